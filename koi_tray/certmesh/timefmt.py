"""RFC 3339 timestamps as Koi writes them, and as koi-tray writes them back.

Koi's roster uses a `Z` suffix with 0–9 fractional digits; its API responses use
`+00:00`. Python's `fromisoformat` accepts at most six fractional digits, so the extra
precision is cut before parsing.
"""

from __future__ import annotations

import datetime as dt
import re

from koi_tray.certmesh.errors import InvalidPayload

_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})$"
)


def parse_timestamp(text: str) -> dt.datetime:
    """Parse an RFC 3339 timestamp into an aware UTC datetime.

    Raises:
        InvalidPayload: `text` is not an RFC 3339 timestamp with an offset.
    """
    match = _RFC3339.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise InvalidPayload(f"not an RFC 3339 timestamp: {text!r}")

    date, clock, fraction, offset = match.groups()
    micro = (fraction or "").ljust(6, "0")[:6]
    offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        parsed = dt.datetime.fromisoformat(f"{date}T{clock}.{micro}{offset}")
    except ValueError as exc:
        raise InvalidPayload(f"not a valid timestamp: {text!r}") from exc
    return parsed.astimezone(dt.UTC)


def format_timestamp(when: dt.datetime) -> str:
    """Format an aware datetime the way Koi's API does (`+00:00`, microseconds)."""
    if when.tzinfo is None:
        raise ValueError("refusing to format a naive datetime")
    return when.astimezone(dt.UTC).isoformat()


def format_roster_timestamp(when: dt.datetime) -> str:
    """Format an aware datetime the way Koi's roster does (`Z` suffix)."""
    return format_timestamp(when).replace("+00:00", "Z")
