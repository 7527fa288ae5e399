"""Wire details a Koi certmesh 0.9 peer relies on, checked on real nodes and real bytes.

Field sets of `/status`, `/trust-bundle`, `/join` and `/renew` answers; the bundle's
signature checked the way a non-Rust verifier would; the member client's tolerance for
what a Koi CA sends (no `policy`, `Z` or `+00:00` with nine fractional digits, CRLF PEMs);
the joiner's fingerprint preflight and what it sends, seen by a fake CA; unlock errors.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from apitools import (
    PASSPHRASE,
    assert_error,
    call,
    client_context,
    http_base,
    invite_code,
    join,
    member_csr,
    mtls_base,
    no_keyring,
    raw,
    snapshot,
    start_ca,
)
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from koi_tray.api.client import fetch_json
from koi_tray.certmesh import pki
from koi_tray.certmesh.bundle import build_bundle, sign_bundle, verify_bundle
from koi_tray.certmesh.ca import CertificateAuthority, JoinRequest
from koi_tray.certmesh.clock import ManualClock, SystemClock
from koi_tray.certmesh.enrollment import enroll
from koi_tray.certmesh.errors import (
    ApprovalDenied,
    CertmeshError,
    InvalidAuth,
    InvalidPayload,
    RenewalFailed,
)
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.member import Membership, MemberState, check_issued_leaf
from koi_tray.certmesh.timefmt import parse_timestamp
from koi_tray.compose import actions
from koi_tray.compose.node import Node

HEX64 = re.compile(r"[0-9a-f]{64}")
POLICY_FIELDS = {"leaf_lifetime_days", "renew_threshold_days", "grace_days"}
STATUS_FIELDS = {
    "ca_initialized",
    "ca_locked",
    "ca_fingerprint",
    "enrollment_open",
    "requires_approval",
    "enrollment_state",
    "member_count",
    "seq",
    "policy",
    "members",
}


@pytest_asyncio.fixture
async def ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Node]:
    no_keyring(monkeypatch)
    node = await start_ca(tmp_path / "ca")
    try:
        yield node
    finally:
        await node.shutdown()


def sha256_of_pem(pem: str) -> str:
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def crlf(pem: str) -> str:
    return pem.replace("\r\n", "\n").replace("\n", "\r\n")


# -- answers of a koi-tray CA -----------------------------------------------------------


@pytest.mark.asyncio
async def test_status_has_koi_fields(ca: Node, tmp_path: Path) -> None:
    await join(ca, tmp_path / "m2", "node-02")
    await join(ca, tmp_path / "m3", "node-03")
    await call("POST", f"{http_base(ca)}/revoke", {"hostname": "node-03"}, token=ca.token)

    status, body = await call("GET", f"{http_base(ca)}/status")
    assert status == 200
    assert STATUS_FIELDS <= set(body) <= STATUS_FIELDS | {"auth_method", "mtls_port"}
    assert body["ca_initialized"] is True and body["ca_locked"] is False
    ca_pem = (tmp_path / "ca" / "certmesh" / "ca" / "ca-cert.pem").read_text()
    assert body["ca_fingerprint"] == sha256_of_pem(ca_pem)
    assert body["enrollment_open"] is True and body["requires_approval"] is False
    assert body["enrollment_state"] == "open"
    assert body["member_count"] == 2  # active members only, the CA's own entry included
    assert isinstance(body["seq"], int) and body["seq"] >= 4
    assert body["policy"] == {
        "leaf_lifetime_days": 90,
        "renew_threshold_days": 30,
        "grace_days": 14,
    }
    assert body["mtls_port"] == ca.address("mtls")[1]

    members = {m["hostname"]: m for m in body["members"]}
    assert set(members) == {"ca-host", "node-02", "node-03"}
    for member in members.values():
        assert set(member) == {"hostname", "role", "status", "cert_fingerprint", "cert_expires"}
        assert HEX64.fullmatch(member["cert_fingerprint"])
        assert member["cert_expires"].endswith("+00:00")
        assert parse_timestamp(member["cert_expires"]) > dt.datetime.now(dt.UTC)
    assert (members["ca-host"]["role"], members["ca-host"]["status"]) == ("primary", "active")
    assert (members["node-02"]["role"], members["node-02"]["status"]) == ("member", "active")
    assert members["node-03"]["status"] == "revoked"
    leaf = (tmp_path / "m2" / "certs" / "node-02" / "cert.pem").read_text()
    assert members["node-02"]["cert_fingerprint"] == sha256_of_pem(leaf)


@pytest.mark.asyncio
async def test_trust_bundle_shape_and_signature(ca: Node, tmp_path: Path) -> None:
    await join(ca, tmp_path / "m2", "node-02")
    await join(ca, tmp_path / "m3", "node-03")
    revoke = {"hostname": "node-03", "reason": "lost laptop", "operator": "Alice"}
    await call("POST", f"{http_base(ca)}/revoke", revoke, token=ca.token)
    node3_fp = sha256_of_pem((tmp_path / "m3" / "certs" / "node-03" / "cert.pem").read_text())

    status, signed = await call("GET", f"{http_base(ca)}/trust-bundle")
    assert status == 200
    assert set(signed) == {"bundle", "signature"}
    bundle = signed["bundle"]
    assert set(bundle) == {
        "seq",
        "issued_at",
        "ca_fingerprint",
        "ca_cert_pem",
        "policy",
        "members",
        "revoked",
    }
    _, koi_status = await call("GET", f"{http_base(ca)}/status")
    assert bundle["seq"] == koi_status["seq"]
    assert bundle["ca_fingerprint"] == koi_status["ca_fingerprint"]
    assert sha256_of_pem(bundle["ca_cert_pem"]) == bundle["ca_fingerprint"]
    assert set(bundle["policy"]) == POLICY_FIELDS
    assert parse_timestamp(bundle["issued_at"]) <= dt.datetime.now(dt.UTC)
    for member in bundle["members"]:
        assert set(member) == {"hostname", "cert_fingerprint", "not_after", "status"}
    statuses = {m["hostname"]: m["status"] for m in bundle["members"]}
    assert statuses == {"ca-host": "active", "node-02": "active", "node-03": "revoked"}
    assert len(bundle["revoked"]) == 1
    revoked = bundle["revoked"][0]
    assert set(revoked) == {"hostname", "cert_fingerprint", "revoked_at"}
    assert (revoked["hostname"], revoked["cert_fingerprint"]) == ("node-03", node3_fp)
    text = json.dumps(bundle)
    for private in ("Alice", "lost laptop", "cert_sans", "node-02.local"):
        assert private not in text

    # Verify as a non-Rust member would: sorted compact JSON, DER ECDSA P-256 / SHA-256.
    signature = base64.b64decode(signed["signature"], validate=True)
    decode_dss_signature(signature)
    signed_bytes = json.dumps(
        bundle, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    public_key = x509.load_pem_x509_certificate(bundle["ca_cert_pem"].encode()).public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(signature, signed_bytes, ec.ECDSA(hashes.SHA256()))
    tampered = json.dumps(
        {**bundle, "seq": bundle["seq"] + 1}, sort_keys=True, separators=(",", ":")
    )
    with pytest.raises(InvalidSignature):
        public_key.verify(signature, tampered.encode(), ec.ECDSA(hashes.SHA256()))


@pytest.mark.asyncio
async def test_join_and_renew_answers(ca: Node, tmp_path: Path) -> None:
    ca_fp = ca.ca.ca_fingerprint
    for hostname, whole_code in (("node-02", False), ("node-03", True)):
        code = await invite_code(ca, hostname)
        token = code if whole_code else code.split(".")[0]
        key, csr = member_csr(hostname)
        body = {"hostname": hostname, "csr": csr, "invite_token": token}
        status, answer = await call("POST", f"{http_base(ca)}/join", body)
        assert status == 200, answer
        assert set(answer) == {"hostname", "ca_cert", "service_cert", "ca_fingerprint", "policy"}
        assert answer["hostname"] == hostname and answer["ca_fingerprint"] == ca_fp
        assert sha256_of_pem(answer["ca_cert"]) == ca_fp
        assert set(answer["policy"]) == POLICY_FIELDS
        leaf = x509.load_pem_x509_certificate(answer["service_cert"].encode())
        ca_cert = x509.load_pem_x509_certificate(answer["ca_cert"].encode())
        leaf.verify_directly_issued_by(ca_cert)
        assert pki.keys_match(key, leaf)
        assert pki.leaf_common_name(leaf) == hostname
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == [hostname, f"{hostname}.local"]
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert leaf.extensions.get_extension_for_class(x509.KeyUsage).critical
        assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        assert leaf.not_valid_before_utc < dt.datetime.now(dt.UTC) - dt.timedelta(minutes=4)

    # The renew answer, over mTLS with a leaf installed by the member's own code.
    root = tmp_path / "m4"
    await join(ca, root, "node-04")
    _, csr = member_csr("node-04")
    answer = await raw(
        "POST",
        f"{mtls_base(ca)}/renew",
        json.dumps({"hostname": "node-04", "csr": csr}),
        ssl_context=client_context(root / "certs" / "node-04"),
    )
    assert answer.status == 200, answer.text
    renewed = answer.json
    assert set(renewed) == {
        "hostname",
        "service_cert",
        "ca_cert",
        "ca_fingerprint",
        "expires",
        "policy",
    }
    assert renewed["expires"].endswith("+00:00")
    cert = x509.load_pem_x509_certificate(renewed["service_cert"].encode())
    assert parse_timestamp(renewed["expires"]) == cert.not_valid_after_utc


@pytest.mark.asyncio
async def test_wrong_unlock_passphrase_is_invalid_auth(ca: Node, tmp_path: Path) -> None:
    url = f"{http_base(ca)}/unlock"
    wrong = json.dumps({"passphrase": "not the passphrase"})
    assert_error(await raw("POST", url, wrong, token=ca.token), 401, "invalid_auth")

    ca.ca.lock()
    assert (await call("GET", f"{http_base(ca)}/status"))[1]["ca_locked"] is True
    before = snapshot(tmp_path / "ca")
    assert_error(await raw("POST", url, wrong, token=ca.token), 401, "invalid_auth")
    assert_error(await raw("GET", f"{http_base(ca)}/trust-bundle"), 503, "ca_locked")
    after = snapshot(tmp_path / "ca")
    assert {k: v for k, v in after.items() if k != "audit"} == {
        k: v for k, v in before.items() if k != "audit"
    }
    assert "unlock_failed" in after["audit"][len(before["audit"]) :].decode()

    status, body = await call("POST", url, {"passphrase": PASSPHRASE}, token=ca.token)
    assert (status, body) == (200, {"success": True})
    assert (await call("GET", f"{http_base(ca)}/status"))[1]["ca_locked"] is False
    assert (await call("GET", f"{http_base(ca)}/trust-bundle"))[0] == 200


# -- the joiner: preflight and what it sends ----------------------------------------------


@pytest.mark.asyncio
async def test_preflight_refuses_a_ca_other_than_the_pin(ca: Node, tmp_path: Path) -> None:
    code = await invite_code(ca, "node-02")
    secret, pin = code.split(".")
    endpoint = http_base(ca).rsplit("/v1/", 1)[0]
    before = snapshot(tmp_path / "ca")
    member = tmp_path / "member"
    for wrong_pin, why in (("ab" * 32, "nothing was sent"), (pin[:-1], "not an invite code")):
        shown: list[str] = []
        with pytest.raises(InvalidAuth, match=why):
            await actions.join_mesh(
                DataDir(member),
                "node-02",
                endpoint,
                f"{secret}.{wrong_pin}",
                SystemClock(),
                shown.append,
            )
        assert shown == []
    assert snapshot(tmp_path / "ca") == before
    assert not (member / "certmesh" / "member.json").exists()
    assert not (member / "certs" / "node-02").exists()

    # The same invite, with its real pin (in capitals, as a person may retype it), still
    # works: the CA never saw the others.
    shouted = f"{secret}.{pin.upper()}"
    await actions.join_mesh(DataDir(member), "node-02", endpoint, shouted, SystemClock(), print)
    assert ca.ca.roster.find("node-02") is not None


class FakeCa:
    """A tiny aiohttp server playing a CA: records every request, answers from a script."""

    def __init__(self, fingerprint: str | None, join_answer: Callable[[], web.Response]) -> None:
        self.fingerprint = fingerprint
        self.join_answer = join_answer
        self.seen: list[tuple[str, str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakeCa:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append((request.method, request.path, json.loads(body) if body else None))
        if request.path == "/v1/certmesh/status":
            status: dict[str, Any] = {"ca_initialized": True, "ca_locked": False}
            if self.fingerprint is not None:
                status["ca_fingerprint"] = self.fingerprint
            return web.json_response(status)
        if request.path == "/v1/certmesh/join":
            return self.join_answer()
        return web.json_response({"error": "not_found", "message": "?"}, status=404)


@pytest_asyncio.fixture
async def fake_ca() -> AsyncIterator[Callable[..., Any]]:
    started: list[FakeCa] = []

    async def start(fingerprint: str | None, join_answer: Callable[[], web.Response]) -> FakeCa:
        fake = FakeCa(fingerprint, join_answer)
        started.append(fake)
        return await fake.start()

    yield start
    for fake in started:
        await fake.stop()


def denied() -> web.Response:
    return web.json_response({"error": "approval_denied", "message": "no"}, status=403)


@pytest.mark.asyncio
async def test_joiner_sends_nothing_to_a_ca_it_does_not_pin(
    fake_ca: Callable[..., Any], tmp_path: Path
) -> None:
    secret = "0f" * 24
    for advertised in ("ab" * 32, None):
        fake = await fake_ca(advertised, denied)
        with pytest.raises(InvalidAuth):
            await actions.join_mesh(
                DataDir(tmp_path / "m"),
                "node-02",
                fake.url,
                f"{secret}.{'cd' * 32}",
                SystemClock(),
                print,
            )
        assert [(m, p) for m, p, _ in fake.seen] == [("GET", "/v1/certmesh/status")]
    with pytest.raises(InvalidAuth, match="no CA fingerprint"):
        await actions.join_mesh(
            DataDir(tmp_path / "m"), "node-02", fake.url, secret, SystemClock(), print
        )


@pytest.mark.asyncio
async def test_joiner_sends_only_the_secret_half(
    fake_ca: Callable[..., Any], tmp_path: Path
) -> None:
    secret, pin = "0f" * 24, "cd" * 32
    fake = await fake_ca(pin, denied)
    with pytest.raises(ApprovalDenied):
        await actions.join_mesh(
            DataDir(tmp_path / "m"), "node-02", fake.url, f"{secret}.{pin}", SystemClock(), print
        )
    method, path, body = fake.seen[-1]
    assert (method, path) == ("POST", "/v1/certmesh/join")
    assert set(body) == {"hostname", "csr", "invite_token"}  # no `sans`, as Koi's CLI
    assert body["invite_token"] == secret
    assert pin not in json.dumps(body)
    csr = x509.load_pem_x509_csr(body["csr"].encode())
    assert csr.subject.rfc4514_string() == "CN=node-02"
    assert not (tmp_path / "m" / "certmesh" / "member.json").exists()


@pytest.mark.asyncio
async def test_joiner_refuses_a_join_answer_from_another_ca(
    fake_ca: Callable[..., Any], tmp_path: Path
) -> None:
    """The CA passes the preflight but answers with a leaf from a different CA."""
    now = dt.datetime.now(dt.UTC)
    other_key = pki.generate_key()
    other_ca = pki.create_ca_certificate(other_key, now)
    pin = "cd" * 32

    def answer() -> web.Response:
        leaf_key = pki.generate_key()
        leaf = pki.issue_leaf(
            other_key, other_ca, leaf_key.public_key(), "node-02", ["node-02"], now, dt.timedelta(1)
        )
        return web.json_response(
            {
                "hostname": "node-02",
                "ca_cert": pki.cert_to_pem(other_ca).decode(),
                "service_cert": pki.cert_to_pem(leaf).decode(),
                "ca_fingerprint": pin,
            }
        )

    fake = await fake_ca(pin, answer)
    with pytest.raises(RenewalFailed, match="pinned CA"):
        await actions.join_mesh(
            DataDir(tmp_path / "m"), "node-02", fake.url, f"{'0f' * 24}.{pin}", SystemClock(), print
        )
    assert not (tmp_path / "m" / "certmesh" / "member.json").exists()
    assert not (tmp_path / "m" / "certs" / "node-02" / "cert.pem").exists()


@pytest.mark.asyncio
async def test_client_turns_garbage_answers_into_certmesh_errors(
    fake_ca: Callable[..., Any],
) -> None:
    """A broken or hostile CA (the bundle travels over plain HTTP) cannot crash a member."""
    answers = [
        web.Response(text="[" * 5000 + "]" * 5000, content_type="application/json"),
        web.Response(text='{"bundle": "\\udc00"}', content_type="application/json"),
        web.Response(text="<html>nope</html>", status=502),
        web.Response(text='["not", "an", "object"]', content_type="application/json"),
    ]
    for answer in answers:
        fake = await fake_ca("cd" * 32, lambda answer=answer: answer)
        with pytest.raises(CertmeshError):
            await fetch_json("POST", f"{fake.url}/v1/certmesh/join", body={})
    fake = await fake_ca("cd" * 32, denied)
    with pytest.raises(ApprovalDenied):
        await fetch_json("POST", f"{fake.url}/v1/certmesh/join", body={})


# -- what the member client accepts from a Koi CA ----------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-06-24T10:00:00Z", dt.datetime(2026, 6, 24, 10, tzinfo=dt.UTC)),
        ("2026-06-24T10:00:00+00:00", dt.datetime(2026, 6, 24, 10, tzinfo=dt.UTC)),
        ("2026-06-24T10:00:00.2Z", dt.datetime(2026, 6, 24, 10, 0, 0, 200000, dt.UTC)),
        (
            "2026-06-24T10:00:00.123456789Z",
            dt.datetime(2026, 6, 24, 10, 0, 0, 123456, dt.UTC),
        ),
        (
            "2026-06-24T10:00:00.123456789+00:00",
            dt.datetime(2026, 6, 24, 10, 0, 0, 123456, dt.UTC),
        ),
        ("2026-06-24T12:00:00.5+02:00", dt.datetime(2026, 6, 24, 10, 0, 0, 500000, dt.UTC)),
    ],
)
def test_timestamps_as_koi_writes_them(text: str, expected: dt.datetime) -> None:
    parsed = parse_timestamp(text)
    assert parsed == expected
    assert parsed.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    "text", ["2026-06-24T10:00:00", "2026-06-24T10:00:00.1234567890Z", "yesterday", ""]
)
def test_timestamps_koi_never_writes_are_refused(text: str) -> None:
    with pytest.raises(InvalidPayload):
        parse_timestamp(text)


def enroll_directly(ca: CertificateAuthority, hostname: str) -> tuple[Any, dict[str, Any]]:
    key, csr = member_csr(hostname)
    minted = ca.mint_invite(hostname)
    result = asyncio.run(enroll(ca, JoinRequest(hostname, csr, minted.code, "192.0.2.7"), None))
    return key, result.to_json()


def test_member_accepts_koi_style_join_and_renew_answers(
    make_ca: Callable[..., CertificateAuthority],
    clock: ManualClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    no_keyring(monkeypatch)
    ca = make_ca("just-me")
    key, answer = enroll_directly(ca, "node-02")
    answer.pop("policy")
    answer["ca_cert"], answer["service_cert"] = (
        crlf(answer["ca_cert"]),
        crlf(answer["service_cert"]),
    )
    membership = Membership.install_join(
        DataDir(tmp_path / "m"),
        clock,
        key,
        answer,
        ca_host="127.0.0.1",
        ca_http_port=5641,
        pinned_fingerprint=ca.ca_fingerprint,
        sans=["node-02", "node-02.local"],
    )
    assert membership.state.policy.leaf_lifetime_days == 90
    leaf = membership.leaf()
    assert leaf is not None

    new_key, csr = member_csr("node-02")
    renewed = ca.renew_member("node-02", leaf.fingerprint, "node-02", csr).to_json()
    renewed.pop("policy")  # a CA older than Koi 0.7 sends none
    renewed["service_cert"] = crlf(renewed["service_cert"])
    renewed["ca_cert"] = crlf(renewed["ca_cert"])
    renewed["expires"] = re.sub(r"(\.\d+)?\+00:00$", ".123456789Z", renewed["expires"])
    cert = membership.install_renewal(new_key, renewed)
    assert membership.leaf().fingerprint == pki.fingerprint(cert) != leaf.fingerprint
    assert pki.keys_match(new_key, cert)

    state = MemberState.from_json(
        {**membership.state.to_json(), "last_bundle_at": "2026-12-01T09:00:00.123456789Z"}
    )
    checked, ca_cert = check_issued_leaf(
        state, new_key, crlf(renewed["service_cert"]), crlf(renewed["ca_cert"])
    )
    assert pki.fingerprint(ca_cert) == ca.ca_fingerprint
    with pytest.raises(RenewalFailed):
        check_issued_leaf(state, key, renewed["service_cert"], renewed["ca_cert"])


def test_member_accepts_a_koi_style_bundle(
    make_ca: Callable[..., CertificateAuthority],
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    no_keyring(monkeypatch)
    ca = make_ca("just-me")
    bundle = build_bundle(ca.roster, crlf(ca.ca_cert_pem), ca.ca_fingerprint, clock.now())
    bundle["issued_at"] = "2026-12-01T09:00:00.123456789Z"
    for member in bundle["members"]:
        member["not_after"] = member["not_after"].replace("+00:00", "Z")
    signed = sign_bundle(bundle, ca._require_key())
    verified = verify_bundle(json.loads(json.dumps(signed)), ca.ca_fingerprint, 0)
    assert verified.seq == ca.roster.seq
    assert verified.issued_at == dt.datetime(2026, 12, 1, 9, 0, 0, 123456, dt.UTC)
