"""Shared set-up for the benchmarks: a CA node on loopback and members joined to it."""

from __future__ import annotations

import statistics
from pathlib import Path

from koi_tray.certmesh import keystore, pki
from koi_tray.certmesh.approval import Approved
from koi_tray.certmesh.ca import JoinRequest
from koi_tray.certmesh.clock import SystemClock
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.member import Membership
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.node import Node

PASSPHRASE = "correct horse battery"


async def instant_decider(request):
    return Approved("bench")


async def start_ca(root: Path, decider=instant_decider, preset: str = "just-me") -> Node:
    config = NodeConfig(
        data_dir=root / "ca",
        hostname="ca-host",
        http_port=0,
        mtls_port=0,
        mtls_bind="127.0.0.1",
        host_kind="embedded",
        max_concurrent_approvals=64,
    )
    node = Node(config, decider, kdf=keystore.FAST_TEST_KDF)
    await node.start()
    await node.create_ca(PASSPHRASE, preset, "bench")
    return node


def join_directly(ca_node: Node, root: Path, hostname: str) -> Membership:
    """Enrol a member through the CA's own checks, without HTTP (set-up, not measured)."""
    ca = ca_node.ca
    invite = ca.mint_invite(hostname)
    key = pki.generate_key()
    csr = pki.build_csr(key, hostname, [hostname, f"{hostname}.local"]).decode()
    answer = ca.finish_join(ca.check_join(JoinRequest(hostname, csr, invite.code)), None)
    return Membership.install_join(
        DataDir(root / hostname),
        SystemClock(),
        key,
        answer.to_json(),
        ca_host="127.0.0.1",
        ca_http_port=ca_node.address("http")[1],
        ca_mtls_port=ca_node.address("mtls")[1],
        pinned_fingerprint=ca.ca_fingerprint,
        sans=[hostname, f"{hostname}.local"],
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def describe_ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"n={len(ms)} p50={percentile(ms, 50):.2f} ms p99={percentile(ms, 99):.2f} ms "
        f"max={max(ms):.2f} ms mean={statistics.fmean(ms):.2f} ms"
    )
