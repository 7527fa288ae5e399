"""Tray start-up and idle cost: start → icon docked, memory, CPU and wake-ups when idle.

Starts koi-tray (`run_tray`, Qt backend unless `--tray pystray`) as a process on a fresh
Xvfb + trayer session, for a CA data dir whose key stays locked (no keyring), as after a
login. Prints figures, not pass/fail:

- start → icon shown and start → icon docked (Qt reports the docked geometry; the log
  is polled every 10 ms, the dock watch every 100 ms), median of `--runs` starts;
- RSS after 10 s idle;
- CPU time (utime + stime from /proc/<pid>/stat) and voluntary context switches (all
  threads, /proc/<pid>/task/*/status) over `--idle` seconds (default 60).

Run: `.venv/bin/python bench/desktop_startup.py [--runs 5] [--idle 60] [--tray qt]`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from desktop_xsession import x_session  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
RUN_TRAY = """
import sys
from pathlib import Path
from koi_tray.compose.config import NodeConfig
from koi_tray.desktop.app import run_tray
config = NodeConfig(data_dir=Path(sys.argv[1]), hostname="ca-host", http_port=0,
                    mtls_port=0, mtls_bind="127.0.0.1")
sys.exit(run_tray(config, sys.argv[2]))
"""


def make_ca(data_dir: Path) -> None:
    from koi_tray.certmesh import keystore
    from koi_tray.compose.config import NodeConfig
    from koi_tray.compose.deciders import deny_and_log_decider
    from koi_tray.compose.node import Node

    async def create() -> None:
        config = NodeConfig(
            data_dir=data_dir, hostname="ca-host", http_port=0, mtls_port=0, mtls_bind="127.0.0.1"
        )
        node = Node(config, deny_and_log_decider(), kdf=keystore.FAST_TEST_KDF)
        await node.start()
        await node.create_ca("correct horse battery", "team", "bench")
        await node.shutdown()

    asyncio.run(create())


def start(display: str, data_dir: Path, state: Path, backend: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DISPLAY": display,
        "QT_QPA_PLATFORM": "xcb",
        "XDG_STATE_HOME": str(state),
        "PYSTRAY_BACKEND": "xorg",
    }
    return subprocess.Popen(
        [sys.executable, "-c", RUN_TRAY, str(data_dir), backend],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for_line(log: Path, pattern: str, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and re.search(pattern, log.read_text()):
            return time.monotonic()
        time.sleep(0.01)
    raise SystemExit(f"no {pattern!r} in {log} within {timeout} s")


def stop(process: subprocess.Popen[bytes]) -> float:
    began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(30)
    return time.monotonic() - began


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def switches(pid: int) -> tuple[int, int]:
    """Voluntary context switches of the main thread and of all threads."""
    total = main = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "status").read_text()
        count = int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", text).group(1))
        total += count
        if task.name == str(pid):
            main = count
    return main, total


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024


def main(runs: int, idle: float, backend: str) -> None:
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp, x_session() as display:
        root = Path(tmp)
        make_ca(root / "ca")
        shown, docked, stops = [], [], []
        ready = "tray icon docked" if backend == "qt" else "pystray icon started"
        for run in range(runs):
            state = root / f"state-{run}"
            log = state / "koi-tray" / "log" / "koi-tray.log"
            began = time.monotonic()
            process = start(display, root / "ca", state, backend)
            shown.append(wait_for_line(log, r"tray icon shown") - began)
            docked.append(wait_for_line(log, ready) - began)
            wait_for_line(log, r"started \(tray\)")
            if run < runs - 1:
                stops.append(stop(process))

        pid = process.pid
        time.sleep(10)
        rss = rss_mb(pid)
        cpu0, (main0, all0) = cpu_seconds(pid), switches(pid)
        time.sleep(idle)
        cpu1, (main1, all1) = cpu_seconds(pid), switches(pid)
        stops.append(stop(process))

    print(f"backend {backend}, {runs} starts, CA data dir (key locked), Xvfb + trayer")
    print(
        f"start → icon shown      median {statistics.median(shown):.2f} s "
        f"(min {min(shown):.2f}, max {max(shown):.2f})"
    )
    print(
        f"start → {ready:<16} median {statistics.median(docked):.2f} s "
        f"(min {min(docked):.2f}, max {max(docked):.2f})"
    )
    print(f"SIGTERM → exit          median {statistics.median(stops):.2f} s")
    print(f"RSS after 10 s idle     {rss:.0f} MB")
    print(
        f"idle {idle:.0f} s: CPU {cpu1 - cpu0:.2f} s, voluntary switches "
        f"{all1 - all0} all threads ({(all1 - all0) / idle:.1f}/s), "
        f"{main1 - main0} main thread ({(main1 - main0) / idle:.1f}/s)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--tray", choices=("qt", "pystray"), default="qt")
    args = parser.parse_args()
    main(args.runs, args.idle, args.tray)
