"""koi-tray's own management routes and the edges of a node's network setup.

`create` and `local-join` turn a running, unconfigured node into a CA or a member (the
command line uses them while the tray runs); the join answers its confirmation code
before the CA has decided. Also: the member's 4 MiB cap on a trust bundle, seen against
a fake CA that streams more, and a port the OS cannot bind.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from apitools import (
    PASSPHRASE,
    assert_error,
    call,
    http_base,
    invite_code,
    join,
    loopback_config,
    no_keyring,
    raw,
    snapshot,
    start_ca,
)
from cryptography import x509
from test_api_approval import ScriptedDecider

from koi_tray.api.client import MAX_RESPONSE_BYTES, HttpCaLink
from koi_tray.api.manage import ManagementClient
from koi_tray.api.server import TOKEN_HEADER, is_same_machine
from koi_tray.certmesh import keystore, pki
from koi_tray.certmesh.approval import Approved
from koi_tray.certmesh.clock import SystemClock
from koi_tray.certmesh.errors import CertmeshError, InvalidAuth
from koi_tray.certmesh.layout import DataDir
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.deciders import deny_and_log_decider
from koi_tray.compose.lock import is_locked
from koi_tray.compose.node import Node
from koi_tray.compose.renewal import member_pass


def blank_config(root: Path, hostname: str = "fresh-node") -> NodeConfig:
    return loopback_config(root, hostname, shutdown_timeout=5.0)


@pytest_asyncio.fixture
async def blank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Node]:
    """A running node whose data dir holds no mesh yet."""
    no_keyring(monkeypatch)
    node = Node(blank_config(tmp_path / "blank"), deny_and_log_decider())
    node.kdf = keystore.FAST_TEST_KDF
    await node.start()
    try:
        yield node
    finally:
        await node.shutdown()


async def handshake_cn(port: int, ca_pem: Path) -> str:
    """Open TLS to the mTLS port (no client certificate) and name the leaf it presents."""
    context = ssl.create_default_context(cafile=str(ca_pem))
    context.check_hostname = False
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return pki.leaf_common_name(x509.load_der_x509_certificate(der))


@pytest.mark.asyncio
async def test_create_turns_a_running_node_into_a_ca(blank: Node) -> None:
    url = f"{http_base(blank)}/create"
    body = {"passphrase": PASSPHRASE, "preset": "team", "operator": "Alice"}
    assert_error(await raw("POST", url, json.dumps(body)), 401, "unauthorized")
    assert blank.role == "unconfigured"

    status, made = await call("POST", url, {**body, "hostname": "ca-host"}, token=blank.token)
    assert status == 200, made
    assert made["hostname"] == "ca-host" and len(made["ca_fingerprint"]) == 64
    assert blank.role == "ca" and blank.config.hostname == "ca-host"
    ca_pem = blank.data.ca_cert
    assert await handshake_cn(blank.address("mtls")[1], ca_pem) == "ca-host"
    crumb = json.loads(blank.data.breadcrumb.read_text())
    assert crumb["hostname"] == "ca-host" and crumb["mtls_port"] == blank.address("mtls")[1]
    _, koi = await call("GET", f"{http_base(blank)}/status")
    assert koi["requires_approval"] is True and koi["ca_fingerprint"] == made["ca_fingerprint"]

    again = await raw("POST", url, json.dumps(body), token=blank.token)
    assert_error(again, 409, "conflict")


async def read_lines(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    async for line in response.content:
        if line.strip():
            yield json.loads(line)


@pytest.mark.asyncio
async def test_local_join_sends_the_code_before_the_ca_decides(tmp_path: Path, blank: Node) -> None:
    decider = ScriptedDecider()
    ca = await start_ca(tmp_path / "ca", "team", decider)
    try:
        code = await invite_code(ca, "node-02")
        endpoint = http_base(ca).rsplit("/v1/", 1)[0]
        body = {"endpoint": endpoint, "invite": code, "hostname": "node-02"}
        headers = {TOKEN_HEADER: blank.token}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{http_base(blank)}/local-join", json=body, headers=headers) as answer,
        ):
            assert answer.status == 200
            lines = read_lines(answer)
            first = await asyncio.wait_for(anext(lines), 10)
            request = await decider.next_request()  # the CA's person is still deciding
            assert first == {"confirmation_code": request.confirmation_code}
            decider.answer("node-02", Approved("Bob"))
            last = await asyncio.wait_for(anext(lines), 10)
        assert last["joined"]["hostname"] == "node-02"
        assert last["joined"]["ca_fingerprint"] == ca.ca.ca_fingerprint
        assert blank.role == "member" and blank.config.hostname == "node-02"
        assert json.loads(blank.data.breadcrumb.read_text())["hostname"] == "node-02"
        _, status = await call("GET", f"{http_base(blank)}/node-status", token=blank.token)
        assert status["role"] == "member" and status["leaf"]["hostname"] == "node-02"
    finally:
        await ca.shutdown()


@pytest.mark.asyncio
async def test_local_join_refusal_after_the_code_comes_back_typed(
    tmp_path: Path, blank: Node
) -> None:
    ca = await start_ca(tmp_path / "ca")
    try:
        forged = f"{'0' * 48}.{ca.ca.ca_fingerprint}"
        codes: list[str] = []
        client = ManagementClient(DataDir(blank.data.root))
        endpoint = http_base(ca).rsplit("/v1/", 1)[0]
        with pytest.raises(InvalidAuth):
            await client.join(endpoint, forged, "node-02", codes.append)
        assert len(codes) == 1
        assert blank.role == "unconfigured"
        assert not blank.data.member_state.exists()

        with pytest.raises(InvalidAuth, match="not an invite code"):
            await client.join(endpoint, "garbage", "node-02", codes.append)
        assert len(codes) == 1
    finally:
        await ca.shutdown()


@pytest.mark.asyncio
async def test_bundle_over_four_mib_is_refused_and_nothing_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_keyring(monkeypatch)
    ca = await start_ca(tmp_path / "ca")
    try:
        membership = await join(ca, tmp_path / "member", "node-02")
    finally:
        await ca.shutdown()
    sent = 0

    async def huge_bundle(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(headers={"content-type": "application/json"})
        await response.prepare(request)
        chunk = b" " * 65536
        try:
            while sent < 5 * 1024 * 1024:
                await response.write(chunk)
                sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return response

    app = web.Application()
    app.router.add_get("/v1/certmesh/trust-bundle", huge_bundle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        # The member dials the fake where its CA was; member.json itself is not edited.
        membership.state = replace(membership.state, ca_http_port=runner.addresses[0][1])
        before = snapshot(tmp_path / "member")
        result = await member_pass(membership, HttpCaLink(membership), SystemClock(), True)
    finally:
        await runner.cleanup()
    assert result.outcome == "failed"
    assert f"larger than {MAX_RESPONSE_BYTES} bytes" in result.detail
    assert snapshot(tmp_path / "member") == before
    assert sent > MAX_RESPONSE_BYTES


@pytest.mark.asyncio
async def test_an_impossible_port_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_keyring(monkeypatch)
    config = NodeConfig(data_dir=tmp_path / "n", hostname="node-09", http_port=70000)
    node = Node(config, deny_and_log_decider())
    with pytest.raises(CertmeshError, match="cannot listen on 127.0.0.1:70000 for http"):
        await node.start()
    data = DataDir(tmp_path / "n")
    assert not data.breadcrumb.exists() and not data.token_file.exists()
    assert not is_locked(data.lock_file)


def test_only_this_machine_counts_as_local() -> None:
    assert is_same_machine("127.0.0.1", "127.0.0.1")
    assert is_same_machine("127.0.0.1", "0.0.0.0")
    assert is_same_machine("::1", "::")
    assert is_same_machine("::ffff:127.0.0.1", "::")
    assert is_same_machine("192.168.1.20", "192.168.1.20")  # our own LAN address
    assert not is_same_machine("192.168.1.21", "192.168.1.20")
    assert not is_same_machine("192.168.1.21", "0.0.0.0")
    assert not is_same_machine(None, "127.0.0.1")
    assert not is_same_machine("not an address", None)
