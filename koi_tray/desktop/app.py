"""The tray host's entry point: `run_tray(config, backend)`.

The order matters and is the point of this module:

1. Set up the log, and refuse at once (exit 1, one line, no traceback) when another
   node holds the data dir, or when there is no desktop session to show a window in (on
   Linux and the BSDs Qt would otherwise abort the process with a misleading message
   about missing xcb libraries).
2. Create the one QApplication (PySide6 imported before qasync), the qasync loop, the
   backend and the controller, and show the icon in its "starting" state. Nothing slow
   has been imported yet: not aiohttp, not the node.
3. On the loop: import the node module on an executor thread (the icon stays responsive),
   start the node with the dialog decider, and hand it to the controller.
4. SIGINT, SIGTERM and the Quit item run the controller's quit sequence (the node's
   staged shutdown, then dialogs, icon and window); the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from koi_tray.certmesh.errors import CertmeshError
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.member import DEFAULT_HTTP_PORT, DEFAULT_MTLS_PORT
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.lock import NodeAlreadyRunning, is_locked
from koi_tray.desktop import logs

if TYPE_CHECKING:
    from PySide6.QtWidgets import QApplication

    from koi_tray.autostart import Autostart
    from koi_tray.compose.node import Node
    from koi_tray.desktop.approval import ApprovalBoard
    from koi_tray.desktop.controller import TrayController

log = logging.getLogger(__name__)

APP_ID = "koi-tray"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CRASHED = 2
NODE_MODULE = "koi_tray.compose.node"
NO_DESKTOP = (
    "no desktop session here (no DISPLAY or WAYLAND_DISPLAY); "
    "run `koi-tray serve` for a headless node"
)
_X11_PLATFORMS = ("linux", "freebsd", "openbsd", "netbsd", "dragonfly")


def run_tray(config: NodeConfig, backend: str = "qt", level: int = logging.INFO) -> int:
    """Run koi-tray in the system tray until Quit or a signal; return the exit code.

    Args:
        config: The node's configuration (its `host_kind` becomes "tray").
        backend: "qt" (QSystemTrayIcon) or "pystray".
        level: The log level, for the log file and the terminal.

    Returns:
        0 after a normal quit, 1 when the node could not start (another koi-tray runs
        for the same data dir, a port is taken, a state file is damaged), 2 after an
        unexpected error (its traceback is in the log file).
    """
    started = time.monotonic()
    log_path = logs.setup_logging(level=level)
    try:
        return _run(dataclasses.replace(config, host_kind="tray"), backend, log_path, started)
    except Exception as exc:
        log.critical("koi-tray stopped on an unexpected error: %r", exc, exc_info=True)
        if not logs.logs_to_console():
            print(
                f"koi-tray stopped on an unexpected error: {exc!r} (see {log_path})",
                file=sys.stderr,
            )
        return EXIT_CRASHED


def _run(config: NodeConfig, backend: str, log_path: Path, started: float) -> int:
    if is_locked(DataDir(config.data_dir).lock_file):
        return _refuse(f"koi-tray is already running for {config.data_dir}")
    if missing_desktop_session(os.environ, sys.platform):
        return _refuse(NO_DESKTOP)

    import PySide6.QtWidgets  # before qasync, so qasync picks PySide6

    skip_pyside_source_cache()
    import qasync

    from koi_tray.desktop.approval import ApprovalBoard
    from koi_tray.desktop.backend import make_backend
    from koi_tray.desktop.controller import TrayController

    qt = PySide6.QtWidgets
    app = qt.QApplication.instance() or qt.QApplication(sys.argv[:1])
    app.setQuitOnLastWindowClosed(False)
    app.setApplicationName(APP_ID)
    app.setDesktopFileName(APP_ID)
    _set_app_icon(app)

    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    board = ApprovalBoard()
    controller = TrayController(
        make_backend(backend, loop),
        board,
        certs_dir=DataDir(config.data_dir).certs,
        log_path=log_path,
        autostart=_autostart(),
        autostart_data_dir=autostart_data_dir(config.data_dir),
        autostart_args=login_arguments(config, backend),
    )
    controller.show()
    log.info("koi-tray (%s) shown %.2f s after start", backend, time.monotonic() - started)
    try:
        with loop:
            return loop.run_until_complete(_main(controller, config, board))
    finally:
        asyncio.set_event_loop(None)


async def _main(controller: TrayController, config: NodeConfig, board: ApprovalBoard) -> int:
    loop = asyncio.get_running_loop()
    remove_handlers = _install_signal_handlers(loop, controller.request_quit)
    try:
        controller.starting = asyncio.create_task(start_node(config, board), name="node-start")
        try:
            node = await controller.starting
        except asyncio.CancelledError:
            if not controller.quitting:
                raise
            return await controller.wait_closed()
        except NodeAlreadyRunning:
            controller.close_now()
            return _refuse(f"koi-tray is already running for {config.data_dir}")
        except CertmeshError as exc:
            controller.close_now()
            return _refuse(f"koi-tray cannot start: {exc}")
        controller.attach(node)
        from koi_tray.compose.hosts import freeze_startup_objects  # imported with the node

        freeze_startup_objects()
        return await controller.wait_closed()
    finally:
        remove_handlers()


async def start_node(config: NodeConfig, board: ApprovalBoard) -> Node:
    """Build and start the tray's node: the composition's `Node` with the dialog decider.

    The node module (and aiohttp with it) is imported on an executor thread, so the icon
    already on screen stays responsive meanwhile.
    """
    from koi_tray.desktop.approval import dialog_decider

    loop = asyncio.get_running_loop()
    node_module = await loop.run_in_executor(None, importlib.import_module, NODE_MODULE)
    node = node_module.Node(config, dialog_decider(board))
    await node.start()
    return node


def _install_signal_handlers(
    loop: asyncio.AbstractEventLoop, quit_: Callable[[], None]
) -> Callable[[], None]:
    signals = [signal.SIGINT, signal.SIGTERM]
    try:
        for number in signals:
            loop.add_signal_handler(number, quit_)
    except (NotImplementedError, RuntimeError):
        # Windows: no loop signal handlers; Python runs these between Qt events.
        previous = {
            n: signal.signal(n, lambda *_: loop.call_soon_threadsafe(quit_)) for n in signals
        }

        def restore() -> None:
            for number, handler in previous.items():
                signal.signal(number, handler)

        return restore

    def remove() -> None:
        for number in signals:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(number)

    return remove


def skip_pyside_source_cache() -> None:
    """Keep PySide6 from caching the source of every module imported after it.

    WORKAROUND for PySide6's feature hook (`shibokensupport.feature._mod_uses_pyside`):
    it runs `inspect.getsource` on each module imported after PySide6 to look for the word
    "PySide6", which leaves that module's source in `linecache` for good. For the node's
    imports that was about 14 MB of resident memory and 0.15 s of start-up. The
    replacement makes the same search in the file's bytes and keeps nothing.
    """
    feature = sys.modules.get("shibokensupport.feature")
    if feature is not None and callable(getattr(feature, "_mod_uses_pyside", None)):
        feature._mod_uses_pyside = module_mentions_pyside


def module_mentions_pyside(module: object) -> bool:
    """Tell whether a module's source file mentions PySide6, without caching the source."""
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return False
    try:
        return b"PySide6" in Path(path).read_bytes()
    except OSError:
        return False


def missing_desktop_session(env: Mapping[str, str], platform: str) -> bool:
    """Tell whether Qt would find no display to open on this Linux or BSD machine.

    An explicit `QT_QPA_PLATFORM` (offscreen, vnc, eglfs, ...) is the person's choice and
    is left to Qt. macOS and Windows always have a window server for a logged-in user.
    """
    if not platform.startswith(_X11_PLATFORMS) or env.get("QT_QPA_PLATFORM"):
        return False
    return not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


def _refuse(message: str) -> int:
    """Say why koi-tray stops, once: in the log, and on stderr if the log does not go there."""
    log.error("%s", message)
    if not logs.logs_to_console():
        print(message, file=sys.stderr)
    return EXIT_FAILED


def _set_app_icon(app: QApplication) -> None:
    from PySide6.QtGui import QIcon

    from koi_tray.desktop.icons import render_app_icon
    from koi_tray.desktop.qt_tray import pixmap_from_image

    icon = QIcon()
    for size in (16, 32, 64, 128):
        icon.addPixmap(pixmap_from_image(render_app_icon(size)))
    app.setWindowIcon(icon)


def _autostart() -> Autostart | None:
    from koi_tray.autostart import AutostartError, autostart_for_platform

    try:
        return autostart_for_platform()
    except AutostartError as exc:
        log.info("start at login is not available: %s", exc)
        return None


def autostart_data_dir(data_dir: Path) -> Path | None:
    """Name the data dir in the login entry unless it is the platform's default one.

    The comparison is with the platform's user data dir, not with `$KOI_TRAY_DATA_DIR`:
    the login session may not set that variable, so a data dir chosen through it must be
    written into the entry.
    """
    import platformdirs

    platform_default = Path(platformdirs.user_data_dir(APP_ID, appauthor=False))
    return None if Path(data_dir).absolute() == platform_default.absolute() else Path(data_dir)


def login_arguments(config: NodeConfig, backend: str) -> list[str]:
    """The options after `--data-dir` that make the login session start this same node.

    Only options that differ from the CLI's defaults are carried, so an entry for a
    plain `koi-tray` stays plain: `tray` with `--tray`, the binds and the ports. A CA
    started with `--http-bind 0.0.0.0` to take joins from the LAN comes back bound the
    same way after a reboot. The hostname is left out: the data dir records it at create
    or join, and a stale `--hostname` in the entry would make the login start refuse.
    """
    tray: list[str] = [] if backend == "qt" else ["--tray", backend]
    for option, value, default in (
        ("--http-bind", config.http_bind, "127.0.0.1"),
        ("--http-port", config.http_port, DEFAULT_HTTP_PORT),
        ("--mtls-bind", config.mtls_bind, "0.0.0.0"),
        ("--mtls-port", config.mtls_port, DEFAULT_MTLS_PORT),
    ):
        if value != default:
            tray += [option, str(value)]
    return ["tray", *tray] if tray else []
