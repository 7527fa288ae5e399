"""Asking a person to approve a join: one non-modal dialog per request.

`dialog_decider` returns the certmesh decider the tray hands to its node. For every
request it opens an `ApprovalDialog` through `show_dialog` (never `exec()`), waits for
it on the loop and answers `Approved(operator)` or `Denied(reason)`. Several requests
may wait at once; each has its own dialog, and the `ApprovalBoard` keeps them so the
tray's Approvals menu can raise any of them and Quit can close them all.

The dialog is built not to be answered by accident: it is raised above other windows but
does not take keyboard focus (`WA_ShowWithoutActivating`, no `activateWindow`), Deny is
the default button, and Approve stays disabled until an operator name is typed. Escape,
the window's close button, the deadline and quitting all deny. If the decider is
cancelled (the core's deadline passed, or the node shuts down), the dialog closes itself.
The tray announces each request with a notification from the status snapshot, so the
decider itself sends none.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

import shiboken6
from PySide6.QtCore import QObject, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from koi_tray.certmesh.approval import ApprovalRequest, Approved, Decider, Decision, Denied
from koi_tray.desktop.dialogs import monospace, show_dialog

log = logging.getLogger(__name__)

WINDOW_TITLE = "koi-tray — approve join?"
HEADER_STYLE = (
    "background: #f59e0b; color: #1c1204; font-weight: bold; font-size: 13pt;"
    "padding: 10px 14px;"
    "border-bottom: 3px solid #b45309;"
)
URGENT_STYLE = "color: #b91c1c; font-weight: bold;"
CODE_POINT_SIZE = 30
EXPIRY_GRACE = 2.0
"""Seconds past the request's deadline before the dialog gives up on its own.

At the deadline the certmesh core refuses the join and cancels the decider, which closes
the dialog; the grace lets that happen first so the member hears `approval_timeout`.
"""

DENIED = "denied"
DISMISSED = "dismissed"
TIMED_OUT = "timed_out"
QUITTING = "quitting"
APPROVED = "approved"

_REASONS = {
    DENIED: "denied by the operator",
    DISMISSED: "the approval dialog was closed without approving",
    TIMED_OUT: "no decision before the deadline",
    QUITTING: "koi-tray is quitting",
}


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ApprovalDialog(QDialog):
    """Show one join request and let a person approve (with a name) or deny it.

    `outcome` says how it ended: approved, denied, dismissed (Escape or closed),
    timed_out or quitting; `decision()` turns that into the certmesh answer.
    """

    def __init__(
        self,
        request: ApprovalRequest,
        operator_name: str = "",
        clock: Callable[[], dt.datetime] = _utc_now,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.request = request
        self.outcome: str | None = None
        self._clock = clock
        self.setWindowTitle(WINDOW_TITLE)
        self.setObjectName(f"approval-{request.request_id}")
        self.setMinimumWidth(520)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 12)
        layout.addWidget(self._header())
        body = QVBoxLayout()
        body.setContentsMargins(16, 8, 16, 0)
        layout.addLayout(body)
        self._add_code(body)
        body.addLayout(self._details())
        body.addLayout(self._answer_row())

        self._tick = QTimer(self, interval=1000)
        self._tick.timeout.connect(self._update_countdown)
        self._expiry = QTimer(self, singleShot=True)
        self._expiry.timeout.connect(self.expire)
        self.set_operator_name(operator_name)
        self._update_countdown()
        self._tick.start()
        self._expiry.start(int((request.seconds_left(clock()) + EXPIRY_GRACE) * 1000))

    # -- building -------------------------------------------------------------------------

    def _header(self) -> QLabel:
        header = QLabel(f"⚠  {self.request.hostname} asks to join your certificate mesh")
        header.setStyleSheet(HEADER_STYLE)
        return header

    def _add_code(self, body: QVBoxLayout) -> None:
        body.addWidget(QLabel("Confirmation code"))
        self.code = QLabel(self.request.confirmation_code)
        self.code.setFont(monospace(CODE_POINT_SIZE, bold=True))
        self.code.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        body.addWidget(self.code)
        hint = QLabel(
            f"Approve only if {self.request.hostname} shows the same code. If it does not, deny."
        )
        hint.setWordWrap(True)
        body.addWidget(hint)

    def _details(self) -> QFormLayout:
        request = self.request
        form = QFormLayout()
        form.setContentsMargins(0, 10, 0, 6)
        fingerprint = QLabel(_grouped(request.key_fingerprint))
        fingerprint.setFont(monospace())
        fingerprint.setWordWrap(True)
        invite = f"for {request.invite_hostname}"
        if request.invite_age is not None:
            invite += f", made {_age(request.invite_age)} ago"
        self.countdown = QLabel()
        rows = (
            ("Host", QLabel(f"<b>{request.hostname}</b>")),
            ("From address", QLabel(request.peer_address or "unknown")),
            ("Key fingerprint", fingerprint),
            ("Names (SANs)", QLabel(", ".join(request.sans) or "none")),
            ("Invite used", QLabel(invite)),
            ("Time left", self.countdown),
        )
        for caption, value in rows:
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            form.addRow(caption, value)
        return form

    def _answer_row(self) -> QHBoxLayout:
        self.operator = QLineEdit()
        self.operator.setPlaceholderText("your name (goes into the audit log)")
        self.deny_button = QPushButton("Deny")
        self.deny_button.setDefault(True)
        self.approve_button = QPushButton("Approve")
        self.approve_button.setAutoDefault(False)
        row = QHBoxLayout()
        row.addWidget(QLabel("Operator"))
        row.addWidget(self.operator, 1)
        row.addWidget(self.deny_button)
        row.addWidget(self.approve_button)

        self.operator.textChanged.connect(self._update_approve)
        self.deny_button.clicked.connect(self.deny)
        self.approve_button.clicked.connect(self.approve)
        return row

    # -- state ----------------------------------------------------------------------------

    def set_operator_name(self, name: str) -> None:
        """Prefill the operator field (the name given in the previous dialog)."""
        self.operator.setText(name)
        self._update_approve()

    def operator_name(self) -> str:
        return self.operator.text().strip()

    def seconds_left(self) -> float:
        return self.request.seconds_left(self._clock())

    def _update_approve(self) -> None:
        named = bool(self.operator_name()) or not self.request.requires_approval
        self.approve_button.setEnabled(named and self.seconds_left() > 0)

    def _update_countdown(self) -> None:
        left = self.seconds_left()
        minutes, seconds = divmod(int(left + 0.999), 60)
        self.countdown.setText(f"{minutes}:{seconds:02d}")
        self.countdown.setStyleSheet(URGENT_STYLE if left < 30 else "")
        if left <= 0:
            self._tick.stop()
            self.countdown.setText("0:00 — too late to approve")
            self._update_approve()

    # -- endings --------------------------------------------------------------------------

    def approve(self) -> None:
        """Answer Approved, if the Approve button allows it (a name, before the deadline)."""
        if not self.approve_button.isEnabled():
            return
        self.outcome = APPROVED
        self.accept()

    def deny(self) -> None:
        """Answer Denied by the operator."""
        self.outcome = DENIED
        self.reject()

    def expire(self) -> None:
        """Give up: the deadline (and the grace after it) passed."""
        if self.isVisible():
            self.outcome = self.outcome or TIMED_OUT
            self.reject()

    def close_for_quit(self) -> None:
        """Answer Denied because koi-tray is quitting."""
        if self.isVisible():
            self.outcome = self.outcome or QUITTING
            self.reject()

    def reject(self) -> None:
        self.outcome = self.outcome or DISMISSED
        super().reject()

    def done(self, code: int) -> None:
        self._tick.stop()
        self._expiry.stop()
        super().done(code)

    def decision(self) -> Decision:
        """The certmesh answer for how the dialog ended; anything but Approve denies."""
        if self.outcome == APPROVED:
            return Approved(self.operator_name() or "koi-tray operator")
        return Denied(_REASONS.get(self.outcome or DISMISSED, _REASONS[DISMISSED]))


class ApprovalBoard(QObject):
    """The approval dialogs open right now, and the operator name of this session.

    Signals:
        opened: A dialog for this request id was shown (str).
        closed: The dialog for this request id went away (str).
    """

    opened = Signal(str)
    closed = Signal(str)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.operator_name = ""
        self._dialogs: dict[str, ApprovalDialog] = {}

    def dialogs(self) -> list[ApprovalDialog]:
        """Open dialogs, oldest first."""
        return list(self._dialogs.values())

    def get(self, request_id: str) -> ApprovalDialog | None:
        return self._dialogs.get(request_id)

    def add(self, dialog: ApprovalDialog) -> None:
        self._dialogs[dialog.request.request_id] = dialog

    def discard(self, dialog: ApprovalDialog) -> None:
        """Forget `dialog`, closing it first if it is still up, and free it later."""
        request_id = dialog.request.request_id
        if self._dialogs.get(request_id) is dialog:
            del self._dialogs[request_id]
        if shiboken6.isValid(dialog):
            if dialog.isVisible():
                dialog.reject()
            dialog.deleteLater()
        self.closed.emit(request_id)

    def raise_dialog(self, request_id: str) -> bool:
        """Bring one dialog to the front with focus (the person asked for it)."""
        dialog = self._dialogs.get(request_id)
        if dialog is None:
            return False
        dialog.showNormal()
        dialog.raise_()
        dialog.activateWindow()
        return True

    def raise_all(self) -> int:
        """Bring every open dialog to the front; return how many there are."""
        for request_id in list(self._dialogs):
            self.raise_dialog(request_id)
        return len(self._dialogs)

    def close_all(self) -> None:
        """Deny every open request because koi-tray is quitting."""
        for dialog in list(self._dialogs.values()):
            dialog.close_for_quit()


def dialog_decider(
    board: ApprovalBoard | None = None, clock: Callable[[], dt.datetime] | None = None
) -> Decider:
    """Return a decider that asks through one `ApprovalDialog` per request.

    Args:
        board: Where open dialogs are kept (the tray's menu reads it); None makes one.
        clock: The node's clock, for the countdown; None means the system clock (UTC).

    Returns:
        An async decider. Cancelling it closes that request's dialog.
    """
    board = board if board is not None else ApprovalBoard()
    now = clock or _utc_now

    async def decide(request: ApprovalRequest) -> Decision:
        dialog = ApprovalDialog(request, board.operator_name, now)
        board.add(dialog)
        log.info(
            "asking for approval of %s from %s (code %s)",
            request.hostname,
            request.peer_address or "?",
            request.confirmation_code,
        )
        try:
            finished = show_dialog(dialog, activate=False)
            board.opened.emit(request.request_id)
            await finished
            decision = dialog.decision()
        finally:
            board.discard(dialog)
        if isinstance(decision, Approved):
            board.operator_name = decision.operator
        log.info("approval dialog for %s ended: %s", request.hostname, dialog.outcome)
        return decision

    return decide


def _grouped(fingerprint: str, width: int = 4, per_line: int = 8) -> str:
    groups = [fingerprint[i : i + width] for i in range(0, len(fingerprint), width)]
    lines = [" ".join(groups[i : i + per_line]) for i in range(0, len(groups), per_line)]
    return "\n".join(lines)


def _age(age: dt.timedelta) -> str:
    seconds = max(0, int(age.total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"
