"""Fifty joins that need approval, all at once, over real HTTP on loopback.

A "team" CA node gets fifty joins at the same moment, each with its own invite. A person
(the decider) approves, denies or ignores each one after a random pause, so decisions
arrive in random order, and an ignored join runs into its deadline (cut to one second).
Past sixteen pending joins the CA answers `429 rate_limited`; those clients retry after
a random pause, as a joining host would.

Afterwards the roster, `invites.json`, every roster write and the audit log must agree
with the plan exactly: the approved hosts are enrolled with the certificate their client
received, only their invites are spent, each commit wrote a higher seq, and each join has
exactly one outcome line.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from apitools import OPERATOR, PASSPHRASE, http_base, member_csr, no_keyring
from reltools import audit_line_problem

from koi_tray.api.server import TOKEN_HEADER
from koi_tray.certmesh import audit, keystore, pki, rosterstore
from koi_tray.certmesh.approval import ApprovalRequest, Approved, Decision, Denied
from koi_tray.certmesh.ca import MAX_PENDING_APPROVALS
from koi_tray.certmesh.invites import InviteBook
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.node import Node

JOINS = 50
OUTCOME_EVENTS = {
    "approve": "member_joined",
    "deny": "enroll_approval_denied",
    "timeout": "enroll_approval_timeout",
}
ANSWERS = {
    "approve": (200, None),
    "deny": (403, "approval_denied"),
    "timeout": (504, "approval_timeout"),
}


class Person:
    """Decides each join as planned, after a random pause; counts what it was asked."""

    def __init__(self, plan: dict[str, str], rng: random.Random) -> None:
        self.plan = plan
        self.rng = rng
        self.asked: Counter[str] = Counter()
        self.order: list[str] = []

    async def __call__(self, request: ApprovalRequest) -> Decision:
        self.asked[request.hostname] += 1
        choice = self.plan[request.hostname]
        await asyncio.sleep(self.rng.uniform(0.0, 0.25) if choice != "timeout" else 5.0)
        self.order.append(request.hostname)
        return Approved(OPERATOR) if choice == "approve" else Denied("not this one")


async def join_until_decided(
    session: aiohttp.ClientSession, base: str, hostname: str, code: str, rng: random.Random
) -> tuple[int, dict[str, Any], Any, int]:
    """POST the join, retrying `429`s; return (status, body, key, number of 429s)."""
    key, csr = member_csr(hostname)
    limited = 0
    while True:
        body = {"hostname": hostname, "csr": csr, "invite_token": code}
        async with session.post(f"{base}/join", json=body) as response:
            answer = await response.json()
        if response.status != 429:
            return response.status, answer, key, limited
        assert answer["error"] == "rate_limited", answer
        limited += 1
        assert limited < 500, f"{hostname} was rate-limited forever"
        await asyncio.sleep(rng.uniform(0.05, 0.25))


async def sample_status(session: aiohttp.ClientSession, base: str, seqs: list[int]) -> None:
    while True:
        async with session.get(f"{base}/status") as response:
            seqs.append((await response.json())["seq"])
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_fifty_joins_at_once_end_exactly_as_decided(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    no_keyring(monkeypatch)
    monkeypatch.setattr("koi_tray.certmesh.ca.APPROVAL_TIMEOUT", dt.timedelta(seconds=1))
    written: list[int] = []
    real_write = rosterstore.atomic_write

    def recording_write(path: Path, data: bytes, *args: Any) -> None:
        real_write(path, data, *args)
        written.append(json.loads(data)["metadata"]["seq"])

    monkeypatch.setattr(rosterstore, "atomic_write", recording_write)
    rng = random.Random(50)
    hosts = [f"node-{n:02d}" for n in range(1, JOINS + 1)]
    plan = {host: rng.choice(["approve", "deny", "timeout"]) for host in hosts}
    person = Person(plan, rng)
    config = NodeConfig(
        data_dir=tmp_path / "ca",
        hostname="ca-host",
        http_port=0,
        mtls_port=0,
        mtls_bind="127.0.0.1",
        max_concurrent_approvals=MAX_PENDING_APPROVALS,
    )
    node = Node(config, person, kdf=keystore.FAST_TEST_KDF)
    await node.start()
    try:
        await node.create_ca(PASSPHRASE, "team", OPERATOR)
        base = http_base(node)
        start_seq, writes_before = node.ca.roster.seq, len(written)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            codes = {}
            for host in hosts:
                async with session.post(
                    f"{base}/invite", json={"hostname": host}, headers={TOKEN_HEADER: node.token}
                ) as response:
                    codes[host] = (await response.json())["token"]
            seqs: list[int] = []
            sampler = asyncio.create_task(sample_status(session, base, seqs))
            answers = await asyncio.gather(
                *(
                    join_until_decided(session, base, host, codes[host], random.Random(host))
                    for host in hosts
                )
            )
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        results = dict(zip(hosts, answers, strict=True))
        pending = node.ca.pending_approvals()
        roster = node.ca.roster
    finally:
        await node.shutdown()

    approved = {host for host, choice in plan.items() if choice == "approve"}
    assert 10 <= len(approved) <= 40 and set(plan.values()) == set(ANSWERS)
    for host, (status, body, key, _) in results.items():
        expected_status, expected_code = ANSWERS[plan[host]]
        assert status == expected_status, (host, plan[host], status, body)
        if expected_code:
            assert body["error"] == expected_code, (host, body)
        else:
            cert = pki.load_cert_pem(body["service_cert"])
            assert pki.keys_match(key, cert)
            assert roster.find(host).cert_fingerprint == pki.fingerprint(cert)
    limited = sum(result[3] for result in results.values())
    assert limited > 0, "fifty joins at once should meet the pending bound"
    assert person.asked == Counter(hosts), "every join reaches the person exactly once"
    assert pending == []

    enrolled = {m.hostname for m in roster.active_members} - {"ca-host"}
    assert enrolled == approved
    invites = InviteBook(tmp_path / "ca" / "certmesh" / "invites.json", node.clock)._load()
    assert {i.hostname for i in invites if i.used} == approved
    assert {i.hostname for i in invites if not i.used} == set(hosts) - approved

    commits = written[writes_before:]
    assert commits == sorted(set(commits)), f"seq did not rise with every write: {commits}"
    assert roster.seq == start_seq + len(approved) == commits[-1]
    assert seqs == sorted(seqs) and seqs, "status never showed the seq going back"

    lines = (tmp_path / "ca" / "logs" / "certmesh-audit.log").read_text().splitlines(True)
    for line in lines:
        assert audit_line_problem(line, {audit.parse_line(line)[1]}) is None, line
    events = [audit.parse_line(line)[1:] for line in lines]
    outcomes = Counter(
        (fields["hostname"], event) for event, fields in events if event in OUTCOME_EVENTS.values()
    )
    assert outcomes == Counter((host, OUTCOME_EVENTS[plan[host]]) for host in hosts)
    rate_limited = [
        fields["hostname"] for event, fields in events if event == "enroll_rate_limited"
    ]
    assert len(rate_limited) == limited
    assert sorted(person.order) == sorted(host for host in hosts if plan[host] != "timeout")
