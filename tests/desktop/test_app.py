"""`run_tray` as a process: icon before the slow imports, signals, a second instance.

Each test starts koi-tray through `run_tray_driver.py` in a subprocess on Qt's offscreen
platform (no tray host there, so it shows its status window), with its log directory
under the test's temporary folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from koi_tray.certmesh.layout import DataDir
from koi_tray.compose.lock import DataDirLock

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
