"""The `koi-tray` command: the tray, the headless node, and certmesh administration.

    koi-tray                                   start the tray (same as `koi-tray tray`)
    koi-tray tray [--tray qt|pystray]          the tray, with the node options below
    koi-tray serve [--approval console|deny]   the headless node
    koi-tray certmesh create|unlock|status|invite|join|renew|revoke|...
    koi-tray autostart enable|disable|status

Where a node runs for the data dir, `certmesh` commands (create and join included) go
through its API with the management token; where none runs they do the work themselves
under the data-dir lock. `--hostname` names a node at create or join; afterwards the name
the data dir records is used, and a different `--hostname` is refused. One-shot commands
log warnings only (`-v` for more); `serve` and the tray log at INFO.
Errors print one line (`koi-tray: error: <message> [<code>]`) and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from koi_tray import __version__
from koi_tray.certmesh.errors import CertmeshError
from koi_tray.certmesh.layout import DataDir
from koi_tray.compose.config import NodeConfig, default_data_dir, resolve_hostname

log = logging.getLogger(__name__)

EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A refusal the command line reports in one line (bad use, unreadable input)."""

    code = "usage"


# -- argument parsing -------------------------------------------------------------------


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 (the OS picks one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return port


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--data-dir, --hostname and -v, before the command or (suppress=True) after it.

    After the command their defaults are SUPPRESS, so an option not repeated there keeps
    the value given before the command.
    """
    default = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="data directory (default: per user, or $KOI_TRAY_DATA_DIR)",
        **default,
    )
    parser.add_argument(
        "--hostname",
        metavar="NAME",
        help="this node's name in the mesh, at create or join (default: the machine's "
        "hostname); afterwards the data dir's recorded name is used",
        **default,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        help="log more: -v info, -vv debug (serve and the tray log info already)",
        **({"default": argparse.SUPPRESS} if suppress else {"default": 0}),
    )


def _node_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--http-bind",
        default="127.0.0.1",
        metavar="ADDR",
        help="address for the HTTP port (default 127.0.0.1; 0.0.0.0 or :: to accept joins "
        "from the LAN)",
    )
    parser.add_argument(
        "--http-port",
        type=port_number,
        default=5641,
        metavar="N",
        help="HTTP port: joins, status, trust bundle, management (default 5641)",
    )
    parser.add_argument(
        "--mtls-bind",
        default="0.0.0.0",
        metavar="ADDR",
        help="address for the CA's mTLS renewal port (default 0.0.0.0)",
    )
    parser.add_argument(
        "--mtls-port",
        type=port_number,
        default=5642,
        metavar="N",
        help="the CA's mTLS renewal port (default 5642)",
    )


def _tray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tray",
        choices=("qt", "pystray"),
        default="qt",
        dest="backend",
        help="tray backend (default qt)",
    )
    _node_options(parser)


def _passphrase_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--passphrase-file", type=Path, metavar="FILE", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="koi-tray", description="A certmesh node (CA or member) in your system tray."
    )
    parser.add_argument("--version", action="version", version=f"koi-tray {__version__}")
    _global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command")

    def command(group: Any, name: str, **options: Any) -> argparse.ArgumentParser:
        sub = group.add_parser(name, **options)
        _global_options(sub, suppress=True)
        return sub

    tray = command(commands, "tray", help="start the tray (the default)")
    _tray_options(tray)

    serve = command(commands, "serve", help="run the node headless")
    serve.add_argument(
        "--approval",
        choices=("console", "deny"),
        help="who decides joins that need approval (default: console on a "
        "terminal, deny otherwise)",
    )
    _passphrase_option(serve, "unlock the CA at start with the first line of FILE")
    _node_options(serve)

    certmesh = command(commands, "certmesh", help="administer the mesh").add_subparsers(
        dest="action", required=True
    )
    create = command(certmesh, "create", help="create a CA on this node")
    create.add_argument(
        "--preset",
        choices=("just-me", "team", "organization"),
        default="just-me",
        help="enrollment, approval and auto-unlock defaults (default just-me)",
    )
    create.add_argument("--operator", help="operator name (required when joins need approval)")
    create.add_argument("--enrollment", choices=("open", "closed"), help="override the preset")
    create.add_argument("--approval", choices=("required", "none"), help="override the preset")
    _passphrase_option(create, "read the new CA passphrase from FILE instead of asking")
    unlock = command(certmesh, "unlock", help="unlock the running CA")
    _passphrase_option(unlock, "read the passphrase from FILE instead of asking")
    status = command(certmesh, "status", help="show this node's status")
    status.add_argument("--json", action="store_true", help="print JSON")
    invite = command(certmesh, "invite", help="make a one-time invite for a host")
    invite.add_argument("host", help="hostname the invite is for")
    invite.add_argument(
        "--ttl", type=int, default=60, metavar="MINUTES", help="validity (default 60)"
    )
    invite.add_argument("--json", action="store_true", help="print JSON")
    join = command(certmesh, "join", help="join a mesh")
    join.add_argument("endpoint", help="the CA's HTTP endpoint, e.g. http://ca-host:5641")
    join.add_argument(
        "--invite", required=True, metavar="CODE", help="the code 'certmesh invite' printed"
    )
    join.add_argument("--json", action="store_true", help="print JSON")
    renew = command(certmesh, "renew", help="run a renewal check now")
    renew.add_argument("--force", action="store_true", help="renew even if not due")
    renew.add_argument("--json", action="store_true", help="print JSON")
    _passphrase_option(renew, "unlock a locked CA for this renewal")
    revoke = command(certmesh, "revoke", help="revoke a member for good")
    revoke.add_argument("host", help="the member to revoke")
    revoke.add_argument("--reason", help="recorded in the roster and the audit log")
    revoke.add_argument("--operator", help="who revokes (recorded)")
    command(certmesh, "open-enrollment", help="let invited hosts join")
    command(certmesh, "close-enrollment", help="refuse every join")
    hook = command(
        certmesh,
        "set-hook",
        help="command a member runs after each renewal (not on the CA's own host)",
    )
    hook.add_argument(
        "--reload", required=True, metavar="CMD", help="absolute path and arguments, no shell"
    )
    hook.add_argument("--host", help="member to set it for (default: this node)")
    command(certmesh, "log", help="print the audit log")

    autostart = command(
        commands,
        "autostart",
        help="start the tray at login, with the tray options given here (as the menu does)",
    )
    autostart.add_argument("action", choices=("enable", "disable", "status"))
    _tray_options(autostart)
    return parser


# -- helpers ----------------------------------------------------------------------------


def read_passphrase(path: Path | None, confirm: bool = False) -> str:
    """Read a passphrase from a file (first line) or a prompt without echo."""
    if path is not None:
        try:
            lines = path.read_text("utf-8").splitlines()
        except (OSError, UnicodeError) as exc:
            raise CliError(f"cannot read a passphrase from {path}: {exc}") from exc
        if not lines or not lines[0]:
            raise CliError(
                f"the passphrase file {path} is empty (its first line is the passphrase)"
            )
        return lines[0]
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for the passphrase; use --passphrase-file")
    first = getpass.getpass("CA passphrase: ")
    if confirm and getpass.getpass("Repeat the passphrase: ") != first:
        raise CliError("the passphrases do not match")
    return first


def node_config(args: argparse.Namespace, host_kind: str) -> NodeConfig:
    """The node's configuration; its hostname is the one the data dir records, if any.

    Raises:
        Conflict: `--hostname` differs from the name the data dir records.
    """
    data_dir = args.data_dir or default_data_dir()
    return NodeConfig(
        data_dir=data_dir,
        hostname=resolve_hostname(data_dir, args.hostname),
        http_bind=getattr(args, "http_bind", "127.0.0.1"),
        http_port=getattr(args, "http_port", 5641),
        mtls_bind=getattr(args, "mtls_bind", "0.0.0.0"),
        mtls_port=getattr(args, "mtls_port", 5642),
        host_kind=host_kind,
    )


def emit(value: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    print(json.dumps(value, indent=2) if as_json else human(value))


def log_level(verbose: int, long_running: bool) -> int:
    """WARNING for one-shot commands, INFO for serve and the tray; each -v one step more."""
    levels = [logging.WARNING, logging.INFO, logging.DEBUG]
    return levels[min(len(levels) - 1, verbose + (1 if long_running else 0))]


def configure_logging(level: int) -> None:
    """Log to stderr at `level` (one-shot commands and serve; the tray sets up its own)."""
    logging.basicConfig(
        level=level,
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
    if bundle and node["role"] == "ca":
        lines.append(f"  trust bundle: published here, seq {bundle['seq']}")
    elif bundle and bundle.get("received_at"):
        lines.append(f"  trust bundle: seq {bundle['seq']}, received {bundle['received_at']}")
    elif bundle:
        lines.append("  trust bundle: none received yet")
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


def _hook_failed(result: dict[str, Any]) -> bool:
    hook = result.get("hook")
    return isinstance(hook, dict) and not hook.get("success", False)


def _human_pass(result: dict[str, Any]) -> str:
    outcome = result["outcome"]
    if outcome == "renewed":
        text = f"renewed; the certificate now expires {result['expires']}"
        if _hook_failed(result):
            hook = result["hook"]
            output = f": {hook['output']}" if hook.get("output") else ""
            text += (
                f"\nbut the reload hook FAILED ({hook.get('command')}){output}; the new "
                "certificate is installed, reload the service by hand"
            )
        elif "hook" in result:
            text += "\nreload hook succeeded"
        return text
    if outcome == "not_due":
        return f"not due; renewal is due at {result.get('due_at')}"
    return f"{outcome}: {result['detail']}"


def _finish_pass(args: argparse.Namespace, result: dict[str, Any]) -> int:
    emit(result, args.json, _human_pass)
    failed = result["outcome"] in ("failed", "revoked") or _hook_failed(result)
    return EXIT_ERROR if failed else 0


def _show_code(code: str) -> None:
    print(
        f"confirmation code: {code}  (the CA's operator must see the same code)",
        file=sys.stderr,
        flush=True,
    )


def _posture_flags(args: argparse.Namespace) -> dict[str, bool | None]:
    """`--enrollment` and `--approval` as posture overrides (None: the preset decides)."""
    return {
        "enrollment_open": None if args.enrollment is None else args.enrollment == "open",
        "requires_approval": None if args.approval is None else args.approval == "required",
    }


def _report_created(hostname: str, fingerprint: str, auto_unlock_problem: str | None) -> None:
    """Say what `certmesh create` made, the same whether a node or this process made it."""
    print(f"created the mesh CA on {hostname}")
    print(f"CA fingerprint: {fingerprint}")
    if auto_unlock_problem:
        print(
            f"note: auto-unlock is not available: {auto_unlock_problem}; the CA "
            "will start locked and ask for its passphrase"
        )


def _report_joined(args: argparse.Namespace, joined: dict[str, Any]) -> None:
    """Say what `certmesh join` did (the confirmation code went to stderr before)."""
    emit(
        joined,
        args.json,
        lambda v: f"joined as {v['hostname']}; certificate expires {v['expires']}",
    )


async def certmesh_via_node(args: argparse.Namespace, data: DataDir) -> int:
    """Send the command to the node that holds this data dir."""
    from koi_tray.api.manage import ManagementClient
    from koi_tray.compose import actions

    client = ManagementClient(data)
    action = args.action
    if action == "status":
        node = await client.call("GET", "node-status")
        koi = await client.call("GET", "status")
        emit({**koi, "node": node}, args.json, _human_status)
    elif action == "create":
        actions.ensure_unconfigured(data)
        body = {
            "passphrase": read_passphrase(args.passphrase_file, confirm=True),
            "preset": args.preset,
            "operator": args.operator,
            "hostname": args.hostname,
            **_posture_flags(args),
        }
        made = await client.call("POST", "create", body, timeout=180)
        _report_created(made["hostname"], made["ca_fingerprint"], made["auto_unlock_problem"])
    elif action == "join":
        actions.ensure_unconfigured(data)
        joined = await client.join(args.endpoint, args.invite, args.hostname, _show_code)
        _report_joined(args, joined)
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
        print(f"reload hook set for {host}")
    elif action == "log":
        print((await client.call("GET", "log"))["entries"], end="")
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
        posture = actions.posture_for(args.preset, **_posture_flags(args))
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
        _report_created(ca.hostname, ca.ca_fingerprint, ca.auto_unlock_problem)

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
        from koi_tray.api.server import membership_summary
        from koi_tray.compose import actions

        membership = await actions.join_mesh(
            self.data,
            self.config.hostname,
            self.args.endpoint,
            self.args.invite,
            self.clock,
            _show_code,
        )
        _report_joined(self.args, membership_summary(membership))

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
        node = await self.open_node()
        host = self.args.host or node.config.hostname
        await node.set_hook(host, self.args.reload)
        print(f"reload hook set for {host}")

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
    from koi_tray.desktop.app import autostart_data_dir, login_arguments

    config = node_config(args, "tray")
    data_dir = autostart_data_dir(config.data_dir)
    extra = login_arguments(config, args.backend)
    try:
        autostart = autostart_for_platform()
        if args.action == "enable":
            status = autostart.enable(data_dir, extra)
        elif args.action == "disable":
            status = autostart.disable()
        else:
            status = autostart.status(data_dir, extra)
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
    if status.stale and status.moved:
        print("the entry's program no longer exists; 'koi-tray autostart enable' repairs it")
    elif status.stale:
        print("the entry starts koi-tray with other options than these; 'enable' rewrites it")
    return 0


def _run_tray(args: argparse.Namespace, argv: list[str]) -> int:
    """The tray. It sets up its own log (file, and the terminal when there is one)."""
    from koi_tray.desktop.app import run_tray

    if args.command is None:
        args = build_parser().parse_args([*argv, "tray"])
    level = log_level(args.verbose, long_running=True)
    return run_tray(node_config(args, "tray"), args.backend, level)


def _run_command(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command in (None, "tray"):
        return _run_tray(args, argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "autostart":
        return run_autostart(args)
    return asyncio.run(run_certmesh(args))


def _quiet_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the exit flush stays silent."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    """Run the `koi-tray` command; return its exit status."""
    argv = argv if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(argv)
    if args.command not in (None, "tray"):
        configure_logging(log_level(args.verbose, long_running=args.command == "serve"))
    try:
        status = _run_command(args, argv)
        sys.stdout.flush()
        return status
    except (CertmeshError, CliError) as exc:
        code = getattr(exc, "code", None)
        suffix = f" [{code}]" if code else ""
        print(f"koi-tray: error: {exc}{suffix}", file=sys.stderr)
        log.debug("command failed", exc_info=True)
        return EXIT_ERROR
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("koi-tray: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(
            f"koi-tray: error: unexpected {exc!r}; run with -vv for details [internal]",
            file=sys.stderr,
        )
        log.debug("command failed unexpectedly", exc_info=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
