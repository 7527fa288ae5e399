"""The node as hosts run it: parity between hosts, approvals through the pump, shutdown."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import aiohttp
import pytest
from koitest import loopback_config

from koi_tray.api.client import fetch_json
from koi_tray.certmesh import keystore
from koi_tray.certmesh.approval import Approved
from koi_tray.certmesh.ca import PRESETS, CertificateAuthority
from koi_tray.certmesh.errors import ApprovalDenied, ApprovalTimeout, ShuttingDown
from koi_tray.certmesh.layout import DataDir
from koi_tray.compose import hosts
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.deciders import deny_and_log_decider
from koi_tray.compose.lock import NodeAlreadyRunning
from koi_tray.compose.node import KoiNode, Node

PASSPHRASE = "correct horse battery"


def config_for(tmp_path, name="ca-host", kind="embedded") -> NodeConfig:
    return loopback_config(tmp_path / name, name, host_kind=kind)


async def make_ca_node(tmp_path, decider, preset="team") -> Node:
    node = Node(config_for(tmp_path), decider, kdf=keystore.FAST_TEST_KDF)
    await node.start()
    await node.create_ca("correct horse battery", preset, "Alice")
    return node


async def join_member(tmp_path, ca_node: Node, name="node-02") -> Node:
    member = Node(config_for(tmp_path, name), deny_and_log_decider())
    await member.start()
    invite = ca_node.ca.mint_invite(name)
    port = ca_node.address("http")[1]
    await member.join_mesh(f"http://127.0.0.1:{port}", invite.code, lambda code: None)
    return member


async def _describe_serve_host(config: NodeConfig) -> dict[str, list[str]]:
    started: list[Node] = []
    serving = asyncio.create_task(
        hosts.serve(config, deny_and_log_decider(), PASSPHRASE, on_started=started.append)
    )
    while not started:
        await asyncio.sleep(0.01)
    description = started[0].describe()
    await started[0].shutdown()
    assert await serving == 0
    return description


async def _describe_embedded_host(config: NodeConfig) -> dict[str, list[str]]:
    async with KoiNode(config, decider=deny_and_log_decider()) as node:
        await node.unlock(PASSPHRASE)
        return node.describe()


@pytest.mark.asyncio
async def test_serve_and_embedded_hosts_start_the_same_servers_and_tasks(tmp_path):
    descriptions = {}
    for kind, describe in (("serve", _describe_serve_host), ("embedded", _describe_embedded_host)):
        config = config_for(tmp_path / kind, kind=kind)
        CertificateAuthority.create(
            DataDir(config.data_dir),
            "ca-host",
            PASSPHRASE,
            PRESETS["just-me"],
            "Alice",
            kdf=keystore.FAST_TEST_KDF,
        )
        descriptions[kind] = await describe(config)

    assert descriptions["serve"] == descriptions["embedded"]
    assert descriptions["serve"] == {
        "servers": ["http", "mtls"],
        "tasks": ["approval-pump", "renewal-loop"],
    }


@pytest.mark.asyncio
async def test_an_unconfigured_node_serves_http_only(tmp_path):
    async with KoiNode(config_for(tmp_path), decider=deny_and_log_decider()) as node:
        assert node.describe()["servers"] == ["http"]
        assert node.status.snapshot.health == "idle"
        status = await fetch_json(
            "GET", f"http://127.0.0.1:{node.address('http')[1]}/v1/certmesh/status"
        )
        assert status["ca_initialized"] is False


@pytest.mark.asyncio
async def test_second_node_on_the_same_data_dir_is_refused(tmp_path):
    async with KoiNode(config_for(tmp_path), decider=deny_and_log_decider()):
        second = Node(config_for(tmp_path), deny_and_log_decider())
        with pytest.raises(NodeAlreadyRunning, match="already running"):
            await second.start()


@pytest.mark.asyncio
async def test_shutdown_denies_pending_approvals_and_is_idempotent(tmp_path):
    asked = asyncio.Event()

    async def slow_person(request):
        asked.set()
        await asyncio.Event().wait()

    ca_node = await make_ca_node(tmp_path, slow_person)
    member = Node(config_for(tmp_path, "node-02"), deny_and_log_decider())
    await member.start()
    invite = ca_node.ca.mint_invite("node-02")
    port = ca_node.address("http")[1]
    joining = asyncio.create_task(
        member.join_mesh(f"http://127.0.0.1:{port}", invite.code, lambda code: None)
    )
    await asyncio.wait_for(asked.wait(), 5)
    assert len(ca_node.status.snapshot.pending) == 1

    await asyncio.gather(ca_node.shutdown(), ca_node.shutdown())
    await ca_node.shutdown()

    with pytest.raises(ApprovalDenied):
        await joining
    events = [line for line in ca_node.ca.audit.read_text().splitlines() if "node-02" in line]
    assert "enroll_approval_denied" in events[-1] and "shutting down" in events[-1]
    assert not ca_node.data.breadcrumb.exists() and not ca_node.data.token_file.exists()
    assert ca_node.describe() == {"servers": [], "tasks": ["approval-pump", "renewal-loop"]}
    assert all(task.done() for task in ca_node._tasks.values())
    await member.shutdown()


@pytest.mark.asyncio
async def test_approval_deadline_refuses_the_join_and_the_invite_stays_usable(
    tmp_path, monkeypatch
):
    monkeypatch.setattr("koi_tray.certmesh.ca.APPROVAL_TIMEOUT", dt.timedelta(seconds=0.3))
    answers = iter(["hang", "approve"])

    async def person(request):
        if next(answers) == "hang":
            await asyncio.Event().wait()
        return Approved("Alice")

    ca_node = await make_ca_node(tmp_path, person)
    member = Node(config_for(tmp_path, "node-02"), deny_and_log_decider())
    await member.start()
    invite = ca_node.ca.mint_invite("node-02")
    url = f"http://127.0.0.1:{ca_node.address('http')[1]}"

    with pytest.raises(ApprovalTimeout):
        await member.join_mesh(url, invite.code, lambda code: None)
    assert ca_node.status.snapshot.pending == ()

    await member.join_mesh(url, invite.code, lambda code: None)
    assert ca_node.ca.roster.find("node-02").enrolled_by == "Alice"
    assert member.status.snapshot.role == "member"
    await member.shutdown()
    await ca_node.shutdown()


@pytest.mark.asyncio
async def test_snapshots_describe_the_ca_and_the_member(tmp_path):
    ca_node = await make_ca_node(tmp_path, deny_and_log_decider(), preset="just-me")
    member = await join_member(tmp_path, ca_node)
    seen = []
    member.status.subscribe(lambda new, old: seen.append(new))

    result = await member.renew_now(force=True)
    await asyncio.sleep(0.1)

    snap = member.status.snapshot
    assert result["outcome"] == "renewed"
    assert snap.role == "member" and snap.health == "ok"
    assert snap.mesh_fingerprint == ca_node.ca.ca_fingerprint
    assert snap.leaf.fingerprint == member.membership.leaf().fingerprint
    assert snap.leaf.days_left == 89
    assert snap.renewal.last_renewed_at.isoformat() == result["checked_at"]
    assert snap.renewal.last_outcome in ("renewed", "not_due")
    assert snap.renewal.consecutive_failures == 0
    assert snap.bundle.seq == ca_node.ca.roster.seq
    assert seen and seen[-1].leaf.fingerprint == snap.leaf.fingerprint

    ca_snap = ca_node.status.refresh()
    assert ca_snap.role == "ca" and not ca_snap.ca.locked
    assert [m.hostname for m in ca_snap.ca.members] == ["ca-host", "node-02"]
    assert {c.name for c in ca_snap.capabilities} >= {"certmesh", "http", "mtls", "renewal"}
    assert (
        json.loads(json.dumps(ca_snap.to_json()))["ca"]["fingerprint"] == ca_node.ca.ca_fingerprint
    )

    await ca_node.shutdown()
    failed = await member.renew_now(force=True)
    snap = member.status.snapshot
    assert failed["outcome"] == "failed" and "unreachable" in failed["detail"]
    assert snap.renewal.consecutive_failures == 1
    assert snap.health == "offline"
    await member.shutdown()


@pytest.mark.asyncio
async def test_the_ca_keeps_serving_while_a_join_waits_for_a_person(tmp_path):
    asked = asyncio.Event()
    decide = asyncio.get_running_loop().create_future()

    async def person(request):
        asked.set()
        return await decide

    ca_node = await make_ca_node(tmp_path, person)
    member = Node(config_for(tmp_path, "node-02"), deny_and_log_decider())
    await member.start()
    invite = ca_node.ca.mint_invite("node-02")
    url = f"http://127.0.0.1:{ca_node.address('http')[1]}"
    joining = asyncio.create_task(member.join_mesh(url, invite.code, lambda code: None))
    await asyncio.wait_for(asked.wait(), 5)

    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        for path in ("status", "trust-bundle"):
            began = loop.time()
            async with session.get(f"{url}/v1/certmesh/{path}") as response:
                assert response.status == 200
            assert loop.time() - began < 1.0

    decide.set_result(Approved("Alice"))
    await joining
    await member.shutdown()
    await ca_node.shutdown()


async def _server_leaf_fingerprint(node: Node) -> str:
    """Handshake with the mTLS port and return the fingerprint of the leaf it presents."""
    from cryptography import x509

    from koi_tray.api.client import member_client_context
    from koi_tray.certmesh import pki

    context = member_client_context(node.ca.leaf_store)
    host, port = node.address("mtls")
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return pki.fingerprint(x509.load_der_x509_certificate(der))


@pytest.mark.asyncio
async def test_the_mtls_port_presents_the_renewed_ca_leaf_without_a_restart(tmp_path):
    ca_node = await make_ca_node(tmp_path, deny_and_log_decider(), preset="just-me")
    before = await _server_leaf_fingerprint(ca_node)
    assert before == ca_node.ca.leaf_store.read().fingerprint

    result = await ca_node.renew_now(force=True)

    after = await _server_leaf_fingerprint(ca_node)
    assert result["outcome"] == "renewed"
    assert after != before
    assert after == ca_node.ca.leaf_store.read().fingerprint
    assert ca_node.ca.roster.find("ca-host").cert_fingerprint == after
    await ca_node.shutdown()


@pytest.mark.asyncio
async def test_a_joiner_hanging_up_cancels_its_approval_and_keeps_the_invite(tmp_path):
    from koitest import member_csr

    asked = asyncio.Event()
    withdrawn = asyncio.Event()

    async def person(request):
        asked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            withdrawn.set()
            raise

    ca_node = await make_ca_node(tmp_path, person)
    invite = ca_node.ca.mint_invite("node-02")
    _, csr = member_csr("node-02")
    url = f"http://127.0.0.1:{ca_node.address('http')[1]}/v1/certmesh/join"
    body = {"hostname": "node-02", "csr": csr, "invite_token": invite.code}

    async with aiohttp.ClientSession() as session:
        posting = asyncio.create_task(session.post(url, json=body))
        await asyncio.wait_for(asked.wait(), 5)
        posting.cancel()
        await asyncio.gather(posting, return_exceptions=True)
    await asyncio.wait_for(withdrawn.wait(), 5)
    for _ in range(250):  # the refusal is written on a worker thread, just after
        if ca_node.ca.audit.events()[-1][1] != "invite_minted":
            break
        await asyncio.sleep(0.02)

    last = ca_node.ca.audit.events()[-1]
    assert last[1] == "enroll_approval_denied" and "hung up" in last[2]["detail"]
    assert ca_node.status.refresh().pending == ()
    assert ca_node.ca.roster.find("node-02") is None
    assert ca_node.ca.invites.reserve(invite.code, "node-02")
    await ca_node.shutdown()


@pytest.mark.asyncio
async def test_a_node_takes_one_role_when_asked_twice_at_once(tmp_path):
    ca_node = await make_ca_node(tmp_path, deny_and_log_decider(), preset="just-me")
    node = Node(config_for(tmp_path, "node-02"), deny_and_log_decider(), kdf=keystore.FAST_TEST_KDF)
    await node.start()
    invite = ca_node.ca.mint_invite("node-02")
    url = f"http://127.0.0.1:{ca_node.address('http')[1]}"
    try:
        outcomes = await asyncio.gather(
            node.create_ca("correct horse battery", "just-me", "Alice"),
            node.join_mesh(url, invite.code, lambda code: None),
            return_exceptions=True,
        )

        refused = [o for o in outcomes if isinstance(o, Exception)]
        assert len(refused) == 1 and getattr(refused[0], "code", None) == "conflict", outcomes
        assert node.role == "ca"
        assert not node.data.member_state.exists(), "a CA's data dir also became a member"
        assert not ca_node.ca.roster.is_enrolled("node-02")
    finally:
        await node.shutdown()
        await ca_node.shutdown()


@pytest.mark.asyncio
async def test_a_create_whose_caller_gives_up_still_makes_the_node_a_ca(tmp_path):
    node = Node(config_for(tmp_path), deny_and_log_decider(), kdf=keystore.FAST_TEST_KDF)
    await node.start()
    try:
        caller = asyncio.ensure_future(node.create_ca("correct horse battery", "team", "Alice"))
        await asyncio.sleep(0.01)
        caller.cancel()  # the HTTP client hung up, or Ctrl-C in the CLI
        with pytest.raises(asyncio.CancelledError):
            await caller

        for _ in range(200):
            if node.role == "ca" and "mtls" in node.describe()["servers"]:
                break
            await asyncio.sleep(0.02)
        assert node.role == "ca"
        assert "mtls" in node.describe()["servers"]
    finally:
        await node.shutdown()


@pytest.mark.asyncio
async def test_shutdown_stops_a_join_still_waiting_for_its_ca(tmp_path):
    asked = asyncio.Event()

    async def never_decides(request):
        asked.set()
        await asyncio.Event().wait()

    ca_node = await make_ca_node(tmp_path, never_decides, preset="team")
    member = Node(config_for(tmp_path, "node-02"), deny_and_log_decider())
    await member.start()
    invite = ca_node.ca.mint_invite("node-02")
    url = f"http://127.0.0.1:{ca_node.address('http')[1]}"
    try:
        joining = asyncio.ensure_future(member.join_mesh(url, invite.code, lambda code: None))
        await asyncio.wait_for(asked.wait(), 10)

        began = asyncio.get_running_loop().time()
        await member.shutdown()
        took = asyncio.get_running_loop().time() - began

        with pytest.raises(asyncio.CancelledError):
            await joining
        assert took < 5, f"shutdown waited {took:.1f} s for the join"
        assert not member.data.member_state.exists()
        with pytest.raises(ShuttingDown):
            await member.join_mesh(url, invite.code, lambda code: None)
    finally:
        await member.shutdown()
        await ca_node.shutdown()
