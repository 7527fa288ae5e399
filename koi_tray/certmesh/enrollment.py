"""A join from arrival to answer: checks, then (only if the posture says so) a person.

`enroll` runs the CA's checks, asks the decider under the request's own deadline without
holding any lock, and records the member only on an `Approved` with an operator name.
Every other ending (denied, timed out, a decider that raises or answers nonsense, the
task cancelled at shutdown) refuses the join, releases the invite and is audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from koi_tray.certmesh.approval import Approved, Decider, Denied
from koi_tray.certmesh.ca import CertificateAuthority, JoinRequest, JoinResult, PendingJoin
from koi_tray.certmesh.errors import ApprovalDenied, ApprovalTimeout, ApprovalUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
Runner = Callable[..., Awaitable[Any]]


_COMMITS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="certmesh-commit")


async def run_in_thread(func: Callable[..., T], *args: Any) -> T:
    """Run a blocking certmesh call in the loop's default executor."""
    return await asyncio.get_running_loop().run_in_executor(None, func, *args)


async def run_to_end(func: Callable[..., T], *args: Any) -> T:
    """Run blocking work in the default executor and see it finish even if cancelled.

    Work such as writing a new CA's files cannot be stopped half-way from the loop. A
    task cancelled while it runs waits for it and then re-raises the cancellation, so
    whatever the task releases afterwards (a lock, the data dir) is released once the
    files are whole.
    """
    future = asyncio.get_running_loop().run_in_executor(None, func, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({future})
        raise


async def run_commit(func: Callable[..., T], *args: Any) -> T:
    """Run a roster commit on the one commit thread.

    Commits serialise on the CA's roster lock anyway; giving them their own thread keeps
    them from filling the default executor, where new joins run their checks, so a burst
    of commits does not delay the next join's approval request.
    """
    return await asyncio.get_running_loop().run_in_executor(_COMMITS, func, *args)


async def enroll(
    ca: CertificateAuthority,
    join: JoinRequest,
    decider: Decider | None,
    *,
    run: Runner = run_in_thread,
    commit: Runner = run_commit,
) -> JoinResult:
    """Take one join from its checks to a signed leaf, or to a refusal.

    Raises:
        CertmeshError: The first failed check, or ApprovalDenied / ApprovalTimeout /
            ApprovalUnavailable. asyncio.CancelledError propagates after the join has
            been refused and audited.
    """
    pending = await _checked(ca, join, run)
    request = pending.request
    if not request.requires_approval:
        return await commit(ca.finish_join, pending, None)

    if decider is None:
        detail = "no approver is attached"
        await run(ca.abandon_join, pending, "enroll_approval_unavailable", detail)
        raise ApprovalUnavailable("joins need approval but no approver is attached to this CA")

    timeout = request.seconds_left(ca.clock.now())
    try:
        decision = await asyncio.wait_for(decider(request), timeout)
    except TimeoutError:
        detail = f"no decision within {timeout:.0f} s"
        await run(ca.abandon_join, pending, "enroll_approval_timeout", detail)
        raise ApprovalTimeout(f"no one approved {request.hostname} in time") from None
    except asyncio.CancelledError:
        detail = "cancelled: the joining host hung up, or shutdown"
        await run_to_end(ca.abandon_join, pending, "enroll_approval_denied", detail)
        raise
    except Exception as exc:
        log.debug("approval decider raised for %s", request.hostname, exc_info=True)
        detail = f"the approver failed: {exc!r}"
        await run(ca.abandon_join, pending, "enroll_approval_denied", detail)
        raise ApprovalDenied("the join was not approved (the approver failed)") from exc

    if isinstance(decision, Approved) and isinstance(decision.operator, str):
        operator = decision.operator.strip()
        if operator:
            return await commit(ca.finish_join, pending, operator)
        reason = "approved without an operator name"
    elif isinstance(decision, Denied):
        reason = decision.reason or "denied"
    else:
        reason = f"the approver answered {type(decision).__name__}, not a decision"

    await run(ca.abandon_join, pending, "enroll_approval_denied", reason)
    raise ApprovalDenied(f"the join of {request.hostname} was denied: {reason}")


async def _checked(ca: CertificateAuthority, join: JoinRequest, run: Runner) -> PendingJoin:
    """Run the CA's checks; a join cancelled meanwhile still lets go of what they hold.

    The checks run on a worker thread that cancellation cannot stop, and on success they
    have reserved the invite and registered the join as pending. A joiner that hangs up
    during them must not leave either behind, or the invite stays unusable until restart.
    """
    checks = asyncio.ensure_future(run(ca.check_join, join))
    try:
        return await asyncio.shield(checks)
    except asyncio.CancelledError:
        checks.add_done_callback(lambda done: _abandon_cancelled(ca, done))
        raise


_ABANDONING: set[asyncio.Future[None]] = set()
"""Refusals of joins whose task was already gone, running on the executor until done."""


def _abandon_cancelled(ca: CertificateAuthority, checks: asyncio.Future[PendingJoin]) -> None:
    if checks.cancelled() or checks.exception() is not None:
        return
    pending = checks.result()
    detail = "cancelled: the joiner hung up"
    loop = asyncio.get_running_loop()
    refusal = loop.run_in_executor(None, ca.abandon_join, pending, "enroll_approval_denied", detail)
    _ABANDONING.add(refusal)
    refusal.add_done_callback(lambda done: _abandoned(done, pending.request.hostname))


def _abandoned(refusal: asyncio.Future[None], hostname: str) -> None:
    _ABANDONING.discard(refusal)
    if not refusal.cancelled() and refusal.exception() is not None:
        log.warning("could not refuse the cancelled join of %s: %s", hostname, refusal.exception())
