"""The tray controller on its own: the login entry it writes, repairs at start, how it logs
failures, which notifications snapshot changes raise, and the backend it picks.

Everything is real: a `QtTray` offscreen, XDG entries under a temporary HOME checked by
Debian's `desktop-file-validate`, and status changes delivered by a real `StatusStore`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from desktoptools import NOW, leaf, member_snapshot, wait_until

from koi_tray.autostart import autostart_for_platform, desktop_entry_keys, parse_desktop_exec
from koi_tray.compose.config import NodeConfig, default_data_dir
from koi_tray.compose.status import NodeSnapshot, RenewalView, StatusStore
from koi_tray.desktop import app
from koi_tray.desktop import menu as m
from koi_tray.desktop.approval import ApprovalBoard
from koi_tray.desktop.backend import make_backend
from koi_tray.desktop.controller import TrayController
from koi_tray.desktop.qt_tray import QtTray


@pytest.fixture
def controllers() -> Iterator[list[TrayController]]:
    made: list[TrayController] = []
    yield made
    for controller in made:
        controller.close_now()


def tray_controller(made: list[TrayController], **kw: object) -> TrayController:
    controller = TrayController(QtTray(), ApprovalBoard(), **kw)  # type: ignore[arg-type]
    made.append(controller)
    return controller


def entry_argv(home: Path) -> list[str]:
    text = (home / ".config" / "autostart" / "koi-tray.desktop").read_text()
    return parse_desktop_exec(desktop_entry_keys(text)["Exec"])


# -- start at login -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_login_entry_keeps_the_data_dir_and_the_node_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, controllers: list[TrayController]
) -> None:
    data = tmp_path / "elsewhere"
    monkeypatch.setenv("KOI_TRAY_DATA_DIR", str(data))
    config = NodeConfig(data_dir=default_data_dir(), http_bind="0.0.0.0")  # as the CLI does
    home = tmp_path / "home"
    autostart = autostart_for_platform("linux", home=home, env={}, executable=sys.executable)
    controller = tray_controller(
        controllers,
        autostart=autostart,
        autostart_data_dir=app.autostart_data_dir(config.data_dir),
        autostart_args=app.login_arguments(config, "qt"),
    )
    controller.show()

    controller.handle_action(m.AUTOSTART)
    await wait_until(lambda: controller.model.find(m.AUTOSTART).checked)

    assert entry_argv(home) == [
        sys.executable,
        *("-m", "koi_tray", "--data-dir", str(data)),
        *("tray", "--http-bind", "0.0.0.0"),
    ]
    validate = shutil.which("desktop-file-validate")
    if validate is None:
        pytest.skip("needs desktop-file-validate (apt install desktop-file-utils)")
    entry = home / ".config" / "autostart" / "koi-tray.desktop"
    checked = subprocess.run([validate, str(entry)], capture_output=True, text=True)
    complaints = [line for line in checked.stdout.splitlines() if ": hint: " not in line]
    assert checked.returncode == 0 and not complaints, checked.stdout


def test_login_arguments_carry_only_what_differs_from_the_defaults() -> None:
    plain = NodeConfig(data_dir=Path("/d"))
    custom = NodeConfig(data_dir=Path("/d"), hostname="nas", http_port=6000, mtls_bind="10.0.0.2")

    assert app.login_arguments(plain, "qt") == []
    assert app.login_arguments(plain, "pystray") == ["tray", "--tray", "pystray"]
    assert app.login_arguments(custom, "qt") == [
        *("tray", "--http-port", "6000", "--mtls-bind", "10.0.0.2"),
    ], "the hostname is the data dir's to record, not the login entry's"


def test_only_the_platform_default_data_dir_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOI_TRAY_DATA_DIR", str(tmp_path / "env-dir"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))

    assert app.autostart_data_dir(tmp_path / "env-dir") == tmp_path / "env-dir"
    assert app.autostart_data_dir(tmp_path / "share" / "koi-tray") is None


@pytest.mark.asyncio
async def test_an_entry_for_a_moved_interpreter_is_repaired_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, controllers: list[TrayController]
) -> None:
    home = tmp_path / "home"
    moved = str(tmp_path / "old-venv" / "bin" / "python")  # the venv that was moved away
    autostart_for_platform("linux", home=home, env={}, executable=moved).enable()
    autostart = autostart_for_platform("linux", home=home, env={}, executable=sys.executable)
    assert autostart.status().moved
    controller = tray_controller(controllers, autostart=autostart)

    with caplog.at_level(logging.INFO, logger="koi_tray.desktop.controller"):
        controller.show()
        await wait_until(lambda: entry_argv(home)[0] == sys.executable, what="the repair")
        await wait_until(lambda: "repaired start-at-login entry" in caplog.text)

    assert entry_argv(home) == [sys.executable, "-m", "koi_tray"]
    assert controller.model.find(m.AUTOSTART).checked
    assert not autostart.status().stale


@pytest.mark.asyncio
async def test_an_entry_with_other_options_is_left_as_the_person_made_it(
    tmp_path: Path, controllers: list[TrayController]
) -> None:
    home = tmp_path / "home"
    autostart = autostart_for_platform("linux", home=home, env={}, executable=sys.executable)
    autostart.enable(tmp_path / "other-data")
    controller = tray_controller(controllers, autostart=autostart)

    controller.show()
    await asyncio.sleep(0.2)

    assert "--data-dir" in entry_argv(home)
    assert controller.model.find(m.AUTOSTART).checked


# -- failures are one ERROR line ----------------------------------------------------------


def test_a_failing_action_logs_one_error_line_and_the_traceback_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, controllers: list[TrayController]
) -> None:
    def broken_opener(path: Path) -> None:
        raise OSError(f"no viewer for {path.name}")

    controller = tray_controller(
        controllers, log_path=tmp_path / "koi-tray.log", opener=broken_opener
    )

    with caplog.at_level(logging.DEBUG, logger="koi_tray.desktop.controller"):
        controller.handle_action(m.OPEN_LOG)

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "menu action open_log failed: OSError('no viewer for koi-tray.log')"
    ]
    assert errors[0].exc_info is None
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)


# -- notifications from snapshot changes ----------------------------------------------------


def follow(controller: TrayController, snapshots: list[NodeSnapshot]) -> None:
    """Deliver `snapshots` to the controller in order, through a real StatusStore."""
    queue = iter(snapshots)
    store = StatusStore(lambda: next(queue))
    store.subscribe(controller._on_status)
    for _ in snapshots:
        store.refresh()


def test_revocation_is_notified_once(controllers: list[TrayController]) -> None:
    controller = tray_controller(controllers)
    controller.show()
    later = NOW + dt.timedelta(minutes=5)

    follow(
        controller,
        [
            member_snapshot(),
            member_snapshot(revoked=True),
            dataclasses.replace(member_snapshot(revoked=True), taken_at=later),
            dataclasses.replace(member_snapshot(revoked=True, failures=1), taken_at=later),
        ],
    )

    revoked = [n for n in controller.notices if n.title == "This node was revoked"]
    assert len(revoked) == 1 and revoked[0].urgent
    assert controller.model.find("leaf").text == "Certificate: REVOKED by the CA"


def test_a_routine_renewal_raises_no_notification(controllers: list[TrayController]) -> None:
    controller = tray_controller(controllers)
    controller.show()
    hour = dt.timedelta(hours=1)
    before = member_snapshot(days=31)
    fell_due = dataclasses.replace(
        before,
        taken_at=NOW + dt.timedelta(days=1),
        leaf=leaf("node-02", 30, NOW + dt.timedelta(days=1)),
    )
    renewed_at = fell_due.taken_at + hour
    renewed = dataclasses.replace(
        fell_due,
        taken_at=renewed_at,
        leaf=leaf("node-02", 90, renewed_at),
        renewal=RenewalView(
            last_check_at=renewed_at,
            last_outcome="renewed",
            last_renewed_at=renewed_at,
            next_check_at=renewed_at + hour,
        ),
    )

    follow(controller, [before, fell_due, renewed])

    assert [(n.title, n.body) for n in controller.notices] == []
    assert "renewed" in controller.model.find("renewal_last").text


# -- choosing a backend --------------------------------------------------------------------


def test_pystray_is_refused_on_macos_and_qt_used_instead(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.WARNING, logger="koi_tray.desktop.backend"):
            backend = make_backend("pystray", loop, platform="darwin")
    finally:
        loop.close()

    assert backend.name == "qt"
    assert "--tray pystray is not supported on macOS" in caplog.text
