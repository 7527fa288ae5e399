"""Fixtures shared by every test: a hand-moved clock, data dirs, a CA."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from koitest import PASSPHRASE, START

from koi_tray.certmesh import keystore
from koi_tray.certmesh.ca import PRESETS, CertificateAuthority
from koi_tray.certmesh.clock import ManualClock
from koi_tray.certmesh.layout import DataDir


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
