"""Renewal at the CA: who may renew, with which certificate, for which names; the roster seq."""

from __future__ import annotations

import datetime as dt

import pytest
from koitest import member_csr
from meshtools import assert_state_unchanged, audit_added, join_member, snapshot

from koi_tray.certmesh import pki
from koi_tray.certmesh.ca import CertificateAuthority
from koi_tray.certmesh.clock import ManualClock
from koi_tray.certmesh.errors import (
    CaLocked,
    InvalidPayload,
    NotFound,
    Revoked,
    ScopeViolation,
)


@pytest.fixture
def fp1(ca: CertificateAuthority) -> str:
    """node-a's first leaf fingerprint; node-a enrolled with an extra SAN."""
    _, result = join_member(ca, "node-a", sans=["alias.lan", "10.0.0.9"])
    return pki.fingerprint(pki.load_cert_pem(result.service_cert_pem))


def _renew(ca: CertificateAuthority, fingerprint: str | None, cn: str | None = "node-a") -> str:
    key, csr = member_csr("node-a")
    result = ca.renew_member(cn, fingerprint, "node-a", csr)
    cert = pki.load_cert_pem(result.service_cert_pem)
    assert pki.keys_match(key, cert)
    return pki.fingerprint(cert)


def test_renewal_signs_the_recorded_names_and_rotates_fingerprints(
    ca: CertificateAuthority, clock: ManualClock, fp1: str
):
    clock.advance(dt.timedelta(days=61))
    key, csr = member_csr("node-a", ["node-a"])
    seq = ca.roster.seq
    before = snapshot(ca.data)

    result = ca.renew_member("NODE-A", fp1, "node-a", csr)

    cert = pki.load_cert_pem(result.service_cert_pem)
    sans = cert.extensions.get_extension_for_class(pki.x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == ["node-a", "node-a.local", "alias.lan", "10.0.0.9"]
    member = ca.roster.find("node-a")
    assert member.cert_fingerprint == pki.fingerprint(cert)
    assert member.previous_cert_fingerprint == fp1
    assert member.cert_expires == cert.not_valid_after_utc == clock.now() + dt.timedelta(days=90)
    assert member.last_seen == clock.now()
    assert ca.roster.seq == seq + 1
    assert result.expires == cert.not_valid_after_utc
    assert result.ca_fingerprint == ca.ca_fingerprint
    added = audit_added(ca.data, before)
    assert [event for _, event, _ in added] == ["cert_renewed"]
    assert added[0][2]["fingerprint"] == member.cert_fingerprint


@pytest.mark.parametrize("cn", ["node-b", "ca-host", None, ""])
def test_client_cn_must_be_the_hostname(ca: CertificateAuthority, fp1: str, cn):
    before = snapshot(ca.data)
    with pytest.raises(ScopeViolation):
        _renew(ca, fp1, cn=cn)
    assert_state_unchanged(ca.data, before)
    assert audit_added(ca.data, before) == []


def test_presented_certificate_must_be_current_or_previous(ca: CertificateAuthority, fp1: str):
    _, other = join_member(ca, "node-b")
    strangers = [
        None,
        "",
        "0" * 64,
        fp1.upper(),
        pki.fingerprint(pki.load_cert_pem(other.service_cert_pem)),
        ca.roster.find("ca-host").cert_fingerprint,
    ]
    before = snapshot(ca.data)

    for fingerprint in strangers:
        with pytest.raises(ScopeViolation):
            _renew(ca, fingerprint)

    assert_state_unchanged(ca.data, before)
    assert audit_added(ca.data, before) == []


def test_previous_certificate_stays_accepted_until_a_newer_one_is_used(
    ca: CertificateAuthority, fp1
):
    fp2 = _renew(ca, fp1)
    fp3 = _renew(ca, fp1)  # the answer carrying fp2 was lost; the member still holds fp1

    assert ca.roster.find("node-a").previous_cert_fingerprint == fp1
    with pytest.raises(ScopeViolation):
        _renew(ca, fp2)
    fp4 = _renew(ca, fp3)
    assert fp4 not in {fp1, fp2, fp3}
    assert ca.roster.find("node-a").previous_cert_fingerprint == fp3
    with pytest.raises(ScopeViolation):
        _renew(ca, fp1)


def test_revoked_member_cannot_renew_and_is_audited(ca: CertificateAuthority, fp1: str):
    ca.revoke("node-a", reason="retired", operator="Alice")
    before = snapshot(ca.data)

    with pytest.raises(Revoked):
        _renew(ca, fp1)

    assert_state_unchanged(ca.data, before)
    added = audit_added(ca.data, before)
    assert [(event, fields) for _, event, fields in added] == [
        ("mtls_revoked_rejected", {"hostname": "node-a", "op": "renew"})
    ]


@pytest.mark.parametrize(
    "names",
    [
        ["node-a", "bank.example"],
        ["node-a", "ca-host"],
        ["node-a", "node-a.lan"],
    ],
)
def test_csr_for_names_outside_the_recorded_sans_is_refused(
    ca: CertificateAuthority, fp1: str, names
):
    _, csr = member_csr("node-a", names)
    before = snapshot(ca.data)

    with pytest.raises(InvalidPayload, match=names[1]):
        ca.renew_member("node-a", fp1, "node-a", csr)

    assert_state_unchanged(ca.data, before)


def test_csr_for_another_cn_is_refused(ca: CertificateAuthority, fp1: str):
    _, csr = member_csr("ca-host", ["node-a"])
    with pytest.raises(InvalidPayload, match="CN"):
        ca.renew_member("node-a", fp1, "node-a", csr)


def test_unknown_member_and_locked_ca(ca: CertificateAuthority, fp1: str):
    _, csr = member_csr("node-z")
    with pytest.raises(NotFound):
        ca.renew_member("node-z", fp1, "node-z", csr)
    with pytest.raises(InvalidPayload):
        ca.renew_member("node|z", fp1, "node|z", csr)

    ca.lock()
    with pytest.raises(CaLocked):
        _renew(ca, fp1)


def test_seq_bumps_on_enroll_revoke_and_renew_only(ca: CertificateAuthority, clock: ManualClock):
    seqs = [ca.roster.seq]

    def step(action, bumps: bool):
        action()
        seqs.append(ca.roster.seq)
        assert seqs[-1] == seqs[-2] + (1 if bumps else 0), action.__name__
        assert ca.trust_bundle()["bundle"]["seq"] == seqs[-1]

    fps: dict[str, str] = {}

    def enroll():
        _, result = join_member(ca, "node-a")
        fps["a"] = pki.fingerprint(pki.load_cert_pem(result.service_cert_pem))

    def mint():
        ca.mint_invite("node-b")

    def close():
        ca.set_enrollment(False, operator="Alice")

    def reopen():
        ca.set_enrollment(True, operator="Alice")

    def renew():
        fps["a"] = _renew(ca, fps["a"])

    def health():
        ca.health("node-a", fps["a"], "node-a", ca.ca_fingerprint)

    def hook():
        ca.set_hook("node-a", "/usr/bin/systemctl reload nginx")

    def renew_self():
        clock.advance(dt.timedelta(days=61))
        assert ca.renew_self() is not None

    def revoke():
        ca.revoke("node-a", reason="retired")

    step(enroll, True)
    step(mint, False)
    step(close, False)
    step(reopen, False)
    step(renew, True)
    step(health, False)
    step(hook, False)
    step(renew_self, True)
    step(revoke, True)
    assert ca.roster.seq == seqs[0] + 4


def test_ca_cannot_revoke_itself_and_unknown_hosts_are_not_found(ca: CertificateAuthority):
    before = snapshot(ca.data)
    with pytest.raises(ScopeViolation):
        ca.revoke("ca-host")
    with pytest.raises(NotFound):
        ca.revoke("node-x")
    with pytest.raises(InvalidPayload):
        ca.revoke("node\nx")
    assert_state_unchanged(ca.data, before)
    assert audit_added(ca.data, before) == []


def test_self_leaf_is_renewed_only_when_due(ca: CertificateAuthority, clock: ManualClock):
    first = ca.leaf_store.read().fingerprint
    clock.advance(dt.timedelta(days=59))
    assert not ca.self_leaf_due()
    assert ca.renew_self() is None
    assert ca.leaf_store.read().fingerprint == first

    clock.advance(dt.timedelta(days=1))
    assert ca.self_leaf_due()
    assert ca.renew_self() == clock.now() + dt.timedelta(days=90)
    entry = ca.roster.find("ca-host")
    assert entry.cert_fingerprint == ca.leaf_store.read().fingerprint != first
    assert entry.previous_cert_fingerprint == first

    ca.lock()
    clock.advance(dt.timedelta(days=61))
    with pytest.raises(CaLocked):
        ca.renew_self()
