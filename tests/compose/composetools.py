"""Helpers the composition tests share: an in-process CA link, a join, a hand-driven timer.

Imported as `composetools` by the modules beside it. `DirectLink` calls a real CA without
the network, because OpenSSL checks certificates against the machine's real clock and a
TLS handshake cannot travel months ahead on a `ManualClock`. `Timer` is the renewal
loop's sleep on that clock: a nap ends when the test moves the clock past it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from koi_tray.api.client import CaUnreachable
from koi_tray.certmesh.ca import CertificateAuthority
from koi_tray.certmesh.clock import ManualClock
from koi_tray.certmesh.member import Membership

OUTAGE = "connection refused (simulated outage)"


class DirectLink:
    """The CA called in-process; `bundle_down` and `renew_down` refuse like a dead port."""

    def __init__(self, ca: CertificateAuthority, membership: Membership) -> None:
        self.ca = ca
        self.membership = membership
        self.bundle_down = False
        self.renew_down = False
        self.renewals_asked = 0

    @property
    def down(self) -> bool:
        return self.bundle_down and self.renew_down

    @down.setter
    def down(self, value: bool) -> None:
        self.bundle_down = self.renew_down = value

    async def fetch_bundle(self) -> dict[str, Any]:
        if self.bundle_down:
            raise CaUnreachable(OUTAGE)
        return self.ca.trust_bundle()

    async def renew(self, csr_pem: str) -> dict[str, Any]:
        self.renewals_asked += 1
        if self.renew_down:
            raise CaUnreachable(OUTAGE)
        leaf = self.membership.leaf()
        host = self.membership.state.hostname
        return self.ca.renew_member(host, leaf.fingerprint, host, csr_pem).to_json()


class Timer:
    """A renewal-loop sleep on a `ManualClock`: naps end when the clock reaches them."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.naps: list[float] = []
        self._waiting: list[tuple[dt.datetime, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        wakes = asyncio.get_running_loop().create_future()
        self._waiting.append((self.clock.now() + dt.timedelta(seconds=seconds), wakes))
        try:
            await wakes
        finally:
            self._waiting = [(at, f) for at, f in self._waiting if f is not wakes]

    async def advance(self, delta: dt.timedelta) -> None:
        """Move the clock; naps that end by then return, and the loop gets to run."""
        self.clock.advance(delta)
        for at, wakes in self._waiting:
            if at <= self.clock.now() and not wakes.done():
                wakes.set_result(None)
        await settle()


async def settle() -> None:
    """Let the loop's tasks (and the threads they wait on) run to their next wait."""
    for _ in range(20):
        await asyncio.sleep(0.005)
