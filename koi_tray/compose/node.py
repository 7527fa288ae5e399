"""The node: one certmesh role, its servers and background tasks, started and stopped in order.

`Node` is what every host runs. `start` takes the data-dir lock, loads the CA or the
membership, writes the management token and endpoint breadcrumb, starts the HTTP listener
(and the mTLS listener on an unlocked CA), the approval pump and the renewal loop.
`shutdown` stops taking joins, denies every pending approval, cancels the tasks, closes
the servers and waits for them within a bound; calling it twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import secrets
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

from koi_tray.api.client import CaLink
from koi_tray.api.server import (
    build_http_app,
    build_mtls_app,
    mtls_server_context,
    reload_server_leaf,
)
from koi_tray.certmesh import keystore
from koi_tray.certmesh.approval import Decider
from koi_tray.certmesh.ca import (
    CertificateAuthority,
    JoinRequest,
    JoinResult,
    Posture,
    not_initialized_status,
    require_ca,
)
from koi_tray.certmesh.clock import Clock, SystemClock
from koi_tray.certmesh.enrollment import enroll, run_in_thread, run_to_end
from koi_tray.certmesh.errors import CertmeshError, InvalidPayload, NotFound, ShuttingDown
from koi_tray.certmesh.files import PRIVATE_FILE, atomic_write, atomic_write_json
from koi_tray.certmesh.hostnames import same_host
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.leafstore import FULLCHAIN, KEY
from koi_tray.certmesh.member import Membership, due_at
from koi_tray.compose import actions
from koi_tray.compose.config import NodeConfig, recorded_hostname
from koi_tray.compose.lock import DataDirLock
from koi_tray.compose.pump import ApprovalPump
from koi_tray.compose.renewal import PassResult, RenewalLoop, RenewalRecord, ca_pass, member_pass
from koi_tray.compose.status import (
    BundleView,
    Capability,
    CaView,
    LeafView,
    MemberRow,
    NodeSnapshot,
    StatusStore,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

LISTENER_CLOSE_TIMEOUT = 1.0
"""How long `shutdown` waits for each listener it closes after its own bound ran out."""

LinkFactory = Callable[[Membership], CaLink]


def local_url(host: str, port: int) -> str:
    """The URL a process on this machine dials to reach a listener bound to `host`.

    A wildcard bind is reached on loopback of the same family; IPv6 literals are bracketed.
    """
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Node:
    """A certmesh node and everything it runs. See the module docstring for the stages."""

    def __init__(
        self,
        config: NodeConfig,
        decider: Decider,
        *,
        clock: Clock | None = None,
        link_factory: LinkFactory = actions.link_for,
        kdf: keystore.KdfParams | None = None,
    ) -> None:
        self.config = config
        self.data = DataDir(config.data_dir)
        self.clock = clock or SystemClock()
        self.kdf = kdf
        self.link_factory = link_factory
        self.token = ""
        self.ca: CertificateAuthority | None = None
        self.membership: Membership | None = None
        self.pump = ApprovalPump(decider, config.max_concurrent_approvals, self._changed)
        self.status = StatusStore(self._build_snapshot)
        self.renewal = RenewalLoop(
            self._run_pass,
            RenewalRecord(self.data.certmesh / "renewal.json"),
            self.clock,
            interval=config.renewal_interval,
            on_result=self._after_pass,
        )
        self._lock = DataDirLock(self.data.lock_file)
        self._runners: dict[str, web.AppRunner] = {}
        self._addresses: dict[str, tuple[str, int]] = {}
        self._mtls_context = None
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._chores: set[asyncio.Future[None]] = set()
        self._leaf: LeafView | None = None
        self._member_rows: tuple[object, tuple[MemberRow, ...]] = (None, ())
        self._stopping = False
        self._stopped: asyncio.Future[None] | None = None
        self._role_change = asyncio.Lock()  # one create or join at a time
        self._role_changes: set[asyncio.Future[Any]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything; on failure, undo what was started and re-raise.

        Raises:
            NodeAlreadyRunning: Another process holds this data dir.
            CorruptState: A state file is damaged (a copy was kept; nothing overwritten).
        """
        self._stopped = asyncio.get_running_loop().create_future()
        await run_in_thread(self.data.prepare)
        self._lock.acquire()
        try:
            await self._load_role()
            await self._write_token()
            await self._start_http()
            await self._ensure_mtls()
            self._spawn("approval-pump", self.pump.run())
            self._spawn("renewal-loop", self.renewal.run())
            await self._write_breadcrumb()
        except BaseException:
            await self.shutdown()
            raise
        log.info("%s node %s started (%s)", self.role, self.config.hostname, self.config.host_kind)
        self.status.refresh()

    async def open_offline(self) -> None:
        """Load the role and leaf without servers or tasks (the CLI, under its own lock)."""
        await run_in_thread(self.data.prepare)
        await self._load_role()
        self.status.refresh()

    async def _load_role(self) -> None:
        self._adopt_hostname(await run_in_thread(recorded_hostname, self.data.root))
        self.ca = await run_in_thread(
            lambda: CertificateAuthority.open(self.data, self.config.hostname, clock=self.clock)
        )
        if self.ca is not None:
            await run_in_thread(self.ca.try_auto_unlock)
        else:
            self.membership = await run_in_thread(Membership.load, self.data, self.clock)
        await self._reload_leaf()

    def _adopt_hostname(self, recorded: str | None) -> None:
        """Use the name the data dir records; the configured one only names a new node."""
        if recorded is None or recorded == self.config.hostname:
            return
        log.info(
            "%s records this node as %s; using that name, not %s",
            self.data.root,
            recorded,
            self.config.hostname,
        )
        self.config = dataclasses.replace(self.config, hostname=recorded)

    async def _write_token(self) -> None:
        self.token = secrets.token_urlsafe(32)
        await run_in_thread(atomic_write, self.data.token_file, self.token.encode(), PRIVATE_FILE)

    async def _write_breadcrumb(self) -> None:
        host, port = self._addresses["http"]
        crumb = {
            "pid": os.getpid(),
            "hostname": self.config.hostname,
            "host_kind": self.config.host_kind,
            "http": local_url(host, port),
            "mtls_port": self._addresses.get("mtls", (None, None))[1],
            "started_at": self.clock.now().isoformat(),
        }
        await run_in_thread(atomic_write_json, self.data.breadcrumb, crumb)

    def _spawn(self, name: str, coro: Any) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s stopped: %r", task.get_name(), exc, exc_info=exc)

    async def _start_site(
        self, name: str, app: web.Application, bind: str, port: int, ssl_context: Any = None
    ) -> None:
        # handler_cancellation: a joiner that hangs up while a person decides cancels its
        # join, so the dialog closes and the invite is released instead of enrolling a
        # host that will never receive its certificate.
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1.0,
            handler_cancellation=True,
        )
        await runner.setup()
        site = web.TCPSite(runner, bind, port, ssl_context=ssl_context)
        try:
            await site.start()
        except (OSError, OverflowError) as exc:  # OverflowError: a port above 65535
            await runner.cleanup()
            raise CertmeshError(f"cannot listen on {bind}:{port} for {name}: {exc}") from exc
        self._runners[name] = runner
        self._addresses[name] = runner.addresses[0][:2]
        log.info("%s listening on %s:%d", name, *self._addresses[name])

    async def _start_http(self) -> None:
        app = build_http_app(self)
        await self._start_site("http", app, self.config.http_bind, self.config.http_port)

    async def _ensure_mtls(self) -> None:
        """Start the mTLS listener once this node is an unlocked CA with a leaf."""
        ca = self.ca
        if ca is None or ca.locked or "mtls" in self._runners:
            return
        await run_in_thread(ca.renew_self, False)
        store = ca.leaf_store
        self._mtls_context = await run_in_thread(
            mtls_server_context, store.path(FULLCHAIN), store.path(KEY), ca.data.ca_cert
        )
        app = build_mtls_app(self)
        await self._start_site(
            "mtls", app, self.config.mtls_bind, self.config.mtls_port, self._mtls_context
        )
        await self._reload_leaf()
        if self.data.breadcrumb.exists():
            await self._write_breadcrumb()

    async def shutdown(self) -> None:
        """Stop in stages; idempotent, and bounded by `config.shutdown_timeout`.

        Stages: stop taking joins and deny every pending approval, cancel the background
        tasks, close the listeners, wait for the tasks. Past the bound, listeners the
        stages did not reach are still closed (at most `LISTENER_CLOSE_TIMEOUT` each)
        and the data dir is released.
        """
        if self._stopping:
            if self._stopped is not None:
                await asyncio.shield(self._stopped)
            return
        self._stopping = True
        log.info("node %s shutting down", self.config.hostname)
        try:
            await asyncio.wait_for(self._stop_stages(), self.config.shutdown_timeout)
        except TimeoutError:
            log.error(
                "shutdown took longer than %.0f s; closing the listeners and giving up on the rest",
                self.config.shutdown_timeout,
            )
            await self._close_listeners_now()
        finally:
            self._release_files()
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(None)

    async def _stop_stages(self) -> None:
        await self.pump.close()
        for task in [*self._tasks.values(), *self._role_changes]:
            task.cancel()
        for name, runner in list(self._runners.items()):
            await runner.cleanup()
            del self._runners[name]
        waiting = [*self._tasks.values(), *self._chores, *self._role_changes]
        if waiting:
            await asyncio.wait(waiting)

    async def _close_listeners_now(self) -> None:
        """Close the listeners the timed-out stages did not reach, each within 1 s.

        A stage that hangs (a decider ignoring cancellation, say) must not leave the ports
        open after `shutdown` returns: an embedding program would still take joins.
        """
        for name, runner in list(self._runners.items()):
            try:
                await asyncio.wait_for(runner.cleanup(), LISTENER_CLOSE_TIMEOUT)
            except Exception as exc:
                log.warning("closing the %s listener failed: %r", name, exc)
            del self._runners[name]

    def _release_files(self) -> None:
        if self._lock.held:
            for path in (self.data.breadcrumb, self.data.token_file):
                with contextlib.suppress(OSError):
                    path.unlink()
            self._lock.release()

    async def wait_stopped(self) -> None:
        if self._stopped is not None:
            await asyncio.shield(self._stopped)

    # -- what hosts and tests look at ------------------------------------------------------

    @property
    def role(self) -> str:
        if self.ca is not None:
            return "ca"
        return "member" if self.membership is not None else "unconfigured"

    def address(self, name: str) -> tuple[str, int]:
        """The (host, port) a listener is bound to; raises KeyError if it is not running."""
        return self._addresses[name]

    def describe(self) -> dict[str, list[str]]:
        """What runs: listener names and background task names (for the parity test)."""
        return {"servers": sorted(self._runners), "tasks": sorted(self._tasks)}

    # -- NodeService, for the HTTP routes ----------------------------------------------------

    def koi_status(self) -> dict[str, Any]:
        """Koi's `/status` body, plus `mtls_port` (koi-tray) so members learn where to renew."""
        if self.ca is None:
            return not_initialized_status()
        status = self.ca.status()
        if "mtls" in self._addresses:
            status["mtls_port"] = self._addresses["mtls"][1]
        return status

    def node_status(self) -> dict[str, Any]:
        return self.status.refresh().to_json()

    async def join(self, join: JoinRequest) -> JoinResult:
        if self._stopping:
            raise ShuttingDown("this node is shutting down")
        ca = require_ca(self.ca)
        try:
            return await enroll(ca, join, self.pump.decide)
        finally:
            self.status.refresh()

    async def unlock(self, passphrase: str) -> None:
        ca = require_ca(self.ca)
        await run_in_thread(ca.unlock, passphrase)
        await self._ensure_mtls()
        self.status.refresh()

    async def renew_now(self, force: bool) -> dict[str, Any]:
        result = await self.renewal.pass_now(force)
        await self._reload_and_refresh()
        return result.to_json()

    async def set_hook(self, hostname: object, command: object) -> dict[str, Any]:
        """Store a member's reload hook (this member's own, or one in the CA's roster).

        Raises:
            InvalidPayload: `hostname` is the CA node itself, whose renewals run no hook.
            NotFound: Neither this member nor a member of this CA.
        """
        if self.ca is not None and same_host(str(hostname), self.ca.hostname):
            raise InvalidPayload(
                f"{hostname} is this CA's own host, and the CA runs no reload hook after "
                "renewing its own certificate; set hooks for members"
            )
        membership = self.membership
        if membership is not None and same_host(str(hostname), membership.state.hostname):
            await run_in_thread(membership.set_reload_hook, command)
        elif self.ca is not None:
            await run_in_thread(self.ca.set_hook, hostname, command)
        else:
            raise NotFound(f"{hostname} is neither this member nor a member of this CA")
        return {"hostname": hostname, "reload": command}

    def audit_text(self) -> str:
        if self.ca is not None:
            return self.ca.audit.read_text()
        path = self.data.audit_log
        return path.read_text("utf-8") if path.exists() else ""

    # -- actions the tray and the CLI ask a running node for --------------------------------

    async def create_ca(
        self,
        passphrase: str,
        preset: str,
        operator: str | None,
        *,
        hostname: str | None = None,
        **overrides: bool | None,
    ) -> CertificateAuthority:
        """Make this unconfigured node the mesh CA, and start its mTLS listener.

        Args:
            hostname: The CA node's name; None keeps the configured one.

        Raises:
            Conflict: This node already is a CA or a member.
            InvalidPayload: Unknown preset, weak passphrase, bad hostname, or approval
                required without an operator.
            ShuttingDown: The node is stopping.
        """
        posture = actions.posture_for(preset, **overrides)
        name = hostname or self.config.hostname
        return await self._change_role(self._become_ca(passphrase, posture, operator, name))

    async def _become_ca(
        self, passphrase: str, posture: Posture, operator: str | None, name: str
    ) -> CertificateAuthority:
        self.ca = await run_to_end(
            actions.create_ca,
            self.data,
            name,
            passphrase,
            posture,
            operator,
            self.clock,
            self.kdf,
        )
        self._adopt_hostname(name)
        try:
            await self._ensure_mtls()
        except CertmeshError as exc:
            # The CA exists now; refusing the create would only make a retry a conflict.
            log.error("CA %s created, but its mTLS port cannot start: %s", name, exc)
        self.renewal.wake()
        self.status.refresh()
        return self.ca

    async def join_mesh(
        self,
        endpoint: str,
        invite: str,
        on_code: Callable[[str], None],
        *,
        hostname: str | None = None,
    ) -> Membership:
        """Join the mesh at `endpoint` as `hostname` (None: the configured name).

        `on_code` receives the confirmation code before the join is sent.

        Raises:
            Conflict: This node already is a CA or a member.
            CertmeshError: The CA's refusal, or CaUnreachable.
            ShuttingDown: The node is stopping.
        """
        name = hostname or self.config.hostname
        return await self._change_role(self._become_member(endpoint, invite, on_code, name))

    async def _become_member(
        self, endpoint: str, invite: str, on_code: Callable[[str], None], name: str
    ) -> Membership:
        self.membership = await actions.join_mesh(
            self.data, name, endpoint, invite, self.clock, on_code
        )
        self._adopt_hostname(self.membership.state.hostname)
        await self._reload_leaf()
        if self.data.breadcrumb.exists() and "http" in self._addresses:
            await self._write_breadcrumb()
        self.renewal.wake()
        self.status.refresh()
        return self.membership

    async def _change_role(self, change: Coroutine[Any, Any, T]) -> T:
        """Run a create or a join to its end, one at a time, whoever waits for it.

        The change runs as a task the node owns: a caller that gives up (an HTTP client
        hanging up, Ctrl-C in the CLI) cannot leave it half done with the node unaware of
        its new role. Shutdown cancels it: a join still waiting for its CA stops there,
        and files being written are finished first (`run_to_end`).
        """

        async def one_at_a_time() -> T:
            async with self._role_change:
                if self._stopping:
                    change.close()
                    raise ShuttingDown(f"node {self.config.hostname} is shutting down")
                return await change

        task = asyncio.ensure_future(one_at_a_time())
        self._role_changes.add(task)
        task.add_done_callback(self._role_change_done)
        return await asyncio.shield(task)

    def _role_change_done(self, task: asyncio.Future[Any]) -> None:
        self._role_changes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("create or join ended with %r", task.exception())

    # -- renewal plumbing ---------------------------------------------------------------------

    async def _run_pass(self, force: bool) -> PassResult:
        if self.ca is not None:
            return await ca_pass(self.ca, self.clock, force)
        if self.membership is not None:
            link = self.link_factory(self.membership)
            return await member_pass(self.membership, link, self.clock, force)
        return PassResult(self.clock.now(), "not_applicable", "this node is not in a mesh")

    def _after_pass(self, result: PassResult) -> None:
        if result.outcome == "renewed" and self.ca is not None and self._mtls_context:
            store = self.ca.leaf_store
            reload_server_leaf(self._mtls_context, store.path(FULLCHAIN), store.path(KEY))
            log.info("mTLS listener now presents the renewed leaf")
        chore = asyncio.ensure_future(self._reload_and_refresh())
        self._chores.add(chore)
        chore.add_done_callback(self._chores.discard)

    async def _reload_and_refresh(self) -> None:
        await self._reload_leaf()
        self.status.refresh()

    async def _reload_leaf(self) -> None:
        store = self.ca.leaf_store if self.ca else (self.membership and self.membership.leaf_store)
        policy = (
            self.ca.roster.policy
            if self.ca
            else (self.membership.state.policy if self.membership else None)
        )
        if store is None or policy is None:
            self._leaf = None
            return
        try:
            leaf = await run_in_thread(store.read)
        except CertmeshError as exc:
            log.error("cannot read this node's certificate: %s", exc)
            leaf = None
        if leaf is None:
            self._leaf = None
            return
        now = self.clock.now()
        not_after = leaf.cert.not_valid_after_utc
        self._leaf = LeafView(
            hostname=store.hostname,
            fingerprint=leaf.fingerprint,
            not_after=not_after,
            due_at=due_at(leaf.cert, policy),
            days_left=max(0, (not_after - now) // dt.timedelta(days=1)),
            expired=not_after <= now,
        )

    def _changed(self) -> None:
        self.status.refresh()

    # -- the snapshot ----------------------------------------------------------------------

    def _build_snapshot(self) -> NodeSnapshot:
        now = self.clock.now()
        leaf = self._leaf
        if leaf is not None:
            leaf = LeafView(
                leaf.hostname,
                leaf.fingerprint,
                leaf.not_after,
                leaf.due_at,
                max(0, (leaf.not_after - now) // dt.timedelta(days=1)),
                leaf.not_after <= now,
            )
        return NodeSnapshot(
            role=self.role,
            hostname=self.config.hostname,
            taken_at=now,
            mesh_fingerprint=self._mesh_fingerprint(),
            ca_endpoint=self._ca_endpoint(),
            leaf=leaf,
            renewal=self.renewal.record.view,
            bundle=self._bundle_view(),
            ca=self._ca_view(),
            pending=tuple(self.pump.pending),
            capabilities=self._capabilities(),
            shutting_down=self._stopping,
        )

    def _mesh_fingerprint(self) -> str | None:
        if self.ca is not None:
            return self.ca.ca_fingerprint
        return self.membership.state.ca_fingerprint if self.membership else None

    def _ca_endpoint(self) -> str | None:
        if self.membership is None:
            return None
        state = self.membership.state
        return f"{state.ca_host}:{state.ca_http_port}"

    def _bundle_view(self) -> BundleView | None:
        if self.ca is not None:
            roster = self.ca.roster
            return BundleView(roster.seq, None, False, len(roster.revocations))
        if self.membership is None:
            return None
        state = self.membership.state
        return BundleView(
            state.last_bundle_seq,
            state.last_bundle_at,
            state.self_revoked,
            len(state.revoked_hostnames),
        )

    def _ca_view(self) -> CaView | None:
        ca = self.ca
        if ca is None:
            return None
        roster = ca.roster
        if self._member_rows[0] is not roster:
            rows = tuple(
                MemberRow(m.hostname, m.role, m.status, m.cert_expires) for m in roster.members
            )
            self._member_rows = (roster, rows)
        return CaView(
            fingerprint=ca.ca_fingerprint,
            locked=ca.locked,
            locked_reason=ca.locked_reason if ca.locked else None,
            enrollment_open=roster.enrollment_open,
            requires_approval=roster.requires_approval,
            seq=roster.seq,
            members=self._member_rows[1],
        )

    def _capabilities(self) -> tuple[Capability, ...]:
        rungs = []
        if self.ca is not None:
            ca = self.ca
            summary = "CA locked" if ca.locked else f"CA, {len(ca.roster.active_members)} active"
            rungs.append(Capability("certmesh", summary, not ca.locked))
        elif self.membership is not None:
            revoked = self.membership.state.self_revoked
            rungs.append(Capability("certmesh", "revoked" if revoked else "member", not revoked))
        else:
            rungs.append(Capability("certmesh", "not in a mesh", True))
        for name in ("http", "mtls"):
            if name in self._addresses and name in self._runners:
                host, port = self._addresses[name]
                rungs.append(Capability(name, f"listening on {host}:{port}", True))
            else:
                rungs.append(Capability(name, "stopped", name == "mtls" and self.ca is None))
        view = self.renewal.record.view
        summary = "stopped" if view.loop_stopped else (view.last_outcome or "not run yet")
        rungs.append(Capability("renewal", summary, view.healthy))
        rungs.append(Capability("approvals", f"{len(self.pump.pending)} pending", True))
        return tuple(rungs)


class KoiNode:
    """An embedded node: `async with KoiNode(config, decider=...) as node:`."""

    def __init__(self, config: NodeConfig, *, decider: Decider, **options: Any) -> None:
        self.node = Node(config, decider, **options)

    async def __aenter__(self) -> Node:
        await self.node.start()
        return self.node

    async def __aexit__(self, *exc: object) -> None:
        await self.node.shutdown()
