"""Reload hooks: what is accepted, and how they run (no shell, bounded in time)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from meshtools import join_member, snapshot

from koi_tray.certmesh.ca import CertificateAuthority
from koi_tray.certmesh.errors import InvalidPayload, NotFound, Revoked
from koi_tray.certmesh.hooks import FORBIDDEN, run_reload_hook, validate_reload_hook


@pytest.mark.parametrize(
    "command",
    [
        "/usr/bin/systemctl restart nginx",
        "/bin/echo hello",
        "/opt/my app/reload.sh",
        "C:\\Windows\\System32\\cmd.exe",
        "\\\\server\\share\\reload.exe",
    ],
)
def test_absolute_plain_commands_are_accepted(command: str):
    assert validate_reload_hook(command) == command


@pytest.mark.parametrize(
    "command",
    ["echo hello", "bin/echo hello", "./reload.sh", "reload.sh", "~/reload.sh", "C:reload.exe"],
)
def test_relative_commands_are_refused(command: str):
    with pytest.raises(InvalidPayload):
        validate_reload_hook(command)


@pytest.mark.parametrize("char", sorted(FORBIDDEN), ids=lambda c: f"{ord(c):#04x}")
def test_shell_metacharacters_are_refused(char: str):
    with pytest.raises(InvalidPayload, match="may not contain"):
        validate_reload_hook(f"/bin/echo a{char}b")


@pytest.mark.parametrize("command", ["", "   ", "\t", None, 42, ["/bin/echo"], "/bin/x" * 300])
def test_empty_odd_or_huge_hooks_are_refused(command: object):
    with pytest.raises(InvalidPayload):
        validate_reload_hook(command)


def test_dollar_home_is_refused_and_never_expanded():
    with pytest.raises(InvalidPayload):
        validate_reload_hook("/bin/echo $HOME")

    result = run_reload_hook("/bin/echo $HOME")
    assert result.success and result.output == "$HOME"


def test_hook_runs_and_reports_its_output():
    result = run_reload_hook(validate_reload_hook("/bin/echo hello"))

    assert result.success is True
    assert result.output == "hello"
    assert result.to_json() == {"success": True, "command": "/bin/echo hello", "output": "hello"}


def test_hook_sees_its_marker_variable():
    assert "KOI_TRAY_HOOK=1" in run_reload_hook("/usr/bin/env").output.splitlines()


def test_slow_hook_is_killed_at_the_timeout():
    started = time.monotonic()
    result = run_reload_hook("/bin/sleep 5", timeout=0.5)
    elapsed = time.monotonic() - started

    assert result.success is False
    assert elapsed < 3
    assert result.output == "timed out after 0.5 s"


def test_a_timed_out_hook_takes_the_processes_it_started_with_it(tmp_path: Path):
    script = tmp_path / "reload.sh"
    pid_file = tmp_path / "child.pid"
    script.write_text(f"#!/bin/sh\n/bin/sleep 30 &\necho $! > {pid_file}\nwait\n")
    script.chmod(0o700)

    result = run_reload_hook(str(script), timeout=0.5)

    assert result.success is False
    child = int(pid_file.read_text())
    for _ in range(100):
        if not _alive(child):
            break
        time.sleep(0.02)
    assert not _alive(child), "the hook's background child outlived the timeout"


def test_a_hook_that_starts_a_service_returns_and_leaves_it_running(tmp_path: Path):
    script = tmp_path / "reload.sh"
    pid_file = tmp_path / "service.pid"
    script.write_text(f"#!/bin/sh\n/bin/sleep 30 &\necho $! > {pid_file}\necho started\n")
    script.chmod(0o700)

    started = time.monotonic()
    result = run_reload_hook(str(script), timeout=5)
    took = time.monotonic() - started

    service = int(pid_file.read_text())
    try:
        assert result.success is True and result.output == "started"
        assert took < 3, "the hook was held up by the service it started"
        assert _alive(service), "the service the hook started was killed"
    finally:
        os.kill(service, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("command", ["/bin/false", "/bin/ls /nonexistent-koi-tray-dir"])
def test_non_zero_exit_is_a_failure(command: str):
    result = run_reload_hook(command)
    assert result.success is False


def test_missing_program_is_a_failure_not_an_exception():
    result = run_reload_hook("/nonexistent/koi-tray-reload")
    assert result.success is False
    assert "No such file" in result.output


def test_ca_set_hook_validates_and_does_not_bump_seq(ca: CertificateAuthority):
    join_member(ca, "node-a")
    seq = ca.roster.seq
    ca.set_hook("node-a", "/usr/bin/systemctl restart nginx")
    assert ca.roster.find("node-a").reload_hook == "/usr/bin/systemctl restart nginx"
    assert ca.roster.seq == seq

    before = snapshot(ca.data)
    with pytest.raises(InvalidPayload):
        ca.set_hook("node-a", "systemctl restart nginx")
    with pytest.raises(NotFound):
        ca.set_hook("node-x", "/bin/true")
    assert snapshot(ca.data).roster == before.roster

    ca.revoke("node-a")
    with pytest.raises(Revoked):
        ca.set_hook("node-a", "/bin/true")
