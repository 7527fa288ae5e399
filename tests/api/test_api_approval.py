"""Joins that wait for a person, on a real CA node: nothing else waits with them.

The CA runs the "team" preset (every join needs approval) with a scripted async decider
that holds each request until the test answers it. While a join waits, status and
trust-bundle requests and another member's mTLS renewal must be answered promptly.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from apitools import call, http_base, join, no_keyring, start_ca, timed

from koi_tray.api.client import HttpCaLink
from koi_tray.certmesh import pki
from koi_tray.certmesh.approval import ApprovalRequest, Approved, Decision, Denied
from koi_tray.certmesh.clock import SystemClock
from koi_tray.certmesh.errors import ApprovalDenied
from koi_tray.compose.renewal import member_pass

PROMPT = 1.0


class ScriptedDecider:
    """Hands each approval request to the test and waits for the test's answer."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[ApprovalRequest] = asyncio.Queue()
        self._answers: dict[str, asyncio.Future[Decision]] = {}

    async def __call__(self, request: ApprovalRequest) -> Decision:
        answer = asyncio.get_running_loop().create_future()
        self._answers[request.hostname] = answer
        await self.requests.put(request)
        return await answer

    async def next_request(self) -> ApprovalRequest:
        return await asyncio.wait_for(self.requests.get(), 10)

    def answer(self, hostname: str, decision: Decision) -> None:
        self._answers.pop(hostname).set_result(decision)


@pytest.mark.asyncio
async def test_waiting_join_blocks_nothing_and_is_approved_or_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_keyring(monkeypatch)
    decider = ScriptedDecider()
    ca = await start_ca(tmp_path / "ca", "team", decider)
    try:
        # node-01 joins first (approved), so it can renew while node-02 waits.
        first_codes: list[str] = []
        first = asyncio.create_task(join(ca, tmp_path / "m1", "node-01", first_codes))
        request = await decider.next_request()
        assert request.hostname == "node-01"
        decider.answer("node-01", Approved("Bob"))
        member = await asyncio.wait_for(first, 10)
        assert request.confirmation_code == first_codes[0]

        codes: list[str] = []
        waiting = asyncio.create_task(join(ca, tmp_path / "m2", "node-02", codes))
        request = await decider.next_request()
        assert request.hostname == "node-02"
        assert request.peer_address == "127.0.0.1"
        assert request.sans == ("node-02", "node-02.local")
        assert request.confirmation_code == codes[0]

        base = http_base(ca)
        probes = [call("GET", f"{base}/status") for _ in range(6)]
        probes += [call("GET", f"{base}/trust-bundle") for _ in range(6)]
        results = await asyncio.gather(*(timed(probe) for probe in probes))
        for took, (status, body) in results:
            assert status == 200, body
            assert took < PROMPT, f"answered in {took:.2f} s while a join waited"
        assert all("node-02" not in str(body) for _, (_, body) in results)

        status, node = await call("GET", f"{base}/node-status", token=ca.token)
        assert status == 200
        assert [p["hostname"] for p in node["pending"]] == ["node-02"]
        assert node["pending"][0]["confirmation_code"] == codes[0]

        old_fp = member.leaf().fingerprint
        took, result = await timed(
            member_pass(member, HttpCaLink(member), SystemClock(), force=True)
        )
        assert result.outcome == "renewed", result.detail
        assert took < PROMPT
        assert member.leaf().fingerprint != old_fp
        assert not waiting.done()

        decider.answer("node-02", Approved("Carol"))
        joined = await asyncio.wait_for(waiting, 10)
        assert joined.state.hostname == "node-02"
        enrolled = ca.ca.roster.find("node-02")
        assert enrolled is not None and enrolled.enrolled_by == "Carol"

        denied = asyncio.create_task(join(ca, tmp_path / "m3", "node-03"))
        assert (await decider.next_request()).hostname == "node-03"
        decider.answer("node-03", Denied("not today"))
        with pytest.raises(ApprovalDenied, match="not today"):
            await asyncio.wait_for(denied, 10)
        assert ca.ca.roster.find("node-03") is None
        assert not (tmp_path / "m3" / "certmesh" / "member.json").exists()
        assert [i.hostname for i in ca.ca.invites.outstanding()] == ["node-03"]

        events = [(event, fields) for _, event, fields in ca.ca.audit.events()]
        joined_by = {f["hostname"]: f.get("approved_by") for e, f in events if e == "member_joined"}
        assert joined_by["node-01"] == "Bob" and joined_by["node-02"] == "Carol"
        assert ("enroll_approval_denied", "node-03") in {(e, f.get("hostname")) for e, f in events}
        assert pki.fingerprint(member.leaf().cert) == ca.ca.roster.find("node-01").cert_fingerprint
    finally:
        await ca.shutdown()


@pytest.mark.asyncio
async def test_shutdown_denies_a_waiting_join(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_keyring(monkeypatch)
    decider = ScriptedDecider()
    ca = await start_ca(tmp_path / "ca", "team", decider)
    try:
        waiting = asyncio.create_task(join(ca, tmp_path / "m", "node-02"))
        await decider.next_request()
    finally:
        await ca.shutdown()
    with pytest.raises(Exception) as refused:
        await asyncio.wait_for(waiting, 10)
    assert getattr(refused.value, "code", None) in ("approval_denied", "ca_unreachable")
    assert not (tmp_path / "m" / "certmesh" / "member.json").exists()
    events = [(event, fields.get("hostname")) for _, event, fields in ca.ca.audit.events()]
    assert ("enroll_approval_denied", "node-02") in events
