"""A member node: installing the join answer, renewing, and when renewal is due."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from koitest import member_csr
from meshtools import join_member, member_node

from koi_tray.certmesh import pki
from koi_tray.certmesh.ca import CertificateAuthority
from koi_tray.certmesh.clock import ManualClock
from koi_tray.certmesh.errors import InvalidPayload, RenewalFailed
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.member import Membership, due_at, is_due, new_renewal_request
from koi_tray.certmesh.roster import CertPolicy


@pytest.fixture
def member(ca: CertificateAuthority, clock: ManualClock, tmp_path: Path) -> Membership:
    return member_node(ca, clock, tmp_path / "member-node")


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_join_installs_a_matching_private_identity(ca: CertificateAuthority, member: Membership):
    leaf = member.leaf()
    leaf_dir = member.data.leaf_dir("node-a")

    assert pki.fingerprint(leaf.cert) == ca.roster.find("node-a").cert_fingerprint
    assert pki.keys_match(leaf.key, leaf.cert)
    assert pki.fingerprint(leaf.ca_cert) == ca.ca_fingerprint
    assert _mode(leaf_dir / "key.pem") == 0o600
    assert _mode(leaf_dir) == 0o700
    assert _mode(member.data.certs) == 0o700
    assert (leaf_dir / "fullchain.pem").read_bytes() == (
        pki.cert_to_pem(leaf.cert) + pki.cert_to_pem(leaf.ca_cert)
    )
    state = json.loads(member.data.member_state.read_text())
    assert state["ca_fingerprint"] == ca.ca_fingerprint
    assert state["hostname"] == "node-a"
    assert (state["ca_http_port"], state["ca_mtls_port"]) == (5641, 5642)
    assert _mode(member.data.member_state) == 0o600


def test_join_answer_for_another_ca_installs_nothing(
    ca: CertificateAuthority, clock: ManualClock, tmp_path: Path
):
    key, result = join_member(ca, "node-a")
    data = DataDir(tmp_path / "member-node")

    with pytest.raises(RenewalFailed, match="pinned"):
        Membership.install_join(
            data,
            clock,
            key,
            result.to_json(),
            ca_host="ca-host",
            ca_http_port=5641,
            pinned_fingerprint="0" * 64,
            sans=["node-a"],
        )
    assert not data.root.exists() or not any(data.root.rglob("*.pem"))
    assert Membership.load(data, clock) is None


def test_join_answer_for_another_key_installs_nothing(
    ca: CertificateAuthority, clock: ManualClock, tmp_path: Path
):
    _, result = join_member(ca, "node-a")
    data = DataDir(tmp_path / "member-node")

    with pytest.raises(RenewalFailed, match="different key"):
        Membership.install_join(
            data,
            clock,
            pki.generate_key(),
            result.to_json(),
            ca_host="ca-host",
            ca_http_port=5641,
            pinned_fingerprint=ca.ca_fingerprint,
            sans=["node-a"],
        )
    assert Membership.load(data, clock) is None


def test_renewal_round_trip_installs_the_new_identity(
    ca: CertificateAuthority, clock: ManualClock, member: Membership
):
    old = member.leaf()
    clock.advance(dt.timedelta(days=61))
    request = new_renewal_request(member.state)

    response = ca.renew_member("node-a", old.fingerprint, "node-a", request.csr_pem)
    cert = member.install_renewal(request.key, response.to_json())

    new = member.leaf()
    assert new.fingerprint == pki.fingerprint(cert) == ca.roster.find("node-a").cert_fingerprint
    assert new.fingerprint != old.fingerprint
    assert pki.keys_match(request.key, new.cert)
    assert ca.roster.find("node-a").previous_cert_fingerprint == old.fingerprint
    assert _mode(member.data.leaf_dir("node-a") / "key.pem") == 0o600


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda r, other: {**r, "service_cert": other}, "different key"),
        (lambda r, other: {**r, "ca_cert": r["service_cert"]}, "pinned"),
        (lambda r, other: {**r, "service_cert": "garbage"}, "unreadable"),
        (lambda r, other: "not an object", "JSON object"),
    ],
    ids=["leaf-for-another-key", "wrong-ca", "garbage-leaf", "not-a-dict"],
)
def test_bad_renewal_answer_keeps_the_old_identity(
    ca: CertificateAuthority, clock: ManualClock, member: Membership, mangle, message
):
    old = member.leaf()
    files = {p: p.read_bytes() for p in member.data.certs.rglob("*") if p.is_file()}
    request = new_renewal_request(member.state)
    response = ca.renew_member("node-a", old.fingerprint, "node-a", request.csr_pem).to_json()
    _, stranger_csr = member_csr("node-a")
    other = ca.renew_member("node-a", old.fingerprint, "node-a", stranger_csr).service_cert_pem

    with pytest.raises(RenewalFailed, match=message):
        member.install_renewal(request.key, mangle(response, other))

    assert member.leaf().fingerprint == old.fingerprint
    assert {p: p.read_bytes() for p in member.data.certs.rglob("*") if p.is_file()} == files


def test_leaf_signed_by_an_impostor_with_our_ca_name_is_refused(
    ca: CertificateAuthority, clock: ManualClock, member: Membership
):
    impostor_key = pki.generate_key()
    request = new_renewal_request(member.state)
    forged = pki.issue_leaf(
        impostor_key,
        ca.ca_cert,
        request.key.public_key(),
        "node-a",
        ["node-a"],
        clock.now(),
        dt.timedelta(days=90),
    )
    response = {"service_cert": pki.cert_to_pem(forged).decode(), "ca_cert": ca.ca_cert_pem}

    with pytest.raises(RenewalFailed, match="not signed by the pinned CA"):
        member.install_renewal(request.key, response)


def test_renewal_is_due_thirty_days_before_expiry(member: Membership, clock: ManualClock):
    cert = member.leaf().cert
    policy = member.state.policy

    assert due_at(cert, policy) == cert.not_valid_after_utc - dt.timedelta(days=30)
    assert not is_due(cert, policy, clock.now() + dt.timedelta(days=59, hours=23))
    assert is_due(cert, policy, clock.now() + dt.timedelta(days=60))
    short = CertPolicy(leaf_lifetime_days=90, renew_threshold_days=60)
    assert is_due(cert, short, clock.now() + dt.timedelta(days=30))


def test_renewal_csr_asks_for_this_host_only(member: Membership):
    request = new_renewal_request(member.state)
    checked = pki.check_csr(request.csr_pem, "node-a")
    assert checked.dns_names == ("node-a", "node-a.local")


def test_reload_hook_is_validated_and_kept(member: Membership, clock: ManualClock):
    member.set_reload_hook("/usr/bin/systemctl reload nginx")
    assert Membership.load(member.data, clock).state.reload_hook == (
        "/usr/bin/systemctl reload nginx"
    )

    saved = member.data.member_state.read_bytes()
    with pytest.raises(InvalidPayload):
        member.set_reload_hook("systemctl reload nginx; rm -rf /")
    assert member.data.member_state.read_bytes() == saved

    member.set_reload_hook(None)
    assert "reload_hook" not in json.loads(member.data.member_state.read_text())


@pytest.mark.parametrize(
    "policy",
    [
        {"leaf_lifetime_days": 30, "renew_threshold_days": 30},
        {"leaf_lifetime_days": "x"},
        {"renew_threshold_days": 0},
        "90",
    ],
)
def test_inconsistent_policy_falls_back_to_defaults(policy):
    assert CertPolicy.from_json(policy) == CertPolicy()
