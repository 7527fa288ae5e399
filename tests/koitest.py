"""Constants and helpers the tests share (import as `from koitest import ...`).

They live here rather than in `conftest.py` because every folder's conftest is a module
named `conftest`, and importing from it picks whichever was collected first.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from koi_tray.certmesh import pki
from koi_tray.certmesh.ca import CertificateAuthority, JoinRequest
from koi_tray.certmesh.clock import Clock
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.member import Membership
from koi_tray.compose.config import NodeConfig

START = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
PASSPHRASE = "correct horse battery"


def member_csr(hostname: str, sans: list[str] | None = None):
    """Return (key, csr_pem) for a member joining as `hostname`."""
    key = pki.generate_key()
    names = sans if sans is not None else [hostname, f"{hostname}.local"]
    return key, pki.build_csr(key, hostname, names).decode()


def join_in_process(
    ca: CertificateAuthority, root: Path, clock: Clock, host: str = "node-02"
) -> Membership:
    """Join `host` to `ca` without approval and install it in a member data dir at `root`."""
    key, csr = member_csr(host)
    pending = ca.check_join(JoinRequest(host, csr, ca.mint_invite(host).code, "127.0.0.1"))
    return Membership.install_join(
        DataDir(root),
        clock,
        key,
        ca.finish_join(pending, None).to_json(),
        ca_host="127.0.0.1",
        ca_http_port=5641,
        pinned_fingerprint=ca.ca_fingerprint,
        sans=[host, f"{host}.local"],
    )


def loopback_config(data_dir: Path, hostname: str, **options: Any) -> NodeConfig:
    """A node on loopback with ports the OS picks (and the mTLS port on loopback too)."""
    return NodeConfig(
        data_dir=data_dir,
        hostname=hostname,
        http_port=0,
        mtls_port=0,
        mtls_bind="127.0.0.1",
        **options,
    )
