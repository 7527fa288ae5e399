"""Reload hooks: the command a member runs after installing a renewed certificate.

A hook is an absolute path and plain arguments, no shell metacharacters, split on white
space and run without a shell under a timeout. `run_reload_hook` blocks until the command
ends, so callers on an event loop run it in an executor.
"""

from __future__ import annotations

import logging
import os
import subprocess
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
    """Run a validated hook without a shell; never raises for the command's own failure."""
    argv = command.split()
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "KOI_TRAY_HOOK": "1"},
        )
    except subprocess.TimeoutExpired:
        log.warning("reload hook %r did not finish within %g s and was killed", command, timeout)
        return HookResult(command, False, f"timed out after {timeout:g} s")
    except OSError as exc:
        log.warning("reload hook %r could not start: %s", command, exc)
        return HookResult(command, False, str(exc))

    output = (done.stdout + done.stderr).decode("utf-8", "replace").strip()[:MAX_OUTPUT]
    if done.returncode != 0:
        log.warning("reload hook %r exited with %d", command, done.returncode)
    return HookResult(command, done.returncode == 0, output)
