"""Helpers shared by the desktop tests: waiting on the loop, requests, snapshots, nodes.

Imported as `desktoptools` by the test modules beside it (pytest puts this folder on the
import path because it has no `__init__.py`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from koitest import loopback_config

from koi_tray.certmesh import keystore
from koi_tray.certmesh.approval import ApprovalRequest, Decider
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.node import Node
from koi_tray.compose.status import (
    BundleView,
    CaView,
    LeafView,
    MemberRow,
    NodeSnapshot,
    RenewalView,
)

NOW = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
UPDATE_SCREENSHOTS = "KOI_TRAY_UPDATE_SCREENSHOTS"
CA_FINGERPRINT = "5db49a9382327b21" + "ab" * 24
PASSPHRASE = "correct horse battery"
LOCKED_REASON = "the CA key is locked; unlock it with the passphrase"
_ids = itertools.count(1)


async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    """Poll `predicate` on the loop (never a nested Qt loop) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.01)


def make_request(
    hostname: str = "node-02",
    seconds: float = 300.0,
    requires_approval: bool = True,
    now: dt.datetime | None = None,
) -> ApprovalRequest:
    """An approval request as the CA would build it, due `seconds` from now."""
    now = now or dt.datetime.now(dt.UTC)
    return ApprovalRequest(
        request_id=f"req-{next(_ids)}",
        hostname=hostname,
        requires_approval=requires_approval,
        peer_address="192.0.2.10",
        sans=(hostname, f"{hostname}.local"),
        invite_hostname=hostname,
        invite_age=dt.timedelta(minutes=4),
        key_fingerprint="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        confirmation_code="947 171",
        received_at=now,
        deadline=now + dt.timedelta(seconds=seconds),
    )


def leaf(hostname: str, days: int, now: dt.datetime = NOW) -> LeafView:
    not_after = now + dt.timedelta(days=days)
    return LeafView(
        hostname=hostname,
        fingerprint="e0eb8ec4675c2b6a" * 4,
        not_after=not_after,
        due_at=not_after - dt.timedelta(days=30),
        days_left=days,
        expired=days <= 0,
    )


def ca_snapshot(
    *,
    locked: bool = False,
    pending: tuple[ApprovalRequest, ...] = (),
    members: int = 2,
    enrollment_open: bool = True,
    requires_approval: bool = True,
) -> NodeSnapshot:
    rows = tuple(
        MemberRow(f"node-{i:02d}", "member", "active", NOW + dt.timedelta(days=80))
        for i in range(2, 2 + members)
    )
    return NodeSnapshot(
        role="ca",
        hostname="ca-host",
        taken_at=NOW,
        mesh_fingerprint=CA_FINGERPRINT,
        leaf=leaf("ca-host", 89),
        renewal=RenewalView(
            last_check_at=NOW - dt.timedelta(minutes=3),
            last_outcome="not_due",
            next_check_at=NOW + dt.timedelta(minutes=57),
        ),
        # A CA's node reports no time for its own bundle (it signs one per request).
        bundle=BundleView(seq=3, received_at=None, self_revoked=False, revoked_count=0),
        ca=CaView(
            fingerprint=CA_FINGERPRINT,
            locked=locked,
            locked_reason=LOCKED_REASON if locked else None,
            enrollment_open=enrollment_open,
            requires_approval=requires_approval,
            seq=3,
            members=rows,
        ),
        pending=pending,
    )


def member_snapshot(
    *,
    days: int = 60,
    failures: int = 0,
    reachable: bool = True,
    revoked: bool = False,
    detail: str = "",
) -> NodeSnapshot:
    return NodeSnapshot(
        role="member",
        hostname="node-02",
        taken_at=NOW,
        mesh_fingerprint=CA_FINGERPRINT,
        ca_endpoint="ca-host:5641",
        leaf=leaf("node-02", days),
        renewal=RenewalView(
            last_check_at=NOW - dt.timedelta(minutes=2),
            last_outcome="failed" if failures else "renewed",
            last_detail=detail,
            last_renewed_at=NOW - dt.timedelta(days=1),
            consecutive_failures=failures,
            next_check_at=NOW + dt.timedelta(minutes=1 if failures else 58),
            ca_reachable=reachable,
        ),
        bundle=BundleView(
            seq=4,
            received_at=NOW - dt.timedelta(minutes=3),
            self_revoked=revoked,
            revoked_count=1 if revoked else 0,
        ),
    )


def unconfigured_snapshot() -> NodeSnapshot:
    return NodeSnapshot(role="unconfigured", hostname="laptop", taken_at=NOW)


def node_config(root: Path, hostname: str) -> NodeConfig:
    """A node on loopback with OS-chosen ports."""
    return loopback_config(root / hostname, hostname)


async def start_node(root: Path, hostname: str, decider: Decider) -> Node:
    node = Node(node_config(root, hostname), decider, kdf=keystore.FAST_TEST_KDF)
    await node.start()
    return node


def http_url(node: Node) -> str:
    return f"http://127.0.0.1:{node.address('http')[1]}"


def screenshot_path(tmp_path: Path, name: str) -> Path:
    """Where a test saves screenshot `name`: the test's temporary folder, or
    docs/screenshots when `KOI_TRAY_UPDATE_SCREENSHOTS=1` asks to update the tracked ones.
    """
    folder = SCREENSHOTS if os.environ.get(UPDATE_SCREENSHOTS) == "1" else tmp_path / "shots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def assert_real_png(path: Path, size: tuple[int, int] | list[int]) -> None:
    """Check `path` is a PNG of `size` pixels with a picture in it, not one flat colour."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG", path
        assert tuple(image.size) == tuple(size), (path, image.size, size)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 8, f"{path} is nearly blank: {colours}"
    assert min(size) > 100, f"{path} is only {size}"
