"""The renewal loop: pull the trust bundle, renew when due, publish every outcome.

A pass runs at start, then about hourly (±10 % jitter). After a failure the next pass
comes sooner: one minute, doubling per consecutive failure, capped at the hour. A member's
pass pulls the bundle first (an unreachable CA is a failure from the first attempt), then
renews if its leaf is due; a CA's pass re-issues the CA node's own leaf when due. The
record of passes is kept in `certmesh/renewal.json` so it survives restarts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from koi_tray.api.client import CaLink, CaUnreachable
from koi_tray.certmesh.ca import CertificateAuthority
from koi_tray.certmesh.clock import Clock
from koi_tray.certmesh.enrollment import run_in_thread
from koi_tray.certmesh.errors import CertmeshError, Revoked, StorageError
from koi_tray.certmesh.files import atomic_write_json, read_json
from koi_tray.certmesh.hooks import HookResult, run_reload_hook
from koi_tray.certmesh.member import Membership, due_at, new_renewal_request
from koi_tray.certmesh.timefmt import format_timestamp, parse_timestamp
from koi_tray.compose.status import RenewalView

log = logging.getLogger(__name__)

HISTORY_LIMIT = 200
FIRST_RETRY = 60.0


@dataclass(frozen=True)
class PassResult:
    """What one renewal pass did."""

    checked_at: dt.datetime
    outcome: str  # renewed | not_due | failed | revoked | not_applicable
    detail: str = ""
    expires: dt.datetime | None = None
    due_at: dt.datetime | None = None
    hook: HookResult | None = None
    bundle_seq: int | None = None
    bundle_updated: bool = False
    reachable: bool = True

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "checked_at": format_timestamp(self.checked_at),
            "outcome": self.outcome,
            "detail": self.detail,
            "reachable": self.reachable,
            "bundle_updated": self.bundle_updated,
        }
        if self.expires:
            out["expires"] = format_timestamp(self.expires)
        if self.due_at:
            out["due_at"] = format_timestamp(self.due_at)
        if self.hook:
            out["hook"] = self.hook.to_json()
        if self.bundle_seq is not None:
            out["bundle_seq"] = self.bundle_seq
        return out


def next_delay(failures: int, interval: float, rng: random.Random) -> float:
    """Seconds until the next pass: jittered interval, or backoff after failures."""
    if failures <= 0:
        return interval * rng.uniform(0.9, 1.1)
    backoff = min(interval, FIRST_RETRY * 2 ** (failures - 1))
    return backoff * rng.uniform(0.9, 1.1)


class RenewalRecord:
    """The persisted summary and recent history of renewal passes."""

    def __init__(self, path: Any) -> None:
        self.path = path
        self.view = RenewalView()
        self.history: list[PassResult] = []
        self._saved_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        raw = None
        try:
            raw = read_json(path)
        except CertmeshError as exc:
            log.warning("ignoring unreadable renewal record %s: %s", path, exc)
        if isinstance(raw, dict):
            self.view = _view_from_json(raw)

    def needs_saving(self, previous: RenewalView) -> bool:
        """Save when the outcome changed, or daily; a steady "not due" is not news."""
        view = self.view
        if (view.last_outcome, view.last_detail, view.consecutive_failures) != (
            previous.last_outcome,
            previous.last_detail,
            previous.consecutive_failures,
        ):
            return True
        if previous.last_check_at is None or view.last_check_at is None:
            return True
        return view.last_check_at - self._saved_at >= dt.timedelta(days=1)

    def add(self, result: PassResult, next_check_at: dt.datetime | None) -> RenewalView:
        failures = self.view.consecutive_failures + 1 if result.outcome == "failed" else 0
        renewed_at = result.checked_at if result.outcome == "renewed" else None
        self.view = RenewalView(
            last_check_at=result.checked_at,
            last_outcome=result.outcome,
            last_detail=result.detail,
            last_renewed_at=renewed_at or self.view.last_renewed_at,
            consecutive_failures=failures,
            next_check_at=next_check_at,
            ca_reachable=result.reachable,
        )
        self.history = [*self.history[-(HISTORY_LIMIT - 1) :], result]
        return self.view

    def schedule(self, next_check_at: dt.datetime) -> None:
        self.view = replace(self.view, next_check_at=next_check_at)

    def save(self) -> None:
        view = self.view
        document = {
            "last_check_at": view.last_check_at and format_timestamp(view.last_check_at),
            "last_outcome": view.last_outcome,
            "last_detail": view.last_detail,
            "last_renewed_at": view.last_renewed_at and format_timestamp(view.last_renewed_at),
            "consecutive_failures": view.consecutive_failures,
            "next_check_at": view.next_check_at and format_timestamp(view.next_check_at),
            "ca_reachable": view.ca_reachable,
            "history": [r.to_json() for r in self.history[-20:]],
        }
        atomic_write_json(self.path, document)
        if view.last_check_at is not None:
            self._saved_at = view.last_check_at


def _view_from_json(raw: dict[str, Any]) -> RenewalView:
    def stamp(key: str) -> dt.datetime | None:
        value = raw.get(key)
        try:
            return parse_timestamp(value) if isinstance(value, str) else None
        except CertmeshError:
            return None

    failures = raw.get("consecutive_failures", 0)
    return RenewalView(
        last_check_at=stamp("last_check_at"),
        last_outcome=raw.get("last_outcome") if isinstance(raw.get("last_outcome"), str) else None,
        last_detail=str(raw.get("last_detail", "")),
        last_renewed_at=stamp("last_renewed_at"),
        consecutive_failures=failures if isinstance(failures, int) else 0,
        next_check_at=stamp("next_check_at"),
        ca_reachable=bool(raw.get("ca_reachable", True)),
    )


async def member_pass(
    membership: Membership,
    link: CaLink,
    clock: Clock,
    force: bool = False,
    hook_timeout: float = 60.0,
) -> PassResult:
    """One member pass: bundle, then renewal if due (or forced), then the reload hook."""
    now = clock.now()
    try:
        signed = await link.fetch_bundle()
    except CaUnreachable as exc:
        return PassResult(now, "failed", f"CA unreachable: {exc}", reachable=False)
    except CertmeshError as exc:
        return _bundle_refused(membership, now, exc)
    try:
        change = await run_in_thread(membership.accept_bundle, signed)
    except StorageError as exc:  # this node's disk; the bundle itself was fine
        return PassResult(now, "failed", f"cannot save the trust bundle: {exc}")
    except CertmeshError as exc:
        return _bundle_refused(membership, now, exc)

    seq = change.state.last_bundle_seq
    if change.state.self_revoked:
        return PassResult(
            now,
            "revoked",
            "the CA has revoked this node",
            bundle_seq=seq,
            bundle_updated=change.updated,
        )

    leaf = await run_in_thread(membership.leaf)
    if leaf is None:
        return PassResult(now, "failed", "no certificate installed", bundle_seq=seq)
    due = due_at(leaf.cert, membership.state.policy)
    if not force and now < due:
        return PassResult(
            now, "not_due", "", due_at=due, bundle_seq=seq, bundle_updated=change.updated
        )

    request = new_renewal_request(membership.state)
    try:
        answer = await link.renew(request.csr_pem)
    except CaUnreachable as exc:
        return PassResult(now, "failed", f"CA unreachable: {exc}", bundle_seq=seq, reachable=False)
    except Revoked as exc:
        await run_in_thread(membership.save, replace(membership.state, self_revoked=True))
        return PassResult(now, "revoked", str(exc), bundle_seq=seq)
    except CertmeshError as exc:
        return PassResult(now, "failed", f"renewal refused: {exc}", bundle_seq=seq)
    try:
        cert = await run_in_thread(membership.install_renewal, request.key, answer)
    except StorageError as exc:  # this node's disk, not the CA's answer
        detail = f"cannot install the renewed certificate: {exc}"
        return PassResult(now, "failed", detail, bundle_seq=seq)
    except CertmeshError as exc:
        return PassResult(now, "failed", f"renewal refused: {exc}", bundle_seq=seq)

    hook = None
    if membership.state.reload_hook:
        hook = await run_in_thread(run_reload_hook, membership.state.reload_hook, hook_timeout)
    return PassResult(
        now,
        "renewed",
        "",
        expires=cert.not_valid_after_utc,
        hook=hook,
        bundle_seq=seq,
        bundle_updated=change.updated,
    )


def _bundle_refused(membership: Membership, now: dt.datetime, exc: Exception) -> PassResult:
    log.warning("trust bundle from %s refused: %s", membership.state.ca_host, exc)
    return PassResult(now, "failed", f"trust bundle refused: {exc}")


async def ca_pass(ca: CertificateAuthority, clock: Clock, force: bool = False) -> PassResult:
    """One CA pass: re-issue the CA node's own leaf when it is due (or forced)."""
    now = clock.now()
    try:
        expires = await run_in_thread(ca.renew_self, force)
    except CertmeshError as exc:
        return PassResult(now, "failed", f"cannot renew the CA's own leaf: {exc}")
    if expires is not None:
        return PassResult(now, "renewed", "", expires=expires, bundle_seq=ca.roster.seq)
    leaf = await run_in_thread(ca.leaf_store.read)
    due = due_at(leaf.cert, ca.roster.policy) if leaf else None
    return PassResult(now, "not_due", "", due_at=due, bundle_seq=ca.roster.seq)


PassRunner = Callable[[bool], Awaitable[PassResult]]
Sleeper = Callable[[float], Awaitable[None]]


class RenewalLoop:
    """Runs passes on schedule, publishes each, and can be asked for a pass now."""

    def __init__(
        self,
        run_pass: PassRunner,
        record: RenewalRecord,
        clock: Clock,
        *,
        interval: float = 3600.0,
        sleep: Sleeper = asyncio.sleep,
        rng: random.Random | None = None,
        on_result: Callable[[PassResult], None] | None = None,
    ) -> None:
        self._run_pass = run_pass
        self.record = record
        self.clock = clock
        self.interval = interval
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._on_result = on_result or (lambda result: None)
        self._turn = asyncio.Lock()
        self._wake = asyncio.Event()

    async def pass_now(self, force: bool = False) -> PassResult:
        """Run one pass now (serialised with the scheduled ones) and publish it."""
        async with self._turn:
            try:
                result = await self._run_pass(force)
            except CertmeshError as exc:
                result = PassResult(self.clock.now(), "failed", str(exc))
            await self._publish(result)
            return result

    async def _publish(self, result: PassResult) -> None:
        failed = result.outcome == "failed"
        failures = self.record.view.consecutive_failures + 1 if failed else 0
        delay = next_delay(failures, self.interval, self._rng)
        next_at = self.clock.now() + dt.timedelta(seconds=delay)
        previous = self.record.view
        self.record.add(result, next_at)
        self._log(result)
        if self.record.needs_saving(previous):
            try:
                await run_in_thread(self.record.save)
            except CertmeshError as exc:
                log.warning("could not save the renewal record: %s", exc)
        self._on_result(result)

    def _log(self, result: PassResult) -> None:
        view = self.record.view
        if result.outcome == "failed":
            log.warning(
                "renewal pass failed (%d in a row): %s; next try at %s",
                view.consecutive_failures,
                result.detail,
                view.next_check_at,
            )
        elif result.outcome == "renewed":
            log.info("renewed this node's certificate until %s", result.expires)
        elif result.outcome == "revoked":
            log.error("this node is revoked: %s", result.detail)
        elif result.outcome == "not_due":
            log.info("certificate not due for renewal until %s", result.due_at)
        else:
            log.debug("renewal pass: %s", result.detail)

    async def run(self) -> None:
        """Pass at start, then on schedule, until cancelled."""
        while True:
            await self.pass_now()
            next_at = self.record.view.next_check_at or self.clock.now()
            delay = max(0.0, (next_at - self.clock.now()).total_seconds())
            self._wake.clear()
            sleeper = asyncio.ensure_future(self._sleep(delay))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()

    def wake(self) -> None:
        """Make the sleeping loop run its next pass now."""
        self._wake.set()
