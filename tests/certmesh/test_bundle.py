"""The signed trust bundle: verifiable by anyone, refused when touched, never rolled back."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from koitest import PASSPHRASE
from meshtools import join_member, member_node

from koi_tray.certmesh import keystore
from koi_tray.certmesh.bundle import build_bundle, sign_bundle, verify_bundle
from koi_tray.certmesh.ca import PRESETS, CertificateAuthority
from koi_tray.certmesh.clock import ManualClock
from koi_tray.certmesh.errors import BundleRejected
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.member import Membership
from koi_tray.certmesh.roster import CertPolicy


@pytest.fixture
def mesh(ca: CertificateAuthority) -> CertificateAuthority:
    """A CA with an active member and a revoked one."""
    join_member(ca, "node-a", sans=["alias.lan"])
    join_member(ca, "node-r")
    ca.set_hook("node-a", "/usr/bin/systemctl restart nginx")
    ca.revoke("node-r", reason="lost", operator="Alice")
    return ca


def _wire(signed: dict[str, Any]) -> dict[str, Any]:
    """What a member receives: the JSON text parsed again by an independent reader."""
    return json.loads(json.dumps(signed))


def test_bundle_verifies_independently_after_reserialisation(mesh: CertificateAuthority):
    wire = _wire(mesh.trust_bundle())

    signed_bytes = json.dumps(
        wire["bundle"], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    mesh.ca_cert.public_key().verify(
        base64.b64decode(wire["signature"]), signed_bytes, ec.ECDSA(hashes.SHA256())
    )

    verified = verify_bundle(wire, mesh.ca_fingerprint, None)
    assert verified.seq == mesh.roster.seq
    assert verified.revokes("node-r") and verified.revokes("NODE-R")
    assert not verified.revokes("node-a")
    assert verified.member_count == 3
    assert verified.ca_cert_pem == mesh.ca_cert_pem


def test_key_order_does_not_matter(mesh: CertificateAuthority):
    def reversed_keys(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: reversed_keys(value[k]) for k in reversed(list(value))}
        if isinstance(value, list):
            return [reversed_keys(v) for v in value]
        return value

    shuffled = reversed_keys(_wire(mesh.trust_bundle()))
    assert verify_bundle(shuffled, mesh.ca_fingerprint, None).seq == mesh.roster.seq


def test_bundle_tells_members_nothing_private(mesh: CertificateAuthority):
    text = json.dumps(mesh.trust_bundle())
    for private in ("Alice", "alias.lan", "systemctl", "lost", "192.0.2"):
        assert private not in text
    bundle = mesh.trust_bundle()["bundle"]
    assert set(bundle) == {
        "seq",
        "issued_at",
        "ca_fingerprint",
        "ca_cert_pem",
        "policy",
        "members",
        "revoked",
    }
    assert {m["hostname"]: m["status"] for m in bundle["members"]} == {
        "ca-host": "active",
        "node-a": "active",
        "node-r": "revoked",
    }
    assert bundle["revoked"][0]["cert_fingerprint"] == mesh.roster.find("node-r").cert_fingerprint


def _leaves(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    else:
        yield path, value


def _changed(value: Any) -> Any:
    """Return a plausible different value of the same type: one character, digit or flag."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if not value:
        return "0"
    middle = len(value) // 2
    while not value[middle].isalnum():
        middle += 1
    swap = {"0": "1", "9": "8", "a": "b", "z": "y", "A": "B", "Z": "Y"}
    replacement = swap.get(value[middle], "0" if value[middle] != "0" else "1")
    if value[middle].isalpha() and value[middle] not in swap:
        replacement = "a" if value[middle] != "a" else "b"
    return value[:middle] + replacement + value[middle + 1 :]


def test_every_single_field_tamper_is_refused(mesh: CertificateAuthority):
    wire = _wire(mesh.trust_bundle())
    paths = list(_leaves(wire))
    assert len(paths) == 23  # 7 bundle fields, 3 members x 4, 1 revocation x 3, signature

    accepted = []
    for path, value in paths:
        tampered = copy.deepcopy(wire)
        target = tampered
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = _changed(value)
        assert target[path[-1]] != value
        try:
            verify_bundle(tampered, mesh.ca_fingerprint, None)
        except BundleRejected:
            continue
        accepted.append(path)

    assert accepted == []
    verify_bundle(wire, mesh.ca_fingerprint, None)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda w: w.pop("signature"),
        lambda w: w.pop("bundle"),
        lambda w: w.update(signature="not base64!"),
        lambda w: w.update(bundle=[]),
        lambda w: w["bundle"].update(seq=-1),
        lambda w: w["bundle"].update(seq=True),
        lambda w: w["bundle"].update(seq="5"),
        lambda w: w["bundle"].pop("ca_cert_pem"),
        lambda w: w["bundle"].update(extra="field"),
        lambda w: w["bundle"]["members"].pop(),
        lambda w: w["bundle"]["revoked"].clear(),
    ],
    ids=[
        "no-signature",
        "no-bundle",
        "bad-base64",
        "bundle-list",
        "negative-seq",
        "bool-seq",
        "string-seq",
        "no-ca-pem",
        "added-field",
        "member-removed",
        "revocation-removed",
    ],
)
def test_structural_tampering_is_refused(mesh: CertificateAuthority, mangle):
    wire = _wire(mesh.trust_bundle())
    mangle(wire)
    with pytest.raises(BundleRejected):
        verify_bundle(wire, mesh.ca_fingerprint, None)


@pytest.mark.parametrize("signed", [None, [], "bundle", 42])
def test_non_object_bundle_is_refused(mesh: CertificateAuthority, signed):
    with pytest.raises(BundleRejected):
        verify_bundle(signed, mesh.ca_fingerprint, None)


@pytest.fixture
def other_ca(tmp_path: Path, clock: ManualClock) -> CertificateAuthority:
    return CertificateAuthority.create(
        DataDir(tmp_path / "other-ca"),
        "other-host",
        PASSPHRASE,
        PRESETS["just-me"],
        "Mallory",
        clock=clock,
        kdf=keystore.FAST_TEST_KDF,
    )


def test_bundle_of_another_ca_is_refused(mesh: CertificateAuthority, other_ca):
    with pytest.raises(BundleRejected, match="pinned"):
        verify_bundle(_wire(other_ca.trust_bundle()), mesh.ca_fingerprint, None)


def test_our_bundle_signed_by_another_ca_key_is_refused(mesh: CertificateAuthority, other_ca):
    other_key = keystore.decrypt_ca_key(other_ca.data.ca_key.read_bytes(), PASSPHRASE)
    forged = sign_bundle(mesh.trust_bundle()["bundle"], other_key)
    with pytest.raises(BundleRejected, match="signature"):
        verify_bundle(_wire(forged), mesh.ca_fingerprint, None)


def test_other_ca_pem_with_our_fingerprint_field_is_refused(mesh: CertificateAuthority, other_ca):
    other_key = keystore.decrypt_ca_key(other_ca.data.ca_key.read_bytes(), PASSPHRASE)
    bundle = dict(other_ca.trust_bundle()["bundle"], ca_fingerprint=mesh.ca_fingerprint)
    with pytest.raises(BundleRejected):
        verify_bundle(_wire(sign_bundle(bundle, other_key)), mesh.ca_fingerprint, None)


def test_lower_seq_is_refused_equal_is_accepted(mesh: CertificateAuthority):
    wire = _wire(mesh.trust_bundle())
    seq = wire["bundle"]["seq"]

    assert verify_bundle(wire, mesh.ca_fingerprint, seq).seq == seq
    assert verify_bundle(wire, mesh.ca_fingerprint, seq - 1).seq == seq
    with pytest.raises(BundleRejected, match="older"):
        verify_bundle(wire, mesh.ca_fingerprint, seq + 1)


# -- the member side: what a verified bundle changes and what survives a restart --------------


@pytest.fixture
def member(ca: CertificateAuthority, clock: ManualClock, tmp_path: Path) -> Membership:
    return member_node(ca, clock, tmp_path / "member-node")


def test_member_keeps_bundle_facts_across_a_reload(
    ca: CertificateAuthority, clock: ManualClock, member: Membership
):
    first = _wire(ca.trust_bundle())
    change = member.accept_bundle(first)
    assert change.updated and not change.newly_revoked

    join_member(ca, "node-b")
    ca.revoke("node-b")
    ca.revoke("node-a", reason="retired")
    ca_key = keystore.decrypt_ca_key(ca.data.ca_key.read_bytes(), PASSPHRASE)
    roster = ca.roster
    policy = CertPolicy(leaf_lifetime_days=60, renew_threshold_days=20, grace_days=7)
    bundle = build_bundle(
        replace(roster, policy=policy),
        ca.ca_cert_pem,
        ca.ca_fingerprint,
        clock.now(),
    )
    change = member.accept_bundle(_wire(sign_bundle(bundle, ca_key)))
    assert change.updated and change.newly_revoked

    reloaded = Membership.load(member.data, clock)
    assert reloaded.state.last_bundle_seq == roster.seq
    assert reloaded.state.policy == policy
    assert set(reloaded.state.revoked_hostnames) == {"node-a", "node-b"}
    assert reloaded.state.self_revoked is True
    assert reloaded.state.last_bundle_at == clock.now()

    saved = member.data.member_state.read_bytes()
    with pytest.raises(BundleRejected):
        reloaded.accept_bundle(first)
    assert member.data.member_state.read_bytes() == saved

    again = reloaded.accept_bundle(_wire(ca.trust_bundle()))
    assert not again.updated and not again.newly_revoked
    assert Membership.load(member.data, clock).state.self_revoked is True


def test_equal_seq_is_no_change(ca: CertificateAuthority, member: Membership):
    signed = _wire(ca.trust_bundle())
    assert member.accept_bundle(signed).updated
    before = member.state

    change = member.accept_bundle(_wire(ca.trust_bundle()))

    assert not change.updated
    assert change.state.last_bundle_seq == before.last_bundle_seq
    assert change.state.revoked_hostnames == before.revoked_hostnames


def test_bundle_from_another_ca_changes_nothing_on_the_member(
    member: Membership, other_ca: CertificateAuthority
):
    files = {p: p.read_bytes() for p in member.data.root.rglob("*") if p.is_file()}
    with pytest.raises(BundleRejected):
        member.accept_bundle(_wire(other_ca.trust_bundle()))
    assert {p: p.read_bytes() for p in member.data.root.rglob("*") if p.is_file()} == files
