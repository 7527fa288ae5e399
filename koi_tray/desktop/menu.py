"""The tray menu as data: one pure function from a status snapshot to a `MenuModel`.

This module owns what the menu says and which actions it offers; it imports no Qt and no
tray library. Every backend (Qt's tray, pystray, the no-tray status window) renders the
same model, so what a person sees does not depend on the desktop.

Status lines are enabled items, so every desktop theme draws them in full contrast (a
disabled item is greyed to near-invisible in several); clicking one opens the status
window. The model always holds the same keys in the same order. Items that do not apply (the CA
lines on a member, "Unlock CA…" on an unlocked CA) are present with `visible=False`, so a
backend builds its native menu once and afterwards only updates text, state and
visibility by key. Only the children of the two submenus (members, pending approvals)
vary in number.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field

from koi_tray.compose.status import HookView, NodeSnapshot
from koi_tray.desktop.icons import IconState, badge_label

INFO = "info"
ACTION = "action"
CHECK = "check"
SUBMENU = "submenu"
SEPARATOR = "separator"

# Action keys, as the backends report them back. A click on a status line reports STATUS
# (with the line's key as argument): it opens the status window.
STATUS = "status"
APPROVALS = "approvals"
APPROVAL = "approval"
RENEW = "renew"
UNLOCK = "unlock"
INVITE = "invite"
COPY_FINGERPRINT = "copy_fingerprint"
OPEN_CERTS = "open_certs"
OPEN_LOG = "open_log"
AUTOSTART = "autostart"
QUIT = "quit"

SHORT_FINGERPRINT = 16
_DETAIL_WIDTH = 90

_OUTCOME_WORDS = {
    "renewed": "renewed",
    "not_due": "OK, not due yet",
    "failed": "FAILED",
    "revoked": "revoked",
    "not_applicable": "nothing to renew",
}


@dataclass(frozen=True)
class MenuItem:
    """One line of the menu.

    Attributes:
        key: Stable identity; backends keep one native item per key.
        text: What the line says.
        kind: `info` (a status line: enabled, so every theme draws it legibly, and
            clicking it opens the status window), `action`, `check`, `submenu` or
            `separator`.
        enabled: Whether it can be clicked.
        visible: Whether it is shown at all.
        checked: For `check` items.
        children: For `submenu` items; their number varies.
        arg: Passed back with the action (a request id for an approval).
        tooltip: Longer text where a backend can show it.
    """

    key: str
    text: str = ""
    kind: str = INFO
    enabled: bool = True
    visible: bool = True
    checked: bool = False
    children: tuple[MenuItem, ...] = ()
    arg: str | None = None
    tooltip: str = ""


@dataclass(frozen=True)
class MenuModel:
    """Everything a tray shows for one snapshot: menu, tooltip, icon state and badge."""

    items: tuple[MenuItem, ...]
    tooltip: str
    icon_state: IconState
    pending: int = 0
    status_keys: tuple[str, ...] = field(default=(), repr=False)

    def find(self, key: str) -> MenuItem:
        """Return the top-level item with `key`; raise KeyError if there is none."""
        for item in self.items:
            if item.key == key:
                return item
        raise KeyError(key)

    def status_lines(self) -> Iterator[MenuItem]:
        """The visible status lines (info lines and submenu headers), top to bottom."""
        for item in self.items:
            if item.key in self.status_keys and item.visible:
                yield item

    def actions(self) -> Iterator[MenuItem]:
        """The actions and check items, visible or not, in menu order."""
        return (item for item in self.items if item.kind in (ACTION, CHECK))


def icon_state_for(snapshot: NodeSnapshot | None) -> IconState:
    """Map `snapshot.health` to the icon; no snapshot yet (starting) is idle."""
    if snapshot is None or snapshot.shutting_down:
        return IconState.IDLE
    return IconState(snapshot.health)


def build_menu(
    snapshot: NodeSnapshot | None,
    *,
    autostart: bool | None = None,
    busy: frozenset[str] = frozenset(),
    tz: dt.tzinfo | None = None,
) -> MenuModel:
    """Build the menu for `snapshot`; None means the node is still starting.

    Args:
        snapshot: The node's latest status; relative times are counted from its
            `taken_at`.
        autostart: Whether "Start at login" is on; None when the platform has no
            supported mechanism (the item is then disabled).
        busy: Action keys running right now (for instance `renew`), shown as such.
        tz: Time zone for clock times; None means the machine's local zone.
    """
    status = _status_items(snapshot, tz)
    ca = snapshot.ca if snapshot is not None else None
    ready = snapshot is not None and not snapshot.shutting_down
    in_mesh = ready and snapshot.role != "unconfigured"
    renew_text = "Renewing…" if RENEW in busy else "Renew now"
    pending = len(snapshot.pending) if snapshot is not None else 0

    actions = (
        MenuItem("sep_actions", kind=SEPARATOR),
        _approvals_item(snapshot),
        MenuItem(RENEW, renew_text, ACTION, in_mesh and RENEW not in busy),
        MenuItem(UNLOCK, "Unlock CA…", ACTION, ready, visible=bool(ca and ca.locked)),
        MenuItem(INVITE, "Invite a host…", ACTION, ready, visible=ca is not None),
        MenuItem(
            COPY_FINGERPRINT,
            "Copy CA fingerprint",
            ACTION,
            bool(snapshot and snapshot.mesh_fingerprint),
        ),
        MenuItem(OPEN_CERTS, "Open certificates folder", ACTION),
        MenuItem(OPEN_LOG, "Open log…", ACTION),
        MenuItem("sep_app", kind=SEPARATOR),
        MenuItem(
            AUTOSTART, "Start at login", CHECK, autostart is not None, checked=bool(autostart)
        ),
        MenuItem(QUIT, "Quit koi-tray", ACTION),
    )
    return MenuModel(
        items=status + actions,
        tooltip=_tooltip(snapshot),
        icon_state=icon_state_for(snapshot),
        pending=pending,
        status_keys=tuple(item.key for item in status),
    )


def _tooltip(snapshot: NodeSnapshot | None) -> str:
    if snapshot is None:
        return "koi-tray: starting…"
    if snapshot.shutting_down:
        return "koi-tray: stopping…"
    return snapshot.summary


def _status_items(snapshot: NodeSnapshot | None, tz: dt.tzinfo | None) -> tuple[MenuItem, ...]:
    if snapshot is None or snapshot.shutting_down:
        words = "Starting…" if snapshot is None else "Stopping…"
        return (
            MenuItem("role", words),
            *(
                MenuItem(
                    key, kind=SUBMENU if key == "members" else INFO, enabled=False, visible=False
                )
                for key in _LATER_STATUS_KEYS
            ),
        )
    now = snapshot.taken_at
    lines = (
        MenuItem("role", _role_line(snapshot)),
        MenuItem("leaf", _leaf_line(snapshot), visible=_in_mesh(snapshot)),
        *_renewal_items(snapshot, now, tz),
        _bundle_item(snapshot, now),
        *_ca_items(snapshot),
    )
    return lines


_LATER_STATUS_KEYS = (
    "leaf",
    "renewal_last",
    "renewal_detail",
    "renewal_hook",
    "renewal_next",
    "bundle",
    "members",
    "enrollment",
    "ca_key",
)


def _in_mesh(snapshot: NodeSnapshot) -> bool:
    return snapshot.role != "unconfigured"


def _role_line(snapshot: NodeSnapshot) -> str:
    mesh = (snapshot.mesh_fingerprint or "")[:SHORT_FINGERPRINT]
    if snapshot.role == "ca":
        return f"CA of mesh {mesh} · {snapshot.hostname}"
    if snapshot.role == "member":
        via = f" · CA {snapshot.ca_endpoint}" if snapshot.ca_endpoint else ""
        return f"Member of mesh {mesh}{via}"
    return f"Not in a mesh yet · {snapshot.hostname}"


def _leaf_line(snapshot: NodeSnapshot) -> str:
    leaf = snapshot.leaf
    if snapshot.bundle is not None and snapshot.bundle.self_revoked:
        return "Certificate: REVOKED by the CA"
    if leaf is None:
        return "Certificate: none"
    until = f"{leaf.not_after:%Y-%m-%d}"
    if leaf.expired:
        return f"Certificate for {leaf.hostname}: EXPIRED on {until}"
    days = "1 day" if leaf.days_left == 1 else f"{leaf.days_left} days"
    overdue = ", renewal OVERDUE" if snapshot.renewal_overdue else ""
    return f"Certificate for {leaf.hostname}: {days} left (until {until}){overdue}"


def _renewal_items(
    snapshot: NodeSnapshot, now: dt.datetime, tz: dt.tzinfo | None
) -> tuple[MenuItem, ...]:
    view = snapshot.renewal
    shown = _in_mesh(snapshot)
    if view.loop_stopped:
        last = "Renewal STOPPED on an error: restart koi-tray (see Open log…)"
    elif view.last_check_at is None:
        last = "Last renewal check: not yet"
    else:
        outcome = _OUTCOME_WORDS.get(view.last_outcome or "", view.last_outcome or "?")
        if view.consecutive_failures > 1:
            outcome += f" ({view.consecutive_failures}× in a row)"
        when = _clock(view.last_check_at, now, tz)
        last = f"Last renewal check: {outcome} at {when} ({_ago(now - view.last_check_at)})"

    failing = view.consecutive_failures > 0 or view.last_outcome == "failed"
    detail = _shorten(view.last_detail) if failing and view.last_detail else ""

    if view.next_check_at is None:
        upcoming = "Next check: not scheduled"
    else:
        wait = view.next_check_at - now
        upcoming = f"Next check: {_clock(view.next_check_at, now, tz)} ({_until(wait)})"
    return (
        MenuItem("renewal_last", last, visible=shown, tooltip=view.last_detail),
        MenuItem("renewal_detail", f"    {detail}", visible=shown and bool(detail)),
        _hook_item(view.last_hook, now, tz, shown),
        MenuItem("renewal_next", upcoming, visible=shown),
    )


def _hook_item(
    hook: HookView | None, now: dt.datetime, tz: dt.tzinfo | None, shown: bool
) -> MenuItem:
    """The reload hook's last run, shown once one has run after a renewal."""
    if hook is None:
        return MenuItem("renewal_hook", visible=False)
    when = _clock(hook.ran_at, now, tz)
    if hook.success:
        text = f"Reload hook: OK at {when}"
    else:
        text = f"Reload hook FAILED at {when}: {_shorten(hook.output or 'no output')}"
    return MenuItem("renewal_hook", text, visible=shown, tooltip=hook.command)


def _bundle_item(snapshot: NodeSnapshot, now: dt.datetime) -> MenuItem:
    bundle = snapshot.bundle
    if bundle is None or not _in_mesh(snapshot):
        return MenuItem("bundle", enabled=False, visible=False)
    revoked = f", {bundle.revoked_count} revoked" if bundle.revoked_count else ""
    if snapshot.role == "ca":
        # A CA signs the bundle afresh on every request; the age it can show is that of
        # the roster change that made this seq, when the snapshot carries it.
        text = f"Trust bundle: seq {bundle.seq}{revoked}, published here"
        if bundle.received_at is not None:
            text += f" (changed {_ago(now - bundle.received_at)})"
    elif bundle.received_at is None:
        text = "Trust bundle: none received yet"
    else:
        age = _ago(now - bundle.received_at)
        text = f"Trust bundle: seq {bundle.seq}{revoked}, received {age}"
    return MenuItem("bundle", text)


def _ca_items(snapshot: NodeSnapshot) -> tuple[MenuItem, ...]:
    ca = snapshot.ca
    if ca is None:
        return (
            MenuItem("members", kind=SUBMENU, enabled=False, visible=False),
            MenuItem("enrollment", enabled=False, visible=False),
            MenuItem("ca_key", enabled=False, visible=False),
        )
    revoked = sum(1 for m in ca.members if m.status == "revoked")
    header = f"Members: {ca.active_members} active"
    if revoked:
        header += f", {revoked} revoked"
    rows = tuple(
        MenuItem(
            STATUS, f"{m.hostname}{_role_note(m.role)} — {m.status}, until {m.expires:%Y-%m-%d}"
        )
        for m in ca.members
    ) or (MenuItem(STATUS, "(no members yet)"),)

    if ca.enrollment_open:
        approval = "approval required" if ca.requires_approval else "no approval needed"
        enrollment = f"Enrollment: open · {approval}"
    else:
        enrollment = "Enrollment: closed"
    key = "CA key: LOCKED (use Unlock CA…)" if ca.locked else "CA key: unlocked"
    return (
        MenuItem("members", header, SUBMENU, children=rows),
        MenuItem("enrollment", enrollment),
        MenuItem("ca_key", key, tooltip=ca.locked_reason or ""),
    )


def _role_note(role: str) -> str:
    return "" if role == "member" else f" ({role})"


def _approvals_item(snapshot: NodeSnapshot | None) -> MenuItem:
    pending = snapshot.pending if snapshot is not None else ()
    shown = snapshot is not None and (snapshot.ca is not None or bool(pending))
    if not pending:
        return MenuItem(APPROVALS, "Approvals… (none waiting)", SUBMENU, False, visible=shown)
    now = snapshot.taken_at
    rows = tuple(
        MenuItem(
            APPROVAL,
            f"{request.hostname} from {request.peer_address or '?'} · code "
            f"{request.confirmation_code} · {_until(request.deadline - now, bare=True)} left",
            ACTION,
            arg=request.request_id,
        )
        for request in pending
    )
    text = f"Approvals… ({badge_label(len(pending))} waiting)"
    return MenuItem(APPROVALS, text, SUBMENU, children=rows, visible=shown)


def _clock(when: dt.datetime, now: dt.datetime, tz: dt.tzinfo | None) -> str:
    local = when.astimezone(tz)
    if abs(when - now) < dt.timedelta(hours=20):
        return f"{local:%H:%M}"
    return f"{local:%Y-%m-%d %H:%M}"


def _span(delta: dt.timedelta) -> str:
    seconds = abs(delta.total_seconds())
    if seconds < 90:
        return f"{int(seconds)} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 36 * 3600:
        return f"{round(seconds / 3600)} h"
    return f"{round(seconds / 86400)} days"


def _ago(delta: dt.timedelta) -> str:
    if delta.total_seconds() < 60:
        return "just now"
    return f"{_span(delta)} ago"


def _until(delta: dt.timedelta, bare: bool = False) -> str:
    if delta.total_seconds() <= 0:
        return "0 s" if bare else "due now"
    return _span(delta) if bare else f"in {_span(delta)}"


def _shorten(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _DETAIL_WIDTH else line[: _DETAIL_WIDTH - 1] + "…"
