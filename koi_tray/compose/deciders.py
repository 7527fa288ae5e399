"""Approval deciders for hosts without a dialog: deny-and-log, the console, and an adapter.

A decider is an async callable from `ApprovalRequest` to `Approved` or `Denied`. Whatever
a decider does wrong (raises, hangs past the deadline, answers something else), the
certmesh core refuses the join; these deciders only decide.

Blocking work runs on `DaemonThreads`, never on the loop's default executor: a decision
function that hangs keeps one of its own few threads and cannot starve the node's file
and key work, nor keep the process alive at exit. The console decider reads its input
through one `ConsoleInput`, so an answer typed after a question was withdrawn is dropped
instead of answering the next one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from koi_tray.certmesh.approval import ApprovalRequest, Approved, Decider, Decision, Denied

log = logging.getLogger(__name__)

DECIDER_THREADS = 4
READ_CHUNK = 4096


def deny_and_log_decider() -> Decider:
    """Refuse every join that needs approval, with a warning that says what to do."""

    async def decide(request: ApprovalRequest) -> Decision:
        log.warning(
            "denied join of %s from %s: this node has no approver (run the tray, or "
            "'koi-tray serve --approval console' on a terminal)",
            request.hostname,
            request.peer_address or "?",
        )
        return Denied("this node denies joins that need approval")

    return decide


class DaemonThreads:
    """A few daemon worker threads for calls that may never return.

    Unlike `concurrent.futures.ThreadPoolExecutor`, nothing joins these threads at exit,
    so a call stuck forever (a person who never answers) cannot hold up the process.
    When every thread is stuck, new work waits in the queue; work cancelled while it
    waits is skipped.
    """

    def __init__(self, max_workers: int = DECIDER_THREADS, name: str = "decider") -> None:
        self.max_workers = max_workers
        self.name = name
        self._work: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[[], Any]]]
        self._work = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @property
    def started(self) -> int:
        """How many worker threads exist (they are started on demand)."""
        return len(self._threads)

    def submit(self, func: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Queue `func` for a worker thread and return its future."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._work.put((future, func))
        if self._idle.acquire(blocking=False):
            return future

        with self._lock:
            if len(self._threads) < self.max_workers:
                thread = threading.Thread(
                    target=self._serve,
                    name=f"{self.name}-{len(self._threads) + 1}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
            else:
                log.warning(
                    "all %d %s threads are busy (a blocking decider has not returned); "
                    "new work waits for one",
                    self.max_workers,
                    self.name,
                )
        return future

    def _serve(self) -> None:
        while True:
            future, func = self._work.get()
            if future.set_running_or_notify_cancel():
                try:
                    result = func()
                except BaseException as exc:  # handed to the waiting coroutine
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            self._idle.release()


def blocking_decider(
    func: Callable[[ApprovalRequest], Decision], threads: DaemonThreads | None = None
) -> Decider:
    """Run a blocking decision function on its own daemon threads.

    If the deadline passes first, the join is refused; the thread may still be running
    and its late answer is ignored (a thread cannot be interrupted). Hung calls occupy
    the decider's threads only, never the loop's default executor.
    """
    pool = threads or DaemonThreads()

    async def decide(request: ApprovalRequest) -> Decision:
        work = pool.submit(lambda: func(request))
        try:
            return await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            if not work.done():  # running: a thread cannot be interrupted
                work.add_done_callback(lambda _: _late_answer_ignored(request))
            raise

    return decide


def _late_answer_ignored(request: ApprovalRequest) -> None:
    log.info("a late answer for the join of %s was ignored", request.hostname)


def prompt_text(request: ApprovalRequest) -> str:
    """What the console shows for one join: who asks, from where, and the code to compare."""
    return (
        "\n== certmesh join needs approval ==\n"
        f"  host:              {request.hostname}\n"
        f"  from address:      {request.peer_address or 'unknown'}\n"
        f"  confirmation code: {request.confirmation_code}"
        "   (must match the code the joining host prints)\n"
        f"  key fingerprint:   {request.key_fingerprint}\n"
        f"  names (SANs):      {', '.join(request.sans)}\n"
        f"  invite for:        {request.invite_hostname}\n"
        "Approve this join? [y/N] "
    )


def says_yes(answer: str) -> bool:
    """Tell whether a typed answer approves: only `y` or `yes`, in any case."""
    return answer.strip().lower() in ("y", "yes")


class ConsoleInput:
    """The one reader of a console's input, feeding whole lines to the event loop.

    A daemon thread reads the input (from its file descriptor when it has one, so no
    Python lock is held while it blocks) and hands each line to the loop. Lines count
    only while a question is open; a line typed while none is, such as a late answer
    to a request that already timed out, is dropped.
    """

    def __init__(self, stdin: TextIO) -> None:
        self._stdin = stdin
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lines: asyncio.Queue[str] = asyncio.Queue()
        self._open = False
        self.eof = False

    def open_question(self) -> None:
        """Start collecting lines for a new question; anything typed before is dropped."""
        self._drain()
        self._open = True
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(
                target=self._read_forever, name="console-input", daemon=True
            )
            self._thread.start()

    def close_question(self) -> None:
        """Stop collecting; lines not yet read are dropped."""
        self._open = False
        self._drain()

    async def readline(self) -> str:
        """The next line typed for the open question; "" once the input has ended."""
        if self.eof and self._lines.empty():
            return ""
        return await self._lines.get()

    def _drain(self) -> None:
        dropped = 0
        while not self._lines.empty():
            if self._lines.get_nowait():
                dropped += 1
        if dropped:
            log.info("dropped %d console line(s) typed while no join was waiting", dropped)

    def _deliver(self, line: str) -> None:
        if not line:
            self.eof = True
        if self._open:
            self._lines.put_nowait(line)
        elif line:
            log.info("ignored console input: no join is waiting for an answer")

    def _read_forever(self) -> None:
        for line in self._lines_from_input():
            if not self._hand_over(line):
                return
        self._hand_over("")

    def _hand_over(self, line: str) -> bool:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, line)
        except RuntimeError:  # the loop has closed; nobody is asking any more
            return False
        return True

    def _lines_from_input(self) -> Iterator[str]:
        try:
            fd = self._stdin.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
        if fd is None:
            yield from iter(self._stdin.readline, "")
            return

        pending = b""
        while True:
            try:
                chunk = os.read(fd, READ_CHUNK)
            except OSError as exc:
                log.debug("console input ended: %s", exc)
                chunk = b""
            if not chunk:
                if pending:
                    yield pending.decode("utf-8", "replace")
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace") + "\n"


class ConsoleDecider:
    """Ask on the terminal, one request at a time, without blocking the loop.

    A request that times out, is withdrawn by its joiner or is denied at shutdown while
    its question is on screen withdraws the question and says so; the next line typed
    belongs to the next question.
    """

    def __init__(self, stdin: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.input = ConsoleInput(stdin or sys.stdin)
        self._stderr = stderr
        self._turn = asyncio.Lock()

    @property
    def stderr(self) -> TextIO:
        return self._stderr or sys.stderr

    async def __call__(self, request: ApprovalRequest) -> Decision:
        async with self._turn:
            self.input.open_question()
            try:
                return await self._ask(request)
            except asyncio.CancelledError:
                self._say(_withdrawn_text(request))
                raise
            finally:
                self.input.close_question()

    async def _ask(self, request: ApprovalRequest) -> Decision:
        self._say(prompt_text(request))
        if not says_yes(await self.input.readline()):
            return Denied("denied at the console")

        self._say("Operator name: ")
        operator = (await self.input.readline()).strip()
        if not operator:
            return Denied("no operator name given at the console")
        return Approved(operator)

    def _say(self, text: str) -> None:
        self.stderr.write(text)
        self.stderr.flush()


def _withdrawn_text(request: ApprovalRequest) -> str:
    if dt.datetime.now(dt.UTC) >= request.deadline:
        why = "timed out"
    else:
        why = "was withdrawn (the joiner hung up, or this node is shutting down)"
    return (
        f"\n-- the join of {request.hostname} {why} and was refused; "
        "what you type now answers the next request only --\n"
    )


def console_decider(stdin: TextIO | None = None, stderr: TextIO | None = None) -> Decider:
    """Ask on the terminal, one request at a time, off the event loop."""
    return ConsoleDecider(stdin, stderr)
