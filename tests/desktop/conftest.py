"""Fixtures for the desktop tests: Qt offscreen, the qasync loop, real nodes on loopback.

Qt chooses its platform plugin once per process, so every test in this process runs on
`offscreen` (set here, before anything imports Qt): widgets, menus and dialogs work and
can be clicked with QTest, but there is no tray to dock into. The tests that need a real
X server and tray host (`test_xvfb.py`) run their Qt side in a subprocess with
`QT_QPA_PLATFORM=xcb`; see that module's docstring.

Async tests (`@pytest.mark.asyncio`) run on a `qasync.QEventLoop` over the one
QApplication, provided to pytest-asyncio through `pytest_asyncio_loop_factories`.
"""

from __future__ import annotations

import asyncio
import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"
os.environ.setdefault("PYSTRAY_BACKEND", "dummy")

import PySide6.QtWidgets  # noqa: E402  (after the platform is chosen, before qasync)
import pytest  # noqa: E402
import pytestqt.plugin  # noqa: E402
import qasync  # noqa: E402

_LOOPS: list[qasync.QEventLoop] = []
"""Every loop made here, kept until the session ends.

A closed qasync loop still owns Qt timers (closing only marks its timer object stopped),
and one of them may fire during a later test. If Python's garbage collector frees the
loop and its timer object while Qt is delivering that timer event, the process crashes;
keeping the loops referenced rules that out.
"""


def _qasync_loop() -> qasync.QEventLoop:
    qt = PySide6.QtWidgets
    app = qt.QApplication.instance() or qt.QApplication(["koi-tray-tests"])
    app.setQuitOnLastWindowClosed(False)
    loop = qasync.QEventLoop(app)
    _LOOPS.append(loop)
    return loop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict:
    """Run this folder's async tests and fixtures on a qasync loop."""
    return {"qasync": _qasync_loop}


_process_qt_events = pytestqt.plugin._process_events


def _process_events_as_the_loop() -> None:
    """pytest-qt's event pass between test phases, run the way the tray runs Qt events.

    pytest-qt calls `QApplication.processEvents()` after each setup, call and teardown,
    when no asyncio loop is running. qasync delivers its callbacks through Qt timers, so
    a task woken then (a renewal pass after `create_ca`, say) would step with no running
    loop and fail in `asyncio.get_running_loop()`. In koi-tray every Qt event is handled
    inside the qasync loop's `run_forever`, so the pass is made to look the same.
    """
    loop = next((loop for loop in reversed(_LOOPS) if not loop.is_closed()), None)
    if loop is None or asyncio._get_running_loop() is not None:
        _process_qt_events()
        return
    asyncio._set_running_loop(loop)
    try:
        _process_qt_events()
    finally:
        asyncio._set_running_loop(None)


pytestqt.plugin._process_events = _process_events_as_the_loop
