"""Drive a real tray icon on a real X server with real mouse events; print a JSON report.

Usage (DISPLAY must name an X server with a tray host, e.g. Xvfb + trayer):

    QT_QPA_PLATFORM=xcb python xvfb_driver.py qt WORKDIR [SCREENSHOT_DIR]
    QT_QPA_PLATFORM=xcb PYSTRAY_BACKEND=xorg python xvfb_driver.py pystray WORKDIR

`qt` runs a real CA node with the tray controller on `QtTray`, waits until the icon is
docked, right-clicks its centre with xdotool, checks the menu is shown (and saves a
screenshot of it), then clicks "Renew now" and waits for the renewal to be reported.
`pystray` docks a `PystrayTray` (xorg backend: no menu), left-clicks it with xdotool and
checks the callback arrived on the asyncio loop's thread.

`test_xvfb.py` runs this script in a subprocess, because Qt chooses its platform once
per process and the pytest process is offscreen.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import PySide6.QtWidgets
import qasync
from PIL import Image
from PySide6.QtCore import QRect

from koi_tray.autostart import autostart_for_platform
from koi_tray.certmesh import keystore
from koi_tray.compose.config import NodeConfig
from koi_tray.desktop import menu as m
from koi_tray.desktop.approval import ApprovalBoard, dialog_decider
from koi_tray.desktop.controller import TrayController

PASSPHRASE = "correct horse battery"


async def poll(predicate: Any, timeout: float, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(step)


async def xdotool(*args: str) -> None:
    process = await asyncio.create_subprocess_exec("xdotool", *args)
    await process.wait()


async def grab_root() -> Image.Image:
    process = await asyncio.create_subprocess_exec(
        "import", "-window", "root", "png:-", stdout=subprocess.PIPE
    )
    data, _ = await process.communicate()
    import io

    return Image.open(io.BytesIO(data)).convert("RGB")


def docked(geometry: QRect) -> bool:
    return not geometry.isEmpty() and (geometry.x(), geometry.y()) != (0, 0)


async def qt_scenario(workdir: Path, shots: Path | None) -> dict[str, Any]:
    from koi_tray.compose.node import Node
    from koi_tray.desktop.qt_tray import QtTray

    report: dict[str, Any] = {}
    board = ApprovalBoard()
    config = NodeConfig(
        data_dir=workdir / "ca",
        hostname="ca-host",
        http_port=0,
        mtls_port=0,
        mtls_bind="127.0.0.1",
    )
    node = Node(config, dialog_decider(board), kdf=keystore.FAST_TEST_KDF)
    await node.start()
    await node.create_ca(PASSPHRASE, "team", "Alice")
    tray = QtTray()
    autostart = autostart_for_platform("linux", home=workdir / "home", env={})
    controller = TrayController(
        tray, board, log_path=workdir / "koi-tray.log", opener=print, autostart=autostart
    )
    controller.show()
    controller.attach(node)
    report["available"] = tray.available()
    report["tray_shown"] = controller.tray_shown

    await poll(lambda: docked(tray.geometry()), 10)
    geometry = tray.geometry()
    report["geometry"] = [geometry.x(), geometry.y(), geometry.width(), geometry.height()]
    centre = geometry.center()
    await xdotool("mousemove", str(centre.x()), str(centre.y()), "click", "3")
    report["menu_visible"] = bool(await poll(lambda: tray.menu.isVisible(), 5))
    await asyncio.sleep(0.3)

    menu = tray.menu
    if report["menu_visible"] and shots is not None:
        box = menu.geometry().united(geometry).adjusted(-12, -12, 12, 12)
        image = await grab_root()
        crop = (max(0, box.left()), max(0, box.top()), box.right(), box.bottom())
        image.crop(crop).save(shots / "menu.png")
        report["screenshot"] = str(shots / "menu.png")

    renew = tray.action(m.RENEW)
    report["renew_enabled"] = renew.isEnabled()
    spot = menu.mapToGlobal(menu.actionGeometry(renew).center())
    await xdotool("mousemove", str(spot.x()), str(spot.y()), "click", "1")
    renewed = await poll(
        lambda: any(n.title == "Certificate renewed" for n in controller.notices), 10
    )
    report["renew_fired"] = bool(renewed)
    report["menu_closed_after_click"] = not menu.isVisible()

    controller.request_quit()
    report["exit"] = await controller.wait_closed()
    return report


async def pystray_scenario(workdir: Path) -> dict[str, Any]:
    from koi_tray.desktop.icons import IconState, render_icon
    from koi_tray.desktop.pystray_tray import PystrayTray

    loop = asyncio.get_running_loop()
    report: dict[str, Any] = {}
    clicks: list[bool] = []
    tray = PystrayTray(loop)
    tray.bind(
        lambda key, arg: None,
        lambda: clicks.append(threading.current_thread() is threading.main_thread()),
    )
    report["available"] = tray.available()
    tray.set_menu(m.build_menu(None))
    tray.set_icon(render_icon(IconState.OK, 1))
    tray.set_tooltip("koi-tray under pystray")
    tray.show()
    icon = tray.icon
    report["backend"] = type(icon).__module__
    report["has_menu"] = tray.has_menu

    root = icon._display.screen().root

    def placed() -> list[int] | None:
        # Docked means trayer has reparented the window and moved it into its panel.
        if icon._systray_manager is None:
            return None
        size = icon._window.get_geometry()
        origin = root.translate_coords(icon._window, 0, 0)
        box = [origin.x, origin.y, size.width, size.height]
        return box if origin.x > 0 and size.width > 1 else None

    box = await poll(placed, 10)
    report["docked"] = box is not None
    report["geometry"] = box
    await asyncio.sleep(0.2)
    x, y = box[0] + box[2] // 2, box[1] + box[3] // 2
    await xdotool("mousemove", str(x), str(y), "click", "1")
    report["left_click_on_loop"] = await poll(lambda: clicks[:1], 5) == [True]

    started = time.monotonic()
    tray.close()
    report["stop_seconds"] = round(time.monotonic() - started, 2)
    return report


async def main(argv: list[str]) -> dict[str, Any]:
    scenario, workdir = argv[1], Path(argv[2])
    shots = Path(argv[3]) if len(argv) > 3 else None
    if scenario == "qt":
        return await qt_scenario(workdir, shots)
    if scenario == "pystray":
        return await pystray_scenario(workdir)
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
