"""An X session for the desktop benchmarks: Xvfb on a display it picks, and trayer.

Used as a context manager by `desktop_startup.py`; both processes are stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator

TRAYER = [
    "trayer",
    "--edge",
    "top",
    "--align",
    "right",
    "--widthtype",
    "request",
    "--height",
    "32",
    "--transparent",
    "false",
]


@contextlib.contextmanager
def x_session() -> Iterator[str]:
    """Start Xvfb (`-displayfd`) and trayer; yield the DISPLAY value."""
    for tool in ("Xvfb", "trayer"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt install xvfb trayer")
    read_end, write_end = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    reply = b""
    while not reply.endswith(b"\n"):
        ready, _, _ = select.select([read_end], [], [], 10)
        chunk = os.read(read_end, 16) if ready else b""
        if not chunk:
            break
        reply += chunk
    os.close(read_end)
    display = f":{reply.decode().strip()}"
    trayer = subprocess.Popen(
        TRAYER,
        env={**os.environ, "DISPLAY": display},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_tray(display)
        yield display
    finally:
        for process in (trayer, xvfb):
            process.terminate()
            process.wait(5)


def _wait_for_tray(display: str, timeout: float = 10.0) -> None:
    from Xlib import X
    from Xlib.display import Display

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            connection = Display(display)
            owner = connection.get_selection_owner(connection.intern_atom("_NET_SYSTEM_TRAY_S0"))
            connection.close()
            if owner != X.NONE:
                return
        time.sleep(0.05)
    raise SystemExit("trayer did not take the tray selection within 10 s")
