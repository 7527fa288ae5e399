"""The CA's roster: posture, policy, members and revocations, in Koi's `roster.json` shape.

The roster is the CA's record of who may renew. Its `seq` grows by one at every enroll,
revoke and renewal, and members see that number in the trust bundle. koi-tray adds one
field Koi does not know (`previous_cert_fingerprint`, for renewal authorization); Koi's
loader ignores it. Fields this code does not know are kept and written back unchanged.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from koi_tray.certmesh.errors import CertmeshError, CorruptState
from koi_tray.certmesh.hostnames import same_host
from koi_tray.certmesh.timefmt import format_roster_timestamp, parse_timestamp

ROLE_PRIMARY = "primary"
ROLE_MEMBER = "member"
STATUS_ACTIVE = "active"
STATUS_REVOKED = "revoked"


@dataclass(frozen=True)
class CertPolicy:
    """How long leaves live and when members renew them."""

    leaf_lifetime_days: int = 90
    renew_threshold_days: int = 30
    grace_days: int = 14

    @classmethod
    def from_json(cls, value: object) -> CertPolicy:
        """Read a policy, falling back to the defaults when it is missing or inconsistent."""
        if not isinstance(value, dict):
            return cls()
        try:
            policy = cls(
                int(value.get("leaf_lifetime_days", 90)),
                int(value.get("renew_threshold_days", 30)),
                int(value.get("grace_days", 14)),
            )
        except (TypeError, ValueError):
            return cls()
        if not 0 < policy.renew_threshold_days < policy.leaf_lifetime_days:
            return cls()
        return policy

    def to_json(self) -> dict[str, int]:
        return {
            "leaf_lifetime_days": self.leaf_lifetime_days,
            "renew_threshold_days": self.renew_threshold_days,
            "grace_days": self.grace_days,
        }

    @property
    def lifetime(self) -> dt.timedelta:
        return dt.timedelta(days=self.leaf_lifetime_days)

    @property
    def threshold(self) -> dt.timedelta:
        return dt.timedelta(days=self.renew_threshold_days)


@dataclass(frozen=True)
class RosterMember:
    hostname: str
    role: str
    enrolled_at: dt.datetime
    cert_fingerprint: str
    cert_expires: dt.datetime
    cert_sans: tuple[str, ...]
    status: str = STATUS_ACTIVE
    enrolled_by: str | None = None
    last_seen: dt.datetime | None = None
    pinned_ca_fingerprint: str | None = None
    reload_hook: str | None = None
    previous_cert_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def active(self) -> bool:
        return self.status == STATUS_ACTIVE

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(
            hostname=self.hostname,
            role=self.role,
            enrolled_at=format_roster_timestamp(self.enrolled_at),
            cert_fingerprint=self.cert_fingerprint,
            cert_expires=format_roster_timestamp(self.cert_expires),
            cert_sans=list(self.cert_sans),
            status=self.status,
        )
        optional = {
            "enrolled_by": self.enrolled_by,
            "last_seen": self.last_seen and format_roster_timestamp(self.last_seen),
            "pinned_ca_fingerprint": self.pinned_ca_fingerprint,
            "reload_hook": self.reload_hook,
            "previous_cert_fingerprint": self.previous_cert_fingerprint,
        }
        out.update({key: value for key, value in optional.items() if value})
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RosterMember:
        known = {
            "hostname",
            "role",
            "enrolled_at",
            "cert_fingerprint",
            "cert_expires",
            "cert_sans",
            "status",
            "enrolled_by",
            "last_seen",
            "pinned_ca_fingerprint",
            "reload_hook",
            "previous_cert_fingerprint",
        }
        last_seen = raw.get("last_seen")
        return cls(
            hostname=str(raw["hostname"]),
            role=str(raw.get("role", ROLE_MEMBER)),
            enrolled_at=parse_timestamp(raw["enrolled_at"]),
            cert_fingerprint=str(raw.get("cert_fingerprint", "")),
            cert_expires=parse_timestamp(raw["cert_expires"]),
            cert_sans=tuple(str(s) for s in raw.get("cert_sans", [])),
            status=str(raw.get("status", STATUS_ACTIVE)),
            enrolled_by=raw.get("enrolled_by"),
            last_seen=parse_timestamp(last_seen) if last_seen else None,
            pinned_ca_fingerprint=raw.get("pinned_ca_fingerprint"),
            reload_hook=raw.get("reload_hook"),
            previous_cert_fingerprint=raw.get("previous_cert_fingerprint"),
            extra={key: value for key, value in raw.items() if key not in known},
        )


@dataclass(frozen=True)
class Revocation:
    hostname: str
    revoked_at: dt.datetime
    revoked_by: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hostname": self.hostname,
            "revoked_at": format_roster_timestamp(self.revoked_at),
        }
        if self.revoked_by:
            out["revoked_by"] = self.revoked_by
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Revocation:
        return cls(
            hostname=str(raw["hostname"]),
            revoked_at=parse_timestamp(raw["revoked_at"]),
            revoked_by=raw.get("revoked_by"),
            reason=raw.get("reason"),
        )


def _fold(hostname: str) -> str:
    """Fold a hostname the way `same_host` compares it."""
    return hostname.rstrip(".").lower()


@dataclass(frozen=True)
class Roster:
    """An immutable roster value; every change returns a new one."""

    created_at: dt.datetime
    enrollment_open: bool
    requires_approval: bool
    operator: str | None
    policy: CertPolicy
    seq: int
    members: tuple[RosterMember, ...] = ()
    revocations: tuple[Revocation, ...] = ()

    @cached_property
    def _by_host(self) -> dict[str, RosterMember]:
        """Members by DNS-folded hostname, built once per (immutable) roster value."""
        index: dict[str, RosterMember] = {}
        for member in self.members:
            index.setdefault(_fold(member.hostname), member)
        return index

    @cached_property
    def _revoked_hosts(self) -> frozenset[str]:
        return frozenset(_fold(r.hostname) for r in self.revocations)

    def find(self, hostname: str) -> RosterMember | None:
        return self._by_host.get(_fold(hostname))

    def is_revoked(self, hostname: str) -> bool:
        member = self.find(hostname)
        if member is not None and member.status == STATUS_REVOKED:
            return True
        return _fold(hostname) in self._revoked_hosts

    def is_enrolled(self, hostname: str) -> bool:
        member = self.find(hostname)
        return member is not None and member.active

    @property
    def active_members(self) -> tuple[RosterMember, ...]:
        return tuple(m for m in self.members if m.active)

    def with_member(self, member: RosterMember, bump: bool = True) -> Roster:
        """Return a roster where `member` replaces any entry for its hostname."""
        others = tuple(m for m in self.members if not same_host(m.hostname, member.hostname))
        index = next(
            (i for i, m in enumerate(self.members) if same_host(m.hostname, member.hostname)),
            len(others),
        )
        members = others[:index] + (member,) + others[index:]
        return replace(self, members=members, seq=self.seq + (1 if bump else 0))

    def with_revocation(self, revocation: Revocation) -> Roster:
        member = self.find(revocation.hostname)
        roster = self
        if member is not None:
            roster = roster.with_member(replace(member, status=STATUS_REVOKED), bump=False)
        return replace(roster, revocations=roster.revocations + (revocation,), seq=self.seq + 1)

    def metadata_json(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "created_at": format_roster_timestamp(self.created_at),
            "enrollment_open": self.enrollment_open,
            "requires_approval": self.requires_approval,
            "policy": self.policy.to_json(),
            "seq": self.seq,
        }
        if self.operator:
            metadata["operator"] = self.operator
        return metadata

    def to_json(self) -> dict[str, Any]:
        return {
            "metadata": self.metadata_json(),
            "members": [m.to_json() for m in self.members],
            "revocation_list": [r.to_json() for r in self.revocations],
        }

    @classmethod
    def from_json(cls, raw: object, source: str = "roster.json") -> Roster:
        """Parse a roster document.

        Raises:
            CorruptState: The document does not have the roster's shape; the message names
                `source`.
        """
        try:
            metadata = raw["metadata"]
            return cls(
                created_at=parse_timestamp(metadata["created_at"]),
                enrollment_open=bool(metadata.get("enrollment_open", True)),
                requires_approval=bool(metadata.get("requires_approval", False)),
                operator=metadata.get("operator"),
                policy=CertPolicy.from_json(metadata.get("policy")),
                seq=int(metadata.get("seq", 0)),
                members=tuple(RosterMember.from_json(m) for m in raw.get("members", [])),
                revocations=tuple(Revocation.from_json(r) for r in raw.get("revocation_list", [])),
            )
        except (KeyError, TypeError, ValueError, AttributeError, CertmeshError) as exc:
            raise CorruptState(f"{source} does not look like a certmesh roster: {exc!r}") from exc
