"""Reload hooks: the command a member runs after installing a renewed certificate.

A hook is an absolute path and plain arguments, no shell metacharacters, split on white
space and run without a shell under a timeout. `run_reload_hook` blocks until the command
ends, so callers on an event loop run it in an executor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass

from koi_tray.certmesh.errors import InvalidPayload

log = logging.getLogger(__name__)

FORBIDDEN = set(";|&$`><()\n\r\0*?[]{}~%!")
DEFAULT_TIMEOUT = 60.0
MAX_OUTPUT = 4096


def validate_reload_hook(command: object) -> str:
    """Return `command` if it is an absolute program path with plain arguments.

    Raises:
        InvalidPayload: Empty, relative, too long, or holding a shell metacharacter.
    """
    if not isinstance(command, str) or not command.strip():
        raise InvalidPayload("reload hook must be a non-empty string")
    if len(command) > 1024:
        raise InvalidPayload("reload hook is longer than 1024 characters")
    bad = sorted(FORBIDDEN.intersection(command))
    if bad:
        raise InvalidPayload(f"reload hook may not contain {''.join(bad)!r}")

    program = command.split()[0]
    drive_absolute = len(program) > 3 and program[1] == ":" and program[2] in "\\/"
    windows_absolute = drive_absolute or program.startswith("\\\\")
    if not (program.startswith("/") or windows_absolute):
        raise InvalidPayload(f"reload hook must start with an absolute path, got {program!r}")
    return command


@dataclass(frozen=True)
class HookResult:
    command: str
    success: bool
    output: str = ""

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"success": self.success, "command": self.command}
        if self.output:
            out["output"] = self.output
        return out


def run_reload_hook(command: str, timeout: float = DEFAULT_TIMEOUT) -> HookResult:
    """Run a validated hook without a shell; never raises for the command's own failure.

    Its output goes to a temporary file, not a pipe, so a service the hook starts in the
    background (and which inherits the output) neither makes the hook look hung nor is
    killed with it. Only a hook still running at the timeout is killed, with whatever it
    started in its own session.
    """
    argv = command.split()
    with tempfile.TemporaryFile() as output:
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "KOI_TRAY_HOOK": "1"},
                start_new_session=os.name == "posix",
            )
        except OSError as exc:
            log.warning("reload hook %r could not start: %s", command, exc)
            return HookResult(command, False, str(exc))

        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_hook(process)
            log.warning("reload hook %r did not finish within %g s; killed", command, timeout)
            return HookResult(command, False, f"timed out after {timeout:g} s")

        output.seek(0)
        text = output.read(MAX_OUTPUT * 4).decode("utf-8", "replace").strip()[:MAX_OUTPUT]
    if process.returncode != 0:
        log.warning("reload hook %r exited with %d", command, process.returncode)
    return HookResult(command, process.returncode == 0, text)


def _kill_hook(process: subprocess.Popen[bytes]) -> None:
    """Kill a hung hook and, on POSIX, every process still in its session."""
    if os.name == "posix":
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    else:
        process.kill()
    process.wait()
