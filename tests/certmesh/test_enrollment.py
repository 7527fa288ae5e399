"""Joins: every refusal has its own code, changes nothing and is audited once; approvals.

A refused join must leave `roster.json` and `invites.json` byte-identical and add exactly
its refusal line to the audit log. With a posture that needs approval, a person is asked
only after every check passed, sees enough to recognise the request, and every way the
question can end other than "approved by <name>" refuses the join and leaves the invite
usable.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from koitest import member_csr
from meshtools import (
    PEER,
    assert_state_unchanged,
    audit_added,
    enroll_now,
    join_member,
    join_request,
    snapshot,
)

from koi_tray.certmesh import ca as ca_module
from koi_tray.certmesh import pki
from koi_tray.certmesh.approval import ApprovalRequest, Approved, Denied
from koi_tray.certmesh.ca import CertificateAuthority, JoinRequest
from koi_tray.certmesh.clock import ManualClock
from koi_tray.certmesh.enrollment import enroll
from koi_tray.certmesh.errors import (
    ApprovalDenied,
    ApprovalTimeout,
    ApprovalUnavailable,
    CaLocked,
    CertmeshError,
    Conflict,
    EnrollmentClosed,
    InvalidAuth,
    InvalidPayload,
    Revoked,
)

# -- CSRs that break one rule each ---------------------------------------------------------


def _csr_pem(builder: x509.CertificateSigningRequestBuilder, key, algorithm) -> str:
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def _named(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def _builder(cn: str = "node-a") -> x509.CertificateSigningRequestBuilder:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_named((NameOID.COMMON_NAME, cn)))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(cn), x509.DNSName(f"{cn}.local")]),
            critical=False,
        )
    )


def csr_p384() -> str:
    return _csr_pem(_builder(), ec.generate_private_key(ec.SECP384R1()), hashes.SHA256())


def csr_sha384() -> str:
    return _csr_pem(_builder(), pki.generate_key(), hashes.SHA384())


def csr_basic_constraints() -> str:
    builder = _builder().add_extension(
        x509.BasicConstraints(ca=True, path_length=None), critical=True
    )
    return _csr_pem(builder, pki.generate_key(), hashes.SHA256())


def csr_two_common_names() -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        _named((NameOID.COMMON_NAME, "node-a"), (NameOID.COMMON_NAME, "ca-host"))
    )
    return _csr_pem(builder, pki.generate_key(), hashes.SHA256())


def csr_bad_signature() -> str:
    _, pem = member_csr("node-a")
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def csr_truncated() -> str:
    _, pem = member_csr("node-a")
    return pem[: len(pem) // 2]


BAD_CSRS: dict[str, Callable[[], object]] = {
    "plain-text": lambda: "this is not a certificate request",
    "pem-with-junk": lambda: (
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    ),
    "truncated": csr_truncated,
    "bad-self-signature": csr_bad_signature,
    "missing": lambda: None,
    "empty": lambda: "   ",
    "not-a-string": lambda: 42,
    "oversized": lambda: member_csr("node-a")[1] + "\n" * 20_000,
    "non-ascii": lambda: member_csr("node-a")[1].replace("REQUEST", "REQUÊST"),
    "p384-key": csr_p384,
    "sha384-signature": csr_sha384,
    "cn-is-another-host": lambda: member_csr("ca-host")[1],
    "basic-constraints-extension": csr_basic_constraints,
    "two-common-names": csr_two_common_names,
}

HOSTILE_HOSTNAMES = [
    "node\na",
    "node-a\n",
    "node-a.lan\n",
    "node|a",
    "node=a",
    "nöde-a",
    "\ud800node",
    "a" * 300,
    "-node-a",
    "node-a-",
    "node_a",
    "node a",
    "",
    "node..a",
    ".",
    None,
    7,
]


# -- a refusal changes nothing but the audit log --------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A join that must be refused, how, and with which audit event."""

    build: Callable[[CertificateAuthority, ManualClock], JoinRequest]
    error: type[CertmeshError]
    event: str


def _with_csr(csr_factory: Callable[[], object]):
    def build(ca: CertificateAuthority, clock: ManualClock) -> JoinRequest:
        code = ca.mint_invite("node-a").code
        return JoinRequest("node-a", csr_factory(), code, PEER)

    return build


def _with_sans(sans: object):
    def build(ca: CertificateAuthority, clock: ManualClock) -> JoinRequest:
        code = ca.mint_invite("node-a").code
        return join_request("node-a", code, sans=sans)[1]

    return build


def _with_hostname(hostname: object):
    def build(ca: CertificateAuthority, clock: ManualClock) -> JoinRequest:
        code = ca.mint_invite("node-a").code
        return join_request(hostname, code, csr_host="node-a")[1]

    return build


def _expired_invite(ca, clock):
    code = ca.mint_invite("node-a").code
    clock.advance(dt.timedelta(minutes=60))
    return join_request("node-a", code)[1]


def _used_invite(ca, clock):
    code = ca.mint_invite("node-b").code
    enroll_now(ca, join_request("node-b", code)[1])
    return join_request("node-b", code)[1]


def _invite_for_another_host(ca, clock):
    code = ca.mint_invite("node-b").code
    return join_request("node-a", code)[1]


def _invite_pinned_to_another_ca(ca, clock):
    secret = ca.mint_invite("node-a").code.split(".")[0]
    return join_request("node-a", f"{secret}.{'ab' * 32}")[1]


def _unknown_invite(ca, clock):
    ca.mint_invite("node-a")
    return join_request("node-a", f"{secrets.token_hex(24)}.{ca.ca_fingerprint}")[1]


def _no_invite(ca, clock):
    ca.mint_invite("node-a")
    return join_request("node-a", None)[1]


def _revoked_host(ca, clock):
    join_member(ca, "node-a")
    ca.revoke("node-a", reason="stolen laptop", operator="Alice")
    return join_request("node-a", ca.mint_invite("node-a").code)[1]


def _already_enrolled(ca, clock):
    join_member(ca, "node-a")
    return join_request("node-a", ca.mint_invite("node-a").code)[1]


def _ca_host_itself(ca, clock):
    return join_request("ca-host", ca.mint_invite("ca-host").code)[1]


def _enrollment_closed(ca, clock):
    code = ca.mint_invite("node-a").code
    ca.set_enrollment(False, operator="Alice")
    return join_request("node-a", code)[1]


def _ca_locked(ca, clock):
    code = ca.mint_invite("node-a").code
    ca.lock()
    return join_request("node-a", code)[1]


REFUSALS: dict[str, Refusal] = {
    **{
        f"csr-{name}": Refusal(_with_csr(factory), InvalidPayload, "enroll_invalid_request")
        for name, factory in BAD_CSRS.items()
    },
    **{
        f"hostname-{index}": Refusal(_with_hostname(name), InvalidPayload, "enroll_invalid_request")
        for index, name in enumerate(HOSTILE_HOSTNAMES)
    },
    "sans-17-extras": Refusal(
        _with_sans([f"alias{i}.lan" for i in range(17)]), InvalidPayload, "enroll_invalid_request"
    ),
    "sans-wildcard": Refusal(_with_sans(["*.lan"]), InvalidPayload, "enroll_invalid_request"),
    "sans-newline": Refusal(_with_sans(["ok.lan\nevil"]), InvalidPayload, "enroll_invalid_request"),
    "sans-trailing-newline": Refusal(
        _with_sans(["alias.lan\n"]), InvalidPayload, "enroll_invalid_request"
    ),
    "sans-ipv6-zone": Refusal(
        _with_sans(["fe80::1%eth0"]), InvalidPayload, "enroll_invalid_request"
    ),
    "sans-not-a-list": Refusal(_with_sans("alias.lan"), InvalidPayload, "enroll_invalid_request"),
    "invite-expired": Refusal(_expired_invite, InvalidAuth, "enroll_token_invalid"),
    "invite-used": Refusal(_used_invite, InvalidAuth, "enroll_token_invalid"),
    "invite-other-host": Refusal(_invite_for_another_host, InvalidAuth, "enroll_token_invalid"),
    "invite-other-ca": Refusal(_invite_pinned_to_another_ca, InvalidAuth, "enroll_token_invalid"),
    "invite-unknown": Refusal(_unknown_invite, InvalidAuth, "enroll_token_invalid"),
    "invite-missing": Refusal(_no_invite, InvalidAuth, "enroll_token_invalid"),
    "revoked-host": Refusal(_revoked_host, Revoked, "enroll_revoked_attempt"),
    "already-enrolled": Refusal(_already_enrolled, Conflict, "enroll_already_enrolled"),
    "ca-host-itself": Refusal(_ca_host_itself, Conflict, "enroll_already_enrolled"),
    "enrollment-closed": Refusal(_enrollment_closed, EnrollmentClosed, "enroll_closed"),
    "ca-locked": Refusal(_ca_locked, CaLocked, "enroll_ca_locked"),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_refused_join_changes_nothing_but_one_audit_line(
    case: Refusal, ca: CertificateAuthority, clock: ManualClock
):
    request = case.build(ca, clock)
    before = snapshot(ca.data)
    members_before = ca.roster.members

    with pytest.raises(case.error) as refused:
        enroll_now(ca, request)

    assert type(refused.value) is case.error
    assert refused.value.code == case.error.code
    assert_state_unchanged(ca.data, before)
    assert ca.roster.members == members_before
    added = audit_added(ca.data, before)
    assert [event for _, event, _ in added] == [case.event]
    _, _, fields = added[0]
    assert set(fields) == {"hostname", "result", "peer", "detail"}
    assert fields["result"] == "denied"
    assert fields["peer"] == PEER
    assert fields["hostname"] == str(request.hostname)[:253]
    assert fields["detail"] == str(refused.value)


def test_hostile_hostname_cannot_forge_an_audit_line(ca: CertificateAuthority):
    code = ca.mint_invite("node-a").code
    forged = "x\n2026-12-01T09:00:00Z | member_joined | hostname=evil | approved_by=Alice"
    before = snapshot(ca.data)

    with pytest.raises(InvalidPayload):
        enroll_now(ca, join_request(forged, code, csr_host="node-a")[1])

    added = audit_added(ca.data, before)
    assert [event for _, event, _ in added] == ["enroll_invalid_request"]
    assert added[0][2]["hostname"] == forged
    assert "\n2026-12-01T09:00:00Z | member_joined" not in ca.audit.read_text()


def test_invite_survives_refusals_and_then_enrolls(ca: CertificateAuthority):
    code = ca.mint_invite("node-a").code
    for request in (
        JoinRequest("node-a", csr_sha384(), code, PEER),
        JoinRequest("node-a", member_csr("node-b")[1], code, PEER),
        join_request("node-a", code, sans=["*.lan"])[1],
    ):
        with pytest.raises(InvalidPayload):
            enroll_now(ca, request)

    key, request = join_request("node-a", code)
    result = enroll_now(ca, request)

    assert pki.keys_match(key, pki.load_cert_pem(result.service_cert_pem))
    assert ca.roster.is_enrolled("node-a")


# -- which refusal wins when a join breaks several rules --------------------------------------


def _closed_and_bad_invite(ca, clock):
    ca.set_enrollment(False)
    return join_request("node-a", f"{secrets.token_hex(24)}.{ca.ca_fingerprint}")[1]


def _closed_and_bad_csr(ca, clock):
    code = ca.mint_invite("node-a").code
    ca.set_enrollment(False)
    return JoinRequest("node-a", "garbage", code, PEER)


def _bad_invite_and_bad_csr(ca, clock):
    return JoinRequest("node-a", csr_p384(), secrets.token_hex(24), PEER)


def _bad_invite_and_revoked(ca, clock):
    join_member(ca, "node-a")
    ca.revoke("node-a")
    return join_request("node-a", secrets.token_hex(24))[1]


def _revoked_and_bad_csr(ca, clock):
    join_member(ca, "node-a")
    ca.revoke("node-a")
    return JoinRequest("node-a", csr_basic_constraints(), ca.mint_invite("node-a").code, PEER)


def _enrolled_and_bad_csr(ca, clock):
    join_member(ca, "node-a")
    return JoinRequest("node-a", "garbage", ca.mint_invite("node-a").code, PEER)


def _bad_hostname_and_closed(ca, clock):
    ca.set_enrollment(False)
    return JoinRequest("node|a", "garbage", "nonsense", PEER)


def _bad_hostname_and_locked(ca, clock):
    ca.lock()
    return JoinRequest("node\na", "garbage", "nonsense", PEER)


def _locked_and_closed(ca, clock):
    ca.set_enrollment(False)
    ca.lock()
    return join_request("node-a", "nonsense")[1]


ORDER = {
    "closed-before-bad-invite": Refusal(_closed_and_bad_invite, EnrollmentClosed, "enroll_closed"),
    "closed-before-bad-csr": Refusal(_closed_and_bad_csr, EnrollmentClosed, "enroll_closed"),
    "bad-invite-before-bad-csr": Refusal(
        _bad_invite_and_bad_csr, InvalidAuth, "enroll_token_invalid"
    ),
    "bad-invite-before-revoked": Refusal(
        _bad_invite_and_revoked, InvalidAuth, "enroll_token_invalid"
    ),
    "revoked-before-bad-csr": Refusal(_revoked_and_bad_csr, Revoked, "enroll_revoked_attempt"),
    "enrolled-before-bad-csr": Refusal(_enrolled_and_bad_csr, Conflict, "enroll_already_enrolled"),
    "hostname-before-closed": Refusal(
        _bad_hostname_and_closed, InvalidPayload, "enroll_invalid_request"
    ),
    "hostname-before-locked": Refusal(
        _bad_hostname_and_locked, InvalidPayload, "enroll_invalid_request"
    ),
    "locked-before-closed": Refusal(_locked_and_closed, CaLocked, "enroll_ca_locked"),
}


@pytest.mark.parametrize("case", ORDER.values(), ids=ORDER.keys())
def test_first_failed_check_is_the_one_reported(
    case: Refusal, ca: CertificateAuthority, clock: ManualClock
):
    request = case.build(ca, clock)
    before = snapshot(ca.data)

    with pytest.raises(case.error):
        enroll_now(ca, request)

    assert_state_unchanged(ca.data, before)
    assert [event for _, event, _ in audit_added(ca.data, before)] == [case.event]


def test_sixteen_extra_sans_are_accepted_and_duplicates_folded(ca: CertificateAuthority):
    extras = [f"alias{i}.lan" for i in range(15)] + ["NODE-A.local"]
    _, result = join_member(ca, "node-a", sans=extras)

    cert = pki.load_cert_pem(result.service_cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [n.value for n in names] == ["node-a", "node-a.local", *extras[:15]]


def test_join_without_approval_records_the_member(ca: CertificateAuthority, clock: ManualClock):
    seq = ca.roster.seq
    key, result = join_member(ca, "node-a", sans=["alias.lan"])

    member = ca.roster.find("node-a")
    cert = pki.load_cert_pem(result.service_cert_pem)
    assert member.cert_fingerprint == pki.fingerprint(cert)
    assert member.cert_sans == ("node-a", "node-a.local", "alias.lan")
    assert member.enrolled_by == "Alice"
    assert member.role == "member"
    assert member.pinned_ca_fingerprint == ca.ca_fingerprint
    assert ca.roster.seq == seq + 1
    assert result.ca_fingerprint == ca.ca_fingerprint
    assert result.to_json()["policy"]["leaf_lifetime_days"] == 90
    _, event, fields = ca.audit.events()[-1]
    assert event == "member_joined"
    assert fields["approved_by"] == "Alice"
    assert fields["fingerprint"] == member.cert_fingerprint


# -- approval ---------------------------------------------------------------------------------


class Decider:
    """Records every request it is shown and answers with `answer` (or raises it)."""

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.requests: list[ApprovalRequest] = []

    async def __call__(self, request: ApprovalRequest):
        self.requests.append(request)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


@pytest.fixture
def team(make_ca) -> CertificateAuthority:
    return make_ca("team", "Alice")


@pytest.mark.asyncio
async def test_approved_join_records_the_approver(team: CertificateAuthority):
    code = team.mint_invite("node-a").code
    key, request = join_request("node-a", code)
    decider = Decider(Approved("  Bob "))
    before = snapshot(team.data)

    result = await enroll(team, request, decider)

    assert len(decider.requests) == 1
    assert pki.keys_match(key, pki.load_cert_pem(result.service_cert_pem))
    assert team.roster.find("node-a").enrolled_by == "Bob"
    added = audit_added(team.data, before)
    assert [event for _, event, _ in added] == ["member_joined"]
    assert added[0][2]["approved_by"] == "Bob"
    assert team.pending_approvals() == []


@pytest.mark.asyncio
async def test_decider_sees_who_asks_and_the_key_they_hold(
    team: CertificateAuthority, clock: ManualClock
):
    code = team.mint_invite("node-a").code
    clock.advance(dt.timedelta(minutes=7))
    key, request = join_request("node-a", code, sans=["alias.lan", "10.0.0.9"], peer="192.0.2.77")
    decider = Decider(Approved("Bob"))

    await enroll(team, request, decider)

    seen = decider.requests[0]
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert seen.hostname == "node-a"
    assert seen.peer_address == "192.0.2.77"
    assert seen.sans == ("node-a", "node-a.local", "alias.lan", "10.0.0.9")
    assert seen.invite_hostname == "node-a"
    assert seen.invite_age == dt.timedelta(minutes=7)
    assert seen.key_fingerprint == hashlib.sha256(spki).hexdigest()
    assert seen.confirmation_code == pki.confirmation_code(seen.key_fingerprint)
    assert re.fullmatch(r"\d{3} \d{3}", seen.confirmation_code)
    assert seen.requires_approval is True
    assert seen.deadline - seen.received_at == dt.timedelta(seconds=300)
    assert seen.to_json()["invite_age_seconds"] == 420


REFUSED_DECISIONS = {
    "denied": (Denied("not on my watch"), "not on my watch"),
    "approved-empty-name": (Approved(""), "without an operator name"),
    "approved-blank-name": (Approved("   "), "without an operator name"),
    "approved-non-string-name": (Approved(None), "not a decision"),
    "returns-none": (None, "NoneType"),
    "returns-yes": ("yes", "str"),
    "returns-true": (True, "bool"),
    "raises": (RuntimeError("dialog crashed"), "dialog crashed"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("answer, detail", REFUSED_DECISIONS.values(), ids=REFUSED_DECISIONS)
async def test_anything_but_a_named_approval_refuses_and_keeps_the_invite(
    team: CertificateAuthority, answer: object, detail: str
):
    code = team.mint_invite("node-a").code
    before = snapshot(team.data)

    with pytest.raises(ApprovalDenied):
        await enroll(team, join_request("node-a", code)[1], Decider(answer))

    assert_state_unchanged(team.data, before)
    added = audit_added(team.data, before)
    assert [event for _, event, _ in added] == ["enroll_approval_denied"]
    assert detail in added[0][2]["detail"]
    assert team.pending_approvals() == []

    await enroll(team, join_request("node-a", code)[1], Decider(Approved("Bob")))
    assert team.roster.is_enrolled("node-a")


async def _never_answers(request: ApprovalRequest):
    await asyncio.Event().wait()


@pytest.mark.asyncio
async def test_unanswered_approval_times_out(team: CertificateAuthority, monkeypatch):
    monkeypatch.setattr(ca_module, "APPROVAL_TIMEOUT", dt.timedelta(milliseconds=50))
    code = team.mint_invite("node-a").code
    before = snapshot(team.data)

    with pytest.raises(ApprovalTimeout):
        await enroll(team, join_request("node-a", code)[1], _never_answers)

    assert_state_unchanged(team.data, before)
    assert [event for _, event, _ in audit_added(team.data, before)] == ["enroll_approval_timeout"]
    await enroll(team, join_request("node-a", code)[1], Decider(Approved("Bob")))
    assert team.roster.is_enrolled("node-a")


@pytest.mark.asyncio
async def test_deadline_follows_the_ca_clock(team: CertificateAuthority, clock: ManualClock):
    """A join whose deadline has passed by the CA's clock is not put to the approver."""
    code = team.mint_invite("node-a").code
    decider = Decider(Approved("Bob"))

    async def run_and_let_time_pass(func, *args):
        result = func(*args)
        if func == team.check_join:
            clock.advance(dt.timedelta(seconds=301))
        return result

    with pytest.raises(ApprovalTimeout):
        await enroll(team, join_request("node-a", code)[1], decider, run=run_and_let_time_pass)
    assert not team.roster.is_enrolled("node-a")
    assert team.audit.events()[-1][1] == "enroll_approval_timeout"


@pytest.mark.asyncio
async def test_no_decider_attached_is_approval_unavailable(team: CertificateAuthority):
    code = team.mint_invite("node-a").code
    before = snapshot(team.data)

    with pytest.raises(ApprovalUnavailable) as refused:
        await enroll(team, join_request("node-a", code)[1], None)

    assert refused.value.http_status == 503
    assert_state_unchanged(team.data, before)
    assert [event for _, event, _ in audit_added(team.data, before)] == [
        "enroll_approval_unavailable"
    ]
    await enroll(team, join_request("node-a", code)[1], Decider(Approved("Bob")))
    assert team.roster.is_enrolled("node-a")


def _team_bad_csr(ca, clock):
    return JoinRequest("node-a", csr_sha384(), ca.mint_invite("node-a").code, PEER)


def _team_closed(ca, clock):
    code = ca.mint_invite("node-a").code
    ca.set_enrollment(False, operator="Alice")
    return join_request("node-a", code)[1]


def _team_bad_invite(ca, clock):
    ca.mint_invite("node-a")
    return join_request("node-a", secrets.token_hex(24))[1]


def _team_revoked(ca, clock):
    code = ca.mint_invite("node-a").code
    asyncio.run(enroll(ca, join_request("node-a", code)[1], Decider(Approved("Bob"))))
    ca.revoke("node-a")
    return join_request("node-a", ca.mint_invite("node-a").code)[1]


NEVER_ASKED = {
    "bad-csr": (_team_bad_csr, InvalidPayload),
    "enrollment-closed": (_team_closed, EnrollmentClosed),
    "bad-invite": (_team_bad_invite, InvalidAuth),
    "revoked": (_team_revoked, Revoked),
    "bad-hostname": (_with_hostname("node|a"), InvalidPayload),
    "wildcard-san": (_with_sans(["*.lan"]), InvalidPayload),
}


@pytest.mark.parametrize("build, error", NEVER_ASKED.values(), ids=NEVER_ASKED)
def test_decider_is_never_asked_about_a_join_that_fails_a_check(
    team: CertificateAuthority, clock: ManualClock, build, error
):
    request = build(team, clock)
    decider = Decider(Approved("Bob"))
    before = snapshot(team.data)

    with pytest.raises(error):
        asyncio.run(enroll(team, request, decider))

    assert decider.requests == []
    assert_state_unchanged(team.data, before)
    assert len(audit_added(team.data, before)) == 1


@pytest.mark.asyncio
async def test_second_join_with_the_same_invite_is_refused_while_the_first_waits(
    team: CertificateAuthority,
):
    code = team.mint_invite("node-a").code
    asked, answer = asyncio.Event(), asyncio.Event()

    async def slow_approver(request: ApprovalRequest):
        asked.set()
        await answer.wait()
        return Approved("Bob")

    first_key, first = join_request("node-a", code)
    waiting = asyncio.create_task(enroll(team, first, slow_approver))
    await asyncio.wait_for(asked.wait(), 5)

    with pytest.raises(InvalidAuth):
        await enroll(team, join_request("node-a", code)[1], slow_approver)
    assert not waiting.done()
    assert [p.hostname for p in team.pending_approvals()] == ["node-a"]
    assert team.status()["member_count"] == 1
    assert team.trust_bundle()["bundle"]["seq"] == team.roster.seq

    answer.set()
    result = await asyncio.wait_for(waiting, 5)
    assert pki.keys_match(first_key, pki.load_cert_pem(result.service_cert_pem))
    events = [event for _, event, _ in team.audit.events()]
    assert events[-2:] == ["enroll_token_invalid", "member_joined"]

    with pytest.raises(InvalidAuth):
        await enroll(team, join_request("node-a", code)[1], slow_approver)


@pytest.mark.asyncio
async def test_enrollment_closed_while_waiting_refuses_and_keeps_the_invite(
    team: CertificateAuthority,
):
    code = team.mint_invite("node-a").code

    async def approver_who_closes_enrollment_first(request: ApprovalRequest):
        team.set_enrollment(False, operator="Alice")
        return Approved("Bob")

    with pytest.raises(EnrollmentClosed):
        await enroll(team, join_request("node-a", code)[1], approver_who_closes_enrollment_first)

    assert not team.roster.is_enrolled("node-a")
    assert team.audit.events()[-1][1] == "enroll_failed"
    team.set_enrollment(True, operator="Alice")
    await enroll(team, join_request("node-a", code)[1], Decider(Approved("Bob")))
    assert team.roster.is_enrolled("node-a")


@pytest.mark.asyncio
async def test_cancelled_approval_refuses_the_join(team: CertificateAuthority):
    code = team.mint_invite("node-a").code
    task = asyncio.create_task(enroll(team, join_request("node-a", code)[1], _never_answers))
    while not team.pending_approvals():
        await asyncio.sleep(0.01)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert team.pending_approvals() == []
    _, event, fields = team.audit.events()[-1]
    assert event == "enroll_approval_denied"
    assert "cancelled" in fields["detail"]
    await enroll(team, join_request("node-a", code)[1], Decider(Approved("Bob")))
    assert team.roster.is_enrolled("node-a")


@pytest.mark.asyncio
async def test_a_join_cancelled_during_its_checks_lets_go_of_its_invite(
    team: CertificateAuthority,
):
    code = team.mint_invite("node-a").code
    checking, finish_checks = threading.Event(), threading.Event()
    real_check = team.check_join

    def slow_check(join):
        checking.set()
        finish_checks.wait(5)
        return real_check(join)

    team.check_join = slow_check
    task = asyncio.create_task(enroll(team, join_request("node-a", code)[1], _never_answers))
    await asyncio.to_thread(checking.wait, 5)
    task.cancel()
    finish_checks.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(300):
        if team.audit.events()[-1][1] == "enroll_approval_denied":
            break
        await asyncio.sleep(0.01)

    team.check_join = real_check
    assert team.pending_approvals() == []
    assert "hung up" in team.audit.events()[-1][2]["detail"]
    await enroll(team, join_request("node-a", code)[1], Decider(Approved("Bob")))
    assert team.roster.is_enrolled("node-a")


@pytest.mark.asyncio
async def test_joins_needing_no_approval_are_not_listed_as_pending(
    ca: CertificateAuthority,
):
    code = ca.mint_invite("node-a").code
    assert not ca.roster.requires_approval

    pending = ca.check_join(join_request("node-a", code)[1])

    assert ca.pending_approvals() == []
    ca.finish_join(pending, None)
    assert ca.roster.is_enrolled("node-a")
