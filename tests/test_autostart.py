"""Tests for start-at-login entries on Linux (XDG), macOS (LaunchAgent) and Windows (Run key).

Every test gives the code a home directory and environment under `tmp_path`; nothing
here reads or writes the real home directory or registry.
"""

from __future__ import annotations

import plistlib
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from koi_tray.autostart import (
    DISABLED,
    DISABLED_BY_USER,
    ENABLED,
    RUN_KEY,
    STARTUP_APPROVED_KEY,
    AutostartError,
    LaunchAgentAutostart,
    RegistryAutostart,
    XdgAutostart,
    autostart_for_platform,
    desktop_entry_keys,
    launch_command,
    parse_desktop_exec,
    windows_command_line,
)

REPO = Path(__file__).resolve().parents[1]
PYTHON = "/opt/koi tray/venv/bin/python"
WINDOWS_PYTHON = r"C:\Program Files\Python311\python.exe"
REG_SZ = 1
REG_BINARY = 3


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def xdg(tmp_path: Path, executable: str = PYTHON, env: dict[str, str] | None = None) -> Any:
    env = {} if env is None else env
    return autostart_for_platform("linux", home=tmp_path / "home", env=env, executable=executable)


def validate(path: Path) -> None:
    """Run the real desktop-file-validate; hints are fine, errors and warnings are not."""
    tool = shutil.which("desktop-file-validate")
    if tool is None:
        pytest.skip("desktop-file-validate is not installed (Debian: desktop-file-utils)")

    result = subprocess.run([tool, str(path)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "error:" not in output and "warning:" not in output, output


def set_key(path: Path, line: str) -> None:
    """Set a key in the entry, replacing an existing one, as GNOME Tweaks or KDE do."""
    key = line.split("=", 1)[0] + "="
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if not x.startswith(key)]
    path.write_text("\n".join([*lines, line]) + "\n", encoding="utf-8")


# Linux and the BSDs


def test_enable_writes_entries_desktop_file_validate_accepts(tmp_path: Path) -> None:
    autostart = xdg(tmp_path)

    autostart.enable(tmp_path / "data dir")

    validate(autostart.entry)
    validate(autostart.application_entry)


def test_entries_name_the_app_and_its_icon(tmp_path: Path) -> None:
    autostart = xdg(tmp_path)

    autostart.enable()

    entry = desktop_entry_keys(autostart.entry.read_text(encoding="utf-8"))
    application = desktop_entry_keys(autostart.application_entry.read_text(encoding="utf-8"))
    for keys in (entry, application):
        assert keys["Name"] == "koi-tray"
        assert keys["Icon"] == "koi-tray"
        assert keys["Categories"] == "Network;Security;"
        assert "certificate mesh" in keys["Comment"]
        assert keys["Exec"] == f'"{PYTHON}" -m koi_tray'
    assert entry["X-GNOME-Autostart-enabled"] == "true"
    assert "X-GNOME-Autostart-enabled" not in application


def test_default_locations_follow_xdg_base_directories(tmp_path: Path) -> None:
    home = tmp_path / "home"
    autostart = xdg(tmp_path, env={"XDG_CONFIG_HOME": "relative/ignored", "XDG_DATA_HOME": ""})

    status = autostart.enable()

    assert status.location == str(home / ".config" / "autostart" / "koi-tray.desktop")
    assert (home / ".local" / "share" / "applications" / "koi-tray.desktop").is_file()
    for size in (32, 64, 128, 256):
        icon = home / ".local/share/icons/hicolor" / f"{size}x{size}" / "apps" / "koi-tray.png"
        with Image.open(icon) as image:
            assert image.size == (size, size)


def test_xdg_environment_overrides_locations(tmp_path: Path) -> None:
    config, data = tmp_path / "cfg", tmp_path / "share"
    env = {"XDG_CONFIG_HOME": str(config), "XDG_DATA_HOME": str(data)}

    xdg(tmp_path, env=env).enable()

    assert (config / "autostart" / "koi-tray.desktop").is_file()
    assert (data / "applications" / "koi-tray.desktop").is_file()
    assert (data / "icons/hicolor/64x64/apps/koi-tray.png").is_file()
    assert not (tmp_path / "home").exists()


def test_enable_status_disable_round_trip_leaves_nothing(tmp_path: Path) -> None:
    autostart = xdg(tmp_path)
    assert autostart.status() == autostart.disable()
    assert autostart.status().state == DISABLED

    first = autostart.enable()
    written = {p: p.read_bytes() for p in files_under(tmp_path / "home")}
    second = autostart.enable()

    assert first == second == autostart.status()
    assert first.state == ENABLED and not first.stale
    assert first.command == f'"{PYTHON}" -m koi_tray'
    assert {p: p.read_bytes() for p in files_under(tmp_path / "home")} == written
    assert len(written) == 6, "autostart entry, application entry and four icons"

    status = autostart.disable()

    assert status.state == DISABLED and status.command is None
    assert autostart.status().state == DISABLED
    assert files_under(tmp_path / "home") == []


@pytest.mark.parametrize("line", ["Hidden=true", "X-GNOME-Autostart-enabled=false"])
def test_user_switch_off_reads_as_disabled_by_user(tmp_path: Path, line: str) -> None:
    autostart = xdg(tmp_path)
    autostart.enable()

    set_key(autostart.entry, line)

    assert autostart.status().state == DISABLED_BY_USER
    assert autostart.enable().state == ENABLED


def test_moved_interpreter_is_stale_until_enable_repairs_it(tmp_path: Path) -> None:
    xdg(tmp_path, executable="/old/venv/bin/python").enable()
    moved = xdg(tmp_path, executable="/new/venv/bin/python")

    before = moved.status()
    repaired = moved.enable()

    assert before.state == ENABLED and before.stale
    assert before.command == '"/old/venv/bin/python" -m koi_tray'
    assert not repaired.stale
    assert repaired.command == '"/new/venv/bin/python" -m koi_tray'


def test_other_data_dir_counts_as_stale(tmp_path: Path) -> None:
    autostart = xdg(tmp_path)

    autostart.enable(Path("/srv/koi"))

    assert not autostart.status(Path("/srv/koi")).stale
    assert autostart.status(Path("/srv/other")).stale
    assert autostart.status().stale


def test_data_dir_with_space_survives_exec_quoting(tmp_path: Path) -> None:
    autostart = xdg(tmp_path)
    data_dir = Path('/srv/koi data/$HOME "quoted" 100%')

    status = autostart.enable(data_dir)

    exec_value = desktop_entry_keys(autostart.entry.read_text(encoding="utf-8"))["Exec"]
    expected = [PYTHON, "-m", "koi_tray", "--data-dir", str(data_dir)]
    assert parse_desktop_exec(exec_value) == expected
    assert not status.stale


def test_glib_launches_the_entry_with_the_intended_argv(tmp_path: Path) -> None:
    gio = shutil.which("gio")
    if gio is None:
        pytest.skip("gio is not installed (Debian: libglib2.0-bin)")
    record = tmp_path / "argv.txt"
    program = tmp_path / "bin dir" / "fake python"
    program.parent.mkdir()
    program.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}.part"\nmv "{record}.part" "{record}"\n'
    )
    program.chmod(0o755)
    autostart = xdg(tmp_path, executable=str(program))

    autostart.enable(tmp_path / "data dir $x")
    subprocess.run([gio, "launch", str(autostart.entry)], check=True, timeout=30)

    deadline = time.monotonic() + 10
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    argv = record.read_text().splitlines()
    assert argv == ["-m", "koi_tray", "--data-dir", str(tmp_path / "data dir $x")]


def test_unwritable_location_raises_autostart_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    autostart = xdg(tmp_path, env={"XDG_CONFIG_HOME": str(blocker)})

    with pytest.raises(AutostartError, match="not-a-dir"):
        autostart.enable()


# Any platform


def test_launch_command_runs_this_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)

    assert launch_command() == [sys.executable, "-m", "koi_tray"]
    assert launch_command(Path("rel dir")) == [
        sys.executable,
        "-m",
        "koi_tray",
        "--data-dir",
        str(tmp_path / "rel dir"),
    ]


def test_platforms_map_to_their_mechanism(tmp_path: Path) -> None:
    home = tmp_path / "home"

    assert isinstance(autostart_for_platform("freebsd14", home=home, env={}), XdgAutostart)
    assert isinstance(autostart_for_platform("darwin", home=home), LaunchAgentAutostart)
    assert isinstance(autostart_for_platform("win32", registry=FakeRegistry()), RegistryAutostart)
    with pytest.raises(AutostartError, match="not supported on emscripten"):
        autostart_for_platform("emscripten", home=home)


def test_module_imports_neither_qt_nor_pillow() -> None:
    script = "import sys, koi_tray.autostart; print(sorted({'PIL', 'PySide6'} & set(sys.modules)))"

    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"


# macOS


def read_plist(autostart: Any) -> dict[str, Any]:
    return plistlib.loads(autostart.plist.read_bytes())


def test_launch_agent_plist_round_trip(tmp_path: Path) -> None:
    autostart = autostart_for_platform("darwin", home=tmp_path, executable=PYTHON)
    plist = tmp_path / "Library" / "LaunchAgents" / "org.koi-tray.agent.plist"

    status = autostart.enable(Path("/Users/me/koi data"))

    assert status.location == str(plist)
    assert status.state == ENABLED and not status.stale
    assert read_plist(autostart) == {
        "Label": "org.koi-tray.agent",
        "ProgramArguments": [PYTHON, "-m", "koi_tray", "--data-dir", "/Users/me/koi data"],
        "RunAtLoad": True,
    }
    assert autostart.disable().state == DISABLED
    assert files_under(tmp_path) == []


def test_launch_agent_disabled_key_reads_as_disabled_by_user(tmp_path: Path) -> None:
    autostart = autostart_for_platform("darwin", home=tmp_path, executable=PYTHON)
    autostart.enable()

    agent = read_plist(autostart)
    autostart.plist.write_bytes(plistlib.dumps({**agent, "Disabled": True}))

    assert autostart.status().state == DISABLED_BY_USER
    assert autostart.enable().state == ENABLED
    assert "Disabled" not in read_plist(autostart)


@pytest.mark.parametrize(
    "content",
    [
        plistlib.dumps({"Label": "org.koi-tray.agent", "ProgramArguments": ["/gone/python"]}),
        b"<plist>half a file",
    ],
    ids=["other-command", "corrupt"],
)
def test_launch_agent_stale_plist_is_repaired(tmp_path: Path, content: bytes) -> None:
    autostart = autostart_for_platform("darwin", home=tmp_path, executable=PYTHON)
    autostart.plist.parent.mkdir(parents=True)
    autostart.plist.write_bytes(content)

    assert autostart.status().stale

    repaired = autostart.enable()

    assert not repaired.stale
    assert read_plist(autostart)["ProgramArguments"] == [PYTHON, "-m", "koi_tray"]


# Windows


class FakeRegistry:
    """Stand-in for HKEY_CURRENT_USER that records every write with its type and value.

    A stand-in is used because no Windows registry exists on Linux, where these tests run;
    the real `WindowsRegistry` only forwards these three calls to `winreg`.
    """

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], tuple[Any, int]] = {}
        self.writes: list[tuple[Any, ...]] = []

    def get_value(self, key: str, name: str) -> tuple[Any, int] | None:
        return self.values.get((key, name))

    def set_value(self, key: str, name: str, kind: int, value: Any) -> None:
        self.writes.append(("set", key, name, kind, value))
        self.values[(key, name)] = (value, kind)

    def delete_value(self, key: str, name: str) -> None:
        self.writes.append(("delete", key, name))
        self.values.pop((key, name), None)


def windows(registry: FakeRegistry, executable: str = WINDOWS_PYTHON) -> Any:
    return autostart_for_platform("win32", registry=registry, executable=executable)


def test_run_key_gets_a_quoted_reg_sz_command(tmp_path: Path) -> None:
    registry = FakeRegistry()

    status = windows(registry).enable(Path(r"C:\x y"))

    command = r'"C:\Program Files\Python311\python.exe" -m koi_tray --data-dir "C:\x y"'
    assert registry.writes[0] == ("set", RUN_KEY, "koi-tray", REG_SZ, command)
    assert RUN_KEY == r"Software\Microsoft\Windows\CurrentVersion\Run"
    assert status.location == r"HKCU\Software\Microsoft\Windows\CurrentVersion\Run"
    assert status.command == command
    assert status.state == ENABLED and not status.stale


def test_pythonw_beside_the_interpreter_is_preferred(tmp_path: Path) -> None:
    for name in ("python.exe", "pythonw.exe"):
        (tmp_path / name).write_bytes(b"")
    registry = FakeRegistry()

    windows(registry, str(tmp_path / "python.exe")).enable()

    assert registry.values[(RUN_KEY, "koi-tray")] == (
        f'"{tmp_path / "pythonw.exe"}" -m koi_tray',
        REG_SZ,
    )


@pytest.mark.parametrize(
    ("first_byte", "state"),
    [(0x03, DISABLED_BY_USER), (0x02, ENABLED), (0x06, ENABLED)],
)
def test_task_manager_switch_is_honoured(first_byte: int, state: str) -> None:
    registry = FakeRegistry()
    autostart = windows(registry)
    autostart.enable()

    approved = bytes([first_byte]) + bytes(11)
    registry.values[(STARTUP_APPROVED_KEY, "koi-tray")] = (approved, REG_BINARY)

    assert autostart.status().state == state


def test_enable_clears_task_manager_switch_and_disable_removes_all() -> None:
    registry = FakeRegistry()
    autostart = windows(registry)
    registry.values[(RUN_KEY, "koi-tray")] = ('"C:\\old\\python.exe" -m koi_tray', REG_SZ)
    registry.values[(STARTUP_APPROVED_KEY, "koi-tray")] = (b"\x03" + bytes(11), REG_BINARY)

    before = autostart.status()
    after = autostart.enable()

    assert before.state == DISABLED_BY_USER and before.stale
    assert after.state == ENABLED and not after.stale
    assert autostart.disable().state == DISABLED
    assert registry.values == {}


def test_windows_quoting_follows_commandlinetoargvw() -> None:
    argv = [r"C:\p\pythonw.exe", "-m", "koi_tray", r"C:\plain", "two words\\", 'say "hi"', ""]

    assert windows_command_line(argv) == (
        r'"C:\p\pythonw.exe" -m koi_tray C:\plain "two words\\" "say \"hi\"" ""'
    )


def test_node_options_round_trip_and_a_moved_interpreter_is_told_apart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    moved = str(tmp_path / "gone" / "python")
    args = ["tray", "--http-bind", "0.0.0.0"]
    autostart = autostart_for_platform("linux", home=home, env={}, executable=sys.executable)

    enabled = autostart.enable(tmp_path / "data", args)
    assert not enabled.stale and not enabled.moved
    assert enabled.program == sys.executable
    assert autostart.status(tmp_path / "data").stale  # the options are part of the command

    autostart_for_platform("linux", home=home, env={}, executable=moved).enable()
    status = autostart.status()
    assert status.stale and status.moved and status.program == moved
