"""Drive the real tray on a real X server with real mouse and keyboard; print a JSON report.

Usage (DISPLAY must name an X server with a tray host, e.g. Xvfb + trayer):

    QT_QPA_PLATFORM=xcb python xvfb_driver.py qt WORKDIR SHOTS_DIR
    QT_QPA_PLATFORM=xcb PYSTRAY_BACKEND=xorg python xvfb_driver.py pystray WORKDIR SHOTS_DIR

Both scenarios run a real CA node with the tray controller on the named backend and a
member node on loopback, in this one process and on one qasync loop, and act only
through X input: xdotool moves the pointer, clicks and types, and closing a window is a
`WM_DELETE_WINDOW` message, as a window manager sends for its close button.

`qt`: the icon docks; a right click on its centre opens the menu (saved as `menu.png`);
clicking "Renew now" renews and the menu's renewal line says so; with the CA locked the
same click fails and the line says FAILED. `pystray` (xorg: no menu): the icon docks; a
left click opens the status window, whose Renew button does the same.

Then, for both, five joins from the member, each answered in its approval dialog: Deny
clicked, Escape pressed, the window closed, the deadline left to pass (shortened to a
few seconds here; there is no setting for it), and a name typed and Approve clicked.
For each the report has what the member heard (the error code, or "enrolled"), whether
the CA's roster holds the member, the audit line, and the answer to a
`GET /v1/certmesh/status` made from another thread while the dialog was up.

`test_xvfb.py` runs this script in a subprocess, because Qt chooses its platform once
per process and the pytest process is offscreen.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import PySide6.QtWidgets
import qasync
from PIL import Image
from PySide6.QtCore import QPoint, QRect
from PySide6.QtWidgets import QWidget

from koi_tray.certmesh import ca as ca_module
from koi_tray.certmesh import keystore
from koi_tray.certmesh.errors import CertmeshError
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.deciders import deny_and_log_decider
from koi_tray.compose.node import Node
from koi_tray.desktop import menu as m
from koi_tray.desktop.approval import ApprovalBoard, ApprovalDialog, dialog_decider
from koi_tray.desktop.controller import TrayController

PASSPHRASE = "correct horse battery"
SHORT_DEADLINE = dt.timedelta(seconds=3)
MENU_RETRIES: list[float] = []
JOIN_CASES = ("deny", "escape", "close", "timeout", "approve")


async def poll(predicate: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(step)


async def xdotool(*args: str) -> None:
    process = await asyncio.create_subprocess_exec("xdotool", *args)
    await process.wait()


async def click_at(point: QPoint, button: int = 1) -> None:
    await xdotool("mousemove", str(point.x()), str(point.y()), "click", str(button))


async def click_widget(widget: QWidget) -> None:
    """Click the centre of `widget` where it is on screen."""
    await click_at(widget.mapToGlobal(widget.rect().center()))


def close_window(window_id: int) -> None:
    """Send `WM_DELETE_WINDOW` to a top-level window, as a window manager's close button does."""
    from Xlib import X
    from Xlib.display import Display
    from Xlib.protocol import event

    display = Display()
    try:
        window = display.create_resource_object("window", window_id)
        protocols = display.intern_atom("WM_PROTOCOLS")
        delete = display.intern_atom("WM_DELETE_WINDOW")
        message = event.ClientMessage(
            window=window, client_type=protocols, data=(32, [delete, X.CurrentTime, 0, 0, 0])
        )
        window.send_event(message, event_mask=X.NoEventMask)
        display.flush()
    finally:
        display.close()


async def grab_root() -> Image.Image:
    process = await asyncio.create_subprocess_exec(
        "import", "-window", "root", "png:-", stdout=subprocess.PIPE
    )
    data, _ = await process.communicate()
    return Image.open(io.BytesIO(data)).convert("RGB")


async def save_crop(box: QRect, path: Path) -> list[int]:
    """Save the part of the screen in `box` as a PNG; return its size."""
    image = await grab_root()
    crop = (max(0, box.left()), max(0, box.top()), box.right() + 1, box.bottom() + 1)
    shot = image.crop(crop)
    shot.save(path)
    return list(shot.size)


def get_status(url: str) -> int:
    """GET the node's status page from a worker thread (not the loop); return the HTTP code."""
    with urllib.request.urlopen(f"{url}/v1/certmesh/status", timeout=5) as response:
        return response.status


def docked(geometry: QRect) -> bool:
    return not geometry.isEmpty() and (geometry.x(), geometry.y()) != (0, 0)


def loopback(root: Path, hostname: str) -> NodeConfig:
    return NodeConfig(
        data_dir=root / hostname,
        hostname=hostname,
        http_port=0,
        mtls_port=0,
        mtls_bind="127.0.0.1",
    )


class Rig:
    """The CA with its tray, a member to join from, and what the scenario saw."""

    def __init__(self, workdir: Path, shots: Path) -> None:
        self.workdir = workdir
        self.shots = shots
        self.board = ApprovalBoard()
        self.report: dict[str, Any] = {}
        self.ca: Node
        self.member: Node
        self.controller: TrayController

    async def start(self, backend: Any) -> None:
        from koi_tray.autostart import autostart_for_platform

        self.ca = Node(
            loopback(self.workdir, "ca-host"),
            dialog_decider(self.board),
            kdf=keystore.FAST_TEST_KDF,
        )
        await self.ca.start()
        await self.ca.create_ca(PASSPHRASE, "team", "Alice")
        self.member = Node(
            loopback(self.workdir, "node-02"), deny_and_log_decider(), kdf=keystore.FAST_TEST_KDF
        )
        await self.member.start()
        autostart = autostart_for_platform("linux", home=self.workdir / "home", env={})
        self.controller = TrayController(
            backend,
            self.board,
            log_path=self.workdir / "koi-tray.log",
            opener=print,
            autostart=autostart,
        )
        self.controller.show()
        self.controller.attach(self.ca)
        self.report["tray_shown"] = self.controller.tray_shown

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ca.address('http')[1]}"

    def line(self, key: str) -> str:
        return self.controller.model.find(key).text

    def notices(self) -> list[str]:
        return [notice.title for notice in self.controller.notices]

    async def lock_ca(self) -> None:
        self.ca.ca.lock()
        self.ca.status.refresh()

    async def unlock_ca(self) -> None:
        await self.ca.unlock(PASSPHRASE)

    async def quit(self) -> None:
        started = time.monotonic()
        self.controller.request_quit()
        self.report["exit"] = await self.controller.wait_closed()
        self.report["quit_seconds"] = round(time.monotonic() - started, 2)
        await self.member.shutdown()

    # -- joins ------------------------------------------------------------------------------

    async def joins(self) -> None:
        for case in JOIN_CASES:
            self.report[f"join_{case}"] = await self.join(case)

    async def join(self, case: str) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if case == "timeout":
            ca_module.APPROVAL_TIMEOUT = SHORT_DEADLINE
        invite = self.ca.ca.mint_invite("node-02")
        codes: list[str] = []
        join = asyncio.ensure_future(self.member.join_mesh(self.url, invite.code, codes.append))
        try:
            dialog = await poll(lambda: self.board.dialogs() and self.board.dialogs()[0], 15)
            await poll(lambda: dialog.isVisible(), 5)
            await asyncio.sleep(0.4)  # mapped and placed by the X server
            result["dialog_code_matches"] = dialog.code.text() == codes[0]
            loop = asyncio.get_running_loop()
            result["http_while_open"] = await loop.run_in_executor(None, get_status, self.url)
            result["dialog_still_open"] = dialog.isVisible()
            await self.answer(case, dialog, result)
            try:
                await asyncio.wait_for(join, 15)
            except CertmeshError as exc:
                result["outcome"] = exc.code
            else:
                result["outcome"] = "enrolled"
        finally:
            ca_module.APPROVAL_TIMEOUT = dt.timedelta(seconds=300)
        result["dialog_closed"] = bool(await poll(lambda: not self.board.dialogs(), 5))
        roster = self.ca.ca.roster.members
        result["in_roster"] = [x.status for x in roster if x.hostname == "node-02"]
        audit = [line for line in self.ca.audit_text().splitlines() if "node-02" in line]
        result["audit"] = audit[-1] if audit else ""
        return result

    async def answer(self, case: str, dialog: ApprovalDialog, result: dict[str, Any]) -> None:
        if case == "deny":
            await click_widget(dialog.deny_button)
        elif case == "escape":
            await click_widget(dialog.operator)  # the dialog gets the keyboard
            await poll(dialog.operator.hasFocus, 3)
            await xdotool("key", "Escape")
        elif case == "close":
            close_window(int(dialog.winId()))
        elif case == "approve":
            await click_widget(dialog.operator)
            result["operator_focused"] = bool(await poll(dialog.operator.hasFocus, 3))
            await xdotool("type", "--delay", "30", "Alice")
            await poll(lambda: dialog.operator.text() == "Alice", 3)
            result["typed"] = dialog.operator.text()
            result["approve_enabled"] = dialog.approve_button.isEnabled()
            await click_widget(dialog.approve_button)
        # "timeout": nobody answers.


async def qt_scenario(workdir: Path, shots: Path) -> dict[str, Any]:
    from koi_tray.desktop.qt_tray import QtTray

    tray = QtTray()
    rig = Rig(workdir, shots)
    await rig.start(tray)
    report = rig.report
    report["available"] = tray.available()

    await poll(lambda: docked(tray.geometry()), 10)
    geometry = tray.geometry()
    report["geometry"] = [geometry.x(), geometry.y(), geometry.width(), geometry.height()]
    menu = await open_menu(tray, geometry)
    report["menu_visible"] = menu is not None
    if menu is not None:
        await asyncio.sleep(0.3)
        box = menu.geometry().united(geometry).adjusted(-12, -12, 12, 12)
        report["screenshot"] = str(shots / "menu.png")
        report["screenshot_size"] = await save_crop(box, shots / "menu.png")
        report["screenshot_box"] = [box.width(), box.height()]

    report["renew_enabled"] = tray.action(m.RENEW).isEnabled()
    report["renewed"] = await qt_renew(rig, tray, geometry, "Certificate renewed")
    report["menu_closed_after_click"] = not tray.menu.isVisible()
    report["line_after_success"] = await menu_line(tray, geometry, "renewal_last")

    await rig.lock_ca()
    report["failed"] = await qt_renew(rig, tray, geometry, "Certificate renewal failed")
    report["line_after_failure"] = await menu_line(tray, geometry, "renewal_last")
    report["detail_after_failure"] = rig.line("renewal_detail")
    await rig.unlock_ca()

    await rig.joins()
    await rig.quit()
    report["menu_retries"] = len(MENU_RETRIES)
    return report


async def open_menu(tray: Any, geometry: QRect) -> Any:
    """Right-click the icon and return the menu once it shows (closing an open one first)."""
    if tray.menu.isVisible():
        await close_menu(tray.menu)
    for _ in range(3):
        # A right click within ~0.5 s of the click that closed the menu is swallowed
        # (Qt's popup handling); a person is never that quick, so wait as one would.
        await asyncio.sleep(0.5)
        await click_at(geometry.center(), 3)
        if await poll(lambda: tray.menu.isVisible(), 2):
            return tray.menu
        MENU_RETRIES.append(time.monotonic())
    return None


async def close_menu(menu: Any) -> None:
    await xdotool("key", "Escape")
    await poll(lambda: not menu.isVisible(), 3)


async def qt_renew(rig: Rig, tray: Any, geometry: QRect, notice: str) -> bool:
    """Open the menu with a right click, click Renew now, wait for `notice`."""
    menu = await open_menu(tray, geometry)
    if menu is None:
        return False
    await asyncio.sleep(0.2)
    renew = tray.action(m.RENEW)
    await click_at(menu.mapToGlobal(menu.actionGeometry(renew).center()))
    return bool(await poll(lambda: notice in rig.notices(), 10))


async def menu_line(tray: Any, geometry: QRect, key: str) -> str:
    """Open the menu and read the line `key` as it is shown; close the menu with Escape."""
    menu = await open_menu(tray, geometry)
    if menu is None:
        return ""
    text = tray.action(key).text() if tray.action(key).isVisible() else ""
    await close_menu(menu)
    return text


async def pystray_scenario(workdir: Path, shots: Path) -> dict[str, Any]:
    from koi_tray.desktop.pystray_tray import PystrayTray

    tray = PystrayTray(asyncio.get_running_loop())
    rig = Rig(workdir, shots)
    report = rig.report
    report["available"] = tray.available()
    await rig.start(tray)
    icon = tray.icon
    report["backend"] = type(icon).__module__
    report["has_menu"] = tray.has_menu

    box = await poll(lambda: pystray_box(icon), 10)
    report["docked"] = box is not None
    report["geometry"] = box
    await asyncio.sleep(0.2)
    await click_at(QPoint(box[0] + box[2] // 2, box[1] + box[3] // 2))
    window = await poll(lambda: rig.controller.window, 5)
    report["window_opened_by_left_click"] = bool(window and await poll(window.isVisible, 5))
    await asyncio.sleep(0.3)

    report["renewed"] = await window_renew(rig, "Certificate renewed")
    report["line_after_success"] = window.lines["renewal_last"].text()
    await rig.lock_ca()
    report["failed"] = await window_renew(rig, "Certificate renewal failed")
    report["line_after_failure"] = window.lines["renewal_last"].text()
    await rig.unlock_ca()

    await rig.joins()
    await rig.quit()
    return report


def pystray_box(icon: Any) -> list[int] | None:
    """Where trayer placed pystray's xorg icon window, once it has reparented it."""
    if icon._systray_manager is None:
        return None
    root = icon._display.screen().root
    size = icon._window.get_geometry()
    origin = root.translate_coords(icon._window, 0, 0)
    box = [origin.x, origin.y, size.width, size.height]
    return box if origin.x > 0 and size.width > 1 else None


async def window_renew(rig: Rig, notice: str) -> bool:
    window = rig.controller.window
    button = window.buttons[m.RENEW]
    await poll(button.isEnabled, 5)
    await click_widget(button)
    return bool(await poll(lambda: notice in rig.notices(), 10))


async def main(argv: list[str]) -> dict[str, Any]:
    scenario, workdir, shots = argv[1], Path(argv[2]), Path(argv[3])
    shots.mkdir(parents=True, exist_ok=True)
    if scenario == "qt":
        return await qt_scenario(workdir, shots)
    if scenario == "pystray":
        return await pystray_scenario(workdir, shots)
    raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    qt = PySide6.QtWidgets
    app = qt.QApplication.instance() or qt.QApplication(sys.argv[:1])
    app.setQuitOnLastWindowClosed(False)
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    with loop:
        result = loop.run_until_complete(main(sys.argv))
    print(json.dumps(result), flush=True)
