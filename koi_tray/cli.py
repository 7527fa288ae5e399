"""The `koi-tray` command: the tray, the headless node, and certmesh administration.

    koi-tray                                   start the tray (same as `koi-tray tray`)
    koi-tray tray [--tray qt|pystray]          the tray, with the node options below
    koi-tray serve [--approval console|deny]   the headless node
    koi-tray certmesh create|unlock|status|invite|join|renew|revoke|...
    koi-tray autostart enable|disable|status

Where a node runs for the data dir, `certmesh` commands go through its API with the
management token; where none runs they do the work themselves under the data-dir lock.
Errors print one line (`koi-tray: error: <message> [<code>]`) and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from koi_tray import __version__
from koi_tray.certmesh.errors import CertmeshError
from koi_tray.certmesh.layout import DataDir
from koi_tray.compose.config import NodeConfig, default_data_dir, default_hostname

log = logging.getLogger(__name__)

EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A refusal the command line reports in one line (bad use, unreadable input)."""

    code = "usage"


# -- argument parsing -------------------------------------------------------------------


def _node_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--http-bind",
        default="127.0.0.1",
        metavar="ADDR",
        help="address for the HTTP port (default 127.0.0.1; 0.0.0.0 to accept joins from the LAN)",
    )
    parser.add_argument("--http-port", type=int, default=5641, metavar="N")
    parser.add_argument("--mtls-bind", default="0.0.0.0", metavar="ADDR")
    parser.add_argument("--mtls-port", type=int, default=5642, metavar="N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="koi-tray", description="A certmesh node (CA or member) in your system tray."
    )
    parser.add_argument("--version", action="version", version=f"koi-tray {__version__}")
    parser.add_argument(
        "--data-dir", type=Path, help="data directory (default: per user, or $KOI_TRAY_DATA_DIR)"
    )
    parser.add_argument(
        "--hostname", help="this node's name in the mesh (default: the machine's hostname)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(dest="command")

    tray = commands.add_parser("tray", help="start the tray (the default)")
    tray.add_argument("--tray", choices=("qt", "pystray"), default="qt", dest="backend")
    _node_options(tray)

    serve = commands.add_parser("serve", help="run the node headless")
    serve.add_argument(
        "--approval",
        choices=("console", "deny"),
        help="who decides joins that need approval (default: console on a "
        "terminal, deny otherwise)",
    )
    serve.add_argument("--passphrase-file", type=Path, help="unlock the CA at start")
    _node_options(serve)

    certmesh = commands.add_parser("certmesh", help="administer the mesh").add_subparsers(
        dest="action", required=True
    )
    create = certmesh.add_parser("create", help="create a CA on this node")
    create.add_argument("--preset", choices=("just-me", "team", "organization"), default="just-me")
    create.add_argument("--operator", help="operator name (required when joins need approval)")
    create.add_argument("--enrollment", choices=("open", "closed"))
    create.add_argument("--approval", choices=("required", "none"))
    create.add_argument("--passphrase-file", type=Path)
    unlock = certmesh.add_parser("unlock", help="unlock the running CA")
    unlock.add_argument("--passphrase-file", type=Path)
    status = certmesh.add_parser("status", help="show this node's status")
    status.add_argument("--json", action="store_true")
    invite = certmesh.add_parser("invite", help="make a one-time invite for a host")
    invite.add_argument("host")
    invite.add_argument("--ttl", type=int, default=60, metavar="MINUTES")
    invite.add_argument("--json", action="store_true")
    join = certmesh.add_parser("join", help="join a mesh")
    join.add_argument("endpoint", help="the CA's HTTP endpoint, e.g. http://ca-host:5641")
    join.add_argument("--invite", required=True, metavar="CODE")
    join.add_argument("--json", action="store_true")
    renew = certmesh.add_parser("renew", help="run a renewal check now")
    renew.add_argument("--force", action="store_true", help="renew even if not due")
    renew.add_argument("--json", action="store_true")
    renew.add_argument("--passphrase-file", type=Path, help="unlock a locked CA for this renewal")
    revoke = certmesh.add_parser("revoke", help="revoke a member for good")
    revoke.add_argument("host")
    revoke.add_argument("--reason")
    revoke.add_argument("--operator")
    certmesh.add_parser("open-enrollment", help="let invited hosts join")
    certmesh.add_parser("close-enrollment", help="refuse every join")
    hook = certmesh.add_parser("set-hook", help="command to run after each renewal")
    hook.add_argument("--reload", required=True, metavar="CMD")
    hook.add_argument("--host", help="member to set it for (default: this node)")
    certmesh.add_parser("log", help="print the audit log")

    autostart = commands.add_parser("autostart", help="start koi-tray at login")
    autostart.add_argument("action", choices=("enable", "disable", "status"))
    return parser


# -- helpers ----------------------------------------------------------------------------


def read_passphrase(path: Path | None, confirm: bool = False) -> str:
    """Read a passphrase from a file (first line) or a prompt without echo."""
    if path is not None:
        try:
            return path.read_text("utf-8").splitlines()[0]
        except (OSError, IndexError) as exc:
            raise CliError(f"cannot read a passphrase from {path}: {exc}") from exc
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for the passphrase; use --passphrase-file")
    first = getpass.getpass("CA passphrase: ")
    if confirm and getpass.getpass("Repeat the passphrase: ") != first:
        raise CliError("the passphrases do not match")
    return first


def node_config(args: argparse.Namespace, host_kind: str) -> NodeConfig:
    return NodeConfig(
        data_dir=args.data_dir or default_data_dir(),
        hostname=args.hostname or default_hostname(),
        http_bind=getattr(args, "http_bind", "127.0.0.1"),
        http_port=getattr(args, "http_port", 5641),
        mtls_bind=getattr(args, "mtls_bind", "0.0.0.0"),
        mtls_port=getattr(args, "mtls_port", 5642),
        host_kind=host_kind,
    )


def emit(value: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    print(json.dumps(value, indent=2) if as_json else human(value))


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# -- certmesh commands ------------------------------------------------------------------


async def run_certmesh(args: argparse.Namespace) -> int:
    from koi_tray.compose.lock import DataDirLock, NodeAlreadyRunning

    config = node_config(args, "cli")
    data = DataDir(config.data_dir)
    data.prepare()
    lock = DataDirLock(data.lock_file)
    try:
        lock.acquire()
    except NodeAlreadyRunning:
        return await certmesh_via_node(args, data)
    try:
        return await DirectCommands(args, config).run()
    finally:
        lock.release()


def _human_status(status: dict[str, Any]) -> str:
    node = status["node"]
    lines = [node["summary"], f"  role: {node['role']}   health: {node['health']}"]
    if node.get("mesh_fingerprint"):
        lines.append(f"  CA fingerprint: {node['mesh_fingerprint']}")
    leaf = node.get("leaf")
    if leaf:
        lines.append(
            f"  certificate: {leaf['fingerprint'][:16]}…  expires {leaf['not_after']}"
            f"  ({leaf['days_left']} days left; renewal due {leaf['due_at']})"
        )
    renewal = node["renewal"]
    if renewal.get("last_check_at"):
        lines.append(
            f"  last renewal check: {renewal['last_check_at']} → "
            f"{renewal['last_outcome']} {renewal['last_detail']}".rstrip()
        )
        lines.append(
            f"  consecutive failures: {renewal['consecutive_failures']};"
            f" next check {renewal['next_check_at']}"
        )
    bundle = node.get("bundle")
    if bundle:
        lines.append(f"  trust bundle: seq {bundle['seq']} at {bundle['received_at']}")
    ca = node.get("ca")
    if ca:
        posture = "open" if ca["enrollment_open"] else "closed"
        approval = "approval required" if ca["requires_approval"] else "no approval"
        lines.append(
            f"  CA: {'LOCKED' if ca['locked'] else 'unlocked'}; enrollment {posture}, "
            f"{approval}; {len(ca['members'])} members; seq {ca['seq']}"
        )
        for member in ca["members"]:
            lines.append(
                f"    {member['hostname']:<24} {member['role']:<8} {member['status']:<8}"
                f" expires {member['expires']}"
            )
    if node["pending"]:
        lines.append(f"  pending approvals: {len(node['pending'])}")
    return "\n".join(lines)


def _human_invite(minted: dict[str, Any]) -> str:
    return f"{minted['token']}\n(for {minted['hostname']}, valid until {minted['expires_at']})"


def _human_pass(result: dict[str, Any]) -> str:
    outcome = result["outcome"]
    if outcome == "renewed":
        text = f"renewed; the certificate now expires {result['expires']}"
        if "hook" in result:
            hook = result["hook"]
            text += f"\nreload hook {'succeeded' if hook['success'] else 'FAILED'}"
        return text
    if outcome == "not_due":
        return f"not due; renewal is due at {result.get('due_at')}"
    return f"{outcome}: {result['detail']}"


def _finish_pass(args: argparse.Namespace, result: dict[str, Any]) -> int:
    emit(result, args.json, _human_pass)
    return EXIT_ERROR if result["outcome"] in ("failed", "revoked") else 0


def _show_code(code: str) -> None:
    print(
        f"confirmation code: {code}  (the CA's operator must see the same code)",
        file=sys.stderr,
        flush=True,
    )


async def certmesh_via_node(args: argparse.Namespace, data: DataDir) -> int:
    """Send the command to the node that holds this data dir."""
    from koi_tray.api.manage import ManagementClient

    client = ManagementClient(data)
    action = args.action
    if action == "status":
        node = await client.call("GET", "node-status")
        koi = await client.call("GET", "status")
        emit({**koi, "node": node}, args.json, _human_status)
    elif action == "invite":
        body = {"hostname": args.host, "ttl_mins": args.ttl}
        emit(await client.call("POST", "invite", body), args.json, _human_invite)
    elif action == "renew":
        result = await client.call("POST", "renew-now", {"force": args.force}, timeout=120)
        return _finish_pass(args, result)
    elif action == "revoke":
        body = {"hostname": args.host, "reason": args.reason, "operator": args.operator}
        await client.call("POST", "revoke", body)
        print(f"revoked {args.host}")
    elif action in ("open-enrollment", "close-enrollment"):
        answer = await client.call("POST", action)
        print(f"enrollment is {answer['enrollment_state']}")
    elif action == "unlock":
        passphrase = read_passphrase(args.passphrase_file)
        await client.call("POST", "unlock", {"passphrase": passphrase}, timeout=60)
        print("CA unlocked")
    elif action == "set-hook":
        host = args.host or (await client.call("GET", "node-status"))["hostname"]
        await client.call("PUT", "set-hook", {"hostname": host, "reload": args.reload})
        print("reload hook set")
    elif action == "log":
        print((await client.call("GET", "log"))["entries"], end="")
    else:
        raise CliError(f"'certmesh {action}' needs the node for {data.root} to be stopped first")
    return 0


class DirectCommands:
    """`certmesh` commands done on the data dir itself, while this process holds its lock."""

    def __init__(self, args: argparse.Namespace, config: NodeConfig) -> None:
        from koi_tray.certmesh.clock import SystemClock

        self.args = args
        self.config = config
        self.data = DataDir(config.data_dir)
        self.clock = SystemClock()

    async def run(self) -> int:
        handler = getattr(self, "do_" + self.args.action.replace("-", "_"))
        return await handler() or 0

    def open_ca(self) -> Any:
        from koi_tray.certmesh.ca import CertificateAuthority, require_ca

        ca = CertificateAuthority.open(self.data, self.config.hostname, clock=self.clock)
        return require_ca(ca)

    async def open_node(self) -> Any:
        from koi_tray.compose.deciders import deny_and_log_decider
        from koi_tray.compose.node import Node

        node = Node(self.config, deny_and_log_decider(), clock=self.clock)
        await node.open_offline()
        return node

    async def do_create(self) -> None:
        from koi_tray.compose import actions

        args = self.args
        posture = actions.posture_for(
            args.preset,
            enrollment_open=None if args.enrollment is None else args.enrollment == "open",
            requires_approval=None if args.approval is None else args.approval == "required",
        )
        actions.ensure_unconfigured(self.data)
        passphrase = read_passphrase(args.passphrase_file, confirm=True)
        ca = await asyncio.to_thread(
            actions.create_ca,
            self.data,
            self.config.hostname,
            passphrase,
            posture,
            args.operator,
            self.clock,
        )
        print(f"created the mesh CA on {self.config.hostname}")
        print(f"CA fingerprint: {ca.ca_fingerprint}")
        if ca.auto_unlock_problem:
            print(
                f"note: auto-unlock is not available: {ca.auto_unlock_problem}; the CA "
                "will start locked and ask for its passphrase"
            )

    async def do_status(self) -> None:
        node = await self.open_node()
        value = {**node.koi_status(), "node": node.status.snapshot.to_json()}
        emit(value, self.args.json, _human_status)

    async def do_renew(self) -> int:
        node = await self.open_node()
        if node.ca is not None and node.ca.locked and (self.args.force or node.ca.self_leaf_due()):
            passphrase = read_passphrase(self.args.passphrase_file)
            await asyncio.to_thread(node.ca.unlock, passphrase)
        result = await node.renewal.pass_now(self.args.force)
        return _finish_pass(self.args, result.to_json())

    async def do_invite(self) -> None:
        ca = self.open_ca()
        minted = ca.mint_invite(self.args.host, dt.timedelta(minutes=self.args.ttl))
        value = {
            "token": minted.code,
            "hostname": minted.hostname,
            "expires_at": minted.expires_at.isoformat(),
            "ca_fingerprint": ca.ca_fingerprint,
        }
        emit(value, self.args.json, _human_invite)

    async def do_join(self) -> None:
        from koi_tray.compose import actions

        membership = await actions.join_mesh(
            self.data,
            self.config.hostname,
            self.args.endpoint,
            self.args.invite,
            self.clock,
            _show_code,
        )
        leaf = membership.leaf()
        value = {
            "hostname": membership.state.hostname,
            "ca_fingerprint": membership.state.ca_fingerprint,
            "expires": leaf.cert.not_valid_after_utc.isoformat() if leaf else None,
        }
        emit(
            value,
            self.args.json,
            lambda v: f"joined as {v['hostname']}; certificate expires {v['expires']}",
        )

    async def do_revoke(self) -> None:
        self.open_ca().revoke(self.args.host, self.args.reason, self.args.operator)
        print(f"revoked {self.args.host}")

    async def do_open_enrollment(self) -> None:
        self.open_ca().set_enrollment(True)
        print("enrollment is open")

    async def do_close_enrollment(self) -> None:
        self.open_ca().set_enrollment(False)
        print("enrollment is closed")

    async def do_set_hook(self) -> None:
        from koi_tray.certmesh.member import Membership

        membership = Membership.load(self.data, self.clock)
        own = membership is not None and self.args.host in (None, membership.state.hostname)
        if own:
            membership.set_reload_hook(self.args.reload)
        else:
            self.open_ca().set_hook(self.args.host or self.config.hostname, self.args.reload)
        print("reload hook set")

    async def do_log(self) -> None:
        path = self.data.audit_log
        print(path.read_text("utf-8") if path.exists() else "", end="")

    async def do_unlock(self) -> None:
        ca = self.open_ca()
        await asyncio.to_thread(ca.unlock, read_passphrase(self.args.passphrase_file))
        print(
            "the passphrase is correct, but no node is running to keep the CA unlocked; "
            "start one with the tray or 'koi-tray serve --passphrase-file FILE'"
        )


# -- entry point ------------------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> int:
    from koi_tray.compose.deciders import console_decider, deny_and_log_decider
    from koi_tray.compose.hosts import serve

    approval = args.approval or ("console" if sys.stdin.isatty() else "deny")
    decider = console_decider() if approval == "console" else deny_and_log_decider()
    passphrase = read_passphrase(args.passphrase_file) if args.passphrase_file else None
    log.info("approvals on this node: %s", approval)
    return asyncio.run(serve(node_config(args, "serve"), decider, passphrase))


def run_autostart(args: argparse.Namespace) -> int:
    from koi_tray.autostart import AutostartError, autostart_for_platform

    autostart = autostart_for_platform()
    try:
        if args.action == "enable":
            status = autostart.enable(args.data_dir)
        elif args.action == "disable":
            status = autostart.disable()
        else:
            status = autostart.status(args.data_dir)
    except AutostartError as exc:
        raise CliError(str(exc)) from exc
    words = {
        "enabled": "enabled",
        "disabled": "disabled",
        "disabled_by_user": "disabled by the user",
    }
    print(f"start at login: {words.get(status.state, status.state)} ({status.location})")
    if status.command:
        print(f"command: {status.command}")
    if status.stale:
        print("the command is stale (the program moved); 'koi-tray autostart enable' repairs it")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "tray"):
        from koi_tray.desktop.app import run_tray

        if args.command is None:
            args = build_parser().parse_args([*(argv or sys.argv[1:]), "tray"])
        return run_tray(node_config(args, "tray"), args.backend)

    configure_logging(args.verbose)
    try:
        if args.command == "serve":
            return run_serve(args)
        if args.command == "autostart":
            return run_autostart(args)
        return asyncio.run(run_certmesh(args))
    except (CertmeshError, CliError) as exc:
        code = getattr(exc, "code", None)
        suffix = f" [{code}]" if code else ""
        print(f"koi-tray: error: {exc}{suffix}", file=sys.stderr)
        log.debug("command failed", exc_info=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("koi-tray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
