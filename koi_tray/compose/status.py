"""One immutable picture of the node, and who gets told when it changes.

`NodeSnapshot` is what the tray menu, the tooltip, the icon, `certmesh status --json` and
the logs all read: role, this node's leaf, the renewal history summary, the last trust
bundle, the CA's posture and members, pending approvals, and the capability ladder.
`health` folds it into one of ok, attention, critical, offline or idle. `alerts_between`
names what changed in a way a person should be told about.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from koi_tray.certmesh.approval import ApprovalRequest

log = logging.getLogger(__name__)

EXPIRY_WARNING_DAYS = (30, 14, 7, 1)
HOOK_OUTPUT_SHOWN = 200


@dataclass(frozen=True)
class LeafView:
    hostname: str
    fingerprint: str
    not_after: dt.datetime
    due_at: dt.datetime
    days_left: int
    expired: bool


@dataclass(frozen=True)
class HookView:
    """The last reload hook run after a renewal: what ran, whether it worked, what it said."""

    command: str
    success: bool
    output: str  # trimmed to HOOK_OUTPUT_SHOWN characters
    ran_at: dt.datetime


@dataclass(frozen=True)
class BundleCheck:
    """The last trust bundle a member accepted: its seq, when, and whether it was new."""

    seq: int
    checked_at: dt.datetime
    updated: bool
    updated_at: dt.datetime | None  # when a bundle last brought a change


@dataclass(frozen=True)
class RenewalView:
    """The renewal loop's record: what the last pass did and when the next one runs.

    `loop_stopped` is set when the loop task ended on an error (it never does by design,
    so this reads as "renewal is not running"); it is not persisted.
    """

    last_check_at: dt.datetime | None = None
    last_outcome: str | None = None
    last_detail: str = ""
    last_renewed_at: dt.datetime | None = None
    consecutive_failures: int = 0
    next_check_at: dt.datetime | None = None
    ca_reachable: bool = True
    last_hook: HookView | None = None
    last_bundle: BundleCheck | None = None
    loop_stopped: bool = False

    @property
    def healthy(self) -> bool:
        """Renewal is running and its last pass did not fail."""
        return self.consecutive_failures == 0 and not self.loop_stopped


@dataclass(frozen=True)
class BundleView:
    seq: int
    received_at: dt.datetime | None
    self_revoked: bool
    revoked_count: int


@dataclass(frozen=True)
class MemberRow:
    hostname: str
    role: str
    status: str
    expires: dt.datetime


@dataclass(frozen=True)
class CaView:
    fingerprint: str
    locked: bool
    locked_reason: str | None
    enrollment_open: bool
    requires_approval: bool
    seq: int
    members: tuple[MemberRow, ...]

    @property
    def active_members(self) -> int:
        return sum(1 for m in self.members if m.status == "active")


@dataclass(frozen=True)
class Capability:
    name: str
    summary: str
    healthy: bool


@dataclass(frozen=True)
class NodeSnapshot:
    role: str  # "unconfigured" | "ca" | "member"
    hostname: str
    taken_at: dt.datetime
    mesh_fingerprint: str | None = None
    ca_endpoint: str | None = None
    leaf: LeafView | None = None
    renewal: RenewalView = field(default_factory=RenewalView)
    bundle: BundleView | None = None
    ca: CaView | None = None
    pending: tuple[ApprovalRequest, ...] = ()
    capabilities: tuple[Capability, ...] = ()
    shutting_down: bool = False

    @property
    def health(self) -> str:
        """One word for the icon: idle, critical, offline, attention or ok.

        Offline (the CA cannot be reached) is shown only while the certificate is not yet
        due; a due certificate that cannot be renewed needs attention whatever the cause.
        """
        if self.role == "unconfigured":
            return "idle"
        if (self.leaf is None or self.leaf.expired) or (self.bundle and self.bundle.self_revoked):
            return "critical"
        due = self.leaf.due_at <= self.taken_at
        if self.role == "member" and not self.renewal.ca_reachable and not due:
            return "offline"
        locked = self.ca is not None and self.ca.locked
        if due or locked or not self.renewal.healthy:
            return "attention"
        return "ok"

    @property
    def renewal_overdue(self) -> bool:
        """The leaf is due, a pass has run since, and none renewed it: renewal is failing.

        A leaf that merely fell due waits for its next pass (within the hour) and is not
        overdue, unless the renewal loop has stopped; neither is one whose renewal already
        succeeded but is not reloaded yet.
        """
        leaf, view = self.leaf, self.renewal
        if leaf is None or leaf.due_at > self.taken_at:
            return False
        if view.last_renewed_at is not None and view.last_renewed_at >= leaf.due_at:
            return False
        if view.loop_stopped:
            return True  # no pass will come: a due leaf is overdue at once
        return view.last_check_at is not None and view.last_check_at >= leaf.due_at

    @property
    def summary(self) -> str:
        """The one-line tooltip."""
        if self.role == "unconfigured":
            return "koi-tray: not in a mesh"
        parts = [f"koi-tray {self.role} {self.hostname}"]
        if self.bundle is not None and self.bundle.self_revoked:
            parts.append("REVOKED")
        elif self.leaf is None:
            parts.append("no certificate")
        elif self.leaf.expired:
            parts.append("certificate EXPIRED")
        else:
            parts.append(f"certificate {self.leaf.days_left} days left")
        if self.renewal.consecutive_failures:
            parts.append(f"renewal failing ({self.renewal.consecutive_failures}×)")
        if self.renewal.loop_stopped:
            parts.append("renewal stopped")
        if self.ca is not None and self.ca.locked:
            parts.append("CA locked")
        if self.pending:
            parts.append(f"{len(self.pending)} approval(s) waiting")
        return " · ".join(parts)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: datetimes as RFC 3339, approvals as their public fields."""

        def convert(value: Any) -> Any:
            if isinstance(value, dt.datetime):
                return value.isoformat()
            if isinstance(value, dict):
                return {k: convert(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [convert(v) for v in value]
            return value

        out = convert(
            {key: value for key, value in asdict(self).items() if key not in ("pending",)}
        )
        out["pending"] = [request.to_json() for request in self.pending]
        out["health"] = self.health
        out["summary"] = self.summary
        return out


@dataclass(frozen=True)
class Alert:
    """Something a person should be told once: kind, title, body."""

    kind: str  # approval_requested | renewal_failed | expiring | revoked | ca_locked
    title: str
    body: str


def alerts_between(old: NodeSnapshot | None, new: NodeSnapshot) -> list[Alert]:
    """Name what changed from `old` to `new` that deserves a notification.

    None follow a routine successful renewal.
    """
    alerts: list[Alert] = []
    old_ids = {r.request_id for r in old.pending} if old else set()
    for request in new.pending:
        if request.request_id not in old_ids:
            alerts.append(
                Alert(
                    "approval_requested",
                    f"{request.hostname} asks to join the mesh",
                    f"From {request.peer_address or 'an unknown address'}; "
                    f"confirmation code {request.confirmation_code}.",
                )
            )

    failures = new.renewal.consecutive_failures
    if failures and (old is None or old.renewal.consecutive_failures == 0):
        alerts.append(
            Alert("renewal_failed", "Certificate renewal failed", new.renewal.last_detail)
        )

    revoked = bool(new.bundle and new.bundle.self_revoked)
    was_revoked = bool(old and old.bundle and old.bundle.self_revoked)
    if revoked and not was_revoked:
        alerts.append(
            Alert("revoked", "This node was revoked", "The CA revoked this node's certificate.")
        )

    level = _warning_level(new)
    if not revoked and level is not None:
        old_level = _warning_level(old) if old is not None else None
        if old_level is None or level < old_level:
            alerts.append(_expiry_alert(new))
    return alerts


def _warning_level(snapshot: NodeSnapshot) -> int | None:
    """The tightest expiry warning (30, 14, 7 or 1 days) an overdue leaf has reached.

    None while renewal is on time: a routine renewal, which happens when the leaf falls
    due (30 days before expiry by default), never warns.
    """
    leaf = snapshot.leaf
    if leaf is None or not snapshot.renewal_overdue:
        return None
    reached = [days for days in EXPIRY_WARNING_DAYS if leaf.days_left <= days]
    return min(reached) if reached else None


def _expiry_alert(snapshot: NodeSnapshot) -> Alert:
    leaf = snapshot.leaf
    assert leaf is not None
    ends = f"{leaf.hostname}'s certificate ends on {leaf.not_after:%Y-%m-%d}"
    why = snapshot.renewal.last_detail or "renewal has not succeeded"
    if leaf.expired:
        return Alert("expiring", "Certificate has expired", f"{ends}. Last renewal: {why}.")
    return Alert(
        "expiring",
        f"Certificate expires in {leaf.days_left} day(s)",
        f"{ends} and renewal is failing: {why}.",
    )


class StatusStore:
    """Holds the latest snapshot and tells subscribers when it changes."""

    def __init__(self, build: Callable[[], NodeSnapshot]) -> None:
        self._build = build
        self._snapshot: NodeSnapshot | None = None
        self._subscribers: list[Callable[[NodeSnapshot, NodeSnapshot | None], None]] = []

    @property
    def snapshot(self) -> NodeSnapshot:
        if self._snapshot is None:
            self._snapshot = self._build()
        return self._snapshot

    def subscribe(
        self, callback: Callable[[NodeSnapshot, NodeSnapshot | None], None]
    ) -> Callable[[], None]:
        """Call `callback(new, old)` on every change; return a function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def refresh(self) -> NodeSnapshot:
        """Rebuild the snapshot and tell subscribers if anything but the time changed."""
        old = self._snapshot
        new = self._build()
        self._snapshot = new
        if old is not None and _same_apart_from_time(old, new):
            return new
        for callback in list(self._subscribers):
            try:
                callback(new, old)
            except Exception:
                log.exception("a status subscriber failed")
        return new


def _same_apart_from_time(a: NodeSnapshot, b: NodeSnapshot) -> bool:
    """Tell whether only the clock moved, and moving it changed nothing a person sees."""
    if replace(a, taken_at=b.taken_at) != b:
        return False
    return a.health == b.health and _warning_level(a) == _warning_level(b)
