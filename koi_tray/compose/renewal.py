"""The renewal loop: pull the trust bundle, renew when due, publish every outcome.

A pass runs at start, then about hourly (±10 % jitter). After a failure the next pass
comes sooner: one minute, doubling per consecutive failure, capped at the hour. A member's
pass pulls the bundle first (an unreachable CA is a failure from the first attempt), then
renews if its leaf is due, even when the bundle could not be pulled (renewal has its own
port and its own checks); a CA's pass re-issues the CA node's own leaf when due. The
record of passes is kept in `certmesh/renewal.json` so it survives restarts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
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
from koi_tray.compose.status import HOOK_OUTPUT_SHOWN, BundleCheck, HookView, RenewalView

log = logging.getLogger(__name__)

HISTORY_LIMIT = 200
# More passes than run in a day, the longest a steady "not due" goes unsaved, so every
# published pass reaches the file.
SAVED_HISTORY = 48
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
    """Seconds until the next pass: jittered interval, or backoff after failures.

    Backoff starts at a minute and doubles per consecutive failure; the jitter is applied
    before the cap, so a failing node never waits longer than `interval`.
    """
    if failures <= 0:
        return interval * rng.uniform(0.9, 1.1)
    backoff = FIRST_RETRY * 2 ** min(failures - 1, 32)
    return min(interval, backoff * rng.uniform(0.9, 1.1))


class RenewalRecord:
    """The persisted summary and recent history of renewal passes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.view = RenewalView()
        self.history: list[PassResult] = []
        self._saved_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        raw = None
        try:
            raw = read_json(path)
        except CertmeshError as exc:
            log.warning("ignoring unreadable renewal record %s: %s", path, exc)
        self._earlier: list[dict[str, Any]] = []  # passes of earlier runs, as saved
        if isinstance(raw, dict):
            self.view = _view_from_json(raw)
            saved = raw.get("history")
            if isinstance(saved, list):
                self._earlier = [entry for entry in saved if isinstance(entry, dict)]

    def needs_saving(self, previous: RenewalView) -> bool:
        """Save when the outcome changed, or daily; a steady "not due" is not news."""
        view = self.view
        if (view.last_outcome, view.last_detail, view.consecutive_failures) != (
            previous.last_outcome,
            previous.last_detail,
            previous.consecutive_failures,
        ):
            return True
        bundle = view.last_bundle
        if bundle is not None and bundle.updated and bundle != previous.last_bundle:
            return True
        if previous.last_check_at is None or view.last_check_at is None:
            return True
        return view.last_check_at - self._saved_at >= dt.timedelta(days=1)

    def add(self, result: PassResult) -> RenewalView:
        """Fold one pass into the view and the history; the caller schedules the next."""
        view = self.view
        failures = view.consecutive_failures + 1 if result.outcome == "failed" else 0
        renewed_at = result.checked_at if result.outcome == "renewed" else None
        self.view = replace(
            view,
            last_check_at=result.checked_at,
            last_outcome=result.outcome,
            last_detail=result.detail,
            last_renewed_at=renewed_at or view.last_renewed_at,
            consecutive_failures=failures,
            ca_reachable=result.reachable,
            last_hook=_hook_view(result) or view.last_hook,
            last_bundle=_bundle_check(result, view.last_bundle),
        )
        self.history = [*self.history[-(HISTORY_LIMIT - 1) :], result]
        return self.view

    def saved_history(self) -> list[dict[str, Any]]:
        """The most recent passes as the file keeps them, earlier runs' included."""
        recent = [r.to_json() for r in self.history[-SAVED_HISTORY:]]
        return [*self._earlier, *recent][-SAVED_HISTORY:]

    def schedule(self, next_check_at: dt.datetime) -> None:
        self.view = replace(self.view, next_check_at=next_check_at)

    def mark_stopped(self) -> None:
        self.view = replace(self.view, loop_stopped=True)

    def save(self) -> None:
        view = self.view
        document = {
            "last_check_at": _stamp(view.last_check_at),
            "last_outcome": view.last_outcome,
            "last_detail": view.last_detail,
            "last_renewed_at": _stamp(view.last_renewed_at),
            "consecutive_failures": view.consecutive_failures,
            "next_check_at": _stamp(view.next_check_at),
            "ca_reachable": view.ca_reachable,
            "last_hook": view.last_hook and _hook_json(view.last_hook),
            "last_bundle": view.last_bundle and _bundle_json(view.last_bundle),
            "history": self.saved_history(),
        }
        atomic_write_json(self.path, document)
        if view.last_check_at is not None:
            self._saved_at = view.last_check_at


def _hook_view(result: PassResult) -> HookView | None:
    hook = result.hook
    if hook is None:
        return None
    return HookView(hook.command, hook.success, hook.output[:HOOK_OUTPUT_SHOWN], result.checked_at)


def _bundle_check(result: PassResult, previous: BundleCheck | None) -> BundleCheck | None:
    if result.bundle_seq is None:
        return previous
    updated_at = result.checked_at if result.bundle_updated else None
    return BundleCheck(
        seq=result.bundle_seq,
        checked_at=result.checked_at,
        updated=result.bundle_updated,
        updated_at=updated_at or (previous.updated_at if previous else None),
    )


def _stamp(when: dt.datetime | None) -> str | None:
    return format_timestamp(when) if when is not None else None


def _hook_json(hook: HookView) -> dict[str, Any]:
    return {
        "command": hook.command,
        "success": hook.success,
        "output": hook.output,
        "ran_at": format_timestamp(hook.ran_at),
    }


def _bundle_json(check: BundleCheck) -> dict[str, Any]:
    return {
        "seq": check.seq,
        "checked_at": format_timestamp(check.checked_at),
        "updated": check.updated,
        "updated_at": _stamp(check.updated_at),
    }


def _view_from_json(raw: dict[str, Any]) -> RenewalView:
    failures = raw.get("consecutive_failures", 0)
    outcome = raw.get("last_outcome")
    return RenewalView(
        last_check_at=_parse_stamp(raw.get("last_check_at")),
        last_outcome=outcome if isinstance(outcome, str) else None,
        last_detail=str(raw.get("last_detail", "")),
        last_renewed_at=_parse_stamp(raw.get("last_renewed_at")),
        consecutive_failures=failures if isinstance(failures, int) else 0,
        next_check_at=_parse_stamp(raw.get("next_check_at")),
        ca_reachable=bool(raw.get("ca_reachable", True)),
        last_hook=_hook_from_json(raw.get("last_hook")),
        last_bundle=_bundle_from_json(raw.get("last_bundle")),
    )


def _parse_stamp(value: object) -> dt.datetime | None:
    try:
        return parse_timestamp(value) if isinstance(value, str) else None
    except CertmeshError:
        return None


def _hook_from_json(raw: object) -> HookView | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("command"), str):
        return None
    ran_at = _parse_stamp(raw.get("ran_at"))
    if ran_at is None:
        return None
    output = str(raw.get("output", ""))[:HOOK_OUTPUT_SHOWN]
    return HookView(raw["command"], raw.get("success") is True, output, ran_at)


def _bundle_from_json(raw: object) -> BundleCheck | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("seq"), int):
        return None
    checked_at = _parse_stamp(raw.get("checked_at"))
    if checked_at is None:
        return None
    updated_at = _parse_stamp(raw.get("updated_at"))
    return BundleCheck(raw["seq"], checked_at, raw.get("updated") is True, updated_at)


@dataclass(frozen=True)
class BundleStep:
    """How a member's bundle pull went, carried into the pass's result whatever follows.

    `seq` is set only when a bundle was accepted in this pass; `problem` says why none
    was, and is "" when one was.
    """

    seq: int | None = None
    updated: bool = False
    problem: str = ""
    reachable: bool = True

    def result(self, now: dt.datetime, outcome: str, detail: str, **fields: Any) -> PassResult:
        """A pass result that reports this bundle step beside `outcome` and `detail`."""
        if self.problem and self.problem != detail:
            if detail:
                detail = f"{detail}; bundle pull: {self.problem}"
            elif outcome == "failed":
                detail = self.problem
            else:
                detail = f"bundle pull: {self.problem}"
        # A renewal that went through proves the CA reachable, whatever the bundle did.
        reachable = fields.pop("reachable", True) and (self.reachable or outcome == "renewed")
        return PassResult(
            now,
            outcome,
            detail,
            bundle_seq=self.seq,
            bundle_updated=self.updated,
            reachable=reachable,
            **fields,
        )


async def pull_bundle(membership: Membership, link: CaLink) -> BundleStep:
    """Fetch, verify and save the CA's trust bundle; never raises for the CA's answer."""
    host = membership.state.ca_host
    try:
        signed = await link.fetch_bundle()
    except CaUnreachable as exc:
        return BundleStep(problem=f"CA unreachable: {exc}", reachable=False)
    except CertmeshError as exc:
        log.warning("trust bundle from %s refused: %s", host, exc)
        return BundleStep(problem=f"trust bundle refused: {exc}")
    try:
        change = await run_in_thread(membership.accept_bundle, signed)
    except StorageError as exc:  # this node's disk; the bundle itself was fine
        return BundleStep(problem=f"cannot save the trust bundle: {exc}")
    except CertmeshError as exc:
        log.warning("trust bundle from %s refused: %s", host, exc)
        return BundleStep(problem=f"trust bundle refused: {exc}")

    seq = change.state.last_bundle_seq
    if change.updated:
        log.info("trust bundle from %s updated to seq %d", host, seq)
    return BundleStep(seq=seq, updated=change.updated)


async def member_pass(
    membership: Membership,
    link: CaLink,
    clock: Clock,
    force: bool = False,
    hook_timeout: float = 60.0,
) -> PassResult:
    """One member pass: bundle, then renewal if due (or forced), then the reload hook.

    A failed bundle pull does not stop a due renewal; the pass then reports both. A
    member that knows it is revoked (from this bundle or an earlier one) never renews.
    """
    now = clock.now()
    bundle = await pull_bundle(membership, link)
    if membership.state.self_revoked:
        return bundle.result(now, "revoked", "the CA has revoked this node")

    leaf = await run_in_thread(membership.leaf)
    if leaf is None:
        return bundle.result(now, "failed", "no certificate installed")
    due = due_at(leaf.cert, membership.state.policy)
    if not force and now < due:
        if bundle.problem:
            return bundle.result(now, "failed", bundle.problem, due_at=due)
        return bundle.result(now, "not_due", "", due_at=due)

    return await _renew(membership, link, bundle, now, hook_timeout)


async def _renew(
    membership: Membership,
    link: CaLink,
    bundle: BundleStep,
    now: dt.datetime,
    hook_timeout: float,
) -> PassResult:
    request = new_renewal_request(membership.state)
    try:
        answer = await link.renew(request.csr_pem)
    except CaUnreachable as exc:
        return bundle.result(now, "failed", f"CA unreachable: {exc}", reachable=False)
    except Revoked as exc:
        await run_in_thread(membership.mark_revoked)
        return bundle.result(now, "revoked", str(exc))
    except CertmeshError as exc:
        return bundle.result(now, "failed", f"renewal refused: {exc}")
    try:
        cert = await run_in_thread(membership.install_renewal, request.key, answer)
    except StorageError as exc:  # this node's disk, not the CA's answer
        return bundle.result(now, "failed", f"cannot install the renewed certificate: {exc}")
    except CertmeshError as exc:
        return bundle.result(now, "failed", f"renewal refused: {exc}")

    hook = None
    detail = ""
    if membership.state.reload_hook:
        hook = await run_in_thread(run_reload_hook, membership.state.reload_hook, hook_timeout)
        if not hook.success:  # run_reload_hook has logged it
            detail = f"renewed, but the reload hook failed: {hook.output[:HOOK_OUTPUT_SHOWN]}"
    return bundle.result(now, "renewed", detail, expires=cert.not_valid_after_utc, hook=hook)


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
    """Runs passes on schedule, publishes each, and can be asked for a pass now.

    The loop sleeps until the published `next_check_at`. A pass asked for from outside
    (`pass_now`) publishes a new time and wakes the loop, which then sleeps until that
    time instead of its old one; `wake` asks the loop for a pass at once. A pass that
    raises anything but cancellation is published as failed and the loop carries on.
    """

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
        self._pass_asked = False
        self._passes = 0

    async def pass_now(self, force: bool = False) -> PassResult:
        """Run one pass now (serialised with the scheduled ones), publish it, reschedule."""
        async with self._turn:
            result = await self._guarded_pass(force)
            await self._publish(result)
        self._wake.set()
        return result

    async def _guarded_pass(self, force: bool) -> PassResult:
        try:
            return await self._run_pass(force)
        except CertmeshError as exc:
            return PassResult(self.clock.now(), "failed", str(exc))
        except Exception as exc:  # a bug in a pass must not end renewal for good
            log.error("renewal pass raised %r; it counts as failed", exc)
            log.debug("renewal pass traceback", exc_info=True)
            return PassResult(self.clock.now(), "failed", f"unexpected error: {exc!r}")

    async def _publish(self, result: PassResult) -> None:
        previous = self.record.view
        view = self.record.add(result)
        delay = next_delay(view.consecutive_failures, self.interval, self._rng)
        self.record.schedule(self.clock.now() + dt.timedelta(seconds=delay))
        self._passes += 1
        self._log(result)
        if self.record.needs_saving(previous):
            try:
                await run_in_thread(self.record.save)
            except CertmeshError as exc:
                log.warning("could not save the renewal record %s: %s", self.record.path, exc)
        self._tell(result)

    def _tell(self, result: PassResult) -> None:
        try:
            self._on_result(result)
        except Exception:
            log.exception("a renewal result subscriber failed")

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
        """Pass at start, then on schedule, until cancelled.

        If anything but cancellation ever ends the loop, the record says so
        (`loop_stopped`, and a failed pass naming the error) before the error propagates.
        """
        try:
            await self.pass_now()
            while True:
                passes = self._passes
                if await self._nap():
                    await self._scheduled_pass(passes)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._stopped_by(exc)
            raise

    async def _scheduled_pass(self, passes_before_nap: int) -> None:
        async with self._turn:
            if self._passes != passes_before_nap and not self._pass_asked:
                return  # a pass asked for meanwhile already set the next time
            self._pass_asked = False
            result = await self._guarded_pass(False)
            await self._publish(result)

    async def _nap(self) -> bool:
        """Sleep until the published next check, or until woken; True when a pass is due.

        The sleep itself is trusted over the wall clock: a full sleep means a pass is due
        even if the clock was set back meanwhile. Woken, the loop re-reads the schedule.
        """
        self._wake.clear()
        if self._pass_asked:
            return True
        next_at = self.record.view.next_check_at or self.clock.now()
        delay = (next_at - self.clock.now()).total_seconds()
        delay = min(max(0.0, delay), self.interval * 1.1)
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
        if sleeper.done() and not sleeper.cancelled():
            sleeper.result()  # a failing sleep function ends the loop visibly
            return True
        return self._pass_asked

    def _stopped_by(self, exc: BaseException) -> None:
        log.error("the renewal loop stopped: %r; certificates are no longer renewed", exc)
        log.debug("renewal loop traceback", exc_info=exc)
        self.record.add(PassResult(self.clock.now(), "failed", f"renewal loop stopped: {exc!r}"))
        self.record.mark_stopped()
        self._tell(self.record.history[-1])

    def wake(self) -> None:
        """Make the sleeping loop run its next pass now."""
        self._pass_asked = True
        self._wake.set()
