"""The tray controller: one node, one tray backend, the status window and the dialogs.

`TrayController` owns what the desktop host does on the event loop once Qt is up. It
renders every status snapshot into a `MenuModel` (menu, tooltip, icon), turns
`alerts_between(old, new)` into notifications, carries out the menu's actions (renew,
unlock, invite, copy, open folders, start at login) and runs the quit sequence: the
node's staged shutdown first (which denies pending approvals and so closes their
dialogs), then the other dialogs, the icon and the window.

Every task it starts is kept in a set it owns until the task ends; slow work (key
derivation, writing autostart entries, minting invites) goes to the loop's executor or
to node methods that use it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import shiboken6
from PySide6.QtCore import QObject, QTimer, QUrl
from PySide6.QtGui import QDesktopServices, QGuiApplication
from PySide6.QtWidgets import QDialog

from koi_tray.certmesh.errors import CertmeshError, InvalidAuth
from koi_tray.compose.status import NodeSnapshot, alerts_between
from koi_tray.desktop import menu as m
from koi_tray.desktop.approval import ApprovalBoard
from koi_tray.desktop.backend import TrayBackend
from koi_tray.desktop.dialogs import InviteDialog, UnlockDialog, show_dialog
from koi_tray.desktop.icons import BADGE_CAP, render_icon
from koi_tray.desktop.status_window import StatusWindow

if TYPE_CHECKING:
    from koi_tray.autostart import Autostart
    from koi_tray.compose.node import Node

log = logging.getLogger(__name__)

REFRESH_S = 60.0
ICON_SIZE = 64
NOTICE_HISTORY = 50
URGENT_ALERTS = frozenset({"approval_requested", "renewal_failed", "revoked"})


@dataclasses.dataclass(frozen=True)
class Notice:
    """A notification as it was shown (kept for the status window and for tests)."""

    at: dt.datetime
    title: str
    body: str
    urgent: bool


def open_path(path: Path) -> None:
    """Open a file or folder with the desktop's default application."""
    if not QDesktopServices.openUrl(QUrl.fromLocalFile(str(path))):
        log.warning("nothing on this desktop opened %s; open it by hand", path)


class TrayController(QObject):
    """Drives a tray backend and its windows from a node; see the module docstring.

    The controller can exist before the node: `show()` puts up the icon in its
    "starting" state, `attach(node)` connects it once the node runs.
    """

    def __init__(
        self,
        backend: TrayBackend,
        board: ApprovalBoard,
        *,
        certs_dir: Path | None = None,
        log_path: Path | None = None,
        autostart: Autostart | None = None,
        autostart_data_dir: Path | None = None,
        autostart_args: Sequence[str] = (),
        opener: Callable[[Path], None] = open_path,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.backend = backend
        self.board = board
        self.node: Node | None = None
        self.window: StatusWindow | None = None
        self.tray_shown = False
        self.model = m.build_menu(None)
        self.notices: collections.deque[Notice] = collections.deque(maxlen=NOTICE_HISTORY)
        self.starting: asyncio.Task[Any] | None = None
        self._certs_dir = certs_dir
        self._log_path = log_path
        self._autostart = autostart
        self._autostart_data_dir = autostart_data_dir
        self._autostart_args = tuple(autostart_args)
        self._autostart_on: bool | None = None
        self._opener = opener
        self._snapshot: NodeSnapshot | None = None
        self._busy: set[str] = set()
        self._icon_key: tuple[Any, int] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dialogs: dict[str, QDialog] = {}
        self._unsubscribe: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._quit_task: asyncio.Task[None] | None = None
        self._closed: asyncio.Future[int] | None = None
        backend.bind(self.handle_action, self.activate)

    # -- lifecycle ------------------------------------------------------------------------

    def show(self) -> None:
        """Show the icon (starting state), or the status window where there is no tray."""
        self._autostart_on = self._read_autostart()
        self._render(None)
        reason = self.backend.unavailable_reason()
        if self.backend.available():
            try:
                self.backend.show()
            except Exception as exc:
                reason = f"the {self.backend.name} tray failed to start: {exc!r}"
                log.debug("tray backend traceback", exc_info=True)
            else:
                self.tray_shown = True
                log.info("%s tray icon shown", self.backend.name)
                return
        log.warning("no system tray here (%s); showing the koi-tray window instead", reason)
        self.open_window()
        log.info("status window shown")

    def attach(self, node: Node) -> None:
        """Follow `node`: render its snapshots, notify on alerts, refresh every minute."""
        self.node = node
        self._certs_dir = node.data.certs
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = node.status.subscribe(self._on_status)
        self._on_status(node.status.snapshot, None)
        self._spawn(self._refresh_every_minute(), "tray-refresh")

    @property
    def quitting(self) -> bool:
        return self._quit_task is not None

    def request_quit(self) -> None:
        """Start the quit sequence once; later calls do nothing."""
        if self._quit_task is not None:
            return
        log.info("koi-tray is quitting")
        if self.starting is not None and not self.starting.done():
            self.starting.cancel()
        self._quit_task = self._spawn(self._shutdown(), "tray-shutdown")

    async def wait_closed(self) -> int:
        """Wait until the quit sequence is complete; return the exit code."""
        return await self._closed_future()

    def close_now(self) -> None:
        """Take the icon and windows down at once (start failed; there is no node)."""
        self.board.close_all()
        self.backend.close()
        if self.window is not None:
            self.window.persistent = False
            self.window.close()

    async def _shutdown(self) -> None:
        try:
            self.backend.set_tooltip("koi-tray: stopping…")
            for task in list(self._tasks):
                if task is not asyncio.current_task():
                    task.cancel()
            if self.node is not None:
                await self.node.shutdown()
            for dialog in list(self._dialogs.values()):
                if shiboken6.isValid(dialog):
                    dialog.reject()
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
        finally:
            self.close_now()
            closed = self._closed_future()
            if not closed.done():
                closed.set_result(0)

    def _closed_future(self) -> asyncio.Future[int]:
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        return self._closed

    # -- rendering ------------------------------------------------------------------------

    def _on_status(self, new: NodeSnapshot, old: NodeSnapshot | None) -> None:
        if self._loop is not None and threading.current_thread() is not threading.main_thread():
            self._loop.call_soon_threadsafe(self._on_status, new, old)
            return
        self._render(new)
        for alert in alerts_between(old, new):
            self.notify(alert.title, alert.body, alert.kind in URGENT_ALERTS, alert.kind)

    def _render(self, snapshot: NodeSnapshot | None) -> None:
        self._snapshot = snapshot
        model = m.build_menu(snapshot, autostart=self._autostart_on, busy=frozenset(self._busy))
        self.model = model
        self.backend.set_menu(model)
        self.backend.set_tooltip(model.tooltip)
        icon_key = (model.icon_state, min(model.pending, BADGE_CAP))
        if icon_key != self._icon_key:
            self._icon_key = icon_key
            image = render_icon(model.icon_state, model.pending, ICON_SIZE)
            self.backend.set_icon(image)
            if self.window is not None:
                self.window.set_icon(image)
        if self.window is not None:
            self.window.update_model(model)

    def _rerender(self) -> None:
        self._render(self._snapshot)

    async def _refresh_every_minute(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            if self.node is not None:
                self._render(self.node.status.refresh())

    def notify(self, title: str, body: str, urgent: bool = False, kind: str = "") -> None:
        """Tell the person something: a tray notification, or the window's banner."""
        log.info("notification: %s: %s", title, body)
        self.notices.append(Notice(dt.datetime.now(dt.UTC), title, body, urgent))
        if self.tray_shown:
            self.backend.notify(title, body, urgent)
        if self.window is not None and (self.window.persistent or self.window.isVisible()):
            self.window.show_notice(title, body, urgent, kind)

    def open_window(self) -> StatusWindow:
        """Show the status window (created on first use) and bring it to the front."""
        if self.window is None:
            self.window = StatusWindow(persistent=not self.tray_shown)
            self.window.action_requested.connect(self.handle_action)
            self._icon_key = None
            self._rerender()
        self.window.showNormal()
        self.window.raise_()
        self.window.activateWindow()
        return self.window

    # -- actions --------------------------------------------------------------------------

    def activate(self) -> None:
        """A left click on the icon: raise waiting approvals, else open the window."""
        if self.board.raise_all() == 0:
            self.open_window()

    def handle_action(self, key: str, arg: str | None = None) -> None:
        """Carry out menu action `key` (see `koi_tray.desktop.menu` for the keys)."""
        log.debug("menu action %s %s", key, arg or "")
        try:
            self._dispatch(key, arg)
        except Exception as exc:
            log.error("menu action %s failed: %r", key, exc)
            log.debug("menu action %s traceback", key, exc_info=exc)

    def _dispatch(self, key: str, arg: str | None) -> None:
        node = self.node
        if key == m.QUIT:
            self.request_quit()
        elif key == m.STATUS:
            self.open_window()
        elif key == m.APPROVAL and arg:
            if not self.board.raise_dialog(arg):
                log.info("approval %s has no dialog yet (waiting for a free slot)", arg)
        elif key == m.APPROVALS:
            self.board.raise_all()
        elif key == m.OPEN_LOG and self._log_path is not None:
            self._opener(self._log_path)
        elif key == m.OPEN_CERTS and self._certs_dir is not None:
            self._certs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._opener(self._certs_dir)
        elif key == m.AUTOSTART:
            self._spawn(self._toggle_autostart(), "tray-autostart")
        elif node is None or self.quitting:
            log.info("%s ignored: the node is not running", key)
        elif key == m.RENEW:
            self._spawn(self._renew(node), "tray-renew")
        elif key == m.UNLOCK:
            self._spawn(self._unlock(node), "tray-unlock")
        elif key == m.INVITE:
            self._spawn(self._invite(node), "tray-invite")
        elif key == m.COPY_FINGERPRINT:
            fingerprint = node.status.snapshot.mesh_fingerprint
            if fingerprint:
                QGuiApplication.clipboard().setText(fingerprint)
        else:
            log.warning("unknown menu action %r", key)

    async def _renew(self, node: Node) -> None:
        if m.RENEW in self._busy:
            return
        self._busy.add(m.RENEW)
        self._rerender()
        try:
            result = await node.renew_now(True)
        except CertmeshError as exc:
            self.notify("Renewal failed", str(exc), urgent=True)
            return
        finally:
            self._busy.discard(m.RENEW)
            self._rerender()
        outcome = result.get("outcome")
        if outcome == "renewed":
            until = str(result.get("expires", "?"))[:10]
            self.notify("Certificate renewed", f"The certificate is valid until {until}.")
        elif outcome == "failed" and node.status.snapshot.renewal.consecutive_failures > 1:
            # The first failure is announced by the status alert; later ones only here.
            self.notify("Renewal failed again", str(result.get("detail", "")), urgent=True)
        elif outcome not in ("renewed", "failed"):
            self.notify("Renewal", str(result.get("detail") or outcome))

    async def _unlock(self, node: Node) -> None:
        ca = node.ca
        if ca is None or not ca.locked or self._raise_existing("unlock"):
            return
        dialog = UnlockDialog(ca.ca_fingerprint)
        dialog.submitted.connect(
            lambda passphrase: self._spawn(self._try_unlock(node, dialog, passphrase), "unlock")
        )
        await self._run_dialog("unlock", dialog)

    async def _try_unlock(self, node: Node, dialog: UnlockDialog, passphrase: str) -> None:
        try:
            await node.unlock(passphrase)
        except InvalidAuth:
            error = "Wrong passphrase. Try again."
        except CertmeshError as exc:
            error = str(exc)
        else:
            if shiboken6.isValid(dialog):
                dialog.accept()
            return
        log.warning("unlocking the CA failed: %s", error)
        if shiboken6.isValid(dialog) and dialog.isVisible():
            dialog.show_error(error)

    async def _invite(self, node: Node) -> None:
        if node.ca is None or self._raise_existing("invite"):
            return
        try:
            port = node.address("http")[1]
        except KeyError:
            port = node.config.http_port
        dialog = InviteDialog(f"http://{node.config.hostname}:{port}")
        dialog.submitted.connect(
            lambda hostname: self._spawn(self._mint(node, dialog, hostname), "invite")
        )
        await self._run_dialog("invite", dialog)

    async def _mint(self, node: Node, dialog: InviteDialog, hostname: str) -> None:
        ca = node.ca
        if ca is None:
            return
        loop = asyncio.get_running_loop()
        try:
            minted = await loop.run_in_executor(None, ca.mint_invite, hostname)
        except CertmeshError as exc:
            if shiboken6.isValid(dialog):
                dialog.show_error(str(exc))
            return
        log.info("invite made for %s, expires %s", minted.hostname, minted.expires_at)
        if shiboken6.isValid(dialog):
            dialog.show_invite(minted.code, minted.hostname, minted.expires_at)

    async def _toggle_autostart(self) -> None:
        from koi_tray.autostart import ENABLED, AutostartError

        autostart = self._autostart
        if autostart is None:
            return
        want = not self._autostart_on
        loop = asyncio.get_running_loop()
        try:
            if want:
                status = await loop.run_in_executor(
                    None, autostart.enable, self._autostart_data_dir, self._autostart_args
                )
            else:
                status = await loop.run_in_executor(None, autostart.disable)
        except AutostartError as exc:
            self.notify("Start at login", str(exc))
        else:
            self._autostart_on = status.state == ENABLED
            log.info("start at login is now %s (%s)", status.state, status.location)
        self._rerender()

    def _read_autostart(self) -> bool | None:
        """Read the login entry once at start; schedule a repair when the program moved.

        An enabled entry whose program is not this interpreter (the virtualenv was moved
        or reinstalled elsewhere) would start nothing at the next login, so it is
        rewritten for this installation, on the executor, right after the loop runs. An
        entry that only differs in its options (another data dir, other binds) was the
        person's choice and is left alone.
        """
        if self._autostart is None:
            return None
        from koi_tray.autostart import ENABLED, AutostartError

        try:
            status = self._autostart.status(self._autostart_data_dir, self._autostart_args)
        except AutostartError as exc:
            log.warning("cannot read the start-at-login entry: %s", exc)
            return False
        if status.state != ENABLED:
            return False
        if status.stale and (status.program is None or status.program != self._autostart.program):
            log.info("start-at-login entry runs %s, which is not this koi-tray", status.command)
            QTimer.singleShot(0, self._start_autostart_repair)
        return True

    def _start_autostart_repair(self) -> None:
        if not self.quitting:
            self._spawn(self._repair_autostart(), "tray-autostart-repair")

    async def _repair_autostart(self) -> None:
        from koi_tray.autostart import ENABLED, AutostartError

        autostart = self._autostart
        if autostart is None:
            return
        loop = asyncio.get_running_loop()
        try:
            status = await loop.run_in_executor(
                None, autostart.enable, self._autostart_data_dir, self._autostart_args
            )
        except AutostartError as exc:
            log.warning("the start-at-login entry is broken and cannot be repaired: %s", exc)
            self._autostart_on = False
            self.notify("Start at login", f"The login entry is broken: {exc}")
        else:
            log.info("repaired start-at-login entry: %s runs %s", status.location, status.command)
            self._autostart_on = status.state == ENABLED
        self._rerender()

    # -- helpers --------------------------------------------------------------------------

    def _raise_existing(self, name: str) -> bool:
        dialog = self._dialogs.get(name)
        if dialog is None or not shiboken6.isValid(dialog):
            return False
        dialog.showNormal()
        dialog.raise_()
        dialog.activateWindow()
        return True

    async def _run_dialog(self, name: str, dialog: QDialog) -> int:
        self._dialogs[name] = dialog
        try:
            return await show_dialog(dialog)
        finally:
            if self._dialogs.get(name) is dialog:
                del self._dialogs[name]
            if shiboken6.isValid(dialog):
                dialog.deleteLater()

    def dialog(self, name: str) -> QDialog | None:
        """The open "unlock" or "invite" dialog, if any."""
        return self._dialogs.get(name)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s failed: %r", task.get_name(), exc)
            log.debug("%s traceback", task.get_name(), exc_info=exc)
