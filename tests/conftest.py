"""Fixtures shared by every test: a hand-moved clock, data dirs, a CA, member keys."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest

from koi_tray.certmesh import keystore, pki
from koi_tray.certmesh.ca import PRESETS, CertificateAuthority
from koi_tray.certmesh.clock import ManualClock
from koi_tray.certmesh.layout import DataDir

START = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
PASSPHRASE = "correct horse battery"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def ca_data(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path / "ca-node")


@pytest.fixture
def make_ca(ca_data: DataDir, clock: ManualClock) -> Callable[..., CertificateAuthority]:
    """Build a CA in `ca_data` with a preset; cheap Argon2id so tests stay quick."""

    def make(preset: str = "just-me", operator: str | None = "Alice") -> CertificateAuthority:
        return CertificateAuthority.create(
            ca_data,
            "ca-host",
            PASSPHRASE,
            PRESETS[preset],
            operator,
            clock=clock,
            kdf=keystore.FAST_TEST_KDF,
        )

    return make


@pytest.fixture
def ca(make_ca: Callable[..., CertificateAuthority]) -> CertificateAuthority:
    return make_ca("just-me")


def member_csr(hostname: str, sans: list[str] | None = None):
    """Return (key, csr_pem) for a member joining as `hostname`."""
    key = pki.generate_key()
    names = sans if sans is not None else [hostname, f"{hostname}.local"]
    return key, pki.build_csr(key, hostname, names).decode()
