"""The certificate authority: creation, unlock, joins, renewals, revocation, the bundle.

`CertificateAuthority` owns `certmesh/ca/`, `roster.json`, `invites.json` and the CA
node's own leaf. Its methods are synchronous and thread-safe: a short lock guards the
roster while it is checked and rewritten, and is never held while anyone waits for a
person (see `enrollment.enroll`). Callers on an event loop run the methods that sign or
fsync in an executor; `unlock` runs Argon2id and must never run on the loop.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid
from dataclasses import dataclass, replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from koi_tray.certmesh import keystore, pki
from koi_tray.certmesh.approval import APPROVAL_TIMEOUT, ApprovalRequest
from koi_tray.certmesh.audit import AuditLog
from koi_tray.certmesh.bundle import build_bundle, sign_bundle
from koi_tray.certmesh.clock import Clock, SystemClock
from koi_tray.certmesh.errors import (
    CaLocked,
    CaNotInitialized,
    Conflict,
    CorruptState,
    EnrollmentClosed,
    InvalidAuth,
    InvalidPayload,
    NotFound,
    RateLimited,
    Revoked,
    ScopeViolation,
    StorageError,
)
from koi_tray.certmesh.files import (
    PUBLIC_FILE,
    atomic_write,
    atomic_write_json,
    ensure_private_dir,
    preserve_corrupt_copy,
    read_json,
)
from koi_tray.certmesh.hooks import validate_reload_hook
from koi_tray.certmesh.hostnames import leaf_sans, same_host, validate_hostname
from koi_tray.certmesh.invites import InviteBook, MintedInvite, Reservation, split_code
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.leafstore import LeafStore
from koi_tray.certmesh.member import is_due
from koi_tray.certmesh.roster import (
    ROLE_MEMBER,
    ROLE_PRIMARY,
    CertPolicy,
    Revocation,
    Roster,
    RosterMember,
)
from koi_tray.certmesh.rosterstore import RosterStore
from koi_tray.certmesh.timefmt import format_timestamp

log = logging.getLogger(__name__)

MAX_PENDING_APPROVALS = 16


@dataclass(frozen=True)
class Posture:
    """Who may join: is enrollment open, and does every join need a person's approval."""

    enrollment_open: bool
    requires_approval: bool
    auto_unlock: bool


PRESETS = {
    "just-me": Posture(enrollment_open=True, requires_approval=False, auto_unlock=True),
    "team": Posture(enrollment_open=True, requires_approval=True, auto_unlock=True),
    "organization": Posture(enrollment_open=False, requires_approval=True, auto_unlock=False),
}


@dataclass(frozen=True)
class JoinRequest:
    """A join as it arrived: claimed hostname, CSR, invite code, and where it came from."""

    hostname: object
    csr_pem: object
    invite_token: object
    peer_address: str | None = None
    sans: object = None


@dataclass(frozen=True)
class PendingJoin:
    """A join that passed every check and holds its invite until it is decided."""

    request: ApprovalRequest
    reservation: Reservation
    csr: x509.CertificateSigningRequest
    sans: tuple[str, ...]


@dataclass(frozen=True)
class JoinResult:
    hostname: str
    ca_cert_pem: str
    service_cert_pem: str
    ca_fingerprint: str
    policy: CertPolicy

    def to_json(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "ca_cert": self.ca_cert_pem,
            "service_cert": self.service_cert_pem,
            "ca_fingerprint": self.ca_fingerprint,
            "policy": self.policy.to_json(),
        }


@dataclass(frozen=True)
class RenewResult:
    hostname: str
    service_cert_pem: str
    ca_cert_pem: str
    ca_fingerprint: str
    expires: dt.datetime
    policy: CertPolicy

    def to_json(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "service_cert": self.service_cert_pem,
            "ca_cert": self.ca_cert_pem,
            "ca_fingerprint": self.ca_fingerprint,
            "expires": format_timestamp(self.expires),
            "policy": self.policy.to_json(),
        }


class CertificateAuthority:
    """A mesh CA on this node. Create it with `create`, or load it with `open`."""

    def __init__(
        self, data: DataDir, hostname: str, roster: Roster, clock: Clock, audit: AuditLog
    ) -> None:
        self.data = data
        self.hostname = hostname
        self.clock = clock
        self.audit = audit
        self.invites = InviteBook(data.invites, clock)
        self.leaf_store = LeafStore(data.certs, hostname)
        self.ca_cert = pki.load_cert_pem(data.ca_cert.read_bytes())
        self.ca_fingerprint = pki.fingerprint(self.ca_cert)
        self.ca_cert_pem = pki.cert_to_pem(self.ca_cert).decode()
        self.locked_reason: str | None = "the CA key is locked; unlock it with the passphrase"
        self.auto_unlock_problem: str | None = None
        self.rosters = RosterStore(data.roster, roster)
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._lock = self.rosters.lock
        self._pending_lock = threading.Lock()
        self._pending: dict[str, PendingJoin] = {}

    # -- creation and loading -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        data: DataDir,
        hostname: str,
        passphrase: str,
        posture: Posture,
        operator: str | None = None,
        *,
        clock: Clock | None = None,
        kdf: keystore.KdfParams | None = None,
    ) -> CertificateAuthority:
        """Create a new mesh CA in `data` and issue the CA node's own leaf.

        Raises:
            Conflict: A CA already exists in this data dir.
            InvalidPayload: Bad hostname, short passphrase, or approval required without
                an operator name.
        """
        clock = clock or SystemClock()
        validate_hostname(hostname)
        keystore.check_passphrase_strength(passphrase)
        if posture.requires_approval and not (operator and operator.strip()):
            raise InvalidPayload("an operator name is required when joins need approval")
        if data.ca_key.exists() or data.roster.exists():
            raise Conflict(f"a certmesh CA already exists in {data.root}")

        data.prepare()
        ensure_private_dir(data.ca_dir)
        now = clock.now()
        key = pki.generate_key()
        ca_cert = pki.create_ca_certificate(key, now)
        atomic_write(data.ca_key, keystore.encrypt_ca_key(key, passphrase, kdf))
        atomic_write(data.ca_cert, pki.cert_to_pem(ca_cert), PUBLIC_FILE)
        atomic_write_json(data.ca_dir / "settings.json", {"auto_unlock": posture.auto_unlock})

        roster = Roster(
            created_at=now,
            enrollment_open=posture.enrollment_open,
            requires_approval=posture.requires_approval,
            operator=(operator or "").strip() or None,
            policy=CertPolicy(),
            seq=0,
        )
        audit = AuditLog(data.audit_log, clock)
        ca = cls(data, hostname, roster, clock, audit)
        ca._key = key
        ca.locked_reason = None
        ca.rosters.write_now(roster)
        ca.renew_self(force=True)
        audit.record(
            "ca_initialized",
            enrollment_open="open" if posture.enrollment_open else "closed",
            requires_approval="yes" if posture.requires_approval else "no",
            operator=roster.operator,
            ca_fingerprint=ca.ca_fingerprint,
        )
        if posture.auto_unlock:
            ca.auto_unlock_problem = keystore.store_auto_unlock(ca.ca_fingerprint, passphrase)
            if ca.auto_unlock_problem:
                log.warning(
                    "CA %s: auto-unlock not set up: %s",
                    ca.ca_fingerprint[:16],
                    ca.auto_unlock_problem,
                )
        log.info("created certmesh CA %s on %s", ca.ca_fingerprint[:16], hostname)
        return ca

    @classmethod
    def open(
        cls, data: DataDir, hostname: str, *, clock: Clock | None = None
    ) -> CertificateAuthority | None:
        """Load the CA in `data`, locked; None when this data dir holds no CA.

        Raises:
            CorruptState: `roster.json` or the CA certificate is damaged. A copy of the
                damaged file is kept beside it and nothing is overwritten.
        """
        clock = clock or SystemClock()
        if not data.ca_key.exists():
            return None
        try:
            raw = read_json(data.roster)
            if raw is None:
                found = "holds only null" if data.roster.exists() else "is missing"
                raise CorruptState(f"{data.roster} {found} although the CA key exists")
            roster = Roster.from_json(raw, str(data.roster))
            return cls(data, hostname, roster, clock, AuditLog(data.audit_log, clock))
        except CorruptState:
            stamp = clock.now().strftime("%Y%m%dT%H%M%SZ")
            preserve_corrupt_copy(data.roster, stamp)
            raise
        except InvalidPayload as exc:
            raise CorruptState(f"{data.ca_cert} is not a readable CA certificate") from exc

    @property
    def auto_unlock(self) -> bool:
        settings = read_json(self.data.ca_dir / "settings.json") or {}
        return bool(settings.get("auto_unlock", False))

    @property
    def locked(self) -> bool:
        return self._key is None

    def unlock(self, passphrase: str, *, via: str = "passphrase") -> None:
        """Decrypt the CA key (slow: Argon2id). Run it off the event loop.

        Raises:
            InvalidAuth: Wrong passphrase; audited as `unlock_failed`.
        """
        try:
            key = keystore.decrypt_ca_key(self.data.ca_key.read_bytes(), passphrase)
        except InvalidAuth:
            self.audit.record("unlock_failed", via=via)
            raise
        if not pki.keys_match(key, self.ca_cert):
            raise CorruptState(f"{self.data.ca_key} does not belong to {self.data.ca_cert}")
        with self._lock:
            self._key = key
            self.locked_reason = None
        log.info("CA %s unlocked via %s", self.ca_fingerprint[:16], via)

    def try_auto_unlock(self) -> bool:
        """Unlock from the OS keyring when auto-unlock is on; record why not otherwise."""
        if not self.locked:
            return True
        if not self.auto_unlock:
            self.locked_reason = "the CA key is locked; auto-unlock is off for this CA"
            return False
        passphrase, why = keystore.load_auto_unlock(self.ca_fingerprint)
        if passphrase is None:
            self.locked_reason = f"the CA key is locked: {why}"
            log.warning("CA %s stays locked: %s", self.ca_fingerprint[:16], why)
            return False
        try:
            self.unlock(passphrase, via="keyring")
        except InvalidAuth:
            self.locked_reason = "the CA key is locked: the keyring passphrase is wrong"
            return False
        return True

    def lock(self) -> None:
        with self._lock:
            self._key = None
            self.locked_reason = "the CA key is locked; unlock it with the passphrase"

    # -- roster access -------------------------------------------------------------------

    @property
    def roster(self) -> Roster:
        """The roster as it is on disk (what status and trust bundles tell others)."""
        return self.rosters.durable

    @property
    def _roster(self) -> Roster:
        return self.rosters.working

    def _require_key(self) -> ec.EllipticCurvePrivateKey:
        key = self._key
        if key is None:
            raise CaLocked(self.locked_reason or "the CA is locked")
        return key

    # -- posture, invites, revocation, hooks ----------------------------------------------

    def set_enrollment(self, open_: bool, operator: str | None = None) -> None:
        self.rosters.write_now(replace(self._roster, enrollment_open=open_))
        self.audit.record("enrollment_opened" if open_ else "enrollment_closed", operator=operator)

    def set_requires_approval(self, required: bool, operator: str | None = None) -> None:
        if required and not (operator or self._roster.operator):
            raise InvalidPayload("an operator name is required when joins need approval")
        self.rosters.write_now(replace(self._roster, requires_approval=required))
        self.audit.record("approval_policy_changed", requires_approval=required, operator=operator)

    def mint_invite(self, hostname: object, ttl: dt.timedelta | None = None) -> MintedInvite:
        host = validate_hostname(hostname)
        minted = self.invites.mint(host, self.ca_fingerprint, ttl)
        self.audit.record(
            "invite_minted", hostname=host, expires_at=format_timestamp(minted.expires_at)
        )
        return minted

    def revoke(
        self, hostname: object, reason: str | None = None, operator: str | None = None
    ) -> None:
        """Revoke a member for good; its hostname can never join again.

        Raises:
            NotFound: No member has this hostname.
        """
        host = validate_hostname(hostname)
        with self._lock:
            member = self._roster.find(host)
            if member is None:
                raise NotFound(f"no member named {host}")
            if same_host(member.hostname, self.hostname):
                raise ScopeViolation("the CA cannot revoke its own node")
            revocation = Revocation(member.hostname, self.clock.now(), operator, reason)
            generation = self.rosters.stage(self._roster.with_revocation(revocation))
        self.rosters.commit(generation)
        self.audit.record(
            "member_revoked",
            hostname=member.hostname,
            operator=operator or "unknown",
            reason=reason or "none",
        )
        log.info("revoked member %s (reason: %s)", member.hostname, reason or "none")

    def set_hook(self, hostname: object, command: object) -> None:
        host = validate_hostname(hostname)
        hook = validate_reload_hook(command)
        with self._lock:
            member = self._roster.find(host)
            if member is None:
                raise NotFound(f"no member named {host}")
            if not member.active:
                raise Revoked(f"{host} is revoked")
            hooked = self._roster.with_member(replace(member, reload_hook=hook), bump=False)
            generation = self.rosters.stage(hooked)
        self.rosters.commit(generation)

    # -- enrollment ----------------------------------------------------------------------

    def check_join(self, join: JoinRequest) -> PendingJoin:
        """Run every check a join must pass before anyone is asked, and hold its invite.

        Order: hostname, enrollment open, invite (reserved, not spent), not revoked, not
        already an active member, CSR. Each refusal is audited and changes nothing else.

        Raises:
            InvalidPayload, EnrollmentClosed, InvalidAuth, Revoked, Conflict, CaLocked,
            RateLimited: The first check that fails.
        """
        hostname = str(join.hostname)[:253]
        reservation: Reservation | None = None
        try:
            hostname = validate_hostname(join.hostname)
            self._require_key()
            sans = tuple(leaf_sans(hostname, join.sans))
            if not self._roster.enrollment_open:
                raise EnrollmentClosed("enrollment is closed on this CA")
            if not isinstance(join.invite_token, str) or not join.invite_token:
                raise InvalidAuth("an invite code is required (TOTP joins are not supported)")
            secret, pin = split_code(join.invite_token)
            if pin is not None and pin != self.ca_fingerprint:
                raise InvalidAuth("the invite was made by another CA")
            reservation = self.invites.reserve(secret, hostname)
            if self._roster.is_revoked(hostname):
                raise Revoked(f"{hostname} is revoked and cannot join again")
            if self._roster.is_enrolled(hostname):
                raise Conflict(f"{hostname} is already an active member")
            checked = pki.check_csr(join.csr_pem, hostname)
            pending = self._pending_join(hostname, join, reservation, checked, sans)
        except Exception as exc:
            if reservation is not None:
                self.invites.release(reservation)
            self._audit_refusal(hostname, exc, join.peer_address)
            raise
        return pending

    def _pending_join(
        self,
        hostname: str,
        join: JoinRequest,
        reservation: Reservation,
        checked: pki.CheckedCsr,
        sans: tuple[str, ...],
    ) -> PendingJoin:
        """Build the approval request; register it if a person must decide.

        Raises:
            RateLimited: As many joins as allowed already wait for a person.
        """
        now = self.clock.now()
        invite = reservation.invite
        request = ApprovalRequest(
            request_id=uuid.uuid4().hex[:12],
            hostname=hostname,
            requires_approval=self._roster.requires_approval,
            peer_address=join.peer_address,
            sans=sans,
            invite_hostname=invite.hostname,
            invite_age=None if invite.created_at is None else now - invite.created_at,
            key_fingerprint=checked.key_fingerprint,
            confirmation_code=pki.confirmation_code(checked.key_fingerprint),
            received_at=now,
            deadline=now + APPROVAL_TIMEOUT,
        )
        pending = PendingJoin(request, reservation, checked.csr, sans)
        if request.requires_approval:
            with self._pending_lock:
                if len(self._pending) >= MAX_PENDING_APPROVALS:
                    raise RateLimited("too many joins are waiting for approval; try again later")
                self._pending[request.request_id] = pending
        return pending

    def _audit_refusal(self, hostname: str, exc: Exception, peer: str | None) -> None:
        events = {
            "enrollment_closed": "enroll_closed",
            "invalid_auth": "enroll_token_invalid",
            "revoked": "enroll_revoked_attempt",
            "conflict": "enroll_already_enrolled",
            "invalid_payload": "enroll_invalid_request",
            "ca_locked": "enroll_ca_locked",
            "rate_limited": "enroll_rate_limited",
        }
        code = getattr(exc, "code", "internal")
        event = events.get(code, "enroll_failed")
        self.audit.record(event, hostname=hostname, result="denied", peer=peer, detail=str(exc))
        log.info("refused join from %s as %s: %s", peer or "?", hostname, exc)

    def pending_approvals(self) -> list[ApprovalRequest]:
        with self._pending_lock:
            return [p.request for p in self._pending.values()]

    def abandon_join(self, pending: PendingJoin, event: str, detail: str) -> None:
        """Refuse a pending join: release its invite and audit why (`event`)."""
        with self._pending_lock:
            self._pending.pop(pending.request.request_id, None)
        self.invites.release(pending.reservation)
        self.audit.record(
            event,
            hostname=pending.request.hostname,
            result="denied",
            peer=pending.request.peer_address,
            detail=detail,
        )
        log.info("join of %s refused (%s): %s", pending.request.hostname, event, detail)

    def finish_join(self, pending: PendingJoin, approved_by: str | None) -> JoinResult:
        """Spend the invite, sign the CSR and record the member.

        The checks that could have changed while a person decided (enrollment open, CA
        unlocked, revoked, already enrolled) run again under the roster lock.
        """
        hostname = pending.request.hostname
        try:
            with self._lock:
                key = self._require_key()
                roster = self._roster
                if not roster.enrollment_open:
                    raise EnrollmentClosed("enrollment was closed while the join waited")
                if roster.is_revoked(hostname):
                    raise Revoked(f"{hostname} is revoked and cannot join again")
                if roster.is_enrolled(hostname):
                    raise Conflict(f"{hostname} is already an active member")

                now = self.clock.now()
                cert = pki.issue_leaf(
                    key,
                    self.ca_cert,
                    pending.csr.public_key(),
                    hostname,
                    list(pending.sans),
                    now,
                    roster.policy.lifetime,
                )
                member = RosterMember(
                    hostname=hostname,
                    role=ROLE_PRIMARY if not roster.members else ROLE_MEMBER,
                    enrolled_at=now,
                    cert_fingerprint=pki.fingerprint(cert),
                    cert_expires=cert.not_valid_after_utc,
                    cert_sans=pending.sans,
                    enrolled_by=approved_by or roster.operator,
                    last_seen=now,
                    pinned_ca_fingerprint=self.ca_fingerprint,
                )
                generation = self.rosters.stage(roster.with_member(member))
            self.rosters.commit(generation)
        except Exception as exc:
            self.abandon_join(pending, "enroll_failed", str(exc))
            raise
        finally:
            with self._pending_lock:
                self._pending.pop(pending.request.request_id, None)
        self._spend_after_join(pending)

        self.audit.record(
            "member_joined",
            hostname=hostname,
            fingerprint=member.cert_fingerprint,
            role=member.role,
            approved_by=approved_by or roster.operator or "self",
            peer=pending.request.peer_address,
        )
        log.info("enrolled %s (leaf %s)", hostname, member.cert_fingerprint[:16])
        return JoinResult(
            hostname,
            self.ca_cert_pem,
            pki.cert_to_pem(cert).decode(),
            self.ca_fingerprint,
            roster.policy,
        )

    def _spend_after_join(self, pending: PendingJoin) -> None:
        """Mark the invite used once its member is on the roster.

        The member is already recorded, so a failed write here cannot undo the join. An
        invite left unspent is harmless: it is bound to a host that is now an active
        member, and an active or revoked host can never join again.
        """
        try:
            self.invites.spend(pending.reservation)
        except (StorageError, CorruptState) as exc:
            self.invites.release(pending.reservation)
            log.warning(
                "%s joined, but its invite could not be marked used: %s",
                pending.request.hostname,
                exc,
            )

    # -- renewal -------------------------------------------------------------------------

    def renew_member(
        self,
        client_cn: str | None,
        client_fingerprint: str | None,
        hostname: object,
        csr_pem: object,
    ) -> RenewResult:
        """Sign a member's new key, called over mTLS with the member's current leaf.

        The caller's CN must equal `hostname`, and the presented leaf must be the member's
        current certificate or its previous one. The leaf a renewal was authorised with
        becomes the previous one, so a member whose answers were lost (it still holds the
        old leaf) keeps being able to renew however often that happens.

        Raises:
            CaLocked, ScopeViolation, Revoked, NotFound, InvalidPayload.
        """
        host = validate_hostname(hostname)
        key = self._require_key()
        if client_cn is None or not same_host(client_cn, host):
            raise ScopeViolation(f"the client certificate is for {client_cn!r}, not {host!r}")

        with self._lock:
            roster = self._roster
            if roster.is_revoked(host):
                self.audit.record("mtls_revoked_rejected", hostname=host, op="renew")
                raise Revoked(f"{host} is revoked")
            member = roster.find(host)
            if member is None:
                raise NotFound(f"no member named {host}")
            if not member.active:
                raise ScopeViolation(f"{host} is not an active member")
            _check_presented_leaf(member, client_fingerprint)
            checked = pki.check_csr(csr_pem, host)
            allowed = {s.lower().rstrip(".") for s in member.cert_sans}
            stray = [n for n in checked.dns_names if n.lower().rstrip(".") not in allowed]
            if stray:
                raise InvalidPayload(
                    f"the CSR asks for names {host} was not enrolled with: {stray}"
                )

            now = self.clock.now()
            cert = pki.issue_leaf(
                key,
                self.ca_cert,
                checked.csr.public_key(),
                member.hostname,
                list(member.cert_sans),
                now,
                roster.policy.lifetime,
            )
            renewed = replace(
                member,
                previous_cert_fingerprint=client_fingerprint,
                cert_fingerprint=pki.fingerprint(cert),
                cert_expires=cert.not_valid_after_utc,
                last_seen=now,
            )
            generation = self.rosters.stage(roster.with_member(renewed))
        self.rosters.commit(generation)

        self.audit.record(
            "cert_renewed",
            hostname=member.hostname,
            fingerprint=renewed.cert_fingerprint,
            expires=format_timestamp(renewed.cert_expires),
        )
        log.info("renewed %s until %s", member.hostname, renewed.cert_expires.date())
        return RenewResult(
            member.hostname,
            pki.cert_to_pem(cert).decode(),
            self.ca_cert_pem,
            self.ca_fingerprint,
            cert.not_valid_after_utc,
            roster.policy,
        )

    def health(
        self,
        client_cn: str | None,
        client_fingerprint: str | None,
        hostname: object,
        pinned: object,
    ) -> dict[str, Any]:
        """Tell a member whether its pinned CA is this one, and note when it was last seen.

        A member must present its current or previous certificate, as for renewal, since
        the check rewrites its `last_seen`.

        Raises:
            CaLocked, ScopeViolation, Revoked, InvalidPayload.
        """
        host = validate_hostname(hostname)
        self._require_key()
        if client_cn is None or not same_host(client_cn, host):
            raise ScopeViolation(f"the client certificate is for {client_cn!r}, not {host!r}")
        with self._lock:
            if self._roster.is_revoked(host):
                self.audit.record("mtls_revoked_rejected", hostname=host, op="health")
                raise Revoked(f"{host} is revoked")
            member = self._roster.find(host)
            if member is not None:
                _check_presented_leaf(member, client_fingerprint)
                touched = replace(member, last_seen=self.clock.now())
                generation = self.rosters.stage(self._roster.with_member(touched, bump=False))
        if member is not None:
            self.rosters.commit(generation)
        return {"valid": pinned == self.ca_fingerprint, "ca_fingerprint": self.ca_fingerprint}

    def self_leaf_due(self) -> bool:
        leaf = self.leaf_store.read()
        return leaf is None or is_due(leaf.cert, self._roster.policy, self.clock.now())

    def renew_self(self, force: bool = False) -> dt.datetime | None:
        """Issue the CA node's own leaf when due (or `force`); return its expiry, or None.

        Raises:
            CaLocked: The leaf is due but the CA key is locked.
        """
        if not force and not self.self_leaf_due():
            return None
        key = self._require_key()
        sans = [self.hostname, f"{self.hostname}.local", "localhost", "127.0.0.1"]
        leaf_key = pki.generate_key()

        with self._lock:
            roster = self._roster
            now = self.clock.now()
            cert = pki.issue_leaf(
                key,
                self.ca_cert,
                leaf_key.public_key(),
                self.hostname,
                sans,
                now,
                roster.policy.lifetime,
            )
            old = roster.find(self.hostname)
            entry = RosterMember(
                hostname=self.hostname,
                role=ROLE_PRIMARY,
                enrolled_at=old.enrolled_at if old else now,
                cert_fingerprint=pki.fingerprint(cert),
                cert_expires=cert.not_valid_after_utc,
                cert_sans=tuple(sans),
                enrolled_by=roster.operator,
                last_seen=now,
                pinned_ca_fingerprint=self.ca_fingerprint,
                previous_cert_fingerprint=old.cert_fingerprint if old else None,
            )
            self.leaf_store.install(leaf_key, cert, self.ca_cert)
            generation = self.rosters.stage(roster.with_member(entry))
        self.rosters.commit(generation)

        self.audit.record("self_enroll", hostname=self.hostname, fingerprint=entry.cert_fingerprint)
        log.info(
            "issued the CA node's own leaf for %s until %s", self.hostname, cert.not_valid_after_utc
        )
        return cert.not_valid_after_utc

    # -- what the CA tells others ---------------------------------------------------------

    def trust_bundle(self) -> dict[str, Any]:
        """Sign the durable roster's projection (re-signed per call, like Koi)."""
        key = self._require_key()
        roster = self.roster
        bundle = build_bundle(roster, self.ca_cert_pem, self.ca_fingerprint, self.clock.now())
        return sign_bundle(bundle, key)

    def status(self) -> dict[str, Any]:
        """Koi's `/status` body; never blocks on a pending approval."""
        roster = self.roster
        return {
            "ca_initialized": True,
            "ca_locked": self.locked,
            "ca_fingerprint": self.ca_fingerprint,
            "enrollment_open": roster.enrollment_open,
            "requires_approval": roster.requires_approval,
            "enrollment_state": "open" if roster.enrollment_open else "closed",
            "member_count": len(roster.active_members),
            "seq": roster.seq,
            "policy": roster.policy.to_json(),
            "members": [
                {
                    "hostname": m.hostname,
                    "role": m.role,
                    "status": m.status,
                    "cert_fingerprint": m.cert_fingerprint,
                    "cert_expires": format_timestamp(m.cert_expires),
                }
                for m in roster.members
            ],
        }


def _check_presented_leaf(member: RosterMember, fingerprint: str | None) -> None:
    """Refuse a caller whose leaf is neither the member's current nor its previous one."""
    known = {member.cert_fingerprint, member.previous_cert_fingerprint} - {None, ""}
    if not fingerprint or fingerprint not in known:
        raise ScopeViolation(
            f"the presented certificate is not {member.hostname}'s current or previous one"
        )


def not_initialized_status() -> dict[str, Any]:
    """Koi's `/status` body on a node without a CA."""
    return {
        "ca_initialized": False,
        "ca_locked": True,
        "enrollment_open": False,
        "requires_approval": False,
        "enrollment_state": "closed",
        "member_count": 0,
        "seq": 0,
        "policy": CertPolicy().to_json(),
        "members": [],
    }


def require_ca(ca: CertificateAuthority | None) -> CertificateAuthority:
    if ca is None:
        raise CaNotInitialized("no certmesh CA on this node; run 'koi-tray certmesh create'")
    return ca
