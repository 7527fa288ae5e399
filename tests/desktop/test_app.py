"""`run_tray` as a process: icon before the slow imports, signals, a second instance.

Each test starts koi-tray in a subprocess (through `run_tray_driver.py`, or as
`python -m koi_tray` where the command line itself is the point) on Qt's offscreen
platform (no tray host there, so it shows its status window), or with no display at all,
with its log directory under the test's temporary folder.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.member import DEFAULT_HTTP_PORT, DEFAULT_MTLS_PORT
from koi_tray.compose.lock import DataDirLock
from koi_tray.desktop.app import NO_DESKTOP, missing_desktop_session

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "run_tray_driver.py"


def tray_env(tmp_path: Path, platform: str = "offscreen") -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        QT_QPA_PLATFORM=platform,
        XDG_STATE_HOME=str(tmp_path / "state"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        HOME=str(tmp_path / "home"),
        PYTHONUNBUFFERED="1",
    )
    return env


def log_text(tmp_path: Path) -> str:
    path = tmp_path / "state" / "koi-tray" / "log" / "koi-tray.log"
    return path.read_text() if path.exists() else ""


def start(tmp_path: Path, data: Path, backend: str = "qt") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(DRIVER), str(data), "laptop", backend],
        env=tray_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_file(path: Path, process: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"koi-tray exited early: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_in_order_and_exits_zero(tmp_path: Path, signum: int) -> None:
    data = tmp_path / "data"
    process = start(tmp_path, data)
    wait_for_file(DataDir(data).breadcrumb, process)

    process.send_signal(signum)
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    log = log_text(tmp_path)
    assert log.index("status window shown") < log.index("http listening")
    assert log.index("http listening") < log.index("shutting down")
    assert "showing the koi-tray window instead" in log
    assert not DataDir(data).breadcrumb.exists()


def test_a_second_instance_says_so_and_exits_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with DataDirLock(DataDir(data).lock_file):
        result = subprocess.run(
            [sys.executable, str(DRIVER), str(data), "laptop"],
            env=tray_env(tmp_path),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )

    assert result.returncode == 1
    assert result.stderr.strip() == f"koi-tray is already running for {data}"
    assert "PySide6" not in log_text(tmp_path)


def test_the_icon_comes_before_aiohttp_and_the_node() -> None:
    code = (
        "import sys\n"
        "import koi_tray.desktop.app, koi_tray.desktop.controller, koi_tray.desktop.qt_tray\n"
        "import koi_tray.desktop.approval, koi_tray.desktop.status_window\n"
        "print(sorted(m for m in ('aiohttp', 'koi_tray.compose.node') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )

    assert result.stdout.strip() == "[]"


def no_display_env(tmp_path: Path) -> dict[str, str]:
    env = tray_env(tmp_path)
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        env.pop(name, None)
    env["KOI_TRAY_DATA_DIR"] = str(tmp_path / "data")
    return env


@pytest.mark.parametrize("argv", [[], ["tray", "--tray", "pystray"]], ids=["qt", "pystray"])
def test_without_a_display_koi_tray_says_so_and_exits_one(tmp_path: Path, argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "koi_tray", *argv],
        env=no_display_env(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == NO_DESKTOP
    assert NO_DESKTOP in log_text(tmp_path)


def test_koi_tray_with_no_arguments_starts_the_tray(tmp_path: Path) -> None:
    for port in (DEFAULT_HTTP_PORT, DEFAULT_MTLS_PORT):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is in use here; `koi-tray` alone needs it")
    env = tray_env(tmp_path)
    env["KOI_TRAY_DATA_DIR"] = str(tmp_path / "data")
    process = subprocess.Popen(
        [sys.executable, "-m", "koi_tray"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_file(DataDir(tmp_path / "data").breadcrumb, process)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)

    assert process.returncode == 0, stderr
    log = log_text(tmp_path)
    assert "koi-tray (qt) shown" in log
    assert "started (tray)" in log


def test_desktop_session_check() -> None:
    linux = "linux"

    assert missing_desktop_session({}, linux)
    assert missing_desktop_session({"DISPLAY": ""}, "freebsd13")
    assert not missing_desktop_session({"DISPLAY": ":0"}, linux)
    assert not missing_desktop_session({"WAYLAND_DISPLAY": "wayland-0"}, linux)
    assert not missing_desktop_session({"QT_QPA_PLATFORM": "offscreen"}, linux)
    assert not missing_desktop_session({}, "darwin")
    assert not missing_desktop_session({}, "win32")


PYSIDE_SCAN = """
import linecache, os, sys
sys.path.insert(0, sys.argv[1])
import PySide6.QtWidgets
if sys.argv[2] == "skip":
    from koi_tray.desktop.app import skip_pyside_source_cache
    skip_pyside_source_cache()
import mod_uses, mod_plain
marks = sys.modules["shibokensupport.feature"].pyside_feature_dict
cached = sorted(os.path.basename(k) for k in linecache.cache if "mod_" in k)
print(marks["mod_uses"], marks["mod_plain"], *cached)
"""


@pytest.mark.parametrize(
    "mode, expected",
    [("keep", "0 -1 mod_plain.py mod_uses.py"), ("skip", "0 -1")],
    ids=["pyside-default-caches-sources", "tray-keeps-none"],
)
def test_pyside_import_hook_keeps_no_module_sources(tmp_path: Path, mode: str, expected: str):
    (tmp_path / "mod_uses.py").write_text("import PySide6  # a module that uses PySide6\n")
    (tmp_path / "mod_plain.py").write_text("VALUE = 1\n")

    done = subprocess.run(
        [sys.executable, "-c", PYSIDE_SCAN, str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected.split()
