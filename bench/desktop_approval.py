"""Join arrival → approval dialog on screen, through the real tray decider.

A CA node that needs approval runs on the qasync loop with `dialog_decider`; `--joins`
joins arrive over HTTP on loopback one after another (each with its own invite and key).
For each, the time from the join reaching the CA's `Node.join` to its dialog being shown
is recorded, then the dialog is denied. Prints p50/p99/max. Qt runs offscreen unless
`--xcb` is given, which starts Xvfb + trayer and shows real windows.

Run: `.venv/bin/python bench/desktop_approval.py [--joins 200] [--xcb]`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


async def run(joins: int) -> list[float]:
    from koi_tray.api.client import parse_endpoint, prepare_join, send_join
    from koi_tray.certmesh import keystore
    from koi_tray.certmesh.errors import ApprovalDenied
    from koi_tray.compose.config import NodeConfig
    from koi_tray.compose.node import Node
    from koi_tray.desktop.approval import ApprovalBoard, dialog_decider

    board = ApprovalBoard()
    arrived: dict[str, float] = {}
    shown: dict[str, float] = {}

    def opened(request_id: str) -> None:
        dialog = board.get(request_id)
        if dialog is not None and dialog.isVisible():
            shown[dialog.request.hostname] = time.perf_counter()
            dialog.deny()

    board.opened.connect(opened)
    with tempfile.TemporaryDirectory() as tmp:
        config = NodeConfig(
            data_dir=Path(tmp) / "ca",
            hostname="ca-host",
            http_port=0,
            mtls_port=0,
            mtls_bind="127.0.0.1",
        )
        node = Node(config, dialog_decider(board), kdf=keystore.FAST_TEST_KDF)
        await node.start()
        await node.create_ca("correct horse battery", "team", "bench")
        real_join = node.join

        async def timed_join(join: Any) -> Any:
            arrived[join.hostname] = time.perf_counter()
            return await real_join(join)

        node.join = timed_join
        endpoint = parse_endpoint(f"http://127.0.0.1:{node.address('http')[1]}")
        try:
            for index in range(joins):
                hostname = f"host-{index:04d}"
                invite = node.ca.mint_invite(hostname)
                plan = await prepare_join(endpoint, invite.code, hostname)
                with contextlib.suppress(ApprovalDenied):
                    await send_join(plan)
        finally:
            await node.shutdown()
    return [shown[h] - arrived[h] for h in arrived if h in shown]


def main(joins: int, xcb: bool) -> None:
    logging.basicConfig(level=logging.ERROR)
    with contextlib.ExitStack() as stack:
        if xcb:
            from desktop_xsession import x_session

            os.environ["DISPLAY"] = stack.enter_context(x_session())
            os.environ["QT_QPA_PLATFORM"] = "xcb"
        else:
            os.environ["QT_QPA_PLATFORM"] = "offscreen"
        import PySide6.QtWidgets
        import qasync
        from PySide6.QtCore import qInstallMessageHandler

        qInstallMessageHandler(lambda kind, context, text: None)  # offscreen's "not supported"
        app = PySide6.QtWidgets.QApplication(sys.argv[:1])
        app.setQuitOnLastWindowClosed(False)
        loop = qasync.QEventLoop(app)
        with loop:
            times = loop.run_until_complete(run(joins))

    ms = sorted(t * 1000 for t in times)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    platform = "xcb (Xvfb + trayer)" if xcb else "offscreen"
    print(
        f"{len(ms)} joins, Qt {platform}: join arrival → dialog shown "
        f"p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--joins", type=int, default=200)
    parser.add_argument("--xcb", action="store_true")
    args = parser.parse_args()
    main(args.joins, args.xcb)
