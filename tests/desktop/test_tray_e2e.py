"""The tray against real nodes on loopback: joins through the dialog, renewals, actions, quit.

Every test runs a real CA `Node` (and usually a member) on the qasync loop, with the
tray controller attached to a real `QtTray`. Offscreen there is no tray host, so the
controller also shows its status window, which these tests use as well.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from desktoptools import (
    PASSPHRASE,
    assert_real_png,
    http_url,
    node_config,
    screenshot_path,
    start_node,
    wait_until,
)
from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QWidget

from koi_tray.autostart import autostart_for_platform
from koi_tray.certmesh import ca as ca_module
from koi_tray.certmesh import keystore
from koi_tray.certmesh.errors import CertmeshError
from koi_tray.compose.deciders import deny_and_log_decider
from koi_tray.compose.node import Node
from koi_tray.desktop import approval
from koi_tray.desktop import controller as controller_module
from koi_tray.desktop import menu as m
from koi_tray.desktop.approval import ApprovalBoard, dialog_decider
from koi_tray.desktop.controller import TrayController
from koi_tray.desktop.qt_tray import QtTray

INVITE_CODE = re.compile(r"^[0-9a-f]{48}\.[0-9a-f]{64}$")


@dataclass
class Tray:
    """A node with the tray attached, as the desktop host runs it."""

    node: Node
    board: ApprovalBoard
    tray: QtTray
    controller: TrayController
    opened: list[Path] = field(default_factory=list)

    def line(self, key: str) -> str:
        return self.controller.model.find(key).text

    def notice_titles(self) -> list[str]:
        return [notice.title for notice in self.controller.notices]

    async def quit(self) -> int:
        self.controller.request_quit()
        return await asyncio.wait_for(self.controller.wait_closed(), 10)


async def attach_tray(node: Node, board: ApprovalBoard, tmp_path: Path, **kw: Any) -> Tray:
    tray = QtTray()
    opened: list[Path] = []
    controller = TrayController(
        tray, board, log_path=tmp_path / "koi-tray.log", opener=opened.append, **kw
    )
    controller.show()
    controller.attach(node)
    return Tray(node, board, tray, controller, opened)


async def start_ca(tmp_path: Path, preset: str = "team") -> tuple[Node, ApprovalBoard]:
    board = ApprovalBoard()
    config = node_config(tmp_path, "ca-host")
    node = Node(config, dialog_decider(board), kdf=keystore.FAST_TEST_KDF)
    await node.start()
    await node.create_ca(PASSPHRASE, preset, "Alice")
    return node, board


@pytest_asyncio.fixture
async def ca_tray(tmp_path: Path) -> AsyncIterator[Tray]:
    node, board = await start_ca(tmp_path)
    tray = await attach_tray(node, board, tmp_path)
    yield tray
    await tray.quit()


@pytest_asyncio.fixture
async def member(tmp_path: Path) -> AsyncIterator[Node]:
    node = await start_node(tmp_path, "node-02", deny_and_log_decider())
    yield node
    await node.shutdown()


def begin_join(ca: Node, member: Node, codes: list[str]) -> asyncio.Future[None]:
    invite = ca.ca.mint_invite(member.config.hostname)
    return asyncio.ensure_future(member.join_mesh(http_url(ca), invite.code, codes.append))


def click(widget: QWidget) -> None:
    QTest.mouseClick(widget, Qt.MouseButton.LeftButton)


@pytest.mark.asyncio
async def test_join_approved_in_the_dialog_enrols_the_member(
    ca_tray: Tray, member: Node, tmp_path: Path
) -> None:
    codes: list[str] = []
    join = begin_join(ca_tray.node, member, codes)

    dialog = await wait_until(lambda: ca_tray.board.dialogs() and ca_tray.board.dialogs()[0])
    assert dialog.code.text() == codes[0]
    assert dialog.request.hostname == "node-02"
    await wait_until(lambda: ca_tray.controller.model.pending == 1)
    assert ca_tray.tray.action(m.APPROVALS).text() == "Approvals… (1 waiting)"
    assert "node-02 asks to join the mesh" in ca_tray.notice_titles()
    ca_tray.tray.pool(m.APPROVALS)[0].trigger()  # the menu entry raises this dialog

    QTest.keyClicks(dialog.operator, "Alice")
    click(dialog.approve_button)
    await asyncio.wait_for(join, 10)

    roster = ca_tray.node.ca.roster
    assert ("node-02", "member", "active") in [
        (x.hostname, x.role, x.status) for x in roster.members
    ]
    assert member.role == "member"
    assert member.status.snapshot.leaf is not None
    assert member.status.snapshot.leaf.hostname == "node-02"
    await wait_until(lambda: ca_tray.line("members") == "Members: 2 active")
    rows = [child.text for child in ca_tray.controller.model.find("members").children]
    assert rows[0].startswith("ca-host (primary) — active") and rows[1].startswith("node-02 —")
    assert ca_tray.controller.model.pending == 0

    window = ca_tray.controller.window
    assert window is not None and window.isVisible()
    window.adjustSize()
    await asyncio.sleep(0.05)
    path = screenshot_path(tmp_path, "status-window.png")
    pixmap = window.grab()
    assert pixmap.save(str(path))
    assert_real_png(path, (pixmap.width(), pixmap.height()))


@pytest.mark.asyncio
async def test_join_denied_in_the_dialog_is_refused(ca_tray: Tray, member: Node) -> None:
    join = begin_join(ca_tray.node, member, [])
    dialog = await wait_until(lambda: ca_tray.board.dialogs() and ca_tray.board.dialogs()[0])

    click(dialog.deny_button)

    with pytest.raises(CertmeshError) as refused:
        await asyncio.wait_for(join, 10)
    assert refused.value.code == "approval_denied"
    assert "node-02" not in [x.hostname for x in ca_tray.node.ca.roster.members]
    assert member.role == "unconfigured"


@pytest.mark.asyncio
async def test_join_not_answered_times_out_and_the_dialog_closes(
    ca_tray: Tray, member: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ca_module, "APPROVAL_TIMEOUT", dt.timedelta(seconds=1))
    monkeypatch.setattr(approval, "EXPIRY_GRACE", 60.0)  # only the core's deadline can end it
    join = begin_join(ca_tray.node, member, [])
    await wait_until(lambda: ca_tray.board.dialogs())

    with pytest.raises(CertmeshError) as refused:
        await asyncio.wait_for(join, 10)

    assert refused.value.code == "approval_timeout"
    await wait_until(lambda: not ca_tray.board.dialogs(), what="the dialog to close")


@pytest.mark.asyncio
async def test_quit_denies_pending_approvals_and_closes_dialogs(
    tmp_path: Path, member: Node
) -> None:
    node, board = await start_ca(tmp_path)
    tray = await attach_tray(node, board, tmp_path)
    join = begin_join(node, member, [])
    dialog = await wait_until(lambda: board.dialogs() and board.dialogs()[0])

    tray.tray.action(m.QUIT).trigger()
    assert await asyncio.wait_for(tray.controller.wait_closed(), 10) == 0

    assert not board.dialogs()
    assert dialog.outcome is not None or not dialog.isVisible()
    with pytest.raises(CertmeshError):
        await asyncio.wait_for(join, 10)
    assert node.describe() == {"servers": [], "tasks": ["approval-pump", "renewal-loop"]}
    tray.controller.request_quit()  # a second quit does nothing
    assert await tray.controller.wait_closed() == 0


@pytest.mark.asyncio
async def test_renewal_lines_follow_success_and_failure(tmp_path: Path, member: Node) -> None:
    ca, _ = await start_ca(tmp_path, "just-me")
    invite = ca.ca.mint_invite("node-02")
    await member.join_mesh(http_url(ca), invite.code, lambda code: None)
    tray = await attach_tray(member, ApprovalBoard(), tmp_path)
    try:
        await member.renew_now(True)
        await wait_until(lambda: "Last renewal check: renewed" in tray.line("renewal_last"))
        assert not any("renew" in title.lower() for title in tray.notice_titles())

        await ca.shutdown()
        await member.renew_now(True)
        await wait_until(lambda: "FAILED" in tray.line("renewal_last"))
        assert tray.controller.model.find("renewal_detail").visible
        assert tray.notice_titles().count("Certificate renewal failed") == 1
        assert tray.controller.model.icon_state.value in ("attention", "offline")

        await member.renew_now(True)
        await wait_until(lambda: "× in a row)" in tray.line("renewal_last"))
        assert tray.notice_titles().count("Certificate renewal failed") == 1
    finally:
        await tray.quit()
        await ca.shutdown()


@pytest.mark.asyncio
async def test_renew_now_in_the_menu_renews(ca_tray: Tray) -> None:
    ca_tray.tray.action(m.RENEW).trigger()

    await wait_until(lambda: "Certificate renewed" in ca_tray.notice_titles(), timeout=10)
    assert ca_tray.tray.action(m.RENEW).isEnabled()
    assert "renewed" in ca_tray.line("renewal_last")


@pytest.mark.asyncio
async def test_unlock_dialog_reports_a_wrong_passphrase_then_unlocks(ca_tray: Tray) -> None:
    ca_tray.node.ca.lock()
    ca_tray.node.status.refresh()
    assert ca_tray.tray.action(m.UNLOCK).isVisible()

    ca_tray.tray.action(m.UNLOCK).trigger()
    dialog = await wait_until(lambda: ca_tray.controller.dialog("unlock"))
    QTest.keyClicks(dialog.passphrase, "not the passphrase")
    click(dialog.unlock_button)
    await wait_until(lambda: dialog.error.isVisible(), timeout=10)
    assert dialog.error.text() == "Wrong passphrase. Try again."
    assert dialog.isVisible() and ca_tray.node.ca.locked

    QTest.keyClicks(dialog.passphrase, PASSPHRASE)
    click(dialog.unlock_button)
    await wait_until(lambda: ca_tray.controller.dialog("unlock") is None, timeout=10)

    assert not ca_tray.node.ca.locked
    assert ca_tray.line("ca_key") == "CA key: unlocked"
    assert not ca_tray.tray.action(m.UNLOCK).isVisible()


@pytest.mark.asyncio
async def test_invite_dialog_shows_a_code_to_copy(ca_tray: Tray) -> None:
    ca_tray.tray.action(m.INVITE).trigger()
    dialog = await wait_until(lambda: ca_tray.controller.dialog("invite"))

    QTest.keyClicks(dialog.hostname, "bad_host!")
    click(dialog.create_button)
    await wait_until(dialog.error.isVisible)

    dialog.hostname.clear()
    QTest.keyClicks(dialog.hostname, "nas")
    click(dialog.create_button)
    await wait_until(dialog.code.isVisible)
    assert INVITE_CODE.match(dialog.code.text())
    click(dialog.copy_button)

    assert QGuiApplication.clipboard().text() == dialog.code.text()
    assert "nas" in dialog.details.text()
    dialog.accept()
    await wait_until(lambda: ca_tray.controller.dialog("invite") is None)


@pytest.mark.asyncio
async def test_copy_and_open_actions(ca_tray: Tray, tmp_path: Path) -> None:
    ca_tray.tray.action(m.COPY_FINGERPRINT).trigger()
    ca_tray.tray.action(m.OPEN_CERTS).trigger()
    ca_tray.tray.action(m.OPEN_LOG).trigger()

    assert QGuiApplication.clipboard().text() == ca_tray.node.ca.ca_fingerprint
    assert ca_tray.opened == [ca_tray.node.data.certs, tmp_path / "koi-tray.log"]


@pytest.mark.asyncio
async def test_start_at_login_toggles_the_autostart_entry(tmp_path: Path) -> None:
    node, board = await start_ca(tmp_path, "just-me")
    home = tmp_path / "home"
    autostart = autostart_for_platform("linux", home=home, env={}, executable=sys.executable)
    tray = await attach_tray(node, board, tmp_path, autostart=autostart)
    entry = home / ".config" / "autostart" / "koi-tray.desktop"
    assert not tray.tray.action(m.AUTOSTART).isChecked()

    tray.tray.action(m.AUTOSTART).trigger()
    await wait_until(lambda: tray.controller.model.find(m.AUTOSTART).checked)
    assert entry.exists() and tray.tray.action(m.AUTOSTART).isChecked()

    tray.tray.action(m.AUTOSTART).trigger()
    await wait_until(lambda: not tray.controller.model.find(m.AUTOSTART).checked)
    assert not entry.exists()
    assert await tray.quit() == 0


@pytest.mark.asyncio
async def test_without_a_tray_the_status_window_carries_lines_and_actions(
    ca_tray: Tray,
) -> None:
    window = ca_tray.controller.window

    assert not ca_tray.controller.tray_shown  # offscreen: no tray host
    assert window is not None and window.isVisible() and window.persistent
    assert window.lines["role"].text() == ca_tray.line("role")
    assert window.lines["enrollment"].text() == "Enrollment: open · approval required"
    assert not window.buttons[m.UNLOCK].isVisible()

    click(window.buttons[m.RENEW])
    await wait_until(lambda: "Certificate renewed" in ca_tray.notice_titles(), timeout=10)
    assert window.notice.isVisible() and "Certificate renewed" in window.notice.text()

    window.close()  # with no tray to come back from, closing only minimises
    assert window.isVisible()


@pytest.mark.asyncio
async def test_left_click_raises_pending_dialogs_first(ca_tray: Tray, member: Node) -> None:
    join = begin_join(ca_tray.node, member, [])
    dialog = await wait_until(lambda: ca_tray.board.dialogs() and ca_tray.board.dialogs()[0])

    ca_tray.controller.window.hide()
    ca_tray.controller.activate()
    assert not ca_tray.controller.window.isVisible()

    click(dialog.deny_button)
    with pytest.raises(CertmeshError):
        await asyncio.wait_for(join, 10)
    ca_tray.controller.activate()
    assert ca_tray.controller.window.isVisible()


@pytest.mark.asyncio
async def test_status_is_refreshed_every_minute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(controller_module, "REFRESH_S", 0.02)
    node, board = await start_ca(tmp_path, "just-me")
    tray = await attach_tray(node, board, tmp_path)
    calls = []
    refresh = node.status.refresh
    monkeypatch.setattr(node.status, "refresh", lambda: calls.append(1) or refresh())

    await wait_until(lambda: len(calls) >= 3)
    assert await tray.quit() == 0


class BrokenTray(QtTray):
    """A tray whose toolkit fails when asked to show the icon."""

    def available(self) -> bool:
        return True

    def show(self) -> None:
        raise OSError("the tray host went away")


@pytest.mark.asyncio
async def test_a_tray_that_fails_to_show_falls_back_to_the_window() -> None:
    controller = TrayController(BrokenTray(), ApprovalBoard())

    controller.show()

    assert not controller.tray_shown
    assert controller.window is not None and controller.window.isVisible()
    assert controller.window.lines["role"].text() == "Starting…"
    controller.close_now()
