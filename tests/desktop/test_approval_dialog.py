"""The approval dialog and its decider, on the qasync loop with real widgets (offscreen)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from desktoptools import (
    assert_real_png,
    http_url,
    make_request,
    screenshot_path,
    start_node,
    wait_until,
)
from PySide6.QtCore import Qt
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication, QWidget

from koi_tray.certmesh.approval import ApprovalRequest, Approved, Decision, Denied
from koi_tray.compose.deciders import deny_and_log_decider
from koi_tray.desktop import approval
from koi_tray.desktop.approval import ApprovalBoard, ApprovalDialog, dialog_decider


async def open_one(
    board: ApprovalBoard, request: ApprovalRequest | None = None, **kw: Any
) -> tuple[asyncio.Future[Decision], ApprovalDialog]:
    """Start the decider on one request; return (task, dialog) once the dialog is up."""
    request = request or make_request(**kw)
    task = asyncio.ensure_future(dialog_decider(board)(request))
    dialog = await wait_until(lambda: board.get(request.request_id), what="the dialog")
    await wait_until(dialog.isVisible, what="the dialog to show")
    return task, dialog


def click(widget: QWidget) -> None:
    QTest.mouseClick(widget, Qt.MouseButton.LeftButton)


@pytest.mark.asyncio
async def test_typing_a_name_and_clicking_approve_approves() -> None:
    board = ApprovalBoard()
    task, dialog = await open_one(board)

    QTest.keyClicks(dialog.operator, "Alice")
    click(dialog.approve_button)

    assert await asyncio.wait_for(task, 2) == Approved("Alice")
    assert not board.dialogs()


@pytest.mark.asyncio
async def test_approve_needs_a_name() -> None:
    board = ApprovalBoard()
    task, dialog = await open_one(board)

    assert not dialog.approve_button.isEnabled()
    click(dialog.approve_button)
    await asyncio.sleep(0.05)
    assert not task.done()

    QTest.keyClicks(dialog.operator, "  ")
    assert not dialog.approve_button.isEnabled()
    QTest.keyClicks(dialog.operator, "Bob")
    assert dialog.approve_button.isEnabled()
    dialog.operator.clear()
    assert not dialog.approve_button.isEnabled()
    click(dialog.deny_button)
    await task


@pytest.mark.asyncio
async def test_deny_button_denies() -> None:
    task, dialog = await open_one(ApprovalBoard())

    QTest.keyClicks(dialog.operator, "Alice")
    click(dialog.deny_button)

    assert await asyncio.wait_for(task, 2) == Denied("denied by the operator")


@pytest.mark.asyncio
async def test_deny_is_the_default_button_and_focus_is_not_taken() -> None:
    task, dialog = await open_one(ApprovalBoard())

    assert dialog.deny_button.isDefault()
    assert not dialog.approve_button.isDefault() and not dialog.approve_button.autoDefault()
    assert dialog.testAttribute(Qt.WidgetAttribute.WA_ShowWithoutActivating)
    assert dialog.windowTitle() == "koi-tray — approve join?"
    assert dialog.code.text() == "947 171"
    assert dialog.code.font().pointSize() >= 24

    QTest.keyClicks(dialog.operator, "Alice")
    QTest.keyClick(dialog.operator, Qt.Key.Key_Return)

    assert await asyncio.wait_for(task, 2) == Denied("denied by the operator")


@pytest.mark.asyncio
async def test_escape_denies() -> None:
    task, dialog = await open_one(ApprovalBoard())

    QTest.keyClick(dialog, Qt.Key.Key_Escape)

    decision = await asyncio.wait_for(task, 2)
    assert isinstance(decision, Denied) and "closed without approving" in decision.reason


@pytest.mark.asyncio
async def test_closing_the_window_denies() -> None:
    task, dialog = await open_one(ApprovalBoard())

    dialog.close()

    assert isinstance(await asyncio.wait_for(task, 2), Denied)


@pytest.mark.asyncio
async def test_the_dialog_times_out_by_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(approval, "EXPIRY_GRACE", 0.1)
    task, dialog = await open_one(ApprovalBoard(), seconds=0.4)
    QTest.keyClicks(dialog.operator, "Alice")

    decision = await asyncio.wait_for(task, 3)

    assert decision == Denied("no decision before the deadline")


@pytest.mark.asyncio
async def test_countdown_ticks_and_approve_stops_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(approval, "EXPIRY_GRACE", 5.0)
    task, dialog = await open_one(ApprovalBoard(), seconds=1.2)
    QTest.keyClicks(dialog.operator, "Alice")
    assert dialog.countdown.text() == "0:02"
    assert dialog.approve_button.isEnabled()

    await wait_until(lambda: "too late" in dialog.countdown.text(), timeout=3)

    assert not dialog.approve_button.isEnabled()
    task.cancel()


@pytest.mark.asyncio
async def test_cancelling_the_decider_closes_the_dialog() -> None:
    board = ApprovalBoard()
    task, dialog = await open_one(board)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await wait_until(lambda: not board.dialogs(), what="the board to forget the dialog")
    await asyncio.sleep(0)
    assert not QApplication.topLevelWidgets() or not any(
        isinstance(w, ApprovalDialog) and w.isVisible() for w in QApplication.topLevelWidgets()
    )


@pytest.mark.asyncio
async def test_two_requests_get_two_reachable_dialogs() -> None:
    board = ApprovalBoard()
    first_task, first = await open_one(board, make_request("node-07"))
    second_task, second = await open_one(board, make_request("nas"))

    assert board.dialogs() == [first, second]
    assert first.isVisible() and second.isVisible()
    assert board.raise_dialog(first.request.request_id)
    assert board.raise_all() == 2

    QTest.keyClicks(second.operator, "Alice")
    click(second.approve_button)
    assert await second_task == Approved("Alice")
    assert first.isVisible()
    click(first.deny_button)
    assert isinstance(await first_task, Denied)


@pytest.mark.asyncio
async def test_operator_name_is_remembered_for_the_next_dialog() -> None:
    board = ApprovalBoard()
    task, dialog = await open_one(board)
    QTest.keyClicks(dialog.operator, "Alice")
    click(dialog.approve_button)
    await task

    task, dialog = await open_one(board)

    assert dialog.operator.text() == "Alice"
    assert dialog.approve_button.isEnabled()
    click(dialog.deny_button)
    await task


@pytest.mark.asyncio
async def test_quit_closes_every_dialog_as_denied() -> None:
    board = ApprovalBoard()
    tasks = [(await open_one(board))[0] for _ in range(2)]

    board.close_all()

    for task in tasks:
        assert await asyncio.wait_for(task, 2) == Denied("koi-tray is quitting")


@pytest.mark.asyncio
async def test_http_is_served_while_a_dialog_is_open(tmp_path: Path) -> None:
    node = await start_node(tmp_path, "ca-host", deny_and_log_decider())
    board = ApprovalBoard()
    try:
        task, dialog = await open_one(board)
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(f"{http_url(node)}/v1/certmesh/status") as response:
                    assert response.status == 200
                    assert (await response.json())["ca_initialized"] is False
        assert dialog.isVisible() and not task.done()
        click(dialog.deny_button)
        await task
    finally:
        await node.shutdown()


@pytest.mark.asyncio
async def test_save_screenshot_of_the_dialog(tmp_path: Path) -> None:
    board = ApprovalBoard()
    board.operator_name = "Alice"
    task, dialog = await open_one(board, make_request("nas", seconds=272))
    dialog.adjustSize()
    await asyncio.sleep(0.05)

    path = screenshot_path(tmp_path, "approval-dialog.png")
    pixmap = dialog.grab()
    assert pixmap.save(str(path))
    assert_real_png(path, (pixmap.width(), pixmap.height()))
    assert pixmap.width() >= dialog.minimumWidth()
    click(dialog.deny_button)
    await task
