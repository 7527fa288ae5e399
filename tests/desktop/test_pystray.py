"""The pystray backend without a display: its menu renders the model, clicks hop threads.

pystray's `dummy` backend (set in conftest) lets this process import pystray with no X
server; it cannot show an icon, so docking and real clicks are tested in `test_xvfb.py`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from desktoptools import NOW, ca_snapshot, make_request, wait_until

from koi_tray.desktop import menu as m
from koi_tray.desktop.pystray_tray import PystrayTray, _x11_title


def visible_texts(menu: Any) -> list[str]:
    return [item.text for item in menu if item.text != "- - - -"]


@pytest.mark.asyncio
async def test_menu_renders_the_latest_model() -> None:
    tray = PystrayTray(asyncio.get_running_loop())
    assert tray.available()
    tray.set_menu(m.build_menu(ca_snapshot()))
    menu = tray.build_menu()

    model = m.build_menu(ca_snapshot(locked=True))
    tray.set_menu(model)

    # pystray hides a submenu without items, like the empty "Approvals…" here.
    expected = [
        i.text
        for i in model.items
        if i.visible and i.kind != m.SEPARATOR and (i.kind != m.SUBMENU or i.children)
    ]
    assert visible_texts(menu) == expected
    unlock = next(item for item in menu if item.text == "Unlock CA…")
    assert unlock.enabled
    autostart = next(item for item in menu if item.text == "Start at login")
    assert autostart.checked is False


@pytest.mark.asyncio
async def test_clicks_on_pystray_threads_reach_the_loop() -> None:
    loop = asyncio.get_running_loop()
    tray = PystrayTray(loop)
    tray.available()
    seen: list[tuple[str, str | None, bool]] = []
    tray.bind(
        lambda key, arg: seen.append(
            (key, arg, threading.current_thread() is threading.main_thread())
        ),
        lambda: seen.append(
            ("activate", None, threading.current_thread() is threading.main_thread())
        ),
    )
    request = make_request(now=NOW)
    tray.set_menu(m.build_menu(ca_snapshot(pending=(request,))))
    menu = tray.build_menu()
    renew = next(item for item in menu if item.text == "Renew now")
    approvals = next(item for item in menu if item.text.startswith("Approvals…"))
    approval = next(iter(approvals.submenu))

    def click_from_pystray_thread() -> None:
        renew(None)
        approval(None)
        menu(None)  # a left click runs the default item

    worker = threading.Thread(target=click_from_pystray_thread)
    worker.start()
    worker.join()

    await wait_until(lambda: len(seen) == 3)
    assert seen == [
        (m.RENEW, None, True),
        (m.APPROVAL, request.request_id, True),
        ("activate", None, True),
    ]


def test_without_a_display_pystray_is_unavailable_not_a_crash() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "PYSTRAY_BACKEND")}
    env["WAYLAND_DISPLAY"] = ""
    code = (
        "import asyncio\n"
        "from koi_tray.desktop.pystray_tray import PystrayTray\n"
        "tray = PystrayTray(asyncio.new_event_loop())\n"
        "print(tray.available())\n"
        "print(tray.unavailable_reason())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )

    assert result.returncode == 0, result.stderr
    available, reason = result.stdout.strip().splitlines()
    assert available == "False"
    assert reason.startswith("pystray cannot start here:")
    assert "Traceback" not in result.stderr


def test_titles_are_made_latin_1_for_the_xorg_window() -> None:
    assert _x11_title("koi-tray: starting…") == "koi-tray: starting..."
    assert _x11_title("ca · renewal failing (2×) ✓") == "ca · renewal failing (2×) ?"
