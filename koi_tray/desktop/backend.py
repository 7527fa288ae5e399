"""The small interface every tray backend implements, and choosing one by name.

A backend shows an icon with a tooltip and a menu rendered from a `MenuModel`, shows
notifications, and reports clicks back through two callbacks bound with `bind`. It calls
them on the event loop's thread, whatever thread its toolkit uses. Qt's
`QSystemTrayIcon` (`QtTray`) is the default; pystray (`PystrayTray`) is the alternative.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Protocol

from PIL import Image

from koi_tray.desktop.menu import MenuModel

ActionHandler = Callable[[str, "str | None"], None]
ActivateHandler = Callable[[], None]

log = logging.getLogger(__name__)

BACKENDS = ("qt", "pystray")
PYSTRAY_ON_MACOS = (
    "--tray pystray is not supported on macOS (pystray's darwin backend needs the main "
    "thread, which Qt owns); using the Qt tray instead"
)


class TrayBackend(Protocol):
    """What the tray controller needs from a tray icon implementation."""

    name: str

    def bind(self, on_action: ActionHandler, on_activate: ActivateHandler) -> None:
        """Set the callbacks for menu actions (key, arg) and a left click on the icon."""
        ...

    def available(self) -> bool:
        """Tell whether this desktop has a tray this backend can dock into."""
        ...

    def unavailable_reason(self) -> str:
        """Say in one line why `available()` is False."""
        ...

    def show(self) -> None:
        """Put the icon in the tray (after `set_icon` and `set_menu`)."""
        ...

    def set_icon(self, image: Image.Image) -> None: ...

    def set_tooltip(self, text: str) -> None: ...

    def set_menu(self, model: MenuModel) -> None:
        """Render `model`; the first call builds the menu, later calls update it in place."""
        ...

    def notify(self, title: str, body: str, urgent: bool = False) -> None: ...

    def close(self) -> None:
        """Remove the icon and free the toolkit's resources; safe to call twice."""
        ...


def make_backend(
    name: str, loop: asyncio.AbstractEventLoop, platform: str = sys.platform
) -> TrayBackend:
    """Create the backend called `name` ("qt" or "pystray").

    On macOS "pystray" is refused with a warning and the Qt backend is made instead.

    Args:
        name: The backend's name.
        loop: The event loop pystray's callbacks are handed to.
        platform: A `sys.platform` value.

    Raises:
        ValueError: Unknown name.
    """
    if name == "pystray" and platform == "darwin":
        log.warning("%s", PYSTRAY_ON_MACOS)
        name = "qt"
    if name == "qt":
        from koi_tray.desktop.qt_tray import QtTray

        return QtTray()
    if name == "pystray":
        from koi_tray.desktop.pystray_tray import PystrayTray

        return PystrayTray(loop)
    raise ValueError(f"unknown tray backend {name!r}; choose one of {', '.join(BACKENDS)}")
