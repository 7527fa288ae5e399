"""Opening dialogs without blocking the loop, and the two small action dialogs.

`show_dialog` is the one way koi-tray puts a dialog on screen: it shows the dialog with
`show()` (never `exec()`, which would stall every task on the qasync loop) and returns
an asyncio Future that resolves with the dialog's result code when it finishes, however
it finishes (a button, Escape, the window's close button). Cancelling the Future, or the
task awaiting it, closes the dialog.

`UnlockDialog` asks for the CA passphrase and `InviteDialog` for a hostname; both only
collect input and show results. The work (key derivation, minting) is done by whoever
listens to their `submitted` signal, off the loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import shiboken6
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFont, QFontDatabase, QGuiApplication
from PySide6.QtWidgets import (
    QDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

log = logging.getLogger(__name__)

ERROR_STYLE = "color: #b91c1c;"


def show_dialog(dialog: QDialog, *, activate: bool = True) -> asyncio.Future[int]:
    """Show `dialog` without blocking and return a Future of its result code.

    The Future resolves with `QDialog.DialogCode` (Accepted or Rejected) on the dialog's
    `finished` signal. Cancelling it closes the dialog as rejected.

    Args:
        dialog: A dialog that is not yet shown.
        activate: Give the dialog keyboard focus. Approval dialogs pass False: they are
            raised above other windows but do not take the keys a person is typing
            elsewhere, so a stray Enter cannot answer them.

    Raises:
        RuntimeError: Called with no running event loop.
    """
    result: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def finished(code: int) -> None:
        if not result.done():
            result.set_result(code)

    def abandoned(future: asyncio.Future[int]) -> None:
        if future.cancelled() and shiboken6.isValid(dialog) and dialog.isVisible():
            dialog.reject()

    dialog.finished.connect(finished)
    result.add_done_callback(abandoned)
    dialog.setAttribute(Qt.WidgetAttribute.WA_ShowWithoutActivating, not activate)
    dialog.show()
    dialog.raise_()
    if activate:
        dialog.activateWindow()
    return result


def monospace(point_size: float = 0, bold: bool = False) -> QFont:
    """The system fixed-width font, optionally resized and bold."""
    font = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
    if point_size:
        font.setPointSizeF(point_size)
    font.setBold(bold)
    return font


def _error_label() -> QLabel:
    label = QLabel()
    label.setStyleSheet(ERROR_STYLE)
    label.setWordWrap(True)
    label.hide()
    return label


class UnlockDialog(QDialog):
    """Ask for the CA passphrase; say so in place when it is wrong.

    Signals:
        submitted: The person asked to unlock with this passphrase (str). The listener
            calls `set_busy(True)` while it derives the key, then `show_error` or
            `accept`.
    """

    submitted = Signal(str)

    def __init__(self, fingerprint: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("koi-tray — unlock CA")
        intro = QLabel(
            f"Enter the passphrase of the CA <b>{fingerprint[:16]}</b>.<br>"
            "Deriving the key takes a few seconds."
        )
        self.passphrase = QLineEdit()
        self.passphrase.setEchoMode(QLineEdit.EchoMode.Password)
        self.passphrase.setPlaceholderText("CA passphrase")
        self.error = _error_label()
        self.unlock_button = QPushButton("Unlock")
        self.unlock_button.setDefault(True)
        cancel = QPushButton("Cancel")

        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(cancel)
        buttons.addWidget(self.unlock_button)
        layout = QVBoxLayout(self)
        for widget in (intro, self.passphrase, self.error):
            layout.addWidget(widget)
        layout.addLayout(buttons)

        self.unlock_button.clicked.connect(self._submit)
        self.passphrase.returnPressed.connect(self._submit)
        cancel.clicked.connect(self.reject)

    def set_busy(self, busy: bool) -> None:
        """Grey out the form while the key is derived."""
        self.passphrase.setEnabled(not busy)
        self.unlock_button.setEnabled(not busy)
        self.unlock_button.setText("Unlocking…" if busy else "Unlock")
        if busy:
            self.error.hide()

    def show_error(self, text: str) -> None:
        """Show why unlocking failed, clear the field and let the person try again."""
        self.set_busy(False)
        self.passphrase.clear()
        self.passphrase.setFocus()
        self.error.setText(text)
        self.error.show()

    def _submit(self) -> None:
        text = self.passphrase.text()
        if not text:
            self.show_error("Enter the passphrase.")
            return
        self.set_busy(True)
        self.submitted.emit(text)


class InviteDialog(QDialog):
    """Ask for the hostname to invite, then show the invite code with a Copy button.

    Signals:
        submitted: The person asked for an invite for this hostname (str). The listener
            calls `show_invite` or `show_error`.
    """

    submitted = Signal(str)

    def __init__(self, ca_address: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("koi-tray — invite a host")
        self.setMinimumWidth(560)
        self._ca_address = ca_address

        self.hostname = QLineEdit()
        self.hostname.setPlaceholderText("hostname of the new member, e.g. nas")
        self.create_button = QPushButton("Create invite")
        self.create_button.setDefault(True)
        self.error = _error_label()
        ask = QHBoxLayout()
        ask.addWidget(self.hostname, 1)
        ask.addWidget(self.create_button)

        self.code = QLineEdit()
        self.code.setReadOnly(True)
        self.code.setFont(monospace())
        self.code.hide()
        self.copy_button = QPushButton("Copy")
        self.copy_button.hide()
        self.details = QLabel()
        self.details.setWordWrap(True)
        self.details.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.details.hide()
        show = QHBoxLayout()
        show.addWidget(self.code, 1)
        show.addWidget(self.copy_button)

        close = QPushButton("Close")
        close.setAutoDefault(False)
        footer = QHBoxLayout()
        footer.addStretch(1)
        footer.addWidget(close)

        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("Which host should join this mesh?"))
        layout.addLayout(ask)
        layout.addWidget(self.error)
        layout.addLayout(show)
        layout.addWidget(self.details)
        layout.addLayout(footer)

        self.create_button.clicked.connect(self._submit)
        self.hostname.returnPressed.connect(self._submit)
        self.copy_button.clicked.connect(self.copy_code)
        close.clicked.connect(self.accept)

    def show_invite(self, code: str, hostname: str, expires_at: dt.datetime) -> None:
        """Show the minted code, when it expires and what to do with it."""
        self.error.hide()
        self.hostname.setEnabled(False)
        self.create_button.setEnabled(False)
        self.code.setText(code)
        self.code.show()
        self.copy_button.show()
        self.copy_button.setDefault(True)
        local = expires_at.astimezone()
        self.details.setText(
            f"On <b>{hostname}</b>, join the CA at <b>{self._ca_address}</b> with this code. "
            f"It works once and expires at {local:%Y-%m-%d %H:%M}."
        )
        self.details.show()

    def show_error(self, text: str) -> None:
        """Say why no invite was made and let the person fix the hostname."""
        self.create_button.setEnabled(True)
        self.hostname.setEnabled(True)
        self.error.setText(text)
        self.error.show()

    def copy_code(self) -> None:
        """Put the code on the clipboard."""
        QGuiApplication.clipboard().setText(self.code.text())
        self.copy_button.setText("Copied")

    def _submit(self) -> None:
        name = self.hostname.text().strip()
        if not name:
            self.show_error("Enter a hostname.")
            return
        self.create_button.setEnabled(False)
        self.submitted.emit(name)
