"""Headless hosting: `koi-tray serve` runs the node on a plain asyncio loop until a signal.

The tray host (koi_tray.desktop) builds the very same `Node`; only the decider and the
loop differ. Alerts that the tray would show as notifications are logged here instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable

from koi_tray.certmesh.approval import Decider
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.node import Node
from koi_tray.compose.status import NodeSnapshot, alerts_between

log = logging.getLogger(__name__)


def log_alerts(new: NodeSnapshot, old: NodeSnapshot | None) -> None:
    """Log, once each, what the tray would announce as a notification."""
    for alert in alerts_between(old, new):
        level = logging.INFO if alert.kind == "approval_requested" else logging.WARNING
        log.log(level, "%s: %s", alert.title, alert.body)


def freeze_startup_objects() -> None:
    """Take everything alive once the node runs out of the garbage collector's sight.

    Modules, classes, the CA and its certificates live as long as the process. Left in
    the collector's oldest generation, each full collection walks them all: during a
    burst of 100 renewals one such pass stopped the loop for about 120 ms
    (bench/renewal_stall.py). Frozen, they are never walked again. Only hosts that own
    the process call this (`serve` and the tray); an embedding program decides for itself.
    """
    began = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug(
        "froze %d start-up objects in %.0f ms",
        gc.get_freeze_count(),
        (time.perf_counter() - began) * 1000,
    )


def install_stop_signals(node: Node) -> list[asyncio.Task[None]]:
    """Make SIGINT and SIGTERM start the node's ordered shutdown (POSIX loops only)."""
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stopping.append(loop.create_task(node.shutdown(), name="shutdown"))

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, on_signal, signum)
    return stopping


async def serve(
    config: NodeConfig,
    decider: Decider,
    passphrase: str | None = None,
    on_started: Callable[[Node], None] | None = None,
) -> int:
    """Run a headless node until SIGINT or SIGTERM; return the exit status.

    `on_started` receives the running node (embedders and tests use it to stop it).
    Whatever ends the run, a failed unlock included, the node's ordered shutdown runs
    (it removes the breadcrumb and token and releases the lock) before this returns.

    Raises:
        NodeAlreadyRunning: Another process holds this data dir.
        CertmeshError: The node could not start, or `passphrase` did not unlock the CA.
    """
    node = Node(config, decider)
    node.status.subscribe(log_alerts)
    await node.start()
    stopping = install_stop_signals(node)
    try:
        if node.ca is not None and node.ca.locked:
            if passphrase is not None:
                await node.unlock(passphrase)
            else:
                log.warning(
                    "the CA is locked (%s); run 'koi-tray certmesh unlock'",
                    node.ca.locked_reason,
                )
        freeze_startup_objects()
        if on_started is not None:
            on_started(node)
        await node.wait_stopped()
    finally:
        await node.shutdown()
        for task in stopping:
            await task
    return 0
