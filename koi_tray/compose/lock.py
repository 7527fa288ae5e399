"""One node per data dir: an exclusive, non-blocking lock on `<data dir>/node.lock`.

The lock is an OS file lock (`fcntl.flock` on POSIX, `msvcrt.locking` on Windows), so it
is released by the kernel when the process dies, however it dies.
"""

from __future__ import annotations

import os
from pathlib import Path

from koi_tray.certmesh.errors import Conflict
from koi_tray.certmesh.files import PRIVATE_FILE, ensure_private_dir


class NodeAlreadyRunning(Conflict):
    """Another process holds this data dir."""


class DataDirLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise at once.

        Raises:
            NodeAlreadyRunning: Another koi-tray process uses this data dir.
        """
        ensure_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        try:
            _lock(fd)
        except OSError as exc:
            os.close(fd)
            raise NodeAlreadyRunning(
                f"another koi-tray node is already running for {self.path.parent.resolve()}"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def is_locked(path: Path) -> bool:
    """Tell whether some process holds the lock (by trying to take it briefly)."""
    lock = DataDirLock(path)
    try:
        lock.acquire()
    except NodeAlreadyRunning:
        return True
    lock.release()
    return False
