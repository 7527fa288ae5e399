"""The renewal loop's schedule and resilience, and what its passes publish.

Time is a `ManualClock`; the loop's sleep is a `Timer` on it (or a sleep that moves it),
so hours and days pass without waiting. Members talk to a real CA, in-process where the
clock must travel and over loopback HTTP and mTLS where it need not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import logging
import random
import time
from dataclasses import replace
from pathlib import Path

import pytest
from composetools import OUTAGE, DirectLink, Timer, settle
from koitest import START, join_in_process, loopback_config

from koi_tray.certmesh import keystore
from koi_tray.certmesh.clock import ManualClock
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.deciders import deny_and_log_decider
from koi_tray.compose.node import Node
from koi_tray.compose.renewal import (
    FIRST_RETRY,
    PassResult,
    RenewalLoop,
    RenewalRecord,
    ca_pass,
    member_pass,
    next_delay,
)

DAY = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)
PASSPHRASE = "correct horse battery"


def test_backoff_with_its_jitter_never_exceeds_the_interval():
    rng = random.Random(11)
    for failures in range(1, 40):
        backoff = min(3600.0, FIRST_RETRY * 2 ** (failures - 1))
        for _ in range(200):
            delay = next_delay(failures, 3600.0, rng)
            assert 0.9 * backoff <= delay <= 3600.0, (failures, delay)
    steady = [next_delay(0, 3600.0, rng) for _ in range(500)]
    assert 0.9 * 3600 <= min(steady) and max(steady) <= 1.1 * 3600


def scripted_pass(clock: ManualClock, outcomes):
    """A pass runner that answers `outcomes` in turn and records when it ran."""
    plan = iter(outcomes)
    ran: list[dt.datetime] = []

    async def run_pass(force: bool) -> PassResult:
        ran.append(clock.now())
        outcome = next(plan)
        if isinstance(outcome, BaseException):
            raise outcome
        detail = "CA unreachable: refused" if outcome == "failed" else ""
        return PassResult(clock.now(), outcome, detail, reachable=outcome != "failed")

    return run_pass, ran


@pytest.mark.asyncio
async def test_a_manual_pass_reschedules_the_sleeping_loop(clock: ManualClock, tmp_path: Path):
    run_pass, ran = scripted_pass(
        clock, itertools.chain(["not_due", "failed"], itertools.repeat("not_due"))
    )
    timer = Timer(clock)
    record = RenewalRecord(tmp_path / "renewal.json")
    loop = RenewalLoop(run_pass, record, clock, sleep=timer.sleep)
    task = asyncio.create_task(loop.run())
    await settle()
    assert len(ran) == 1 and 0.9 * 3600 <= timer.naps[-1] <= 1.1 * 3600

    failed = await loop.pass_now()
    await settle()

    retry_in = (loop.record.view.next_check_at - clock.now()).total_seconds()
    assert failed.outcome == "failed" and 0.9 * 60 <= retry_in <= 1.1 * 60
    assert timer.naps[-1] == pytest.approx(retry_in), "the loop sleeps to the new time"
    await timer.advance(dt.timedelta(seconds=retry_in))
    assert len(ran) == 3, "the retry ran a minute after the manual pass, not an hour"
    assert loop.record.view.consecutive_failures == 0
    assert 0.9 * 3600 <= timer.naps[-1] <= 1.1 * 3600
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.asyncio
async def test_a_pass_that_raises_is_published_as_failed_and_the_loop_renews_next(
    make_ca, clock: ManualClock, tmp_path: Path, caplog
):
    ca = make_ca("just-me")
    membership = join_in_process(ca, tmp_path / "member", clock)
    link = DirectLink(ca, membership)
    clock.advance(61 * DAY)
    broken = iter([RuntimeError("bundle parser crashed")])

    async def run_pass(force: bool) -> PassResult:
        error = next(broken, None)
        if error is not None:
            raise error
        return await member_pass(membership, link, clock, force)

    published: list[PassResult] = []
    timer = Timer(clock)
    loop = RenewalLoop(
        run_pass,
        RenewalRecord(tmp_path / "renewal.json"),
        clock,
        sleep=timer.sleep,
        on_result=published.append,
    )
    with caplog.at_level(logging.DEBUG, logger="koi_tray.compose.renewal"):
        task = asyncio.create_task(loop.run())
        await settle()
        assert [r.outcome for r in published] == ["failed"]
        assert "RuntimeError('bundle parser crashed')" in published[0].detail
        assert loop.record.view.consecutive_failures == 1 and not task.done()

        await timer.advance(dt.timedelta(seconds=70))

    assert [r.outcome for r in published] == ["failed", "renewed"]
    assert loop.record.view.consecutive_failures == 0
    assert membership.leaf().cert.not_valid_after_utc == published[1].expires
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert debug, "the traceback is kept at DEBUG"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def member_node(tmp_path: Path, clock: ManualClock, link_for) -> Node:
    config = NodeConfig(data_dir=tmp_path / "member", hostname="node-02", http_port=0)
    return Node(config, deny_and_log_decider(), clock=clock, link_factory=link_for)


@pytest.mark.asyncio
async def test_a_renewal_loop_that_dies_reads_unhealthy(make_ca, clock, tmp_path):
    ca = make_ca("just-me")
    join_in_process(ca, tmp_path / "member", clock)
    node = member_node(tmp_path, clock, lambda membership: DirectLink(ca, membership))

    async def broken_sleep(seconds: float) -> None:
        raise RuntimeError("the timer broke")

    node.renewal._sleep = broken_sleep  # the one way to make the loop task end
    await node.start()
    try:
        await settle()
        snapshot = node.status.refresh()
    finally:
        await node.shutdown()

    rung = next(c for c in snapshot.capabilities if c.name == "renewal")
    assert not rung.healthy
    assert snapshot.renewal.loop_stopped and "renewal stopped" in snapshot.summary
    assert "the timer broke" in snapshot.renewal.last_detail
    assert snapshot.health == "attention"


@pytest.mark.asyncio
async def test_a_due_member_renews_when_the_bundle_cannot_be_pulled(make_ca, clock, tmp_path):
    ca = make_ca("just-me")
    membership = join_in_process(ca, tmp_path / "member", clock)
    link = DirectLink(ca, membership)
    old = membership.leaf()
    link.bundle_down = True

    not_due = await member_pass(membership, link, clock)
    assert not_due.outcome == "failed" and not not_due.reachable
    assert link.renewals_asked == 0, "nothing is due, so only the bundle was tried"

    clock.advance(61 * DAY)
    renewed = await member_pass(membership, link, clock)

    assert renewed.outcome == "renewed" and renewed.reachable
    assert renewed.detail == f"bundle pull: CA unreachable: {OUTAGE}"
    assert membership.leaf().fingerprint != old.fingerprint
    assert ca.roster.find("node-02").cert_fingerprint == membership.leaf().fingerprint

    link.renew_down = True
    clock.advance(61 * DAY)
    both = await member_pass(membership, link, clock)
    assert both.outcome == "failed" and not both.reachable and link.renewals_asked == 2
    assert both.detail == f"CA unreachable: {OUTAGE}"


@pytest.mark.asyncio
async def test_a_member_that_knows_it_is_revoked_never_renews(make_ca, clock, tmp_path):
    ca = make_ca("just-me")
    membership = join_in_process(ca, tmp_path / "member", clock)
    membership.save(replace(membership.state, self_revoked=True))  # from an earlier bundle
    link = DirectLink(ca, membership)
    link.bundle_down = True
    clock.advance(61 * DAY)

    result = await member_pass(membership, link, clock)

    assert result.outcome == "revoked" and "unreachable" in result.detail
    assert link.renewals_asked == 0


async def _ca_and_member(tmp_path: Path) -> tuple[Node, Node]:
    def config(name: str) -> NodeConfig:
        return loopback_config(tmp_path / name, name)

    ca_node = Node(config("ca-host"), deny_and_log_decider(), kdf=keystore.FAST_TEST_KDF)
    await ca_node.start()
    await ca_node.create_ca(PASSPHRASE, "just-me", "Alice")
    member = Node(config("node-02"), deny_and_log_decider())
    await member.start()
    invite = ca_node.ca.mint_invite("node-02")
    url = f"http://127.0.0.1:{ca_node.address('http')[1]}"
    await member.join_mesh(url, invite.code, lambda code: None)
    return ca_node, member


def _write_script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.mark.asyncio
async def test_reload_hook_results_and_bundle_updates_reach_the_snapshot(tmp_path, caplog):
    ca_node, member = await _ca_and_member(tmp_path)
    marker = tmp_path / "reloaded.txt"
    hook = _write_script(tmp_path / "reload", f"echo renewed >> {marker}\necho nginx reloaded\n")
    await member.set_hook("node-02", hook)
    try:
        first = await member.renew_now(force=True)
        snapshot = member.status.snapshot
        assert first["outcome"] == "renewed" and marker.read_text() == "renewed\n"
        ran = snapshot.renewal.last_hook
        assert (ran.command, ran.success, ran.output) == (hook, True, "nginx reloaded")
        assert snapshot.to_json()["renewal"]["last_hook"]["output"] == "nginx reloaded"

        _write_script(tmp_path / "reload", "echo 'nginx: bad config' >&2\nexit 3\n")
        before = member.membership.leaf().fingerprint
        with caplog.at_level(logging.INFO, logger="koi_tray.compose.renewal"):
            second = await member.renew_now(force=True)
        snapshot = member.status.snapshot

        assert second["outcome"] == "renewed", "a failed hook does not undo the renewal"
        assert member.membership.leaf().fingerprint != before
        assert snapshot.renewal.last_outcome == "renewed"
        assert snapshot.renewal.consecutive_failures == 0 and snapshot.health == "ok"
        assert not snapshot.renewal.last_hook.success
        assert snapshot.renewal.last_hook.output == "nginx: bad config"
        assert "reload hook failed: nginx: bad config" in snapshot.renewal.last_detail

        # The first renewal moved the CA's roster on; the second pass pulled that bundle.
        pulled = snapshot.renewal.last_bundle
        assert pulled.updated and pulled.updated_at == dt.datetime.fromisoformat(
            second["checked_at"]
        )
        updated_to = f"trust bundle from 127.0.0.1 updated to seq {pulled.seq}"
        assert updated_to in caplog.text
        seq_now = ca_node.ca.roster.seq
        third = await member.renew_now(force=False)
        assert third["outcome"] == "not_due"
        pulled_again = member.status.snapshot.renewal.last_bundle
        assert pulled_again.seq == seq_now and pulled_again.updated is (seq_now != pulled.seq)
        if not pulled_again.updated:
            assert pulled_again.updated_at == pulled.updated_at
        on_disk = RenewalRecord(member.data.certmesh / "renewal.json").view
        assert on_disk.last_hook == snapshot.renewal.last_hook
    finally:
        await member.shutdown()
        await ca_node.shutdown()


async def _run_node_passes(node: Node, clock: ManualClock, until: dt.datetime, on_pass=None):
    """Drive the node's passes at their published times until `until`.

    A snapshot is taken just before each pass too, so the moment a leaf falls due and
    waits for its pass is seen.
    """
    for _ in range(500):  # the loop's own first pass, which runs at start
        if node.renewal.record.view.next_check_at is not None:
            break
        await asyncio.sleep(0.01)
    while clock.now() < until:
        clock.set(node.renewal.record.view.next_check_at)
        node.status.refresh()
        result = await node.renew_now(False)
        if on_pass is not None:
            on_pass(result)


def _collect_alerts(node: Node) -> list:
    from koi_tray.compose.status import alerts_between

    alerts: list = []
    node.status.subscribe(lambda new, old: alerts.extend(alerts_between(old, new)))
    return alerts


@pytest.mark.asyncio
async def test_routine_renewals_raise_no_notification(make_ca, clock, tmp_path):
    ca = make_ca("just-me")
    join_in_process(ca, tmp_path / "member", clock)
    node = member_node(tmp_path, clock, lambda membership: DirectLink(ca, membership))
    alerts = _collect_alerts(node)
    outcomes: list[str] = []
    await node.start()
    try:
        await _run_node_passes(
            node, clock, START + 130 * DAY, lambda r: outcomes.append(r["outcome"])
        )
    finally:
        await node.shutdown()

    assert outcomes.count("renewed") == 2, "two routine renewals happened"
    assert alerts == []


@pytest.mark.asyncio
async def test_a_failing_renewal_warns_at_30_14_7_and_1_days_once_each(make_ca, clock, tmp_path):
    ca = make_ca("just-me")
    join_in_process(ca, tmp_path / "member", clock)
    links: list[DirectLink] = []
    outage = {"on": True}

    def link_for(membership):
        link = DirectLink(ca, membership)
        link.down = outage["on"]
        links.append(link)
        return link

    node = member_node(tmp_path, clock, link_for)
    alerts = _collect_alerts(node)
    clock.set(START + 55 * DAY)
    await node.start()
    try:
        expires = node.membership.leaf().cert.not_valid_after_utc
        await _run_node_passes(node, clock, expires - 2 * HOUR)
        during = list(alerts)
        outage["on"] = False
        await _run_node_passes(node, clock, clock.now() + 3 * DAY)
    finally:
        await node.shutdown()

    expiring = [a.title for a in during if a.kind == "expiring"]
    assert expiring == [
        "Certificate expires in 29 day(s)",
        "Certificate expires in 14 day(s)",
        "Certificate expires in 7 day(s)",
        "Certificate expires in 1 day(s)",
    ]
    assert [a.kind for a in during].count("renewal_failed") == 1
    assert alerts[len(during) :] == [], "recovery is routine: no alert"


@pytest.mark.asyncio
async def test_revocation_is_announced_once(make_ca, clock, tmp_path):
    ca = make_ca("just-me")
    join_in_process(ca, tmp_path / "member", clock)
    node = member_node(tmp_path, clock, lambda membership: DirectLink(ca, membership))
    alerts = _collect_alerts(node)
    await node.start()
    try:
        await _run_node_passes(node, clock, clock.now() + 2 * HOUR)
        ca.revoke("node-02")
        await _run_node_passes(node, clock, START + 80 * DAY)
        snapshot = node.status.refresh()
    finally:
        await node.shutdown()

    assert [a.kind for a in alerts] == ["revoked"]
    assert snapshot.health == "critical" and snapshot.renewal.last_outcome == "revoked"


def _member_snapshot(days_left: float, reachable: bool):
    from koi_tray.compose.status import LeafView, NodeSnapshot, RenewalView

    not_after = START + dt.timedelta(days=days_left)
    leaf = LeafView(
        "node-02", "ab" * 32, not_after, not_after - 30 * DAY, int(days_left), days_left <= 0
    )
    renewal = RenewalView(
        last_check_at=START - dt.timedelta(minutes=5),
        last_outcome="renewed" if reachable else "failed",
        consecutive_failures=0 if reachable else 4,
        ca_reachable=reachable,
    )
    return NodeSnapshot("member", "node-02", START, leaf=leaf, renewal=renewal)


@pytest.mark.parametrize(
    ("days_left", "reachable", "health"),
    [
        (60, True, "ok"),
        (60, False, "offline"),
        (31, False, "offline"),
        (29, False, "attention"),
        (3, False, "attention"),
        (0, False, "critical"),
        (20, True, "attention"),
    ],
)
def test_an_unreachable_ca_looks_offline_only_until_the_leaf_is_due(days_left, reachable, health):
    assert _member_snapshot(days_left, reachable).health == health


def test_a_stopped_loop_warns_of_expiry_as_soon_as_the_leaf_is_due():
    healthy = _member_snapshot(31, True)
    due = _member_snapshot(29, True)
    stopped = dataclasses.replace(
        due,
        renewal=dataclasses.replace(
            due.renewal,
            last_check_at=START - 3 * DAY,  # the last pass ran before the leaf fell due
            last_renewed_at=START - 61 * DAY,
            loop_stopped=True,
        ),
    )

    from koi_tray.compose.status import alerts_between

    alerts = alerts_between(dataclasses.replace(healthy, renewal=stopped.renewal), stopped)

    assert stopped.renewal_overdue
    assert [(a.kind, a.title) for a in alerts] == [("expiring", "Certificate expires in 29 day(s)")]


@pytest.mark.asyncio
async def test_the_ca_renews_its_own_leaf_when_due_across_simulated_days(make_ca, clock):
    ca = make_ca("just-me")
    first = ca.leaf_store.read()
    end = START + 200 * DAY
    ended = asyncio.Event()
    published: list[PassResult] = []
    on_disk: list[dt.datetime] = []

    async def sleep(seconds: float) -> None:
        clock.advance(dt.timedelta(seconds=seconds))
        assert ca.leaf_store.read().cert.not_valid_after_utc > clock.now(), "the leaf expired"
        if clock.now() >= end:
            ended.set()
            await asyncio.Event().wait()

    def seen(result: PassResult) -> None:
        published.append(result)
        if result.outcome == "renewed":
            on_disk.append(ca.leaf_store.read().cert.not_valid_after_utc)

    loop = RenewalLoop(
        lambda force: ca_pass(ca, clock, force),
        RenewalRecord(ca.data.certmesh / "renewal.json"),
        clock,
        sleep=sleep,
        rng=random.Random(5),
        on_result=seen,
    )
    task = asyncio.create_task(loop.run())
    await asyncio.wait_for(ended.wait(), 60)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    renewals = [r for r in published if r.outcome == "renewed"]
    gaps = [(b.checked_at - a.checked_at) / DAY for a, b in itertools.pairwise(renewals)]
    assert len(renewals) == 3 and all(59 <= gap <= 61.5 for gap in gaps), gaps
    assert on_disk == [r.expires for r in renewals]
    assert {r.outcome for r in published} == {"not_due", "renewed"}
    leaf = ca.leaf_store.read()
    assert leaf.fingerprint != first.fingerprint
    assert ca.roster.find("ca-host").cert_fingerprint == leaf.fingerprint


@pytest.mark.asyncio
async def test_shutdown_returns_within_its_bound_when_a_stage_hangs(tmp_path):
    import aiohttp
    from koitest import member_csr

    asked = asyncio.Event()
    released = asyncio.Event()

    async def stubborn(request):  # a decider that ignores being cancelled
        asked.set()
        while not released.is_set():
            try:
                await released.wait()
            except asyncio.CancelledError:
                continue

    config = NodeConfig(
        data_dir=tmp_path / "ca-host",
        hostname="ca-host",
        http_port=0,
        mtls_port=0,
        mtls_bind="127.0.0.1",
        shutdown_timeout=0.5,
    )
    node = Node(config, stubborn, kdf=keystore.FAST_TEST_KDF)
    await node.start()
    await node.create_ca(PASSPHRASE, "team", "Alice")
    invite = node.ca.mint_invite("node-02")
    _, csr = member_csr("node-02")
    url = f"http://127.0.0.1:{node.address('http')[1]}/v1/certmesh/join"
    async with aiohttp.ClientSession() as session:
        body = {"hostname": "node-02", "csr": csr, "invite_token": invite.code}
        joining = asyncio.ensure_future(session.post(url, json=body))
        await asyncio.wait_for(asked.wait(), 5)

        began = time.monotonic()
        await node.shutdown()
        took = time.monotonic() - began

        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(url.replace("/join", "/status"))  # the listener is closed
        successor = Node(config, deny_and_log_decider())
        await successor.start()  # the data-dir lock was released
        await successor.shutdown()
        released.set()
        try:
            response = await joining
        except aiohttp.ClientError:
            pass  # the join's connection was closed with its listener
        else:
            assert response.status == 403, "the waiting join was answered denied"
        assert not node.ca.roster.is_enrolled("node-02")

    assert took < 0.5 + 1.0 + 0.5, f"shutdown took {took:.2f} s with a 0.5 s bound"
