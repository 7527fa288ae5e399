"""The Qt tray backend: `QSystemTrayIcon` with a `QMenu` built once and updated in place.

The menu is created on the first `set_menu` with one `QAction` per model key. Every
later snapshot only changes text, enabled, visible and checked state on those same
actions, so a menu a person has open does not flicker or lose its place. The two
submenus whose length varies (members, pending approvals) keep a pool of actions that
grows as needed; unused ones are hidden.
"""

from __future__ import annotations

import functools
import io
import logging
import time

from PIL import Image
from PySide6.QtCore import QObject, QRect, QTimer
from PySide6.QtGui import QAction, QIcon, QPixmap
from PySide6.QtWidgets import QMenu, QSystemTrayIcon

from koi_tray.desktop.backend import ActionHandler, ActivateHandler
from koi_tray.desktop.menu import CHECK, INFO, SEPARATOR, STATUS, SUBMENU, MenuItem, MenuModel

log = logging.getLogger(__name__)

NOTIFY_MS = 10_000
DOCK_WATCH_MS = 100
DOCK_WATCH_LIMIT_S = 10.0


def pixmap_from_image(image: Image.Image) -> QPixmap:
    """Convert a Pillow image to a QPixmap (through PNG, which keeps the alpha channel)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    pixmap = QPixmap()
    pixmap.loadFromData(buffer.getvalue(), "PNG")
    return pixmap


class QtTray(QObject):
    """A `TrayBackend` on `QSystemTrayIcon`. Callbacks run on the Qt (= loop) thread."""

    name = "qt"

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.tray = QSystemTrayIcon(self)
        self.menu: QMenu | None = None
        self._actions: dict[str, QAction] = {}
        self._submenus: dict[str, QMenu] = {}
        self._pools: dict[str, list[QAction]] = {}
        self._on_action: ActionHandler = lambda key, arg: None
        self._on_activate: ActivateHandler = lambda: None
        self._shown_at = 0.0
        self._dock_timer = QTimer(self, interval=DOCK_WATCH_MS)
        self._dock_timer.timeout.connect(self._watch_dock)
        self.docked_after: float | None = None
        self.tray.activated.connect(self._activated)

    def bind(self, on_action: ActionHandler, on_activate: ActivateHandler) -> None:
        self._on_action = on_action
        self._on_activate = on_activate

    def available(self) -> bool:
        return QSystemTrayIcon.isSystemTrayAvailable()

    def unavailable_reason(self) -> str:
        return "no system tray host answers on this desktop (QSystemTrayIcon)"

    def show(self) -> None:
        self._shown_at = time.monotonic()
        self.tray.show()
        self._dock_timer.start()

    def set_icon(self, image: Image.Image) -> None:
        self.tray.setIcon(QIcon(pixmap_from_image(image)))

    def set_tooltip(self, text: str) -> None:
        self.tray.setToolTip(text)

    def notify(self, title: str, body: str, urgent: bool = False) -> None:
        icons = QSystemTrayIcon.MessageIcon
        kind = icons.Warning if urgent else icons.Information
        self.tray.showMessage(title, body, kind, NOTIFY_MS)

    def close(self) -> None:
        self._dock_timer.stop()
        self.tray.hide()
        if self.menu is not None:
            self.menu.hide()

    def geometry(self) -> QRect:
        """Where the icon sits on screen (empty until it is docked)."""
        return self.tray.geometry()

    def action(self, key: str) -> QAction:
        """The QAction rendering model item `key`."""
        return self._actions[key]

    def pool(self, key: str) -> list[QAction]:
        """The actions of submenu `key` (hidden ones included)."""
        return self._pools[key]

    # -- rendering ------------------------------------------------------------------------

    def set_menu(self, model: MenuModel) -> None:
        if self.menu is None:
            self.menu = QMenu()
            self.menu.setToolTipsVisible(True)
            self.tray.setContextMenu(self.menu)
        for item in model.items:
            action = self._actions.get(item.key)
            if action is None:
                action = self._add(item)
            self._update(action, item)

    def _add(self, item: MenuItem) -> QAction:
        assert self.menu is not None
        if item.kind == SEPARATOR:
            action = self.menu.addSeparator()
        elif item.kind == SUBMENU:
            submenu = self.menu.addMenu(item.text)
            submenu.setToolTipsVisible(True)
            self._submenus[item.key] = submenu
            self._pools[item.key] = []
            action = submenu.menuAction()
        else:
            action = self.menu.addAction(item.text)
            if item.kind == CHECK:
                action.setCheckable(True)
            if item.kind == INFO:
                action.triggered.connect(functools.partial(self._fire, STATUS, item.key))
            else:
                action.triggered.connect(functools.partial(self._fire, item.key, item.arg))
        self._actions[item.key] = action
        return action

    def _update(self, action: QAction, item: MenuItem) -> None:
        if item.kind != SEPARATOR and action.text() != item.text:
            action.setText(item.text)
        action.setEnabled(item.enabled)
        action.setVisible(item.visible)
        action.setToolTip(item.tooltip or item.text)
        if item.kind == CHECK:
            action.setChecked(item.checked)
        if item.kind == SUBMENU:
            self._sync_pool(item)

    def _sync_pool(self, item: MenuItem) -> None:
        submenu = self._submenus[item.key]
        pool = self._pools[item.key]
        for index, child in enumerate(item.children):
            if index == len(pool):
                action = submenu.addAction(child.text)
                action.triggered.connect(functools.partial(self._fire_pooled, action))
                pool.append(action)
            action = pool[index]
            action.setData((child.key, child.arg))
            if action.text() != child.text:
                action.setText(child.text)
            action.setEnabled(child.enabled)
            action.setVisible(child.visible)
        for action in pool[len(item.children) :]:
            action.setVisible(False)

    # -- events ---------------------------------------------------------------------------

    def _fire(self, key: str, arg: str | None, _checked: bool = False) -> None:
        self._on_action(key, arg)

    def _fire_pooled(self, action: QAction, _checked: bool = False) -> None:
        key, arg = action.data()
        self._on_action(key, arg)

    def _activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if reason == QSystemTrayIcon.ActivationReason.Trigger:
            self._on_activate()

    def _watch_dock(self) -> None:
        # Qt reports a 22 px square at (0, 0) before the tray host has placed the icon.
        geometry = self.tray.geometry()
        waited = time.monotonic() - self._shown_at
        if not geometry.isEmpty() and (geometry.x(), geometry.y()) != (0, 0):
            self._dock_timer.stop()
            self.docked_after = waited
            log.info(
                "tray icon docked at %d,%d (%dx%d), %.2f s after show",
                geometry.x(),
                geometry.y(),
                geometry.width(),
                geometry.height(),
                waited,
            )
        elif waited > DOCK_WATCH_LIMIT_S:
            self._dock_timer.stop()
            log.warning(
                "the tray icon has no place on screen %.0f s after show; the tray host may "
                "not support XEmbed or StatusNotifierItem icons (try --tray pystray)",
                DOCK_WATCH_LIMIT_S,
            )
