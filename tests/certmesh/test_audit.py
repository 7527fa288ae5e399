"""The audit log: one line per event, and no value can add a field or a line."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from meshtools import join_member

from koi_tray.certmesh import audit
from koi_tray.certmesh.audit import AuditLog
from koi_tray.certmesh.ca import CertificateAuthority
from koi_tray.certmesh.clock import ManualClock

HOSTILE = [
    "a|b",
    "a=b",
    "a | forged=1",
    "line one\nline two",
    "cr\rlf\r\n",
    "tab\there",
    "nul\x00bell\x07esc\x1b[31m",
    "del\x7f c1\x85\x9b",
    "sep\u2028par\u2029",
    "back\\slash",
    "trailing backslash\\",
    "\\|\\=\\n",
    "x\n2026-12-01T09:00:00Z | member_joined | hostname=evil | approved_by=Alice",
    "  padded  ",
    "",
    "lone \ud800 surrogate",
    "ünïcödé ✓ 🐟",
]


def _one_line(log: AuditLog, event: str, **fields: object) -> str:
    before = log.read_text()
    log.record(event, **fields)
    added = log.read_text()[len(before) :]
    assert added.endswith("\n")
    assert added.count("\n") == 1
    assert len(added.splitlines()) == 1
    return added


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_value_stays_one_field_on_one_line(tmp_path: Path, clock, value: str):
    log = AuditLog(tmp_path / "logs" / "certmesh-audit.log", clock)

    line = _one_line(log, "member_revoked", hostname="node-a", reason=value, operator=value)

    stamp, event, fields = audit.parse_line(line)
    assert stamp == "2026-12-01T09:00:00Z"
    assert event == "member_revoked"
    assert fields == {"hostname": "node-a", "reason": value, "operator": value}
    assert not any(ord(c) < 0x20 for c in line[:-1])
    assert log.events() == [(stamp, event, fields)]


@pytest.fixture(scope="module")
def shared_log(tmp_path_factory) -> AuditLog:
    clock = ManualClock(dt.datetime(2026, 12, 1, tzinfo=dt.UTC))
    return AuditLog(tmp_path_factory.mktemp("audit") / "certmesh-audit.log", clock)


@settings(max_examples=300, deadline=None)
@given(
    first=st.text(st.characters(codec=None, exclude_categories=())),
    second=st.text(),
)
@example(first="x ", second=" ")
@example(first="\u3000", second="tail\u00a0")
@example(first="\udfff", second="\\x")
def test_any_text_round_trips_through_one_line(shared_log: AuditLog, first: str, second: str):
    line = _one_line(shared_log, "enroll_failed", detail=first, reason=second, hostname="h")

    _, event, fields = audit.parse_line(line)
    assert event == "enroll_failed"
    assert fields == {"detail": first, "reason": second, "hostname": "h"}


def test_none_values_are_left_out(tmp_path: Path, clock):
    log = AuditLog(tmp_path / "a.log", clock)
    line = _one_line(log, "member_revoked", hostname="node-a", operator=None)
    assert audit.parse_line(line)[2] == {"hostname": "node-a"}


def test_log_is_private_and_append_only(ca: CertificateAuthority, clock: ManualClock):
    first = ca.audit.read_text()
    clock.advance(dt.timedelta(seconds=90))
    join_member(ca, "node-a")

    text = ca.audit.read_text()
    assert text.startswith(first)
    assert text.splitlines()[-1].startswith("2026-12-01T09:01:30Z | member_joined | ")
    assert ca.data.audit_log.stat().st_mode & 0o777 == 0o600
    assert ca.data.audit_log.parent.stat().st_mode & 0o777 == 0o700


def test_revocation_reason_cannot_forge_a_line_through_the_ca(ca: CertificateAuthority):
    join_member(ca, "node-a")
    reason = "bye\n2026-12-01T09:00:00Z | member_joined | hostname=evil | approved_by=Alice"

    ca.revoke("node-a", reason=reason, operator="Mallory | role=admin")

    events = ca.audit.events()
    assert [e for _, e, f in events if f.get("hostname") == "evil"] == []
    _, event, fields = events[-1]
    assert event == "member_revoked"
    assert fields == {"hostname": "node-a", "operator": "Mallory | role=admin", "reason": reason}


def test_koi_written_lines_parse(tmp_path: Path):
    line = (
        "2026-06-20T09:00:00Z | member_revoked | hostname=node-03 | operator=Alice | reason=none\n"
    )
    assert audit.parse_line(line) == (
        "2026-06-20T09:00:00Z",
        "member_revoked",
        {"hostname": "node-03", "operator": "Alice", "reason": "none"},
    )
