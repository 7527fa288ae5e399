"""The small status window: the tray menu's lines and actions in an ordinary window.

It stands in for the tray where the desktop has none (stock GNOME, a bare X server), and
is what a left click on the tray icon opens. It renders the same `MenuModel` as the
tray menus: one label per status line and one button per action, created on the first
model and updated in place afterwards. Notifications that have no tray to appear in are
shown in a banner at its top.
"""

from __future__ import annotations

import html
import logging
import time

from PIL import Image
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QCloseEvent, QIcon
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
    QGridLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from koi_tray.desktop.menu import APPROVALS, CHECK, SUBMENU, MenuItem, MenuModel
from koi_tray.desktop.qt_tray import pixmap_from_image

log = logging.getLogger(__name__)

NOTICE_STYLE = "background: #e0f2fe; color: #0c2a3d; padding: 8px; border-radius: 4px;"
URGENT_NOTICE_STYLE = "background: #fde68a; color: #3b2503; padding: 8px; border-radius: 4px;"
BUTTON_COLUMNS = 2


class StatusWindow(QWidget):
    """The node's status lines and action buttons in one window.

    With `persistent` set (there is no tray to reopen it from) closing the window only
    minimises it; otherwise closing hides it until the next left click on the icon.

    Signals:
        action_requested: A button was pressed: the action key (str) and argument
            (str or None), as a tray menu would report it.
    """

    action_requested = Signal(str, object)

    def __init__(self, persistent: bool = False, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.persistent = persistent
        self.setWindowTitle("koi-tray")
        self.setMinimumWidth(460)
        self.icon = QLabel()
        self.summary = QLabel("koi-tray")
        self.summary.setWordWrap(True)
        self.summary.setStyleSheet("font-weight: bold;")
        self.notice = QLabel()
        self.notice.setWordWrap(True)
        self.notice.linkActivated.connect(lambda _link: self.notice.hide())
        self.notice.hide()
        self._notice_kind = ""
        self.lines: dict[str, QLabel] = {}
        self.buttons: dict[str, QPushButton | QCheckBox] = {}

        header = QGridLayout()
        header.addWidget(self.icon, 0, 0, 2, 1)
        header.addWidget(self.summary, 0, 1)
        header.setColumnStretch(1, 1)
        self._lines_box = QVBoxLayout()
        self._buttons_box = QGridLayout()
        layout = QVBoxLayout(self)
        layout.addLayout(header)
        layout.addWidget(self.notice)
        layout.addLayout(self._lines_box)
        layout.addSpacing(8)
        layout.addLayout(self._buttons_box)

    def set_icon(self, image: Image.Image) -> None:
        pixmap = pixmap_from_image(image)
        self.icon.setPixmap(
            pixmap.scaled(
                48,
                48,
                Qt.AspectRatioMode.KeepAspectRatio,
                Qt.TransformationMode.SmoothTransformation,
            )
        )
        self.setWindowIcon(QIcon(pixmap))

    def show_notice(self, title: str, body: str, urgent: bool = False, kind: str = "") -> None:
        """Show a notification in the banner, and flag the window for attention.

        A notice of kind `approval_requested` goes away by itself once no approval is
        pending; any notice goes away with its "dismiss" link.
        """
        stamp = time.strftime("%H:%M")
        self.notice.setText(
            f"<b>{html.escape(title)}</b> <small>({stamp}, <a href='dismiss'>dismiss</a>)"
            f"</small><br>{html.escape(body)}"
        )
        self.notice.setStyleSheet(URGENT_NOTICE_STYLE if urgent else NOTICE_STYLE)
        self.notice.show()
        self._notice_kind = kind
        QApplication.alert(self)

    def update_model(self, model: MenuModel) -> None:
        """Render `model`: the first call creates the widgets, later ones update them."""
        self.summary.setText(model.tooltip)
        status = set(model.status_keys)
        for item in model.items:
            if item.key in status:
                self._line(item)
            elif item.key == APPROVALS or item.kind in ("action", CHECK):
                self._button(item)
        self._arrange_buttons()
        if self._notice_kind == "approval_requested" and not model.pending:
            self.notice.hide()

    def _arrange_buttons(self) -> None:
        """Lay the visible buttons out in order, so hidden ones leave no gaps."""
        index = 0
        for button in self.buttons.values():
            if button.isHidden():
                self._buttons_box.addWidget(button, 100 + index, 0)
                continue
            self._buttons_box.addWidget(button, index // BUTTON_COLUMNS, index % BUTTON_COLUMNS)
            index += 1

    def _line(self, item: MenuItem) -> None:
        label = self.lines.get(item.key)
        if label is None:
            label = QLabel()
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self._lines_box.addWidget(label)
            self.lines[item.key] = label
        text = item.text
        if item.kind == SUBMENU and item.children:
            label.setToolTip("\n".join(child.text for child in item.children))
        else:
            label.setToolTip(item.tooltip)
        label.setText(text.strip() if item.key == "renewal_detail" else text)
        label.setVisible(item.visible)

    def _button(self, item: MenuItem) -> None:
        button = self.buttons.get(item.key)
        if button is None:
            button = QCheckBox(item.text) if item.kind == CHECK else QPushButton(item.text)
            button.clicked.connect(lambda _checked=False, key=item.key: self._clicked(key))
            self.buttons[item.key] = button
        enabled = item.enabled and (item.key != APPROVALS or bool(item.children))
        button.setText(item.text)
        button.setEnabled(enabled)
        button.setVisible(item.visible)
        if isinstance(button, QCheckBox):
            button.setChecked(item.checked)

    def _clicked(self, key: str) -> None:
        self.action_requested.emit(key, None)

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.persistent:
            event.ignore()
            self.showMinimized()
        else:
            super().closeEvent(event)
