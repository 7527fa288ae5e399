"""A node's configuration: where its data lives, what it is called, where it listens."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from koi_tray.certmesh.hostnames import is_valid_hostname
from koi_tray.certmesh.member import DEFAULT_HTTP_PORT, DEFAULT_MTLS_PORT

DATA_DIR_ENV = "KOI_TRAY_DATA_DIR"
HOST_KINDS = ("tray", "serve", "embedded", "cli")


def default_data_dir() -> Path:
    """The per-user data dir: `$KOI_TRAY_DATA_DIR`, else the platform's user data dir."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("koi-tray", appauthor=False))


def default_hostname() -> str:
    """This machine's short hostname, lowercased, if it is a valid RFC 1123 name."""
    name = socket.gethostname().split(".")[0].lower()
    return name if is_valid_hostname(name) else "koi-node"


@dataclass(frozen=True)
class NodeConfig:
    """What a host decides about its node; everything else is read from the data dir."""

    data_dir: Path = field(default_factory=default_data_dir)
    hostname: str = field(default_factory=default_hostname)
    http_bind: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    mtls_bind: str = "0.0.0.0"
    mtls_port: int = DEFAULT_MTLS_PORT
    host_kind: str = "embedded"
    renewal_interval: float = 3600.0
    shutdown_timeout: float = 20.0
    max_concurrent_approvals: int = 8
