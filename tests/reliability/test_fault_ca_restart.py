"""The CA goes down while a member's renewal is in flight, and comes back on the same data dir.

A real CA node and a joined member talk over loopback HTTP and mTLS. The CA's
`renew_member` is wrapped so the test can stop the node at a chosen instant of a renewal:
before the CA has recorded anything ("right after the request is sent"), or after the
roster is committed but before the answer leaves ("the answer is lost"). The node is shut
down while the request hangs, a new node starts on the same data dir and ports, and the
member's next pass must succeed with a matching key and certificate that the roster knows.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from apitools import PASSPHRASE, join, no_keyring, start_ca

from koi_tray.api.client import HttpCaLink
from koi_tray.certmesh import keystore, pki
from koi_tray.certmesh.clock import SystemClock
from koi_tray.certmesh.errors import StorageError
from koi_tray.certmesh.files import read_json
from koi_tray.certmesh.member import Membership
from koi_tray.certmesh.roster import Roster
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.deciders import deny_and_log_decider
from koi_tray.compose.node import Node
from koi_tray.compose.renewal import member_pass


class HeldRenewal:
    """Wraps a CA's `renew_member` so that one call hangs at `stage` until released.

    `stage` is "before commit" (the CA records nothing, as if the process died on
    arrival) or "after commit" (the roster has the new leaf; the answer never leaves).
    """

    def __init__(self, node: Node, stage: str) -> None:
        self.stage = stage
        self.reached = asyncio.Event()
        self.release = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._real = node.ca.renew_member
        node.ca.renew_member = self._renew

    def _renew(self, *args: object):
        if self.stage == "after commit":
            self._real(*args)
        self._loop.call_soon_threadsafe(self.reached.set)
        self.release.wait(10)
        raise StorageError("this CA process is gone")


async def restart(node: Node) -> Node:
    """Start a new CA node on the data dir and ports of `node` (stopped), and unlock it."""
    config = NodeConfig(
        data_dir=node.config.data_dir,
        hostname=node.config.hostname,
        http_port=node.address("http")[1],
        mtls_port=node.address("mtls")[1],
        mtls_bind="127.0.0.1",
        shutdown_timeout=5.0,
    )
    fresh = Node(config, deny_and_log_decider(), kdf=keystore.FAST_TEST_KDF)
    await fresh.start()
    await fresh.unlock(PASSPHRASE)
    return fresh


def roster_entry(root: Path, hostname: str):
    return Roster.from_json(read_json(root / "certmesh" / "roster.json")).find(hostname)


async def interrupted_pass(ca: Node, membership: Membership, stage: str) -> Node:
    """Run one member pass, stop the CA at `stage` of its renewal, return the restarted CA."""
    held = HeldRenewal(ca, stage)
    link = HttpCaLink(membership)
    renewing = asyncio.create_task(member_pass(membership, link, SystemClock(), force=True))
    await asyncio.wait_for(held.reached.wait(), 10)
    stopping = asyncio.create_task(ca.shutdown())
    result = await asyncio.wait_for(renewing, 10)
    held.release.set()
    await stopping

    assert result.outcome == "failed" and not result.reachable, result
    return await restart(ca)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("stage", "interruptions"),
    [("before commit", 1), ("after commit", 1), ("after commit", 2)],
    ids=["stopped-on-arrival", "answer-lost", "answer-lost-twice"],
)
async def test_member_renews_after_the_ca_restarts_mid_renewal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, interruptions: int
):
    no_keyring(monkeypatch)
    ca = await start_ca(tmp_path / "ca")
    try:
        membership = await join(ca, tmp_path / "member", "node-02")
        installed = membership.leaf().fingerprint
        roster_before = (tmp_path / "ca" / "certmesh" / "roster.json").read_bytes()

        for _ in range(interruptions):
            ca = await interrupted_pass(ca, membership, stage)
            leaf = membership.leaf()  # reads and checks that key and certificate match
            assert leaf.fingerprint == installed, "a failed renewal changed the member"
            entry = roster_entry(tmp_path / "ca", "node-02")
            assert installed in (entry.cert_fingerprint, entry.previous_cert_fingerprint)
        if stage == "before commit":
            assert (tmp_path / "ca" / "certmesh" / "roster.json").read_bytes() == roster_before

        result = await member_pass(membership, HttpCaLink(membership), SystemClock(), True)

        assert result.outcome == "renewed", result
        leaf = membership.leaf()
        assert pki.keys_match(leaf.key, leaf.cert) and leaf.fingerprint != installed
        entry = roster_entry(tmp_path / "ca", "node-02")
        assert entry.cert_fingerprint == leaf.fingerprint
        assert entry.previous_cert_fingerprint == installed
        again = await member_pass(membership, HttpCaLink(membership), SystemClock(), True)
        assert again.outcome == "renewed", "the member renews normally afterwards"
    finally:
        await ca.shutdown()
