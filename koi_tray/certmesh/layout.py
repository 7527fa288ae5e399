"""Where a node keeps its files: Koi's data-dir layout under one root.

<data dir>/
  certmesh/roster.json, invites.json, member.json
  certmesh/ca/ca-key.enc, ca-cert.pem
  certs/<hostname>/key.pem, cert.pem, ca.pem, fullchain.pem
  logs/certmesh-audit.log
  node.lock, node.json (endpoint breadcrumb), node.token    (koi-tray)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from koi_tray.certmesh.files import ensure_private_dir


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def certmesh(self) -> Path:
        return self.root / "certmesh"

    @property
    def ca_dir(self) -> Path:
        return self.certmesh / "ca"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca-key.enc"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca-cert.pem"

    @property
    def roster(self) -> Path:
        return self.certmesh / "roster.json"

    @property
    def invites(self) -> Path:
        return self.certmesh / "invites.json"

    @property
    def member_state(self) -> Path:
        return self.certmesh / "member.json"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    def leaf_dir(self, hostname: str) -> Path:
        return self.certs / hostname

    @property
    def audit_log(self) -> Path:
        return self.root / "logs" / "certmesh-audit.log"

    @property
    def lock_file(self) -> Path:
        return self.root / "node.lock"

    @property
    def breadcrumb(self) -> Path:
        return self.root / "node.json"

    @property
    def token_file(self) -> Path:
        return self.root / "node.token"

    def prepare(self) -> DataDir:
        """Create the owner-only directories every role needs."""
        for path in (self.root, self.certmesh, self.certs, self.audit_log.parent):
            ensure_private_dir(path)
        return self
