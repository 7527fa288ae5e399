"""Invites: the code's shape, what reaches the disk, single use, hostnames and lifetimes."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path

import pytest
from meshtools import enroll_now, join_request, snapshot

from koi_tray.certmesh.ca import CertificateAuthority
from koi_tray.certmesh.clock import ManualClock
from koi_tray.certmesh.errors import InvalidAuth, InvalidPayload
from koi_tray.certmesh.invites import DEFAULT_TTL, InviteBook

CODE = re.compile(r"^[0-9a-f]{48}\.[0-9a-f]{64}$")


def _stored(ca: CertificateAuthority) -> list[dict]:
    return json.loads(ca.data.invites.read_text())["invites"]


def test_code_is_48_hex_secret_dot_ca_fingerprint(ca: CertificateAuthority):
    minted = ca.mint_invite("node-a")

    assert CODE.fullmatch(minted.code)
    assert minted.code.split(".")[1] == ca.ca_fingerprint
    assert minted.hostname == "node-a"
    assert ca.mint_invite("node-a").code != minted.code


def test_only_the_secret_hash_reaches_the_disk(ca: CertificateAuthority):
    minted = ca.mint_invite("node-a")
    secret = minted.code.split(".")[0]
    assert _stored(ca)[0]["token_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    with pytest.raises(InvalidAuth):
        enroll_now(ca, join_request("node-b", minted.code)[1])
    enroll_now(ca, join_request("node-a", minted.code)[1])
    ca.mint_invite("node-b")

    for path in Path(ca.data.root).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"secret found in {path}"


def test_invites_json_shape_and_mode(ca: CertificateAuthority, clock: ManualClock):
    minted = ca.mint_invite("node-a")
    secret = minted.code.split(".")[0]

    (entry,) = _stored(ca)
    assert entry == {
        "hostname": "node-a",
        "token_hash": hashlib.sha256(secret.encode()).hexdigest(),
        "expires_at": (clock.now() + dt.timedelta(minutes=60)).isoformat(),
        "used": False,
        "created_at": clock.now().isoformat(),
    }
    assert ca.data.invites.stat().st_mode & 0o777 == 0o600
    assert ca.audit.events()[-1][1:] == (
        "invite_minted",
        {"hostname": "node-a", "expires_at": entry["expires_at"]},
    )


def test_invite_is_single_use(ca: CertificateAuthority):
    code = ca.mint_invite("node-a").code
    enroll_now(ca, join_request("node-a", code)[1])

    assert _stored(ca)[0]["used"] is True
    with pytest.raises(InvalidAuth):
        enroll_now(ca, join_request("node-a", code)[1])
    assert ca.invites.outstanding() == []


@pytest.mark.parametrize(
    "minted_for, joins_as", [("Node-A", "node-a"), ("node-b", "NODE-B"), ("node-c", "Node-C")]
)
def test_invite_hostname_matches_case_insensitively(
    ca: CertificateAuthority, minted_for: str, joins_as: str
):
    code = ca.mint_invite(minted_for).code
    enroll_now(ca, join_request(joins_as, code)[1])

    assert ca.roster.is_enrolled(minted_for.lower())


def test_bare_secret_without_the_pin_is_accepted(ca: CertificateAuthority):
    """Koi's joiner sends only the secret half of the code."""
    secret = ca.mint_invite("node-a").code.split(".")[0]
    enroll_now(ca, join_request("node-a", secret)[1])
    assert ca.roster.is_enrolled("node-a")


def test_uppercase_pin_is_not_this_ca(ca: CertificateAuthority):
    secret, pin = ca.mint_invite("node-a").code.split(".")
    with pytest.raises(InvalidAuth, match="another CA"):
        enroll_now(ca, join_request("node-a", f"{secret}.{pin.upper()}")[1])


@pytest.mark.parametrize(
    "ttl",
    [
        dt.timedelta(seconds=59),
        dt.timedelta(0),
        dt.timedelta(minutes=-5),
        dt.timedelta(days=7, seconds=1),
        dt.timedelta(days=365),
    ],
    ids=["59s", "zero", "negative", "7d+1s", "1y"],
)
def test_ttl_outside_one_minute_to_seven_days_is_refused(
    ca: CertificateAuthority, ttl: dt.timedelta
):
    before = snapshot(ca.data)
    with pytest.raises(InvalidPayload, match="between 1 minute and 7 days"):
        ca.mint_invite("node-a", ttl)
    assert snapshot(ca.data) == before


@pytest.mark.parametrize("ttl", [dt.timedelta(minutes=1), dt.timedelta(days=7)], ids=str)
def test_ttl_bounds_are_inclusive(ca: CertificateAuthority, clock: ManualClock, ttl):
    minted = ca.mint_invite("node-a", ttl)
    assert minted.expires_at == clock.now() + ttl


def test_default_ttl_is_sixty_minutes_and_expiry_follows_the_clock(
    ca: CertificateAuthority, clock: ManualClock
):
    early = ca.mint_invite("node-a")
    late = ca.mint_invite("node-b")
    assert DEFAULT_TTL == dt.timedelta(minutes=60)
    assert early.expires_at == clock.now() + dt.timedelta(minutes=60)

    clock.advance(dt.timedelta(minutes=59, seconds=59))
    enroll_now(ca, join_request("node-a", early.code)[1])
    assert ca.roster.is_enrolled("node-a")

    clock.advance(dt.timedelta(seconds=1))
    with pytest.raises(InvalidAuth):
        enroll_now(ca, join_request("node-b", late.code)[1])
    assert not ca.roster.is_enrolled("node-b")


def test_minting_prunes_used_and_expired_invites(ca: CertificateAuthority, clock: ManualClock):
    used = ca.mint_invite("node-a")
    enroll_now(ca, join_request("node-a", used.code)[1])
    ca.mint_invite("node-b", dt.timedelta(minutes=5))
    kept = ca.mint_invite("node-c", dt.timedelta(hours=2))
    clock.advance(dt.timedelta(minutes=10))

    ca.mint_invite("node-d")

    assert [i["hostname"] for i in _stored(ca)] == ["node-c", "node-d"]
    assert [i.hostname for i in ca.invites.outstanding()] == ["node-c", "node-d"]
    assert kept.expires_at > clock.now()


@pytest.mark.parametrize("hostname", ["node|a", "node\na", "*.lan", "", "a" * 254, None])
def test_mint_refuses_bad_hostnames_and_writes_nothing(ca: CertificateAuthority, hostname):
    before = snapshot(ca.data)
    with pytest.raises(InvalidPayload):
        ca.mint_invite(hostname)
    assert snapshot(ca.data) == before


def test_reservation_blocks_a_second_holder_until_released(tmp_path: Path, clock: ManualClock):
    book = InviteBook(tmp_path / "invites.json", clock)
    secret = book.mint("node-a", "f" * 64).code.split(".")[0]

    held = book.reserve(secret, "node-a")
    with pytest.raises(InvalidAuth):
        book.reserve(secret, "node-a")
    book.release(held)
    again = book.reserve(secret, "NODE-A")
    book.spend(again)

    with pytest.raises(InvalidAuth):
        book.reserve(secret, "node-a")
    assert json.loads((tmp_path / "invites.json").read_text())["invites"][0]["used"] is True
