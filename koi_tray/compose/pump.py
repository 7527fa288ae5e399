"""The approval pump: joins waiting for a person, handed to the host's decider.

The node's `enroll` asks `ApprovalPump.decide`, which queues the request; the pump task
hands queued requests to the decider, several at once up to a bound. Each request ends at
its own deadline (enforced by `enroll`). When the pump stops, every request still queued
or being decided is answered `Denied`, so shutting down never approves anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from koi_tray.certmesh.approval import ApprovalRequest, Decider, Decision, Denied

log = logging.getLogger(__name__)

SHUTDOWN_REASON = "the node is shutting down"

Answer = asyncio.Future[Decision]


class ApprovalPump:
    """Owns the queue of pending approvals and the tasks that decide them."""

    def __init__(
        self,
        decider: Decider,
        max_concurrent: int = 8,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.decider = decider
        self._queue: asyncio.Queue[tuple[ApprovalRequest, asyncio.Future[Decision]]] = (
            asyncio.Queue()
        )
        self._slots = asyncio.Semaphore(max_concurrent)
        self._pending: dict[str, tuple[ApprovalRequest, asyncio.Future[Decision]]] = {}
        self._deciding: set[asyncio.Task[None]] = set()
        self._closed = False
        self._on_change = on_change or (lambda: None)

    @property
    def pending(self) -> list[ApprovalRequest]:
        """Requests waiting for a decision, oldest first."""
        return [request for request, _ in self._pending.values()]

    async def decide(self, request: ApprovalRequest) -> Decision:
        """Queue `request` and wait for its decision (the certmesh `Decider` signature)."""
        if self._closed:
            return Denied(SHUTDOWN_REASON)
        answer: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = (request, answer)
        self._queue.put_nowait((request, answer))
        self._on_change()
        try:
            return await answer
        finally:
            self._pending.pop(request.request_id, None)
            if not answer.done():
                answer.cancel()
            self._on_change()

    async def run(self) -> None:
        """Hand queued requests to the decider until cancelled; then deny the rest."""
        try:
            while True:
                request, answer = await self._queue.get()
                if answer.done():
                    continue
                await self._slots.acquire()
                task = asyncio.create_task(
                    self._decide_one(request, answer), name=f"approval-{request.request_id}"
                )
                self._deciding.add(task)
                task.add_done_callback(self._deciding.discard)
        finally:
            await self.close()

    async def _decide_one(self, request: ApprovalRequest, answer: Answer) -> None:
        decision_task = asyncio.ensure_future(self.decider(request))
        answer.add_done_callback(lambda _: decision_task.cancel())
        try:
            decision = await decision_task
        except asyncio.CancelledError:
            if not answer.done():
                answer.set_result(Denied(SHUTDOWN_REASON))
            if asyncio.current_task().cancelling():
                raise
            return
        except Exception as exc:  # a failing decider must never leave the join hanging
            log.warning("approval decider failed for %s: %r", request.hostname, exc)
            log.debug("decider traceback", exc_info=True)
            if not answer.done():
                answer.set_exception(exc)
            return
        finally:
            self._slots.release()
        if not answer.done():
            answer.set_result(decision)

    async def close(self, grace: float = 2.0) -> None:
        """Deny everything pending and stop deciding. Safe to call more than once.

        Every waiting join is answered at once; the deciders are then cancelled and given
        `grace` seconds to stop. One that ignores cancellation is left behind (still
        held here) with a warning, so it cannot hold up a shutdown.
        """
        self._closed = True
        for _, answer in list(self._pending.values()):
            if not answer.done():
                answer.set_result(Denied(SHUTDOWN_REASON))
        while not self._queue.empty():
            _, answer = self._queue.get_nowait()
            if not answer.done():
                answer.set_result(Denied(SHUTDOWN_REASON))
        tasks = list(self._deciding)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        # `wait`, not `gather`: a caller giving up on this close (the shutdown bound)
        # is not held back by a decider that ignores being cancelled.
        _, stuck = await asyncio.wait(tasks, timeout=grace)
        if stuck:
            log.warning(
                "%d approval decider(s) did not stop within %.0f s of being cancelled (%s); "
                "shutting down without them",
                len(stuck),
                grace,
                ", ".join(sorted(task.get_name() for task in stuck)),
            )
