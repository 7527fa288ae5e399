"""400 simulated days of a member's renewal loop against a real CA, on a hand-moved clock.

The loop, the member's files and the CA are real; only two things stand in. The network
is a `DirectLink` that calls the CA in-process, because OpenSSL checks certificates against
the machine's real clock, so a TLS handshake cannot travel 400 days ahead. And the loop's
sleep moves the `ManualClock` instead of waiting.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from pathlib import Path
from typing import Any

import pytest
from koitest import START, member_csr

from koi_tray.api.client import CaUnreachable
from koi_tray.certmesh import pki
from koi_tray.certmesh.ca import JoinRequest
from koi_tray.certmesh.clock import ManualClock
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.member import Membership
from koi_tray.compose.renewal import PassResult, RenewalLoop, RenewalRecord, member_pass

DAY = dt.timedelta(days=1)


class DirectLink:
    """Calls the CA in-process; `down` makes it behave like an unreachable CA."""

    def __init__(self, ca, membership: Membership) -> None:
        self.ca = ca
        self.membership = membership
        self.down = False

    async def fetch_bundle(self) -> dict[str, Any]:
        if self.down:
            raise CaUnreachable("connection refused (simulated outage)")
        return self.ca.trust_bundle()

    async def renew(self, csr_pem: str) -> dict[str, Any]:
        if self.down:
            raise CaUnreachable("connection refused (simulated outage)")
        leaf = self.membership.leaf()
        result = self.ca.renew_member(
            pki.leaf_common_name(leaf.cert),
            leaf.fingerprint,
            self.membership.state.hostname,
            csr_pem,
        )
        return result.to_json()


async def _join(ca, tmp_path: Path, clock: ManualClock) -> Membership:
    invite = ca.mint_invite("node-02")
    key, csr = member_csr("node-02")
    pending = ca.check_join(JoinRequest("node-02", csr, invite.code, "127.0.0.1"))
    answer = ca.finish_join(pending, None)
    return Membership.install_join(
        DataDir(tmp_path / "member"),
        clock,
        key,
        answer.to_json(),
        ca_host="127.0.0.1",
        ca_http_port=5641,
        pinned_fingerprint=ca.ca_fingerprint,
        sans=["node-02", "node-02.local"],
    )


async def _simulate(ca, membership, clock, link, days, outage=None) -> list[PassResult]:
    """Run the real loop until `days` have passed; return every published pass."""
    end = START + days * DAY
    results: list[PassResult] = []
    ended = asyncio.Event()
    expired_at: list[dt.datetime] = []

    async def sleep(seconds: float) -> None:
        clock.advance(dt.timedelta(seconds=seconds))
        now = clock.now()
        if outage is not None:
            link.down = outage[0] <= now < outage[1]
        leaf = membership.leaf()
        if leaf.cert.not_valid_after_utc <= now:
            expired_at.append(now)
        if now >= end:
            ended.set()
            await asyncio.Event().wait()

    record = RenewalRecord(membership.data.certmesh / "renewal.json")
    loop = RenewalLoop(
        lambda force: member_pass(membership, link, clock, force),
        record,
        clock,
        sleep=sleep,
        rng=random.Random(7),
        on_result=results.append,
    )
    task = asyncio.create_task(loop.run())
    await ended.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not expired_at, f"the leaf expired at {expired_at[0]}"
    return results


@pytest.mark.asyncio
async def test_member_renews_about_every_60_days_and_never_expires(make_ca, clock, tmp_path):
    ca = make_ca("just-me")
    membership = await _join(ca, tmp_path, clock)
    link = DirectLink(ca, membership)

    results = await _simulate(ca, membership, clock, link, days=400)

    renewals = [r for r in results if r.outcome == "renewed"]
    gaps = [
        (b.checked_at - a.checked_at) / DAY for a, b in zip(renewals, renewals[1:], strict=False)
    ]
    assert len(renewals) in (6, 7)
    assert all(59 <= gap <= 61.5 for gap in gaps), gaps
    assert not [r for r in results if r.outcome == "failed"]

    leaf = membership.leaf()
    assert leaf.cert.not_valid_after_utc == renewals[-1].expires
    assert ca.roster.find("node-02").cert_fingerprint == leaf.fingerprint
    assert RenewalRecord(membership.data.certmesh / "renewal.json").view.last_renewed_at == (
        renewals[-1].checked_at
    )


@pytest.mark.asyncio
async def test_unreachable_ca_fails_from_first_pass_backs_off_and_recovers(
    make_ca, clock, tmp_path
):
    ca = make_ca("just-me")
    membership = await _join(ca, tmp_path, clock)
    link = DirectLink(ca, membership)
    outage = (START + 100 * DAY, START + 140 * DAY)

    results = await _simulate(ca, membership, clock, link, days=200, outage=outage)

    in_outage = [r for r in results if outage[0] <= r.checked_at < outage[1]]
    assert in_outage, "no pass ran during the outage"
    assert all(r.outcome == "failed" and not r.reachable for r in in_outage)
    first_pass_after_start = min(r.checked_at for r in in_outage)
    assert first_pass_after_start - outage[0] <= dt.timedelta(hours=1.2)

    gaps = [
        (b.checked_at - a.checked_at).total_seconds()
        for a, b in zip(in_outage, in_outage[1:], strict=False)
    ]
    assert gaps[0] < 120, "the first retry should come about a minute later"
    assert gaps[:6] == sorted(gaps[:6]), "retries back off"
    assert max(gaps) <= 3600 * 1.1, "backoff is capped at the hour"

    after = [r for r in results if r.checked_at >= outage[1]]
    assert after[0].outcome == "renewed", "the overdue renewal happens as soon as the CA is back"
    assert after[0].checked_at - outage[1] <= dt.timedelta(hours=1.1)
    assert membership.leaf().cert.not_valid_after_utc > outage[1] + 80 * DAY
