"""The tray host starts the same servers and tasks as `serve` and an embedded node.

This is the desktop half of the parity check in tests/compose/test_node.py: all three
hosts build `compose.node.Node`, and for the same configuration they must end up running
the same listeners and background tasks.
"""

from __future__ import annotations

import pytest
from koitest import PASSPHRASE

from koi_tray.certmesh import keystore
from koi_tray.certmesh.ca import PRESETS, CertificateAuthority
from koi_tray.certmesh.layout import DataDir
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.deciders import deny_and_log_decider
from koi_tray.compose.node import KoiNode
from koi_tray.desktop.app import start_node
from koi_tray.desktop.approval import ApprovalBoard


def _config(root, kind: str) -> NodeConfig:
    config = NodeConfig(
        data_dir=root / kind,
        hostname="ca-host",
        http_port=0,
        mtls_port=0,
        mtls_bind="127.0.0.1",
        host_kind=kind,
    )
    CertificateAuthority.create(
        DataDir(config.data_dir),
        "ca-host",
        PASSPHRASE,
        PRESETS["team"],
        "Alice",
        kdf=keystore.FAST_TEST_KDF,
    )
    return config


@pytest.mark.asyncio
async def test_tray_and_embedded_hosts_run_the_same_servers_and_tasks(tmp_path, qapp):
    tray_node = await start_node(_config(tmp_path, "tray"), ApprovalBoard())
    try:
        locked = tray_node.describe()
        await tray_node.unlock(PASSPHRASE)
        tray = tray_node.describe()
    finally:
        await tray_node.shutdown()

    async with KoiNode(_config(tmp_path, "embedded"), decider=deny_and_log_decider()) as node:
        embedded_locked = node.describe()
        await node.unlock(PASSPHRASE)
        embedded = node.describe()

    assert (
        locked
        == embedded_locked
        == {
            "servers": ["http"],
            "tasks": ["approval-pump", "renewal-loop"],
        }
    )
    assert (
        tray
        == embedded
        == {
            "servers": ["http", "mtls"],
            "tasks": ["approval-pump", "renewal-loop"],
        }
    )
