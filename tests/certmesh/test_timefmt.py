"""Timestamps as Koi writes them, and the clocks certmesh reads."""

from __future__ import annotations

import datetime as dt

import pytest

from koi_tray.certmesh.clock import ManualClock, SystemClock
from koi_tray.certmesh.errors import InvalidPayload
from koi_tray.certmesh.timefmt import format_roster_timestamp, format_timestamp, parse_timestamp

BASE = dt.datetime(2026, 6, 18, 10, 0, 0, tzinfo=dt.UTC)
DIGITS = "123456789"


@pytest.mark.parametrize("suffix", ["Z", "z", "+00:00"])
@pytest.mark.parametrize("places", range(10))
def test_zero_to_nine_fractional_digits(places: int, suffix: str):
    fraction = f".{DIGITS[:places]}" if places else ""
    parsed = parse_timestamp(f"2026-06-18T10:00:00{fraction}{suffix}")

    micro = int(DIGITS[: min(places, 6)].ljust(6, "0")) if places else 0
    assert parsed == BASE.replace(microsecond=micro)
    assert parsed.tzinfo == dt.UTC


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-06-18T12:00:00+02:00", BASE),
        ("2026-06-18T05:30:00.5-04:30", BASE.replace(microsecond=500000)),
        ("2026-06-18 10:00:00Z", BASE),
        ("  2026-06-18T10:00:00Z\n", BASE),
    ],
)
def test_offsets_are_converted_to_utc(text: str, expected: dt.datetime):
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2026-06-18T10:00:00.1234567890Z",
        "2026-06-18T10:00:00",
        "2026-06-18",
        "2026-13-01T10:00:00Z",
        "2026-06-18T25:00:00Z",
        "2026-06-18T10:00:00.Z",
        "yesterday",
        "",
        None,
        1781776800,
    ],
)
def test_malformed_timestamps_are_invalid_payload(text):
    with pytest.raises(InvalidPayload):
        parse_timestamp(text)


def test_formats_round_trip():
    when = BASE.replace(microsecond=123456)
    assert format_timestamp(when) == "2026-06-18T10:00:00.123456+00:00"
    assert format_roster_timestamp(when) == "2026-06-18T10:00:00.123456Z"
    assert parse_timestamp(format_roster_timestamp(when)) == when
    eastern = when.astimezone(dt.timezone(dt.timedelta(hours=-5)))
    assert format_timestamp(eastern) == "2026-06-18T10:00:00.123456+00:00"


def test_naive_datetimes_are_refused():
    with pytest.raises(ValueError):
        format_timestamp(dt.datetime(2026, 6, 18))
    with pytest.raises(ValueError):
        ManualClock(dt.datetime(2026, 6, 18))


def test_manual_clock_moves_only_when_told(clock: ManualClock):
    start = clock.now()
    assert clock.now() == start
    clock.advance(dt.timedelta(days=400))
    assert clock.now() == start + dt.timedelta(days=400)
    clock.advance(dt.timedelta(hours=-1))
    assert clock.now() == start + dt.timedelta(days=400, hours=-1)
    clock.set(BASE)
    assert clock.now() == BASE


def test_system_clock_is_aware_utc():
    now = SystemClock().now()
    assert now.tzinfo == dt.UTC
    assert abs(now - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=5)
