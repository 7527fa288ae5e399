"""The signed trust bundle: what the CA tells members about the mesh, and how they check it.

Signed bytes are the `bundle` object as compact JSON with keys sorted at every depth, in
UTF-8; the signature is ECDSA P-256 / SHA-256 in DER, standard base64. This matches Koi
certmesh 0.9, so a Koi member verifies a koi-tray bundle and the other way round.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from koi_tray.certmesh import pki
from koi_tray.certmesh.errors import BundleRejected, InvalidPayload
from koi_tray.certmesh.hostnames import same_host
from koi_tray.certmesh.roster import CertPolicy, Roster
from koi_tray.certmesh.timefmt import format_timestamp, parse_timestamp


def canonical_bytes(bundle: dict[str, Any]) -> bytes:
    """Serialise a bundle exactly as it is signed."""
    return json.dumps(bundle, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def build_bundle(roster: Roster, ca_cert_pem: str, ca_fp: str, now: dt.datetime) -> dict[str, Any]:
    """Project the roster into the bundle members see: no operators, hooks or SANs."""
    fingerprints = {m.hostname.lower(): m.cert_fingerprint for m in roster.members}
    return {
        "seq": roster.seq,
        "issued_at": format_timestamp(now),
        "ca_fingerprint": ca_fp,
        "ca_cert_pem": ca_cert_pem,
        "policy": roster.policy.to_json(),
        "members": [
            {
                "hostname": m.hostname,
                "cert_fingerprint": m.cert_fingerprint,
                "not_after": format_timestamp(m.cert_expires),
                "status": m.status,
            }
            for m in roster.members
        ],
        "revoked": [
            {
                "hostname": r.hostname,
                "cert_fingerprint": fingerprints.get(r.hostname.lower(), ""),
                "revoked_at": format_timestamp(r.revoked_at),
            }
            for r in roster.revocations
        ],
    }


def sign_bundle(bundle: dict[str, Any], ca_key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    signature = ca_key.sign(canonical_bytes(bundle), ec.ECDSA(hashes.SHA256()))
    return {"bundle": bundle, "signature": base64.b64encode(signature).decode()}


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every check, reduced to what a member keeps."""

    seq: int
    issued_at: dt.datetime
    ca_fingerprint: str
    ca_cert_pem: str
    policy: CertPolicy
    revoked_hostnames: tuple[str, ...]
    member_count: int
    raw: dict[str, Any]

    def revokes(self, hostname: str) -> bool:
        return any(same_host(h, hostname) for h in self.revoked_hostnames)


def verify_bundle(signed: object, pinned_fp: str, last_seq: int | None) -> VerifiedBundle:
    """Check a signed bundle against the member's pin and the last seq it accepted.

    Checks, in order: shape; the CA PEM inside hashes to the pin; the bundle's own
    `ca_fingerprint` agrees; the signature verifies with that CA's key; `seq` is not lower
    than `last_seq` (equal is a no-op the caller detects).

    Raises:
        BundleRejected: With the reason; nothing about the member should change.
    """
    try:
        bundle = signed["bundle"]
        signature = base64.b64decode(signed["signature"], validate=True)
        ca_pem = bundle["ca_cert_pem"]
        seq = bundle["seq"]
        if not isinstance(bundle, dict) or not isinstance(ca_pem, str):
            raise TypeError("bundle must be an object with a ca_cert_pem string")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise TypeError("seq must be a non-negative integer")
        ca_cert = pki.load_cert_pem(ca_pem)
    except (KeyError, TypeError, binascii.Error, ValueError, InvalidPayload) as exc:
        raise BundleRejected(f"trust bundle is malformed: {exc}") from exc

    derived = pki.fingerprint(ca_cert)
    if not hmac.compare_digest(derived, pinned_fp):
        raise BundleRejected(
            f"trust bundle CA {derived[:16]}… does not match the pinned CA {pinned_fp[:16]}…"
        )
    if bundle.get("ca_fingerprint") != derived:
        raise BundleRejected("trust bundle names a CA fingerprint other than its certificate's")

    public_key = ca_cert.public_key()
    try:
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        public_key.verify(signature, canonical_bytes(bundle), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise BundleRejected("trust bundle signature does not verify") from exc

    if last_seq is not None and seq < last_seq:
        raise BundleRejected(f"trust bundle seq {seq} is older than the last seen {last_seq}")

    try:
        names = [str(r["hostname"]) for r in bundle.get("revoked", [])]
        names += [
            str(m["hostname"]) for m in bundle.get("members", []) if m.get("status") == "revoked"
        ]
        revoked = tuple(dict.fromkeys(name.lower() for name in names))
        issued_at = parse_timestamp(bundle["issued_at"])
        member_count = len(bundle.get("members", []))
    except (KeyError, TypeError, AttributeError, InvalidPayload) as exc:
        raise BundleRejected(f"trust bundle is malformed: {exc}") from exc
    return VerifiedBundle(
        seq=seq,
        issued_at=issued_at,
        ca_fingerprint=derived,
        ca_cert_pem=ca_pem,
        policy=CertPolicy.from_json(bundle.get("policy")),
        revoked_hostnames=revoked,
        member_count=member_count,
        raw=bundle,
    )
