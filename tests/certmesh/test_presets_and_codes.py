"""Presets, their overrides, and the error codes and HTTP statuses a client relies on."""

from __future__ import annotations

import json

import pytest

from koi_tray.certmesh import errors
from koi_tray.certmesh.ca import PRESETS, CertificateAuthority, Posture
from koi_tray.certmesh.errors import CertmeshError, InvalidPayload
from koi_tray.compose.actions import posture_for

# Koi certmesh 0.9's code → status table (koi-certmesh.md §1.1), plus koi-tray's own codes.
KOI_STATUSES = {
    "ca_not_initialized": 503,
    "ca_locked": 503,
    "invalid_auth": 401,
    "rate_limited": 429,
    "enrollment_closed": 403,
    "conflict": 409,
    "not_found": 404,
    "revoked": 403,
    "scope_violation": 403,
    "invalid_payload": 400,
    "approval_denied": 403,
    "approval_timeout": 504,
    "approval_unavailable": 503,
    "renewal_failed": 500,
    "io_error": 500,
    "internal": 500,
    "unauthorized": 401,
    "shutting_down": 503,
}
KOI_TRAY_STATUSES = {"payload_too_large": 413, "bundle_rejected": 500, "corrupt_state": 500}


def test_every_error_carries_koi_code_and_status():
    classes = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, CertmeshError)
    ]
    table = {cls.code: cls.http_status for cls in classes}

    assert table == KOI_STATUSES | KOI_TRAY_STATUSES
    assert len({cls.code for cls in classes}) == len(classes), "two errors share one code"


@pytest.mark.parametrize(
    "preset, enrollment_open, requires_approval, auto_unlock",
    [
        ("just-me", True, False, True),
        ("team", True, True, True),
        ("organization", False, True, False),
    ],
)
def test_presets_are_koi_presets(preset, enrollment_open, requires_approval, auto_unlock):
    posture = PRESETS[preset]

    assert (posture.enrollment_open, posture.requires_approval, posture.auto_unlock) == (
        enrollment_open,
        requires_approval,
        auto_unlock,
    )


def test_overrides_change_only_what_they_name():
    assert posture_for("organization", enrollment_open=True) == Posture(
        enrollment_open=True, requires_approval=True, auto_unlock=False
    )
    assert posture_for("team", requires_approval=False).requires_approval is False
    assert posture_for("team", requires_approval=False).enrollment_open is True
    assert posture_for("just-me") == PRESETS["just-me"]

    with pytest.raises(InvalidPayload, match="unknown preset"):
        posture_for("everyone")


def test_the_roster_records_the_posture_created_with(make_ca):
    ca: CertificateAuthority = make_ca("organization", operator="Alice")

    metadata = json.loads(ca.data.roster.read_text())["metadata"]

    assert metadata["enrollment_open"] is False
    assert metadata["requires_approval"] is True
    assert metadata["operator"] == "Alice"
    assert ca.auto_unlock is False


def test_approval_without_an_operator_is_refused_and_writes_nothing(make_ca, ca_data):
    with pytest.raises(InvalidPayload, match="operator name is required"):
        make_ca("team", operator="  ")

    assert not ca_data.ca_key.exists()
    assert not ca_data.roster.exists()
