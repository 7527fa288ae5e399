"""The mTLS port as clients no one here wrote see it: curl and openssl s_client.

A CA node and a joined member run in-process on loopback; the outside tools read the
member's real key, certificate and CA files from its data dir. They run as asyncio
subprocesses so the node keeps serving on the test's loop meanwhile.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from apitools import (
    client_context,
    join,
    member_csr,
    mtls_base,
    no_keyring,
    run_tool,
    snapshot,
    start_ca,
)
from cryptography import x509

from koi_tray.certmesh import pki
from koi_tray.compose.node import Node

pytestmark = pytest.mark.skipif(
    not (shutil.which("curl") and shutil.which("openssl")), reason="needs curl and openssl"
)


@dataclass
class Mesh:
    ca: Node
    ca_root: Path
    leaf_dir: Path  # the member's certs/node-02/

    @property
    def port(self) -> int:
        return self.ca.address("mtls")[1]


@pytest_asyncio.fixture
async def mesh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Mesh]:
    no_keyring(monkeypatch)
    ca = await start_ca(tmp_path / "ca")
    try:
        await join(ca, tmp_path / "member", "node-02")
        yield Mesh(ca, tmp_path / "ca", tmp_path / "member" / "certs" / "node-02")
    finally:
        await ca.shutdown()


def curl_args(mesh: Mesh, body: str, *tls: str) -> list[str]:
    return [
        "curl",
        "--silent",
        "--show-error",
        "--max-time",
        "10",
        "--write-out",
        "\n%{http_code}",
        *tls,
        "-H",
        "content-type: application/json",
        f"{mtls_base(mesh.ca)}/renew",
        "-d",
        body,
    ]


def renew_body(hostname: str = "node-02") -> tuple[str, str]:
    key, csr = member_csr(hostname)
    return pki.key_to_pem(key).decode(), json.dumps({"hostname": hostname, "csr": csr})


def write_foreign_identity(directory: Path, hostname: str) -> None:
    """A CA that looks like ours (same name) and a leaf from it for `hostname`."""
    now = dt.datetime.now(dt.UTC)
    ca_key, leaf_key = pki.generate_key(), pki.generate_key()
    ca_cert = pki.create_ca_certificate(ca_key, now)
    leaf = pki.issue_leaf(
        ca_key,
        ca_cert,
        leaf_key.public_key(),
        hostname,
        [hostname, f"{hostname}.local"],
        now,
        dt.timedelta(days=90),
    )
    directory.mkdir(parents=True)
    (directory / "key.pem").write_bytes(pki.key_to_pem(leaf_key))
    (directory / "cert.pem").write_bytes(pki.cert_to_pem(leaf))
    (directory / "ca.pem").write_bytes(pki.cert_to_pem(ca_cert))


def assert_refused(code: int, out: str, err: str) -> None:
    """curl failed at the handshake, or was answered 403 with a JSON error."""
    if code == 0:
        body, status = out.rsplit("\n", 1)
        assert status == "403", out
        assert json.loads(body)["error"]
    else:
        assert err.strip(), "curl failed without saying why"


@pytest.mark.asyncio
async def test_curl_renews_on_the_mtls_port(mesh: Mesh) -> None:
    roster_before = mesh.ca.ca.roster.find("node-02")
    seq_before = mesh.ca.ca.roster.seq
    _, body = renew_body()
    code, out, err = await run_tool(
        *curl_args(
            mesh,
            body,
            "--cert",
            str(mesh.leaf_dir / "cert.pem"),
            "--key",
            str(mesh.leaf_dir / "key.pem"),
            "--cacert",
            str(mesh.leaf_dir / "ca.pem"),
        )
    )
    assert code == 0, err
    text, status = out.rsplit("\n", 1)
    assert status == "200", text
    answer = json.loads(text)
    assert set(answer) == {
        "hostname",
        "service_cert",
        "ca_cert",
        "ca_fingerprint",
        "expires",
        "policy",
    }
    issued = x509.load_pem_x509_certificate(answer["service_cert"].encode())
    assert pki.leaf_common_name(issued) == "node-02"
    assert answer["ca_fingerprint"] == mesh.ca.ca.ca_fingerprint

    roster = json.loads((mesh.ca_root / "certmesh" / "roster.json").read_text())
    entry = next(m for m in roster["members"] if m["hostname"] == "node-02")
    assert entry["cert_fingerprint"] == pki.fingerprint(issued)
    assert entry["cert_fingerprint"] != roster_before.cert_fingerprint
    assert roster["metadata"]["seq"] == seq_before + 1


@pytest.mark.asyncio
async def test_openssl_shows_the_ca_server_chain(mesh: Mesh) -> None:
    code, out, err = await run_tool(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{mesh.port}",
        "-showcerts",
        "-cert",
        str(mesh.leaf_dir / "cert.pem"),
        "-key",
        str(mesh.leaf_dir / "key.pem"),
        "-CAfile",
        str(mesh.leaf_dir / "ca.pem"),
    )
    assert code == 0, err
    chain = out.split("Certificate chain", 1)[1]
    leaf_subject, leaf_issuer = chain.splitlines()[1:3]
    assert "CN = ca-host" in leaf_subject or "CN=ca-host" in leaf_subject
    assert "Koi Certmesh CA" in leaf_issuer
    assert "Verify return code: 0 (ok)" in out
    assert " 1 s:CN = Koi Certmesh CA" in chain  # the full chain, CA included


@pytest.mark.asyncio
async def test_client_certificate_from_another_ca_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    write_foreign_identity(foreign, "node-02")
    before = snapshot(mesh.ca_root)
    _, body = renew_body()

    result = await run_tool(
        *curl_args(
            mesh,
            body,
            "--cert",
            str(foreign / "cert.pem"),
            "--key",
            str(foreign / "key.pem"),
            "--cacert",
            str(mesh.leaf_dir / "ca.pem"),
        )
    )
    assert_refused(*result)

    with pytest.raises(aiohttp.ClientError):
        context = client_context(foreign, mesh.leaf_dir / "ca.pem")
        connector = aiohttp.TCPConnector(ssl=context)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(f"{mtls_base(mesh.ca)}/renew", data=body) as response,
        ):
            await response.read()
    assert snapshot(mesh.ca_root) == before


@pytest.mark.asyncio
async def test_no_client_certificate_is_refused(mesh: Mesh) -> None:
    before = snapshot(mesh.ca_root)
    _, body = renew_body()
    result = await run_tool(*curl_args(mesh, body, "--cacert", str(mesh.leaf_dir / "ca.pem")))
    assert_refused(*result)

    code, out, _ = await run_tool(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{mesh.port}",
        "-ign_eof",
        "-CAfile",
        str(mesh.leaf_dir / "ca.pem"),
        stdin=b"GET /v1/certmesh/renew HTTP/1.0\r\n\r\n",
    )
    assert code != 0
    assert "HTTP/1" not in out and "service_cert" not in out
    assert snapshot(mesh.ca_root) == before
