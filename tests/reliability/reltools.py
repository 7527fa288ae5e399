"""Helpers the reliability suites share: a loop thread, disk watches, audit checks, a CA link.

Imported as `reltools` by the modules beside it. Sync tests (hypothesis drives plain
functions) reach async nodes through `LoopThread`; `DiskWatch` tells exactly which state
files a request changed and which audit lines it appended; `DirectLink` and
`join_in_process` give a member a CA without the network, for tests on a hand-moved clock.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

from koi_tray.api.client import CaUnreachable
from koi_tray.certmesh import audit
from koi_tray.certmesh.ca import CertificateAuthority
from koi_tray.certmesh.errors import ERRORS_BY_CODE
from koi_tray.certmesh.member import Membership

T = TypeVar("T")

# Every code a refusal may carry on the wire: the certmesh tree and aiohttp's own refusals.
KNOWN_CODES = frozenset(ERRORS_BY_CODE) | {"method_not_allowed", "shutting_down"}
# Files a running node rewrites for itself; they describe the process, not the mesh.
PROCESS_FILES = frozenset({"node.lock", "node.json", "node.token", "renewal.json"})
_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


class LoopThread:
    """An asyncio loop running on a thread of its own, for sync code that drives nodes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="reliability-loop", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run `coro` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class DiskWatch:
    """The state files under some data dirs, and the audit log of each, at one instant.

    Every file counts except the process files (`PROCESS_FILES`) and the audit logs, which
    are append-only and compared by what was appended.
    """

    def __init__(self, roots: Iterable[Path]) -> None:
        self.roots = list(roots)
        self.files = self._read_files()
        self.audit_sizes = {root: _size(_audit(root)) for root in self.roots}
        self.audit_start = {root: _read(_audit(root)) for root in self.roots}

    def _read_files(self) -> dict[Path, bytes]:
        files = {}
        for root in self.roots:
            for path in root.rglob("*"):
                if path.name in PROCESS_FILES or path.parent.name == "logs":
                    continue
                if path.is_file():
                    files[path] = path.read_bytes()
        return files

    def changes(self) -> tuple[list[str], dict[Path, list[str]]]:
        """Return (state files changed since the last call, audit lines appended per root).

        The baseline moves forward, so each call reports one step.
        """
        files = self._read_files()
        changed = sorted(
            str(p) for p in files.keys() | self.files.keys() if files.get(p) != self.files.get(p)
        )
        self.files = files
        appended: dict[Path, list[str]] = {}
        for root in self.roots:
            path = _audit(root)
            size = _size(path)
            if size != self.audit_sizes[root]:
                with path.open("rb") as handle:
                    handle.seek(self.audit_sizes[root])
                    tail = handle.read()
                appended[root] = tail.decode("utf-8").splitlines(keepends=True)
                self.audit_sizes[root] = size
        return changed, appended

    def audit_is_append_only(self) -> bool:
        """Tell whether every audit log still begins with what it held at the start."""
        return all(_read(_audit(r)).startswith(self.audit_start[r]) for r in self.roots)


def _audit(root: Path) -> Path:
    return root / "logs" / "certmesh-audit.log"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def audit_line_problem(line: str, events: Iterable[str]) -> str | None:
    """Say what is wrong with one raw audit line, or None when it is well-formed.

    Well-formed: one line ending in a newline, a UTC second stamp, an event from `events`,
    and fields that escape back to exactly the same text (so no value added a field).
    """
    if not line.endswith("\n") or "\n" in line[:-1] or "\r" in line:
        return f"not a single line: {line!r}"
    stamp, event, fields = audit.parse_line(line)
    if not _STAMP.match(stamp):
        return f"bad timestamp {stamp!r}"
    if event not in set(events):
        return f"unexpected event {event!r}"
    rebuilt = " | ".join(
        [stamp, event, *(f"{key}={audit.escape_value(value)}" for key, value in fields.items())]
    )
    if rebuilt + "\n" != line:
        return f"fields do not escape back to the line: {line!r}"
    return None


class DirectLink:
    """The CA called in-process, as `tests/compose/test_renewal_simulation.py` does.

    While `down` is set it answers like an unreachable CA.
    """

    def __init__(self, ca: CertificateAuthority, membership: Membership) -> None:
        self.ca = ca
        self.membership = membership
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise CaUnreachable("connection refused (simulated outage)")

    async def fetch_bundle(self) -> dict[str, Any]:
        self._check()
        return self.ca.trust_bundle()

    async def renew(self, csr_pem: str) -> dict[str, Any]:
        self._check()
        leaf = self.membership.leaf()
        host = self.membership.state.hostname
        return self.ca.renew_member(host, leaf.fingerprint, host, csr_pem).to_json()
