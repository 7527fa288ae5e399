"""A member's side of the mesh: `member.json`, renewal due-ness, and what bundles change.

`member.json` keeps Koi's fields (hostname, CA address and ports, pinned CA fingerprint,
SANs, policy, last bundle seq, reload hook) and koi-tray's additions: the revoked
hostnames and this node's own revoked state from the last accepted bundle, and when that
bundle arrived, so both survive a restart.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from koi_tray.certmesh import pki
from koi_tray.certmesh.bundle import VerifiedBundle, verify_bundle
from koi_tray.certmesh.clock import Clock
from koi_tray.certmesh.errors import CertmeshError, CorruptState, RenewalFailed
from koi_tray.certmesh.files import atomic_write_json, preserve_corrupt_copy, read_json
from koi_tray.certmesh.hooks import validate_reload_hook
from koi_tray.certmesh.hostnames import same_host
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.leafstore import Leaf, LeafStore
from koi_tray.certmesh.roster import CertPolicy
from koi_tray.certmesh.timefmt import format_timestamp, parse_timestamp

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 5641
DEFAULT_MTLS_PORT = 5642


@dataclass(frozen=True)
class MemberState:
    hostname: str
    ca_host: str
    ca_fingerprint: str
    sans: tuple[str, ...]
    policy: CertPolicy = field(default_factory=CertPolicy)
    ca_http_port: int = DEFAULT_HTTP_PORT
    ca_mtls_port: int = DEFAULT_MTLS_PORT
    last_bundle_seq: int = 0
    reload_hook: str | None = None
    revoked_hostnames: tuple[str, ...] = ()
    self_revoked: bool = False
    last_bundle_at: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hostname": self.hostname,
            "ca_host": self.ca_host,
            "ca_mtls_port": self.ca_mtls_port,
            "ca_http_port": self.ca_http_port,
            "ca_fingerprint": self.ca_fingerprint,
            "sans": list(self.sans),
            "policy": self.policy.to_json(),
            "last_bundle_seq": self.last_bundle_seq,
            "revoked_hostnames": list(self.revoked_hostnames),
            "self_revoked": self.self_revoked,
        }
        if self.reload_hook:
            out["reload_hook"] = self.reload_hook
        if self.last_bundle_at:
            out["last_bundle_at"] = format_timestamp(self.last_bundle_at)
        return out

    @classmethod
    def from_json(cls, raw: object, source: str = "member.json") -> MemberState:
        """Parse `member.json`.

        Raises:
            CorruptState: The document does not have the member state's shape.
        """
        try:
            last_bundle_at = raw.get("last_bundle_at")
            return cls(
                hostname=str(raw["hostname"]),
                ca_host=str(raw["ca_host"]),
                ca_fingerprint=str(raw["ca_fingerprint"]),
                sans=tuple(str(s) for s in raw.get("sans", [])),
                policy=CertPolicy.from_json(raw.get("policy")),
                ca_http_port=int(raw.get("ca_http_port", DEFAULT_HTTP_PORT)),
                ca_mtls_port=int(raw.get("ca_mtls_port", DEFAULT_MTLS_PORT)),
                last_bundle_seq=int(raw.get("last_bundle_seq", 0)),
                reload_hook=raw.get("reload_hook") or None,
                revoked_hostnames=tuple(raw.get("revoked_hostnames", [])),
                self_revoked=bool(raw.get("self_revoked", False)),
                last_bundle_at=parse_timestamp(last_bundle_at) if last_bundle_at else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError, CertmeshError) as exc:
            raise CorruptState(
                f"{source} does not look like certmesh member state: {exc!r}"
            ) from exc


def load_member_state(path: Path) -> MemberState | None:
    """Read `member.json`; None only when the file does not exist (`null` is damage)."""
    raw = read_json(path)
    if raw is None and not path.exists():
        return None
    return MemberState.from_json(raw, str(path))


def save_member_state(path: Path, state: MemberState) -> None:
    atomic_write_json(path, state.to_json())


def due_at(cert: x509.Certificate, policy: CertPolicy) -> dt.datetime:
    """When a leaf becomes due: its own notAfter minus the renewal threshold."""
    return cert.not_valid_after_utc - policy.threshold


def is_due(cert: x509.Certificate, policy: CertPolicy, now: dt.datetime) -> bool:
    return now >= due_at(cert, policy)


@dataclass(frozen=True)
class BundleChange:
    """What accepting a verified bundle changed for this member."""

    state: MemberState
    updated: bool
    newly_revoked: bool


def apply_bundle(state: MemberState, bundle: VerifiedBundle, now: dt.datetime) -> BundleChange:
    """Fold a verified bundle into the member state (the caller saves it).

    An equal seq refreshes only `last_bundle_at`; a higher one takes policy, the revoked
    list and this node's revoked state.
    """
    if bundle.seq == state.last_bundle_seq and state.last_bundle_at is not None:
        return BundleChange(replace(state, last_bundle_at=now), False, False)

    self_revoked = bundle.revokes(state.hostname)
    new_state = replace(
        state,
        last_bundle_seq=bundle.seq,
        policy=bundle.policy,
        revoked_hostnames=bundle.revoked_hostnames,
        self_revoked=self_revoked or state.self_revoked,
        last_bundle_at=now,
    )
    return BundleChange(new_state, True, self_revoked and not state.self_revoked)


@dataclass(frozen=True)
class RenewalRequest:
    """A fresh key and the CSR that asks the CA to certify it."""

    key: ec.EllipticCurvePrivateKey
    csr_pem: str


def new_renewal_request(state: MemberState) -> RenewalRequest:
    key = pki.generate_key()
    return RenewalRequest(key, pki.build_csr(key, state.hostname, list(state.sans)).decode())


def check_issued_leaf(
    state: MemberState, key: ec.EllipticCurvePrivateKey, cert_pem: str, ca_pem: str
) -> tuple[x509.Certificate, x509.Certificate]:
    """Check what the CA returned before installing it.

    Raises:
        RenewalFailed: The CA certificate does not hash to the pin, the leaf is not for
            this host or this key, or the CA did not sign it.
    """
    try:
        ca_cert = pki.load_cert_pem(ca_pem)
        cert = pki.load_cert_pem(cert_pem)
    except CertmeshError as exc:
        raise RenewalFailed(f"the CA returned an unreadable certificate: {exc}") from exc

    if pki.fingerprint(ca_cert) != state.ca_fingerprint:
        raise RenewalFailed("the CA certificate in the response does not match the pinned CA")
    common_name = pki.leaf_common_name(cert)
    if common_name is None or not same_host(common_name, state.hostname):
        raise RenewalFailed(f"the CA issued a certificate for {common_name!r}, not this host")
    if not pki.keys_match(key, cert):
        raise RenewalFailed("the CA issued a certificate for a different key")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise RenewalFailed("the returned certificate is not signed by the pinned CA") from exc
    return cert, ca_cert


class Membership:
    """A member node's standing in a mesh: `member.json` plus its installed leaf."""

    def __init__(self, data: DataDir, state: MemberState, clock: Clock) -> None:
        self.data = data
        self.state = state
        self.clock = clock
        self.leaf_store = LeafStore(data.certs, state.hostname)
        # Changes to `state` are read-modify-write from worker threads (a bundle pull, a
        # new reload hook); one lock keeps either from undoing the other.
        self._state_lock = threading.RLock()

    @classmethod
    def load(cls, data: DataDir, clock: Clock) -> Membership | None:
        """Load this node's membership; None when it has not joined a mesh.

        Raises:
            CorruptState: `member.json` is damaged; a copy is kept and nothing overwritten.
        """
        try:
            state = load_member_state(data.member_state)
        except CorruptState:
            preserve_corrupt_copy(data.member_state, clock.now().strftime("%Y%m%dT%H%M%SZ"))
            raise
        return None if state is None else cls(data, state, clock)

    @classmethod
    def install_join(
        cls,
        data: DataDir,
        clock: Clock,
        key: ec.EllipticCurvePrivateKey,
        response: dict[str, Any],
        *,
        ca_host: str,
        ca_http_port: int,
        ca_mtls_port: int = DEFAULT_MTLS_PORT,
        pinned_fingerprint: str,
        sans: list[str],
    ) -> Membership:
        """Check a join response against the pin, install the leaf and write `member.json`.

        Raises:
            RenewalFailed: The response's CA does not match the pin or the leaf is wrong.
        """
        hostname = str(response.get("hostname", ""))
        state = MemberState(
            hostname=hostname,
            ca_host=ca_host,
            ca_fingerprint=pinned_fingerprint,
            sans=tuple(sans),
            policy=CertPolicy.from_json(response.get("policy")),
            ca_http_port=ca_http_port,
            ca_mtls_port=ca_mtls_port,
        )
        cert, ca_cert = check_issued_leaf(
            state, key, str(response.get("service_cert", "")), str(response.get("ca_cert", ""))
        )
        data.prepare()
        membership = cls(data, state, clock)
        membership.leaf_store.install(key, cert, ca_cert)
        save_member_state(data.member_state, state)
        log.info("joined the mesh of CA %s as %s", pinned_fingerprint[:16], hostname)
        return membership

    def leaf(self) -> Leaf | None:
        return self.leaf_store.read()

    def save(self, state: MemberState) -> None:
        with self._state_lock:
            save_member_state(self.data.member_state, state)
            self.state = state

    def set_reload_hook(self, command: str | None) -> None:
        hook = None if command is None else validate_reload_hook(command)
        with self._state_lock:
            self.save(replace(self.state, reload_hook=hook))

    def mark_revoked(self) -> None:
        """Record that the CA refused this node as revoked (kept across restarts)."""
        with self._state_lock:
            self.save(replace(self.state, self_revoked=True))

    def accept_bundle(self, signed: object) -> BundleChange:
        """Verify a pulled bundle, fold it in and save; refresh `ca.pem` if it drifted.

        Raises:
            BundleRejected: Nothing changes on disk.
        """
        with self._state_lock:
            state = self.state
            verified = verify_bundle(signed, state.ca_fingerprint, state.last_bundle_seq)
            change = apply_bundle(state, verified, self.clock.now())
            if change.updated or self._bundle_time_is_stale(change.state):
                self.save(change.state)
            else:
                self.state = change.state
        if self.leaf_store.write_ca(pki.load_cert_pem(verified.ca_cert_pem)):
            log.warning(
                "ca.pem of %s differed from the CA's bundle; rewrote it", self.state.hostname
            )
        if change.newly_revoked:
            log.warning(
                "trust bundle seq %d says this node (%s) is revoked",
                verified.seq,
                self.state.hostname,
            )
        return change

    def _bundle_time_is_stale(self, state: MemberState) -> bool:
        """Tell whether the bundle time on disk is over a day behind `state`'s.

        An unchanged bundle only moves `last_bundle_at`; writing that every hour would
        fsync `member.json` 24 times a day for nothing, so it is written daily.
        """
        saved = load_member_state(self.data.member_state)
        if saved is None or saved.last_bundle_at is None or state.last_bundle_at is None:
            return True
        return state.last_bundle_at - saved.last_bundle_at >= dt.timedelta(days=1)

    def install_renewal(
        self, key: ec.EllipticCurvePrivateKey, response: object
    ) -> x509.Certificate:
        """Check a renew response and install key, leaf and CA as one unit.

        Raises:
            RenewalFailed: The response is malformed or fails `check_issued_leaf`.
        """
        if not isinstance(response, dict):
            raise RenewalFailed("the CA's renew response is not a JSON object")
        cert, ca_cert = check_issued_leaf(
            self.state,
            key,
            str(response.get("service_cert", "")),
            str(response.get("ca_cert", "")),
        )
        self.leaf_store.install(key, cert, ca_cert)
        log.info(
            "installed renewed leaf for %s until %s", self.state.hostname, cert.not_valid_after_utc
        )
        return cert
