"""400 simulated days of a member's renewal loop against a real CA, on a hand-moved clock.

The loop, the member's files and the CA are real; only two things stand in. The network
is a `DirectLink` that calls the CA in-process, because OpenSSL checks certificates against
the machine's real clock, so a TLS handshake cannot travel 400 days ahead. And the loop's
sleep moves the `ManualClock` instead of waiting.

Every published pass is compared with `renewal.json` as the loop rewrites it, and every
published renewal with the certificate then on disk.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from composetools import DirectLink
from koitest import START, member_csr

from koi_tray.certmesh.ca import JoinRequest
from koi_tray.certmesh.clock import ManualClock
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.member import Membership
from koi_tray.compose.renewal import PassResult, RenewalLoop, RenewalRecord, member_pass

DAY = dt.timedelta(days=1)


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


@dataclass
class Run:
    """What a simulated run published, and what its files said along the way."""

    results: list[PassResult] = field(default_factory=list)
    saved: dict[str, dict] = field(default_factory=dict)  # checked_at -> saved entry
    expired_at: list[dt.datetime] = field(default_factory=list)

    def renewals(self) -> list[PassResult]:
        return [r for r in self.results if r.outcome == "renewed"]


async def _simulate(membership, clock, link, days, outage=None) -> Run:
    """Run the real loop until `days` have passed, watching what it publishes and saves."""
    end = START + days * DAY
    run = Run()
    ended = asyncio.Event()
    path = membership.data.certmesh / "renewal.json"

    async def sleep(seconds: float) -> None:
        clock.advance(dt.timedelta(seconds=seconds))
        now = clock.now()
        if outage is not None:
            link.down = outage[0] <= now < outage[1]
        if membership.leaf().cert.not_valid_after_utc <= now:
            run.expired_at.append(now)
        if now >= end:
            ended.set()
            await asyncio.Event().wait()

    seen_file: list[tuple[int, int]] = []

    def published(result: PassResult) -> None:
        run.results.append(result)
        stat = path.stat() if path.exists() else None
        if stat is not None and (stat.st_ino, stat.st_mtime_ns) not in seen_file[-1:]:
            seen_file.append((stat.st_ino, stat.st_mtime_ns))
            for entry in json.loads(path.read_text())["history"]:
                run.saved[entry["checked_at"]] = entry
        if result.outcome == "renewed":
            assert membership.leaf().cert.not_valid_after_utc == result.expires
            assert run.saved[result.to_json()["checked_at"]] == result.to_json()

    loop = RenewalLoop(
        lambda force: member_pass(membership, link, clock, force),
        RenewalRecord(path),
        clock,
        sleep=sleep,
        rng=random.Random(7),
        on_result=published,
    )
    task = asyncio.create_task(loop.run())
    await ended.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not run.expired_at, f"the leaf expired at {run.expired_at[0]}"
    _assert_history_matches_the_file(run, loop.record.view, path)
    return run


def _assert_history_matches_the_file(run: Run, view, path: Path) -> None:
    """Every published pass reached renewal.json, except a last day of steady "not due"."""
    published = [r.to_json() for r in run.results]
    saved = [p for p in published if p["checked_at"] in run.saved]
    assert [run.saved[p["checked_at"]] for p in saved] == saved, "a saved pass differs"
    unsaved = published[len(saved) :]
    assert saved == published[: len(saved)], "a pass in the middle never reached the file"
    assert all(p["outcome"] == "not_due" for p in unsaved)
    last_saved = dt.datetime.fromisoformat(saved[-1]["checked_at"])
    assert run.results[-1].checked_at - last_saved < DAY

    on_disk = RenewalRecord(path).view
    renewed = run.renewals()[-1]
    assert on_disk.last_renewed_at == view.last_renewed_at == renewed.checked_at
    assert on_disk.consecutive_failures == view.consecutive_failures
    assert on_disk.last_bundle is not None and on_disk.last_bundle.seq == view.last_bundle.seq


@pytest.mark.asyncio
async def test_member_renews_about_every_60_days_and_never_expires(make_ca, clock, tmp_path):
    ca = make_ca("just-me")
    membership = await _join(ca, tmp_path, clock)
    link = DirectLink(ca, membership)

    run = await _simulate(membership, clock, link, days=400)

    renewals = run.renewals()
    gaps = [(b.checked_at - a.checked_at) / DAY for a, b in itertools.pairwise(renewals)]
    assert len(renewals) in (6, 7)
    assert all(59 <= gap <= 61.5 for gap in gaps), gaps
    assert not [r for r in run.results if r.outcome == "failed"]

    leaf = membership.leaf()
    assert leaf.cert.not_valid_after_utc == renewals[-1].expires
    assert ca.roster.find("node-02").cert_fingerprint == leaf.fingerprint


@pytest.mark.asyncio
async def test_a_40_day_outage_inside_400_days_fails_from_the_first_pass_and_recovers(
    make_ca, clock, tmp_path
):
    ca = make_ca("just-me")
    membership = await _join(ca, tmp_path, clock)
    link = DirectLink(ca, membership)
    outage = (START + 150 * DAY, START + 190 * DAY)  # the leaf falls due on about day 180

    run = await _simulate(membership, clock, link, days=400, outage=outage)

    in_outage = [r for r in run.results if outage[0] <= r.checked_at < outage[1]]
    assert all(r.outcome == "failed" and not r.reachable for r in in_outage)
    assert in_outage[0].checked_at - outage[0] <= dt.timedelta(hours=1.1), "first one fails"
    before = [r for r in run.results if r.checked_at < outage[0]]
    assert not [r for r in before if r.outcome == "failed"]

    times = [r.checked_at for r in in_outage]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert gaps[0] < 120, "the first retry comes about a minute later"
    assert gaps[:6] == sorted(gaps[:6]), "retries back off"
    assert max(gaps) <= 3600, "backoff is capped at the hour"
    due_in_outage = [r for r in in_outage if "bundle pull" not in r.detail and r.detail]
    assert due_in_outage, "once due, the member kept trying to renew through the outage"

    after = [r for r in run.results if r.checked_at >= outage[1]]
    assert after[0].outcome == "renewed", "the overdue renewal happens as soon as the CA is back"
    assert after[0].checked_at - outage[1] <= dt.timedelta(hours=1)
    renewals = run.renewals()
    assert len(renewals) in (5, 6)
    assert not [r for r in after if r.outcome == "failed"]
    assert membership.leaf().cert.not_valid_after_utc == renewals[-1].expires
