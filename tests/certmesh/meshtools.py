"""Helpers shared by the certmesh tests: joins, independent verifiers, state snapshots.

Imported as `meshtools` by the test modules beside it (pytest puts this folder on the
import path because it has no `__init__.py`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from koitest import member_csr

from koi_tray.certmesh import audit, pki
from koi_tray.certmesh.approval import Decider
from koi_tray.certmesh.ca import CertificateAuthority, JoinRequest, JoinResult
from koi_tray.certmesh.clock import Clock
from koi_tray.certmesh.enrollment import enroll
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.member import Membership

PEER = "192.0.2.10"
OPENSSL = "/usr/bin/openssl"


async def run_inline(func: Callable[..., Any], *args: Any) -> Any:
    """Run a certmesh call on the loop thread (an `enroll` runner without an executor)."""
    return func(*args)


def join_request(
    hostname: object,
    code: object,
    *,
    csr_host: str = "",
    sans: object = None,
    peer: str | None = PEER,
) -> tuple[ec.EllipticCurvePrivateKey, JoinRequest]:
    """Build a fresh key and a join for `hostname` whose CSR names `csr_host` (or hostname)."""
    key, csr = member_csr(csr_host or str(hostname))
    return key, JoinRequest(hostname, csr, code, peer, sans)


def enroll_now(
    ca: CertificateAuthority, request: JoinRequest, decider: Decider | None = None
) -> JoinResult:
    """Drive one join through `enroll` to its end, synchronously."""
    return asyncio.run(enroll(ca, request, decider, run=run_inline))


def join_member(
    ca: CertificateAuthority, hostname: str, sans: list[str] | None = None
) -> tuple[ec.EllipticCurvePrivateKey, JoinResult]:
    """Mint an invite for `hostname` and join with it on a CA that needs no approval."""
    code = ca.mint_invite(hostname).code
    key, request = join_request(hostname, code, sans=sans)
    return key, enroll_now(ca, request)


def openssl_verify(
    workdir: Path, ca_cert: x509.Certificate, cert: x509.Certificate, at: dt.datetime
) -> str:
    """Run `openssl verify -x509_strict` at time `at`; return its output or fail the test."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca_file = workdir / "ca.pem"
    leaf_file = workdir / "leaf.pem"
    ca_file.write_bytes(pki.cert_to_pem(ca_cert))
    leaf_file.write_bytes(pki.cert_to_pem(cert))
    done = subprocess.run(
        [
            OPENSSL,
            "verify",
            "-x509_strict",
            "-attime",
            str(int(at.timestamp())),
            "-CAfile",
            str(ca_file),
            str(leaf_file),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(": OK"), done.stdout
    return done.stdout


def rfc5280_verify(
    ca_cert: x509.Certificate, leaf: x509.Certificate, hostname: str, at: dt.datetime
) -> None:
    """Check `leaf` with cryptography's RFC 5280 verifier, as a server and as a client."""
    builder = PolicyBuilder().store(Store([ca_cert])).time(at)
    chain = builder.build_server_verifier(x509.DNSName(hostname)).verify(leaf, [])
    assert chain[0] == leaf and chain[-1] == ca_cert
    client = builder.build_client_verifier().verify(leaf, [])
    assert x509.DNSName(hostname) in client.subjects


@dataclass(frozen=True)
class Snapshot:
    """The CA's state files and audit log at one instant."""

    roster: bytes | None
    invites: bytes | None
    audit_lines: tuple[str, ...]


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def snapshot(data: DataDir) -> Snapshot:
    text = _read(data.audit_log) or b""
    return Snapshot(_read(data.roster), _read(data.invites), tuple(text.decode().splitlines()))


def audit_added(data: DataDir, before: Snapshot) -> list[tuple[str, str, dict[str, str]]]:
    """Return the audit lines written since `before`, parsed; fail if old lines changed."""
    now = snapshot(data).audit_lines
    assert now[: len(before.audit_lines)] == before.audit_lines, "audit log was rewritten"
    return [audit.parse_line(line) for line in now[len(before.audit_lines) :]]


def assert_state_unchanged(data: DataDir, before: Snapshot) -> None:
    after = snapshot(data)
    assert after.roster == before.roster, "roster.json changed"
    assert after.invites == before.invites, "invites.json changed"


def member_node(
    ca: CertificateAuthority, clock: Clock, root: Path, hostname: str = "node-a"
) -> Membership:
    """Join `hostname` to `ca` and install the answer in a member data dir at `root`."""
    key, result = join_member(ca, hostname)
    return Membership.install_join(
        DataDir(root),
        clock,
        key,
        result.to_json(),
        ca_host="ca-host",
        ca_http_port=5641,
        pinned_fingerprint=ca.ca_fingerprint,
        sans=[hostname, f"{hostname}.local"],
    )
