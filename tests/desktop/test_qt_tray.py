"""The Qt backend builds its menu once and updates the same QActions on every snapshot."""

from __future__ import annotations

import pytest
from desktoptools import NOW, ca_snapshot, make_request, member_snapshot
from pytestqt.qtbot import QtBot

from koi_tray.desktop import menu as m
from koi_tray.desktop.icons import IconState, render_icon
from koi_tray.desktop.qt_tray import QtTray


@pytest.fixture
def tray(qtbot: QtBot) -> QtTray:
    tray = QtTray()
    yield tray
    tray.close()


def test_menu_is_updated_in_place(tray: QtTray) -> None:
    tray.set_menu(m.build_menu(None))
    menu = tray.menu
    before = list(menu.actions())
    renew = tray.action(m.RENEW)
    assert renew.text() == "Renew now" and not renew.isEnabled()

    tray.set_menu(m.build_menu(ca_snapshot()))
    tray.set_menu(m.build_menu(ca_snapshot(locked=True)))

    assert tray.menu is menu
    assert list(menu.actions()) == before
    assert tray.action(m.RENEW) is renew and renew.isEnabled()
    assert tray.action("role").text().startswith("CA of mesh")
    assert tray.action(m.UNLOCK).isVisible()
    assert tray.action("ca_key").text() == "CA key: LOCKED (use Unlock CA…)"

    tray.set_menu(m.build_menu(member_snapshot()))
    assert list(menu.actions()) == before
    assert not tray.action(m.UNLOCK).isVisible()
    assert not tray.action(m.INVITE).isVisible()


def test_submenus_reuse_their_actions(tray: QtTray) -> None:
    first, second = make_request("node-07", now=NOW), make_request("nas", now=NOW)
    tray.set_menu(m.build_menu(ca_snapshot(pending=(first, second))))
    pool = list(tray.pool(m.APPROVALS))
    assert [a.text().split(" ")[0] for a in pool] == ["node-07", "nas"]

    tray.set_menu(m.build_menu(ca_snapshot(pending=(second,))))

    assert tray.pool(m.APPROVALS) == pool
    assert pool[0].text().startswith("nas") and pool[0].isVisible()
    assert not pool[1].isVisible()
    assert tray.action(m.APPROVALS).text() == "Approvals… (1 waiting)"


def test_actions_report_their_key_and_argument(tray: QtTray) -> None:
    fired: list[tuple[str, str | None]] = []
    tray.bind(lambda key, arg: fired.append((key, arg)), lambda: fired.append(("activate", None)))
    request = make_request(now=NOW)
    tray.set_menu(m.build_menu(ca_snapshot(pending=(request,)), autostart=False))

    tray.action(m.RENEW).trigger()
    tray.pool(m.APPROVALS)[0].trigger()
    tray.action(m.AUTOSTART).trigger()
    tray.tray.activated.emit(tray.tray.ActivationReason.Trigger)
    tray.tray.activated.emit(tray.tray.ActivationReason.Context)

    assert fired == [
        (m.RENEW, None),
        (m.APPROVAL, request.request_id),
        (m.AUTOSTART, None),
        ("activate", None),
    ]


def test_status_lines_are_readable_and_open_the_status_window(tray: QtTray) -> None:
    fired: list[tuple[str, str | None]] = []
    tray.bind(lambda key, arg: fired.append((key, arg)), lambda: None)
    tray.set_menu(m.build_menu(ca_snapshot()))

    for key in ("role", "leaf", "renewal_last", "enrollment", "ca_key", "members"):
        assert tray.action(key).isEnabled(), key
    tray.action("leaf").trigger()
    tray.pool("members")[0].trigger()

    assert fired == [(m.STATUS, "leaf"), (m.STATUS, None)]


def test_icon_and_tooltip_reach_the_tray(tray: QtTray) -> None:
    tray.set_icon(render_icon(IconState.ATTENTION, 2))
    tray.set_tooltip("koi-tray ca ca-host · 2 approval(s) waiting")

    assert not tray.tray.icon().isNull()
    assert tray.tray.toolTip() == "koi-tray ca ca-host · 2 approval(s) waiting"
    assert not tray.available()  # offscreen has no tray host
