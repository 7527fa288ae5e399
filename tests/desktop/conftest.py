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

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"
os.environ.setdefault("PYSTRAY_BACKEND", "dummy")

import PySide6.QtWidgets  # noqa: E402  (after the platform is chosen, before qasync)
import pytest  # noqa: E402
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
