"""Start koi-tray at login: XDG autostart, macOS LaunchAgents and the Windows Run key.

This module owns the per-user entries that make the desktop session start koi-tray, and
nothing else: it never starts or stops a running koi-tray. Each platform gets one
`Autostart` implementation with the same three operations:

- `enable` writes the entry (and on Linux the application entry and icons that give the
  desktop a name and picture for it). It is idempotent, repairs an entry whose command
  no longer matches this installation (a moved virtualenv, another data dir), and clears
  a "disabled by the user" mark, since calling it is the user asking for autostart.
- `disable` removes everything `enable` wrote. Shared directories stay in place.
- `status` reports `enabled`, `disabled` (no entry) or `disabled_by_user` (an entry the
  user switched off in the desktop's own settings), and whether the command is stale.

The entries start the interpreter that runs this code with `-m koi_tray`, so they keep
working in a virtualenv where no `koi-tray` script is on the session's PATH.

Only the standard library is imported at module level, so the CLI can use this module
without Qt. Writing the Linux icons imports Pillow through `koi_tray.desktop.icons`.
Every deliberate failure raises `AutostartError` with a message fit for the user.
"""

from __future__ import annotations

import abc
import contextlib
import io
import logging
import ntpath
import os
import plistlib
import posixpath
import secrets
import shlex
import sys
import xml.parsers.expat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

logger = logging.getLogger(__name__)

APP_ID = "koi-tray"
MODULE = "koi_tray"
DESKTOP_FILE = f"{APP_ID}.desktop"
ICON_SIZES = (32, 64, 128, 256)
LAUNCH_AGENT_LABEL = "org.koi-tray.agent"

RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"
STARTUP_APPROVED_KEY = r"Software\Microsoft\Windows\CurrentVersion\Explorer\StartupApproved\Run"
REG_SZ = 1
REG_EXPAND_SZ = 2
REG_BINARY = 3

ENABLED = "enabled"
DISABLED = "disabled"
DISABLED_BY_USER = "disabled_by_user"

_XDG_PLATFORMS = ("linux", "freebsd", "openbsd", "netbsd", "dragonfly")
_EXEC_BARE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.,:=+@")
_EXEC_ESCAPED_IN_QUOTES = frozenset('"`$\\')
_STRING_ESCAPES = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_FIELD_CODE_ONLY = frozenset(f"%{c}" for c in "fFuUdDnNickvm")


class AutostartError(Exception):
    """Autostart could not be read or changed; the message says which file or key and why."""


@dataclass(frozen=True)
class AutostartStatus:
    """What the login entry looks like right now.

    Attributes:
        state: `"enabled"`, `"disabled"` (no entry) or `"disabled_by_user"` (an entry the
            user switched off in the desktop's settings).
        command: The command the entry runs, as written there; None without an entry or
            when the entry cannot be parsed.
        location: The entry's file path, or its registry key on Windows.
        stale: The entry exists but differs from what `enable` would write now.
        program: The program the entry starts (the interpreter), when it can be read.
    """

    state: str
    command: str | None
    location: str
    stale: bool
    program: str | None = None

    @property
    def moved(self) -> bool:
        """Tell whether the entry starts a program that no longer exists (a moved venv)."""
        return self.program is not None and not os.path.exists(self.program)


class Registry(Protocol):
    """The three registry operations autostart needs, on keys under HKEY_CURRENT_USER.

    `WindowsRegistry` is the real one; tests pass a stand-in with the same methods.
    """

    def get_value(self, key: str, name: str) -> tuple[Any, int] | None:
        """Return `(value, type)` of `name` under `key`, or None when either is missing."""
        ...

    def set_value(self, key: str, name: str, kind: int, value: Any) -> None:
        """Create `key` if needed and store `value` of registry type `kind` as `name`."""
        ...

    def delete_value(self, key: str, name: str) -> None:
        """Remove `name` from `key`; a missing key or value is not an error."""
        ...


class WindowsRegistry:
    """HKEY_CURRENT_USER through `winreg`, which is imported on first use.

    Errors are the `OSError`s `winreg` raises; `RegistryAutostart` turns them into
    `AutostartError`.
    """

    def get_value(self, key: str, name: str) -> tuple[Any, int] | None:
        """Return `(value, type)` of `name` under `key`, or None when either is missing."""
        winreg = _import_winreg()
        try:
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, key) as handle:
                value, kind = winreg.QueryValueEx(handle, name)
        except FileNotFoundError:
            return None
        return value, kind

    def set_value(self, key: str, name: str, kind: int, value: Any) -> None:
        """Create `key` if needed and store `value` of registry type `kind` as `name`."""
        winreg = _import_winreg()
        with winreg.CreateKeyEx(winreg.HKEY_CURRENT_USER, key, 0, winreg.KEY_SET_VALUE) as handle:
            winreg.SetValueEx(handle, name, 0, kind, value)

    def delete_value(self, key: str, name: str) -> None:
        """Remove `name` from `key`; a missing key or value is not an error."""
        winreg = _import_winreg()
        with contextlib.suppress(FileNotFoundError):
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, key, 0, winreg.KEY_SET_VALUE) as handle:
                winreg.DeleteValue(handle, name)


class Autostart(abc.ABC):
    """One platform's login entry for koi-tray.

    Attributes:
        location: The entry's file path or registry key, for messages and `AutostartStatus`.
    """

    location: str

    def __init__(self, executable: str, paths: ModuleType) -> None:
        self._executable = executable
        self._paths = paths

    @property
    def program(self) -> str:
        """The interpreter the entries start."""
        return self._executable

    def command(self, data_dir: Path | None = None, args: Sequence[str] = ()) -> list[str]:
        """Return the argv `enable(data_dir, args)` would make the session run."""
        return _command(self._executable, data_dir, self._paths, args)

    @abc.abstractmethod
    def enable(self, data_dir: Path | None = None, args: Sequence[str] = ()) -> AutostartStatus:
        """Write the login entry so koi-tray starts at the next login.

        Args:
            data_dir: Passed as `--data-dir` (made absolute); None keeps the default.
            args: More `koi-tray` arguments after `--data-dir`, such as
                `["tray", "--http-bind", "0.0.0.0"]`.

        Raises:
            AutostartError: The entry could not be written.
        """

    @abc.abstractmethod
    def disable(self) -> AutostartStatus:
        """Remove the login entry and whatever else `enable` installed.

        Raises:
            AutostartError: Something `enable` wrote could not be removed.
        """

    @abc.abstractmethod
    def status(self, data_dir: Path | None = None, args: Sequence[str] = ()) -> AutostartStatus:
        """Read the login entry and compare it with what `enable(data_dir, args)` would write.

        Raises:
            AutostartError: The entry exists but could not be read.
        """

    def _status(
        self,
        state: str,
        command: str | None = None,
        stale: bool = False,
        program: str | None = None,
    ) -> AutostartStatus:
        return AutostartStatus(state, command, self.location, stale, program)


class XdgAutostart(Autostart):
    """An XDG autostart entry, for Linux and the BSDs.

    `enable` also installs `koi-tray.desktop` as an application entry and the app icon in
    the user's hicolor theme, so session managers and menus show koi-tray's name and icon.
    Desktop settings switch an autostart entry off by writing `Hidden=true` or, in GNOME's
    tools, `X-GNOME-Autostart-enabled=false` into it; both read as disabled by the user.
    """

    def __init__(self, home: Path, env: Mapping[str, str], executable: str) -> None:
        super().__init__(executable, posixpath)
        config_home = _xdg_base(env, "XDG_CONFIG_HOME", home / ".config")
        data_home = _xdg_base(env, "XDG_DATA_HOME", home / ".local" / "share")

        self.entry = config_home / "autostart" / DESKTOP_FILE
        self.application_entry = data_home / "applications" / DESKTOP_FILE
        self.icons = {
            size: data_home / "icons" / "hicolor" / f"{size}x{size}" / "apps" / f"{APP_ID}.png"
            for size in ICON_SIZES
        }
        self.location = str(self.entry)

    def enable(self, data_dir: Path | None = None, args: Sequence[str] = ()) -> AutostartStatus:
        """Write the application entry, the icons and then the autostart entry."""
        exec_value = desktop_exec(self.command(data_dir, args))
        template = _desktop_template()

        _atomic_write(self.application_entry, _desktop_entry(template, exec_value, False))
        self._write_icons()
        _atomic_write(self.entry, _desktop_entry(template, exec_value, True))

        logger.info("autostart enabled: %s runs %s", self.entry, exec_value)
        return self.status(data_dir, args)

    def disable(self) -> AutostartStatus:
        """Remove the autostart entry, the application entry and the icons."""
        for path in (self.entry, self.application_entry, *self.icons.values()):
            _remove(path)

        logger.info("autostart disabled: removed %s", self.entry)
        return self._status(DISABLED)

    def status(self, data_dir: Path | None = None, args: Sequence[str] = ()) -> AutostartStatus:
        """Read the autostart entry; see the class docstring for "disabled by the user"."""
        text = _read_text(self.entry)
        if text is None:
            return self._status(DISABLED)

        keys = desktop_entry_keys(text)
        switched_off = _is_true(keys.get("Hidden")) or _is_false(
            keys.get("X-GNOME-Autostart-enabled")
        )
        state = DISABLED_BY_USER if switched_off else ENABLED

        exec_value = keys.get("Exec")
        if exec_value is None:
            return self._status(state, None, stale=True)
        command = unescape_desktop_string(exec_value)
        try:
            argv = parse_desktop_exec(exec_value)
        except ValueError:
            return self._status(state, command, stale=True)
        program = argv[0] if argv else None
        return self._status(state, command, argv != self.command(data_dir, args), program)

    def _write_icons(self) -> None:
        try:
            from koi_tray.desktop.icons import render_app_icon
        except ImportError as exc:
            raise AutostartError(f"cannot draw the koi-tray icon: {exc}") from exc

        for size, path in self.icons.items():
            buffer = io.BytesIO()
            render_app_icon(size).save(buffer, format="PNG")
            _atomic_write(path, buffer.getvalue())


class LaunchAgentAutostart(Autostart):
    """A per-user LaunchAgent plist in `~/Library/LaunchAgents`, for macOS.

    The plist is only written, not loaded with `launchctl`: launchd reads it at the next
    login, which is all "start at login" promises, and loading it now would start a second
    koi-tray next to the running one. A plist carrying `Disabled: true` counts as disabled
    by the user. The "Allow in the Background" switch of macOS 13 and later lives in a
    database only `sfltool` and System Settings read, so `status` cannot see it.
    """

    def __init__(self, home: Path, executable: str) -> None:
        super().__init__(executable, posixpath)
        self.plist = home / "Library" / "LaunchAgents" / f"{LAUNCH_AGENT_LABEL}.plist"
        self.location = str(self.plist)

    def enable(self, data_dir: Path | None = None, args: Sequence[str] = ()) -> AutostartStatus:
        """Write the plist with `RunAtLoad` and the current command."""
        agent = {
            "Label": LAUNCH_AGENT_LABEL,
            "ProgramArguments": self.command(data_dir, args),
            "RunAtLoad": True,
        }
        _atomic_write(self.plist, plistlib.dumps(agent, fmt=plistlib.FMT_XML))

        logger.info("autostart enabled: %s", self.plist)
        return self.status(data_dir, args)

    def disable(self) -> AutostartStatus:
        """Remove the plist."""
        _remove(self.plist)

        logger.info("autostart disabled: removed %s", self.plist)
        return self._status(DISABLED)

    def status(self, data_dir: Path | None = None, args: Sequence[str] = ()) -> AutostartStatus:
        """Read the plist and compare its `ProgramArguments` with the current command."""
        if not self.plist.exists():
            return self._status(DISABLED)
        try:
            agent = plistlib.loads(self.plist.read_bytes())
        except OSError as exc:
            raise AutostartError(f"cannot read {self.plist}: {exc.strerror or exc}") from exc
        except (plistlib.InvalidFileException, xml.parsers.expat.ExpatError, ValueError):
            logger.warning(
                "%s is not a valid plist; enable autostart again to repair it", self.plist
            )
            return self._status(ENABLED, None, stale=True)

        state = DISABLED_BY_USER if agent.get("Disabled") is True else ENABLED
        arguments = agent.get("ProgramArguments")
        if not isinstance(arguments, list) or not all(isinstance(a, str) for a in arguments):
            return self._status(state, None, stale=True)
        stale = arguments != self.command(data_dir, args)
        program = arguments[0] if arguments else None
        return self._status(state, shlex.join(arguments), stale, program)


class RegistryAutostart(Autostart):
    """The `koi-tray` value under HKCU's `Run` key, for Windows.

    The command runs `pythonw.exe` from the interpreter's folder when there is one, so no
    console window opens at login. Task Manager's Startup tab switches the entry off by
    writing a binary value of the same name under `StartupApproved\\Run` whose first byte
    is odd; that reads as disabled by the user, and `enable` deletes it.
    """

    def __init__(self, registry: Registry, executable: str) -> None:
        super().__init__(_windowed_python(executable), ntpath)
        self.registry = registry
        self.location = f"HKCU\\{RUN_KEY}"

    def enable(self, data_dir: Path | None = None, args: Sequence[str] = ()) -> AutostartStatus:
        """Store the command line as a REG_SZ value and clear a Task Manager switch-off."""
        command = windows_command_line(self.command(data_dir, args))
        try:
            self.registry.set_value(RUN_KEY, APP_ID, REG_SZ, command)
            self.registry.delete_value(STARTUP_APPROVED_KEY, APP_ID)
        except OSError as exc:
            raise AutostartError(f"cannot write {self.location}\\{APP_ID}: {exc}") from exc

        logger.info("autostart enabled: %s\\%s runs %s", self.location, APP_ID, command)
        return self.status(data_dir, args)

    def disable(self) -> AutostartStatus:
        """Delete the `Run` value and its `StartupApproved` companion."""
        try:
            self.registry.delete_value(RUN_KEY, APP_ID)
            self.registry.delete_value(STARTUP_APPROVED_KEY, APP_ID)
        except OSError as exc:
            raise AutostartError(f"cannot delete {self.location}\\{APP_ID}: {exc}") from exc

        logger.info("autostart disabled: removed %s\\%s", self.location, APP_ID)
        return self._status(DISABLED)

    def status(self, data_dir: Path | None = None, args: Sequence[str] = ()) -> AutostartStatus:
        """Read the `Run` value and Task Manager's switch for it."""
        try:
            run = self.registry.get_value(RUN_KEY, APP_ID)
            approved = self.registry.get_value(STARTUP_APPROVED_KEY, APP_ID)
        except OSError as exc:
            raise AutostartError(f"cannot read {self.location}\\{APP_ID}: {exc}") from exc
        if run is None:
            return self._status(DISABLED)

        value, kind = run
        switched_off = approved is not None and _startup_approved_off(*approved)
        state = DISABLED_BY_USER if switched_off else ENABLED
        if kind not in (REG_SZ, REG_EXPAND_SZ) or not isinstance(value, str):
            return self._status(state, None, stale=True)

        expected = windows_command_line(self.command(data_dir, args))
        return self._status(state, value, value != expected, _windows_program(value))


def launch_command(data_dir: Path | None = None) -> list[str]:
    """Return the argv that starts this koi-tray installation: `python -m koi_tray`.

    Args:
        data_dir: Added as `--data-dir`, made absolute against the current directory;
            None leaves the option out so koi-tray uses its default.

    Raises:
        AutostartError: Python cannot tell which interpreter is running.
    """
    return _command(_current_executable(), data_dir, os.path)


def autostart_for_platform(
    platform: str | None = None,
    *,
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
    registry: Registry | None = None,
    executable: str | None = None,
) -> Autostart:
    """Return the login-entry manager for `platform`.

    Args:
        platform: A `sys.platform` value; None means the running system.
        home: The user's home directory; None means `Path.home()`.
        env: Environment for the XDG base directories; None means `os.environ`.
        registry: The Windows registry to use; None means `WindowsRegistry()`.
        executable: The Python interpreter the entry starts; None means `sys.executable`.

    Raises:
        AutostartError: The platform has no supported autostart mechanism.
    """
    platform = sys.platform if platform is None else platform
    executable = _current_executable() if executable is None else executable

    if platform == "win32":
        return RegistryAutostart(WindowsRegistry() if registry is None else registry, executable)

    home = Path.home() if home is None else home
    if platform == "darwin":
        return LaunchAgentAutostart(home, executable)
    if platform.startswith(_XDG_PLATFORMS):
        return XdgAutostart(home, os.environ if env is None else env, executable)
    raise AutostartError(f"starting koi-tray at login is not supported on {platform}")


def desktop_exec(argv: list[str]) -> str:
    """Encode `argv` as the value of a desktop entry's `Exec` key.

    Arguments made only of letters, digits and `-_.,:=+@` stay bare; all others, paths
    included, are double-quoted with `"`, `` ` ``, `$` and `\\` backslash-escaped, as the
    Desktop Entry spec asks. `%` is doubled so it is not read as a field code, and the
    result is escaped once more as a desktop entry string value.
    """
    words = []
    for arg in argv:
        if arg and set(arg) <= _EXEC_BARE:
            word = arg
        else:
            inner = "".join(f"\\{c}" if c in _EXEC_ESCAPED_IN_QUOTES else c for c in arg)
            word = f'"{inner}"'
        words.append(word.replace("%", "%%"))
    return _escape_desktop_string(" ".join(words))


def parse_desktop_exec(value: str) -> list[str]:
    """Decode the value of an `Exec` key into argv; the inverse of `desktop_exec`.

    Field codes such as `%f` are dropped, since autostart passes no files or URLs.

    Raises:
        ValueError: A quoted argument is not closed.
    """
    text = unescape_desktop_string(value)
    args: list[str] = []
    current: list[str] = []
    in_word = False
    index = 0

    while index < len(text):
        char = text[index]
        if char == '"':
            in_word = True
            index = _read_quoted(text, index + 1, current)
        elif char in " \t":
            if in_word:
                args.append("".join(current))
                current, in_word = [], False
            index += 1
        else:
            current.append(char)
            in_word = True
            index += 1

    if in_word:
        args.append("".join(current))
    return [_expand_field_codes(arg) for arg in args if arg not in _FIELD_CODE_ONLY]


def desktop_entry_keys(text: str) -> dict[str, str]:
    """Return the keys of the `[Desktop Entry]` group; the first of duplicates wins."""
    keys: dict[str, str] = {}
    group = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            group = line[1:-1]
            continue
        if group == "Desktop Entry" and "=" in line:
            key, value = line.split("=", 1)
            keys.setdefault(key.strip(), value.strip())
    return keys


def unescape_desktop_string(value: str) -> str:
    """Undo the desktop entry string escapes `\\s`, `\\n`, `\\t`, `\\r` and `\\\\`."""
    out = []
    index = 0
    while index < len(value):
        char = value[index]
        if char == "\\" and index + 1 < len(value) and value[index + 1] in _STRING_ESCAPES:
            out.append(_STRING_ESCAPES[value[index + 1]])
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


def windows_command_line(argv: list[str]) -> str:
    """Join `argv` into a command line that `CommandLineToArgvW` splits back the same way.

    The program is always quoted. Other arguments are quoted only when they contain
    whitespace or quotes, with backslashes doubled where they precede a quote.

    Raises:
        AutostartError: The program path contains a double quote, which Windows forbids.
    """
    program, *rest = argv
    if '"' in program:
        raise AutostartError(f"the interpreter path {program!r} contains a double quote")
    return " ".join([f'"{program}"', *(_quote_windows_arg(arg) for arg in rest)])


def _command(
    executable: str, data_dir: Path | None, paths: ModuleType, args: Sequence[str] = ()
) -> list[str]:
    argv = [executable, "-m", MODULE]
    if data_dir is not None:
        argv += ["--data-dir", paths.abspath(os.fspath(data_dir))]
    return [*argv, *args]


def _windows_program(command: str) -> str | None:
    """The quoted program at the start of a Run value, as `windows_command_line` writes it."""
    if not command.startswith('"'):
        return None
    end = command.find('"', 1)
    return command[1:end] if end > 1 else None


def _current_executable() -> str:
    if not sys.executable:
        raise AutostartError("cannot tell which Python interpreter runs koi-tray")
    return sys.executable


def _windowed_python(executable: str) -> str:
    """Prefer `pythonw.exe` beside the interpreter so login opens no console window."""
    windowed = Path(executable).with_name("pythonw.exe")
    return str(windowed) if windowed.is_file() else executable


def _import_winreg() -> Any:
    try:
        import winreg
    except ImportError as exc:
        raise AutostartError("the Windows registry is only available on Windows") from exc
    return winreg


def _startup_approved_off(value: Any, kind: int) -> bool:
    """Tell whether Task Manager's `StartupApproved` value says "disabled" (odd first byte)."""
    return kind == REG_BINARY and isinstance(value, bytes) and bool(value) and value[0] & 1 == 1


def _quote_windows_arg(arg: str) -> str:
    if arg and not any(c in arg for c in ' \t\n\v"'):
        return arg
    out = ['"']
    backslashes = 0
    for char in arg:
        if char == "\\":
            backslashes += 1
            continue
        if char == '"':
            out.append("\\" * (2 * backslashes + 1) + '"')
        else:
            out.append("\\" * backslashes + char)
        backslashes = 0
    out.append("\\" * (2 * backslashes) + '"')
    return "".join(out)


def _xdg_base(env: Mapping[str, str], name: str, default: Path) -> Path:
    """Read an XDG base directory; the spec says to ignore empty or relative values."""
    value = env.get(name, "")
    return Path(value) if value and os.path.isabs(value) else default


def _desktop_template() -> str:
    try:
        asset = resources.files("koi_tray").joinpath("assets").joinpath(DESKTOP_FILE)
        return asset.read_text(encoding="utf-8")
    except OSError as exc:
        raise AutostartError(f"the packaged {DESKTOP_FILE} is missing: {exc}") from exc


def _desktop_entry(template: str, exec_value: str, autostart: bool) -> bytes:
    """Fill the packaged entry with this installation's `Exec` line."""
    lines = []
    replaced = False
    for line in template.splitlines():
        if line.startswith("Exec="):
            line, replaced = f"Exec={exec_value}", True
        lines.append(line)
    if not replaced:
        raise AutostartError(f"the packaged {DESKTOP_FILE} has no Exec line")
    if autostart:
        lines.append("X-GNOME-Autostart-enabled=true")
    try:
        return ("\n".join(lines) + "\n").encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AutostartError(f"a desktop entry cannot hold the path in {exec_value!r}") from exc


def _escape_desktop_string(value: str) -> str:
    escapes = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return "".join(escapes.get(c, c) for c in value)


def _read_quoted(text: str, index: int, current: list[str]) -> int:
    """Append a quoted Exec argument starting at `index` to `current`; return the index after."""
    while index < len(text):
        char = text[index]
        if char == '"':
            return index + 1
        if char == "\\" and index + 1 < len(text) and text[index + 1] in _EXEC_ESCAPED_IN_QUOTES:
            current.append(text[index + 1])
            index += 2
        else:
            current.append(char)
            index += 1
    raise ValueError("unterminated quote in Exec value")


def _expand_field_codes(arg: str) -> str:
    out = []
    index = 0
    while index < len(arg):
        if arg[index] == "%" and index + 1 < len(arg):
            if arg[index + 1] == "%":
                out.append("%")
            index += 2
        else:
            out.append(arg[index])
            index += 1
    return "".join(out)


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() == "true"


def _is_false(value: str | None) -> bool:
    return value is not None and value.strip().lower() == "false"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AutostartError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` through a fsynced temporary file in the same directory."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise AutostartError(f"cannot create {path.parent}: {exc.strerror or exc}") from exc

    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(temp, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise AutostartError(f"cannot write {path}: {exc.strerror or exc}") from exc

    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise AutostartError(f"cannot remove {path}: {exc.strerror or exc}") from exc
