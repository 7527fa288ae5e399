"""Where certmesh time comes from: the system clock, or a hand-moved one for tests.

Every validity window, due date, invite expiry and audit stamp reads `Clock.now()`, which
is always timezone-aware UTC. Tests and the renewal simulation move a `ManualClock` through
months without sleeping.
"""

from __future__ import annotations

import datetime as dt
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """Return the current time as an aware UTC datetime."""
        ...


class SystemClock:
    """The machine's wall clock, in UTC."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        if self._now.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")

    def now(self) -> dt.datetime:
        return self._now

    def advance(self, delta: dt.timedelta) -> None:
        """Move the clock by `delta` (which may be negative, for clock-jump tests)."""
        self._now += delta

    def set(self, when: dt.datetime) -> None:
        self._now = when
