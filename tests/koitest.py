"""Constants and helpers the tests share (import as `from koitest import ...`).

They live here rather than in `conftest.py` because every folder's conftest is a module
named `conftest`, and importing from it picks whichever was collected first.
"""

from __future__ import annotations

import datetime as dt

from koi_tray.certmesh import pki

START = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
PASSPHRASE = "correct horse battery"


def member_csr(hostname: str, sans: list[str] | None = None):
    """Return (key, csr_pem) for a member joining as `hostname`."""
    key = pki.generate_key()
    names = sans if sans is not None else [hostname, f"{hostname}.local"]
    return key, pki.build_csr(key, hostname, names).decode()
