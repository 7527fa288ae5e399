"""A node's configuration: where its data lives, what it is called, where it listens."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from koi_tray.certmesh.errors import CertmeshError, Conflict
from koi_tray.certmesh.files import read_json
from koi_tray.certmesh.hostnames import is_valid_hostname, same_host
from koi_tray.certmesh.layout import DataDir
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


def _read_object(path: Path) -> dict[str, object] | None:
    try:
        value = read_json(path)
    except CertmeshError:
        return None  # damage is reported, with its copy kept, when the role is opened
    return value if isinstance(value, dict) else None


def recorded_hostname(data_dir: Path) -> str | None:
    """The name a data dir's mesh knows this node by, or None when it holds no mesh.

    A member's name is `member.json`'s `hostname`; a CA's is its roster's primary entry,
    else the one leaf directory it issued for itself. An unreadable state file counts as
    "nothing recorded": opening the role reports the damage properly.
    """
    data = DataDir(data_dir)
    state = _read_object(data.member_state)
    if state is not None and is_valid_hostname(state.get("hostname")):
        return str(state["hostname"])
    if not data.ca_key.exists():
        return None
    roster = _read_object(data.roster) or {}
    members = roster.get("members")
    for member in members if isinstance(members, list) else []:
        if isinstance(member, dict) and member.get("role") == "primary":
            name = member.get("hostname")
            if is_valid_hostname(name):
                return str(name)
    try:
        # A leaf directory is named after its host; staging directories start with a dot.
        leaves = [p.name for p in data.certs.iterdir() if p.is_dir() and is_valid_hostname(p.name)]
    except OSError:
        return None
    return leaves[0] if len(leaves) == 1 else None


def resolve_hostname(data_dir: Path, given: str | None) -> str:
    """This node's name: the recorded one, else `given`, else the machine's.

    `--hostname` only names a node at create or join; afterwards the data dir decides.

    Raises:
        Conflict: `given` differs from the name the data dir records.
    """
    recorded = recorded_hostname(data_dir)
    if recorded is None:
        return given or default_hostname()
    if given is not None and not same_host(given, recorded):
        raise Conflict(
            f"{data_dir} belongs to the node {recorded!r}, not {given!r}; "
            "drop --hostname (it only names a node at create or join)"
        )
    return recorded


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
