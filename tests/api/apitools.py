"""Helpers for the API tests: real nodes on loopback, raw HTTP calls, state snapshots.

Imported as `apitools` by the test modules beside it (pytest puts this folder on the
import path because it has no `__init__.py`). Nodes run on the test's own event loop
with the real system clock, because real TLS checks real validity windows.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from koitest import PASSPHRASE, loopback_config, member_csr  # noqa: F401 - re-exported

from koi_tray.api.server import PREFIX, TOKEN_HEADER
from koi_tray.certmesh import keystore
from koi_tray.certmesh.approval import Decider
from koi_tray.certmesh.clock import SystemClock
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.member import Membership
from koi_tray.compose import actions
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.deciders import deny_and_log_decider
from koi_tray.compose.node import Node

OPERATOR = "Alice"
STATE_FILES = ("roster.json", "invites.json", "member.json")


def no_keyring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep tests away from the developer's real keyring (auto-unlock stays off)."""
    monkeypatch.setattr(keystore, "usable_keyring", lambda: None)


async def start_ca(
    root: Path,
    preset: str = "just-me",
    decider: Decider | None = None,
    hostname: str = "ca-host",
) -> Node:
    """Start a CA node on loopback ports picked by the OS, and create its mesh."""
    config = loopback_config(root, hostname, shutdown_timeout=5.0)
    node = Node(config, decider or deny_and_log_decider(), kdf=keystore.FAST_TEST_KDF)
    await node.start()
    try:
        await node.create_ca(PASSPHRASE, preset, OPERATOR)
    except BaseException:
        await node.shutdown()
        raise
    return node


async def start_member(root: Path, hostname: str) -> Node:
    """Start an unconfigured node that will join a mesh; HTTP port picked by the OS."""
    config = NodeConfig(data_dir=root, hostname=hostname, http_port=0, shutdown_timeout=5.0)
    node = Node(config, deny_and_log_decider())
    await node.start()
    return node


def http_base(node: Node) -> str:
    return f"http://127.0.0.1:{node.address('http')[1]}{PREFIX}"


def mtls_base(node: Node) -> str:
    return f"https://127.0.0.1:{node.address('mtls')[1]}{PREFIX}"


async def invite_code(ca: Node, hostname: str) -> str:
    """Mint an invite through the CA's management route, as the CLI does."""
    status, body = await call(
        "POST", f"{http_base(ca)}/invite", {"hostname": hostname}, token=ca.token
    )
    assert status == 200, body
    return body["token"]


async def join(ca: Node, root: Path, hostname: str, codes: list[str] | None = None) -> Membership:
    """Join `ca` from the data dir `root` with a fresh invite, as `certmesh join` does."""
    code = await invite_code(ca, hostname)
    seen = codes if codes is not None else []
    return await actions.join_mesh(
        DataDir(root),
        hostname,
        http_base(ca).removesuffix(PREFIX),
        code,
        SystemClock(),
        seen.append,
    )


@dataclass(frozen=True)
class Answer:
    """One raw HTTP answer: status, body text, and the body as JSON when it is JSON."""

    status: int
    text: str
    json: Any


async def raw(
    method: str,
    url: str,
    data: bytes | str | None = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Answer:
    """Send exactly `data` (no JSON encoding) and return what came back."""
    all_headers = {"content-type": "application/json", **(headers or {})}
    if token is not None:
        all_headers[TOKEN_HEADER] = token
    connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else False)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, url, data=data, headers=all_headers) as response,
    ):
        text = await response.text()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    return Answer(response.status, text, value)


async def call(
    method: str, url: str, body: object = None, *, token: str | None = None, **options: Any
) -> tuple[int, Any]:
    """Send `body` as JSON; return (status, decoded JSON)."""
    data = None if body is None else json.dumps(body)
    answer = await raw(method, url, data, token=token, **options)
    return answer.status, answer.json


def assert_error(answer: Answer, status: int, code: str) -> None:
    """The answer is Koi's error body with `code`, and gives nothing away."""
    assert answer.status == status, (answer.status, answer.text)
    assert isinstance(answer.json, dict), answer.text
    assert set(answer.json) == {"error", "message"}, answer.json
    assert answer.json["error"] == code, answer.json
    assert isinstance(answer.json["message"], str) and answer.json["message"]
    assert "Traceback" not in answer.text


def snapshot(root: Path) -> dict[str, bytes | None]:
    """The bytes of the files a refused request must not touch: state, audit log, leaves."""
    data = DataDir(root)
    files = {name: data.certmesh / name for name in STATE_FILES}
    files["audit"] = data.audit_log
    if data.certs.exists():
        files.update({str(p.relative_to(root)): p for p in data.certs.rglob("*") if p.is_file()})
    return {name: path.read_bytes() if path.exists() else None for name, path in files.items()}


def client_context(cert_dir: Path, ca_pem: Path | None = None) -> ssl.SSLContext:
    """TLS client context presenting `cert_dir`'s leaf and trusting `ca_pem`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(ca_pem or cert_dir / "ca.pem"))
    context.load_cert_chain(cert_dir / "cert.pem", cert_dir / "key.pem")
    return context


async def run_tool(*argv: str, timeout: float = 20.0, stdin: bytes = b"") -> tuple[int, str, str]:
    """Run an outside program without blocking the loop the nodes are served from."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def timed(coro: Any) -> tuple[float, Any]:
    """Await `coro`; return (seconds it took, its result)."""
    started = time.monotonic()
    result = await coro
    return time.monotonic() - started, result
