"""The approval pump and the headless deciders: bounded, deadline-bound, never approving."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import logging
import os
import signal
import sys
import threading
import time

import aiohttp
import pytest
from koitest import PASSPHRASE, START, member_csr

from koi_tray.certmesh import keystore
from koi_tray.certmesh.approval import ApprovalRequest, Approved, Denied
from koi_tray.certmesh.ca import PRESETS, CertificateAuthority
from koi_tray.certmesh.enrollment import run_in_thread
from koi_tray.certmesh.layout import DataDir
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.deciders import (
    DECIDER_THREADS,
    ConsoleDecider,
    DaemonThreads,
    blocking_decider,
    console_decider,
    deny_and_log_decider,
)
from koi_tray.compose.node import Node
from koi_tray.compose.pump import SHUTDOWN_REASON, ApprovalPump


def request(
    n: int = 1, hostname: str = "node-02", deadline: dt.datetime | None = None
) -> ApprovalRequest:
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
        deadline=deadline or START + dt.timedelta(seconds=300),
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


class Console:
    """A real pipe standing in for the terminal's input, and a buffer for what is shown."""

    def __init__(self) -> None:
        read_fd, self._write_fd = os.pipe()
        self.stdin = os.fdopen(read_fd, "r")
        self.shown = io.StringIO()
        self.decider = console_decider(self.stdin, self.shown)
        assert isinstance(self.decider, ConsoleDecider)
        self._open = True

    def type(self, text: str) -> None:
        os.write(self._write_fd, text.encode())

    def hang_up(self) -> None:
        if self._open:
            os.close(self._write_fd)
            self._open = False

    async def shows(self, text: str, times: int = 1) -> None:
        for _ in range(500):
            if self.shown.getvalue().count(text) >= times:
                return
            await asyncio.sleep(0.01)
        shown = self.shown.getvalue()
        raise AssertionError(f"the console never showed {text!r} {times}×: {shown}")

    def close(self) -> None:
        self.hang_up()
        reader = self.decider.input._thread
        if reader is not None:
            reader.join(5)
        self.stdin.close()


@pytest.fixture
def console():
    console = Console()
    yield console
    console.close()


QUESTION = "Approve this join? [y/N] "


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("y\nAlice\n", Approved("Alice")),
        ("yes\n  Bob  \n", Approved("Bob")),
        ("Y\nCarol\n", Approved("Carol")),
        ("y\n\n", Denied("no operator name given at the console")),
        ("n\nAlice\n", Denied("denied at the console")),
        ("\n", Denied("denied at the console")),
        ("yep\nAlice\n", Denied("denied at the console")),
        (None, Denied("denied at the console")),  # the input ends: nobody is there
    ],
)
@pytest.mark.asyncio
async def test_console_approves_only_yes_with_a_name(console: Console, typed, expected):
    deciding = asyncio.create_task(console.decider(request()))
    await console.shows(QUESTION)
    if typed is None:
        console.hang_up()
    else:
        console.type(typed)

    assert await asyncio.wait_for(deciding, 5) == expected
    assert "123 456" in console.shown.getvalue()
    assert "192.0.2.7" in console.shown.getvalue()


@pytest.mark.asyncio
async def test_console_decider_asks_one_request_at_a_time(console: Console):
    both = asyncio.gather(console.decider(request(1)), console.decider(request(2, "node-03")))
    await console.shows(QUESTION)
    assert "node-03" not in console.shown.getvalue(), "the second question waits its turn"
    console.type("y\nAlice\n")
    await console.shows(QUESTION, times=2)
    console.type("n\n")

    first, second = await asyncio.wait_for(both, 5)

    assert first == Approved("Alice")
    assert second == Denied("denied at the console")
    text = console.shown.getvalue()
    assert text.index("node-02") < text.index("node-03")


@pytest.mark.asyncio
async def test_a_timed_out_question_is_withdrawn_and_its_late_answer_goes_nowhere(
    console: Console,
):
    expired = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(console.decider(request(1, "node-02", expired)), 0.2)
    assert "the join of node-02 timed out and was refused" in console.shown.getvalue()

    console.type("y\nMallory\n")  # the late answer to the withdrawn question
    await asyncio.sleep(0.2)
    deciding = asyncio.create_task(console.decider(request(2, "node-03")))
    await console.shows(QUESTION, times=2)
    console.type("n\n")
    assert await asyncio.wait_for(deciding, 5) == Denied("denied at the console")

    deciding = asyncio.create_task(console.decider(request(3, "node-04")))
    await console.shows(QUESTION, times=3)
    console.type("yes\nBob\n")
    assert await asyncio.wait_for(deciding, 5) == Approved("Bob"), "the next line is its own"


@pytest.mark.asyncio
async def test_blocking_decider_runs_in_a_thread_and_keeps_the_loop_free():
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


@pytest.mark.asyncio
async def test_hung_blocking_decider_refuses_joins_and_never_starves_the_node(
    tmp_path, monkeypatch
):
    monkeypatch.setattr("koi_tray.certmesh.ca.APPROVAL_TIMEOUT", dt.timedelta(seconds=0.3))
    never = threading.Event()
    threads = DaemonThreads()

    def person_who_never_answers(req: ApprovalRequest):
        never.wait()
        return Approved("too late")

    ca_node = Node(
        NodeConfig(data_dir=tmp_path / "ca", hostname="ca-host", http_port=0, mtls_port=0),
        blocking_decider(person_who_never_answers, threads),
        kdf=keystore.FAST_TEST_KDF,
    )
    await ca_node.start()
    await ca_node.create_ca(PASSPHRASE, "team", "Alice")
    url = f"http://127.0.0.1:{ca_node.address('http')[1]}/v1/certmesh/join"
    try:
        async with aiohttp.ClientSession() as session:
            # More hung calls than the default executor has threads (min(32, CPUs + 4)).
            for batch in range(min(32, (os.cpu_count() or 1) + 4) // 6 + 1):
                names = [f"node-{batch}{n}" for n in range(6)]
                answers = await asyncio.gather(
                    *(_post_join(session, url, ca_node, h) for h in names)
                )
                assert answers == [(504, "approval_timeout")] * 6

        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.wait_for(run_in_thread(lambda: None), 5)
        assert loop.time() - began < 0.5, "the node's executor is starved by hung deciders"
        assert threads.started <= DECIDER_THREADS
    finally:
        never.set()
        await ca_node.shutdown()


async def _post_join(session, url: str, ca_node, hostname: str) -> tuple[int, str]:
    invite = ca_node.ca.mint_invite(hostname)
    _, csr = member_csr(hostname)
    body = {"hostname": hostname, "csr": csr, "invite_token": invite.code}
    async with session.post(url, json=body) as response:
        return response.status, (await response.json())["error"]


SERVE_SCRIPT = """
import asyncio, sys
from pathlib import Path
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.deciders import console_decider
from koi_tray.compose.hosts import serve

config = NodeConfig(data_dir=Path(sys.argv[1]), hostname="ca-host", http_port=0,
                    mtls_port=0, mtls_bind="127.0.0.1", host_kind="serve")
sys.exit(asyncio.run(serve(config, console_decider(), sys.argv[2])))
"""


@pytest.mark.asyncio
async def test_serve_exits_on_sigterm_while_the_console_waits_for_an_answer(tmp_path):
    data = DataDir(tmp_path / "ca-host")
    ca = CertificateAuthority.create(
        data, "ca-host", PASSPHRASE, PRESETS["team"], "Alice", kdf=keystore.FAST_TEST_KDF
    )
    invite = ca.mint_invite("node-02").code
    read_fd, write_fd = os.pipe()  # the terminal: open, and nobody types
    shown = tmp_path / "stderr.txt"
    with shown.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SERVE_SCRIPT,
            str(data.root),
            PASSPHRASE,
            stdin=read_fd,
            stderr=stderr,
            env={**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"},
        )
    os.close(read_fd)
    try:
        port = await _serving_port(data, process)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/v1/certmesh/join"
            _, csr = member_csr("node-02")
            body = {"hostname": "node-02", "csr": csr, "invite_token": invite}
            joining = asyncio.ensure_future(session.post(url, json=body))
            await _wait_for(lambda: QUESTION in shown.read_text(), "the console question")

            process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(process.wait(), 10)
            response = await joining
            assert response.status == 403
    finally:
        os.close(write_fd)
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert code == 0, shown.read_text()
    assert "Fatal Python error" not in shown.read_text()


async def _wait_for(condition, what: str, seconds: float = 10) -> None:
    for _ in range(int(seconds * 50)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def _serving_port(data: DataDir, process) -> int:
    """Wait until `serve` has unlocked its CA (the breadcrumb then names the mTLS port)."""
    crumb: dict = {}

    def ready() -> bool:
        nonlocal crumb
        if process.returncode is not None:
            raise AssertionError(f"serve exited early with {process.returncode}")
        try:
            crumb = json.loads(data.breadcrumb.read_text())
        except (OSError, ValueError):
            return False
        return crumb.get("mtls_port") is not None

    await _wait_for(ready, "serve to unlock its CA")
    return int(crumb["http"].rsplit(":", 1)[1])
