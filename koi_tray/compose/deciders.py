"""Approval deciders for hosts without a dialog: deny-and-log, the console, and an adapter.

A decider is an async callable from `ApprovalRequest` to `Approved` or `Denied`. Whatever
a decider does wrong (raises, hangs past the deadline, answers something else), the
certmesh core refuses the join; these deciders only decide.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import TextIO

from koi_tray.certmesh.approval import ApprovalRequest, Approved, Decider, Decision, Denied

log = logging.getLogger(__name__)


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


def blocking_decider(func: Callable[[ApprovalRequest], Decision]) -> Decider:
    """Run a blocking decision function in the loop's executor.

    If the deadline passes first, the join is refused; the thread may still be running
    and its late answer is ignored (a thread cannot be interrupted).
    """

    async def decide(request: ApprovalRequest) -> Decision:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, func, request)

    return decide


def console_prompt(request: ApprovalRequest, stdin: TextIO, stderr: TextIO) -> Decision:
    """Ask on the terminal: show who asks, then an operator name; only `y`/`yes` approves."""
    stderr.write(
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
    stderr.flush()
    answer = stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        return Denied("denied at the console")
    stderr.write("Operator name: ")
    stderr.flush()
    operator = stdin.readline().strip()
    if not operator:
        return Denied("no operator name given at the console")
    return Approved(operator)


def console_decider(stdin: TextIO | None = None, stderr: TextIO | None = None) -> Decider:
    """Ask on the terminal, one request at a time, off the event loop."""
    turn = asyncio.Lock()
    prompt = blocking_decider(
        lambda request: console_prompt(request, stdin or sys.stdin, stderr or sys.stderr)
    )

    async def decide(request: ApprovalRequest) -> Decision:
        async with turn:
            return await prompt(request)

    return decide
