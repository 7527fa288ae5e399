"""The approval pump and the headless deciders: bounded, deadline-bound, never approving."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import logging

import pytest
from koitest import START

from koi_tray.certmesh.approval import ApprovalRequest, Approved, Denied
from koi_tray.compose.deciders import (
    blocking_decider,
    console_decider,
    console_prompt,
    deny_and_log_decider,
)
from koi_tray.compose.pump import SHUTDOWN_REASON, ApprovalPump


def request(n: int = 1, hostname: str = "node-02") -> ApprovalRequest:
    return ApprovalRequest(
        request_id=f"req{n}",
        hostname=hostname,
        requires_approval=True,
        peer_address="192.0.2.7",
        sans=(hostname, f"{hostname}.local"),
        invite_hostname=hostname,
        invite_age=dt.timedelta(minutes=3),
        key_fingerprint="ab" * 32,
        confirmation_code="123 456",
        received_at=START,
        deadline=START + dt.timedelta(seconds=300),
    )


async def _run_pump(pump: ApprovalPump) -> asyncio.Task[None]:
    task = asyncio.create_task(pump.run())
    await asyncio.sleep(0)
    return task


@pytest.mark.asyncio
async def test_pump_decides_several_at_once_up_to_its_bound():
    in_flight = 0
    most = 0
    release = asyncio.Event()

    async def slow_decider(req: ApprovalRequest):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        in_flight -= 1
        return Approved(f"op-{req.request_id}")

    pump = ApprovalPump(slow_decider, max_concurrent=3)
    task = await _run_pump(pump)
    waits = [asyncio.create_task(pump.decide(request(n))) for n in range(6)]
    await asyncio.sleep(0.05)

    assert most == 3
    assert len(pump.pending) == 6
    release.set()
    decisions = await asyncio.gather(*waits)
    assert decisions == [Approved(f"op-req{n}") for n in range(6)]
    assert pump.pending == []
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.asyncio
async def test_closing_the_pump_denies_everything_pending_and_queued():
    started = asyncio.Event()

    async def never(req: ApprovalRequest):
        started.set()
        await asyncio.Event().wait()

    pump = ApprovalPump(never, max_concurrent=1)
    task = await _run_pump(pump)
    waits = [asyncio.create_task(pump.decide(request(n))) for n in range(3)]
    await started.wait()

    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    assert await asyncio.gather(*waits) == [Denied(SHUTDOWN_REASON)] * 3
    assert await pump.decide(request(9)) == Denied(SHUTDOWN_REASON)


@pytest.mark.asyncio
async def test_a_caller_giving_up_cancels_the_deciders_work():
    cancelled = asyncio.Event()

    async def watcher(req: ApprovalRequest):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    pump = ApprovalPump(watcher)
    task = await _run_pump(pump)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pump.decide(request()), 0.05)

    await asyncio.wait_for(cancelled.wait(), 1)
    assert pump.pending == []
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.asyncio
async def test_a_raising_decider_reaches_the_caller_as_an_error():
    async def broken(req: ApprovalRequest):
        raise RuntimeError("dialog crashed")

    pump = ApprovalPump(broken)
    task = await _run_pump(pump)
    with pytest.raises(RuntimeError, match="dialog crashed"):
        await pump.decide(request())
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.asyncio
async def test_deny_and_log_never_approves_and_says_what_to_do(caplog):
    decide = deny_and_log_decider()
    with caplog.at_level(logging.WARNING):
        decision = await decide(request())
    assert isinstance(decision, Denied)
    assert "node-02" in caplog.text and "192.0.2.7" in caplog.text
    assert "--approval console" in caplog.text


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("y\nAlice\n", Approved("Alice")),
        ("yes\n  Bob  \n", Approved("Bob")),
        ("Y\nCarol\n", Approved("Carol")),
        ("y\n\n", Denied("no operator name given at the console")),
        ("n\nAlice\n", Denied("denied at the console")),
        ("\n", Denied("denied at the console")),
        ("", Denied("denied at the console")),
        ("yep\nAlice\n", Denied("denied at the console")),
    ],
)
def test_console_prompt_approves_only_yes_with_a_name(typed, expected):
    shown = io.StringIO()
    assert console_prompt(request(), io.StringIO(typed), shown) == expected
    assert "123 456" in shown.getvalue()
    assert "192.0.2.7" in shown.getvalue()


@pytest.mark.asyncio
async def test_console_decider_asks_off_the_loop_one_request_at_a_time():
    stdin = io.StringIO("y\nAlice\nn\n")
    shown = io.StringIO()
    decide = console_decider(stdin, shown)

    first, second = await asyncio.gather(decide(request(1)), decide(request(2, "node-03")))

    assert first == Approved("Alice")
    assert second == Denied("denied at the console")
    text = shown.getvalue()
    assert text.index("node-02") < text.index("node-03")


@pytest.mark.asyncio
async def test_blocking_decider_runs_in_a_thread_and_keeps_the_loop_free():
    import threading
    import time

    loop_thread = threading.get_ident()
    seen = []

    def slow(req: ApprovalRequest):
        seen.append(threading.get_ident())
        time.sleep(0.2)
        return Approved("Dana")

    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    decision = await blocking_decider(slow)(request())
    tick_task.cancel()

    assert decision == Approved("Dana")
    assert seen and seen[0] != loop_thread
    assert ticks >= 10, "the loop stalled while the blocking decider ran"
