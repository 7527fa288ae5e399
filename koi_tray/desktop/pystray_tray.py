"""The pystray tray backend, for desktops where Qt's tray icon does not show.

pystray is imported only when this backend is asked for: with no display its import
raises `Xlib.error.DisplayNameError`, which `available()` turns into a one-line reason.
The icon's loop runs `Icon.run` on a daemon thread (not `run_detached`, which on the xorg
backend leaves a setup thread that blocks `stop()` and process exit). Every pystray
callback arrives on that thread and is handed to the asyncio loop with
`call_soon_threadsafe`; nothing here touches Qt.

The menu is one `pystray.Menu` whose texts and states are callables reading the latest
`MenuModel`, so `set_menu` only swaps the model and asks pystray to redraw. pystray's
xorg backend has no menu at all: there a left click (the menu's default item) opens the
status window, which carries the same lines and actions. On the gtk and appindicator
backends `set_menu` is called on the loop thread while GTK runs on pystray's, so the
redraw is handed to GLib's main loop with `GLib.idle_add`; that path is untested here
(see docs/known-issues.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image

from koi_tray.desktop.backend import ActionHandler, ActivateHandler
from koi_tray.desktop.icons import IconState, render_icon
from koi_tray.desktop.menu import CHECK, INFO, SEPARATOR, STATUS, SUBMENU, MenuItem, MenuModel

log = logging.getLogger(__name__)

ICON_NAME = "koi-tray"
_GLIB_BACKENDS = frozenset({"pystray._gtk", "pystray._appindicator"})
STOP_JOIN_S = 1.0
"""How long `close` waits for pystray's thread. It is a daemon thread: if pystray's xorg
loop misses the end of its window (seen now and then), the process exits without it."""


class PystrayTray:
    """A `TrayBackend` on pystray; see the module docstring for threads and menus."""

    name = "pystray"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pystray: Any = None
        self._why = ""
        self._icon: Any = None
        self._thread: threading.Thread | None = None
        self._image: Image.Image = render_icon(IconState.IDLE)
        self._title = "koi-tray"
        self._model: MenuModel | None = None
        self._items: dict[str, MenuItem] = {}
        self._on_action: ActionHandler = lambda key, arg: None
        self._on_activate: ActivateHandler = lambda: None

    def bind(self, on_action: ActionHandler, on_activate: ActivateHandler) -> None:
        self._on_action = on_action
        self._on_activate = on_activate

    # -- availability ---------------------------------------------------------------------

    def available(self) -> bool:
        if self._pystray is not None:
            return True
        try:
            import pystray
        except Exception as exc:  # DisplayNameError and friends are not ImportErrors
            self._why = f"pystray cannot start here: {type(exc).__name__}: {exc}"
            log.debug("pystray import failed", exc_info=True)
            return False
        self._pystray = pystray
        return True

    def unavailable_reason(self) -> str:
        return self._why or "pystray is not available"

    @property
    def has_menu(self) -> bool:
        """Whether pystray's backend on this desktop shows a menu (xorg does not)."""
        return bool(self._icon is not None and self._icon.HAS_MENU)

    @property
    def icon(self) -> Any:
        """The `pystray.Icon`, once shown."""
        return self._icon

    # -- showing ----------------------------------------------------------------------------

    def show(self) -> None:
        if not self.available():
            raise RuntimeError(self.unavailable_reason())
        pystray = self._pystray
        title = _x11_title(self._title)
        self._icon = pystray.Icon(ICON_NAME, self._image, title, menu=self.build_menu())
        _accept_clicks_on_xorg(self._icon)
        self._thread = threading.Thread(
            target=self._icon.run, args=(_make_visible,), name="pystray", daemon=True
        )
        self._thread.start()
        log.info("pystray icon started (%s backend)", type(self._icon).__module__)

    def set_icon(self, image: Image.Image) -> None:
        self._image = image
        if self._icon is not None:
            self._icon.icon = image

    def set_tooltip(self, text: str) -> None:
        self._title = text
        if self._icon is not None:
            self._icon.title = _x11_title(text)

    def set_menu(self, model: MenuModel) -> None:
        self._model = model
        self._items = {item.key: item for item in model.items}
        icon = self._icon
        if icon is None or not icon.HAS_MENU:
            return
        if type(icon).__module__ in _GLIB_BACKENDS:
            from gi.repository import GLib

            GLib.idle_add(_update_menu_once, icon)
        else:
            icon.update_menu()

    def notify(self, title: str, body: str, urgent: bool = False) -> None:
        if self._icon is not None and self._icon.HAS_NOTIFICATION:
            self._icon.notify(body, title)
        else:
            log.info("notification (this pystray backend cannot show it): %s: %s", title, body)

    def close(self) -> None:
        icon, self._icon = self._icon, None
        if icon is None:
            return
        icon.stop()
        if self._thread is not None:
            self._thread.join(STOP_JOIN_S)
            if self._thread.is_alive():
                log.info("pystray's thread still runs %.0f s after stop; leaving it", STOP_JOIN_S)

    # -- the menu ---------------------------------------------------------------------------

    def build_menu(self) -> Any:
        """Make the `pystray.Menu` that renders the latest model (`show` does this once)."""
        pystray = self._pystray
        entries = [
            pystray.MenuItem("Open koi-tray", self._hop_activate, default=True, visible=False)
        ]
        for item in self._model.items if self._model else ():
            entries.append(self._entry(item.key, item.kind))
        return pystray.Menu(*entries)

    def _entry(self, key: str, kind: str) -> Any:
        pystray = self._pystray
        if kind == SEPARATOR:
            return pystray.Menu.SEPARATOR

        def text(_item: Any) -> str:
            return self._item(key).text

        def enabled(_item: Any) -> bool:
            return self._item(key).enabled

        def visible(_item: Any) -> bool:
            return self._item(key).visible

        if kind == SUBMENU:
            submenu = pystray.Menu(lambda: self._children(key))
            return pystray.MenuItem(text, submenu, enabled=enabled, visible=visible)
        checked = (lambda _item: self._item(key).checked) if kind == CHECK else None
        action = self._hop(STATUS, key) if kind == INFO else self._hop(key, None)
        return pystray.MenuItem(text, action, checked=checked, enabled=enabled, visible=visible)

    def _children(self, key: str) -> Iterator[Any]:
        for child in self._item(key).children:
            yield self._pystray.MenuItem(
                child.text, self._hop(child.key, child.arg), enabled=child.enabled
            )

    def _item(self, key: str) -> MenuItem:
        return self._items.get(key) or MenuItem(key, visible=False)

    def _hop(self, key: str, arg: str | None) -> Callable[[Any, Any], None]:
        def clicked(_icon: Any, _item: Any) -> None:
            self._loop.call_soon_threadsafe(self._on_action, key, arg)

        return clicked

    def _hop_activate(self, _icon: Any, _item: Any) -> None:
        self._loop.call_soon_threadsafe(self._on_activate)


def _x11_title(text: str) -> str:
    """Make `text` fit pystray's xorg window name, which python-xlib encodes as Latin-1."""
    return text.replace("…", "...").encode("latin-1", "replace").decode("latin-1")


def _update_menu_once(icon: Any) -> bool:
    icon.update_menu()
    return False  # run once, not on every idle pass


def _make_visible(icon: Any) -> None:
    icon.visible = True


def _accept_clicks_on_xorg(icon: Any) -> None:
    """Ask X for button presses on pystray's xorg icon window.

    pystray 0.19.5 creates the window with only exposure and structure events, so its
    click handler never runs; adding ButtonPressMask makes a left click reach it.
    """
    window = getattr(icon, "_window", None)
    display = getattr(icon, "_display", None)
    if window is None or display is None or type(icon).__module__ != "pystray._xorg":
        return
    import Xlib.X

    mask = Xlib.X.ExposureMask | Xlib.X.StructureNotifyMask | Xlib.X.ButtonPressMask
    window.change_attributes(event_mask=mask)
    display.flush()
