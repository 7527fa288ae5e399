"""What a person (or a policy) is asked when a host wants to join, and what they answer.

A decider is an async callable taking an `ApprovalRequest` and returning `Approved` or
`Denied`. The certmesh core treats anything else (an exception, a late answer, an
`Approved` without an operator name where one is required) as a refusal.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

APPROVAL_TIMEOUT = dt.timedelta(seconds=300)


@dataclass(frozen=True)
class ApprovalRequest:
    """Everything the approver sees about one join waiting for a decision."""

    request_id: str
    hostname: str
    requires_approval: bool
    peer_address: str | None
    sans: tuple[str, ...]
    invite_hostname: str
    invite_age: dt.timedelta | None
    key_fingerprint: str
    confirmation_code: str
    received_at: dt.datetime
    deadline: dt.datetime

    def seconds_left(self, now: dt.datetime) -> float:
        return max(0.0, (self.deadline - now).total_seconds())

    def to_json(self) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "hostname": self.hostname,
            "peer_address": self.peer_address,
            "sans": list(self.sans),
            "invite_hostname": self.invite_hostname,
            "invite_age_seconds": None
            if self.invite_age is None
            else int(self.invite_age.total_seconds()),
            "key_fingerprint": self.key_fingerprint,
            "confirmation_code": self.confirmation_code,
            "received_at": self.received_at.isoformat(),
            "deadline": self.deadline.isoformat(),
        }


@dataclass(frozen=True)
class Approved:
    operator: str


@dataclass(frozen=True)
class Denied:
    reason: str = "denied by the operator"


Decision = Approved | Denied
Decider = Callable[[ApprovalRequest], Awaitable[Decision]]
