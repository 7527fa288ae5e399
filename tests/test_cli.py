"""End-to-end tests of the `koi-tray` command: real processes, real ports, real files.

Every node here is a separate process: the CA runs `koi-tray serve`, the member is driven
by one `koi-tray certmesh ...` process per step, exactly as a person would type them.
The CA is created with the real Argon2id parameters. Subprocesses get a keyring backend
that refuses everything, so no test touches the developer's keyring, and every `serve`
started here is stopped in the fixture's teardown whatever the test did.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from koi_tray.certmesh import pki
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.deciders import deny_and_log_decider
from koi_tray.compose.lock import NodeAlreadyRunning
from koi_tray.compose.node import Node

PASSPHRASE = "correct horse battery"
KOI = [sys.executable, "-m", "koi_tray"]
ERROR_LINE = re.compile(r"^koi-tray: error: .+ \[([a-z_]+)\]$")
START_TIMEOUT = 20.0


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it; we release it at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KOI_TRAY_DATA_DIR"}
    env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"
    return env


def koi(data: Path, *args: str, hostname: str | None = None) -> subprocess.CompletedProcess:
    """Run one `koi-tray` command for the data dir `data` and wait for it."""
    prefix = ["--data-dir", str(data)] + (["--hostname", hostname] if hostname else [])
    return subprocess.run(
        [*KOI, *prefix, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def as_json(result: subprocess.CompletedProcess) -> dict[str, Any]:
    return json.loads(ok(result).stdout)


def error_code(result: subprocess.CompletedProcess) -> str:
    """The code of the one `koi-tray: error: ... [code]` line; the command failed."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("koi-tray: error:")]
    assert len(lines) == 1, result.stderr
    match = ERROR_LINE.match(lines[0])
    assert match, lines[0]
    return match.group(1)


def get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET `url`; return (status, JSON body), also for error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = START_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def cert_fingerprint(path: Path) -> str:
    return pki.fingerprint(x509.load_pem_x509_certificate(path.read_bytes()))


class Served:
    """One `koi-tray serve` process for a data dir, on free loopback ports."""

    def __init__(
        self,
        data: Path,
        hostname: str | None,
        passphrase_file: Path | None,
        http_bind: str | None = None,
    ) -> None:
        self.data = data
        self.hostname = hostname
        self.passphrase_file = passphrase_file
        self.http_bind = http_bind
        self.log_path = data.parent / f"{data.name}-serve-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen | None = None
        self.http_port = 0
        self.mtls_port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, expect_mtls: bool) -> Served:
        """Start serving and wait until the HTTP port answers (and mTLS, for a CA).

        A restart (`stop`, then `start` again) keeps the ports, as members know them.
        """
        if not self.http_port:
            self.http_port, self.mtls_port = free_port(), free_port()
        naming = ["--hostname", self.hostname] if self.hostname else []
        argv = [
            *KOI,
            "--data-dir",
            str(self.data),
            *naming,
            "serve",
            "--http-port",
            str(self.http_port),
            "--mtls-port",
            str(self.mtls_port),
            "--mtls-bind",
            "127.0.0.1",
            "--approval",
            "deny",
        ]
        if self.passphrase_file is not None:
            argv += ["--passphrase-file", str(self.passphrase_file)]
        if self.http_bind is not None:
            argv += ["--http-bind", self.http_bind]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=cli_env()
            )
        wait_for(lambda: self._ready(expect_mtls), f"serve on {self.data} to be ready")
        return self

    def _ready(self, expect_mtls: bool) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log()}")
        try:
            crumb = json.loads((self.data / "node.json").read_text())
            if crumb.get("pid") != self.process.pid:
                return False
            status, body = get_json(f"{crumb['http']}/v1/certmesh/status", timeout=1.0)
        except (OSError, ValueError):
            return False
        if status != 200:
            return False
        # The breadcrumb is rewritten once the mTLS port runs, just after /status shows it.
        return not expect_mtls or body.get("mtls_port") == crumb.get("mtls_port") == self.mtls_port

    def stop(self) -> int | None:
        """SIGTERM, then wait; kill if the ordered shutdown hangs. Idempotent."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """Start `koi-tray serve` processes; all of them are stopped at teardown."""
    started: list[Served] = []

    def start(
        data: Path,
        hostname: str | None,
        passphrase_file: Path | None = None,
        expect_mtls: bool = False,
        http_bind: str | None = None,
    ) -> Served:
        node = Served(data, hostname, passphrase_file, http_bind)
        started.append(node)
        return node.start(expect_mtls)

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase"
    path.write_text(PASSPHRASE + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def ca_dir(tmp_path: Path, passphrase_file: Path) -> Path:
    """A CA made by `koi-tray certmesh create` (real Argon2id), not yet served."""
    data = tmp_path / "a"
    result = ok(
        koi(
            data,
            "certmesh",
            "create",
            "--preset",
            "just-me",
            "--passphrase-file",
            str(passphrase_file),
            hostname="ca-host",
        )
    )
    assert re.search(r"CA fingerprint: [0-9a-f]{64}", result.stdout)
    return data


def serve_ca(serve: Callable[..., Served], ca_dir: Path, passphrase_file: Path) -> Served:
    return serve(ca_dir, "ca-host", passphrase_file, expect_mtls=True)


def invite(data: Path, host: str) -> dict[str, Any]:
    return as_json(koi(data, "certmesh", "invite", host, "--json"))


def join(data: Path, host: str, ca: Served, code: str) -> subprocess.CompletedProcess:
    return koi(data, "certmesh", "join", ca.url, "--invite", code, "--json", hostname=host)


def check_node_status(doc: dict[str, Any], role: str, hostname: str) -> dict[str, Any]:
    """`status --json`: Koi's `/status` fields plus `node` (this node's own picture)."""
    for key in (
        "ca_initialized",
        "ca_locked",
        "enrollment_open",
        "requires_approval",
        "enrollment_state",
        "member_count",
        "seq",
        "policy",
        "members",
    ):
        assert key in doc, key
    node = doc["node"]
    assert node["role"] == role
    assert node["hostname"] == hostname
    leaf = node["leaf"]
    assert re.fullmatch(r"[0-9a-f]{64}", leaf["fingerprint"])
    assert leaf["not_after"].endswith("+00:00")
    assert isinstance(leaf["days_left"], int) and 85 <= leaf["days_left"] <= 90
    renewal = node["renewal"]
    for key in ("last_check_at", "last_outcome", "consecutive_failures", "next_check_at"):
        assert key in renewal, key
    assert isinstance(renewal["consecutive_failures"], int)
    assert {"seq", "received_at"} <= set(node["bundle"])
    assert isinstance(node["pending"], list)
    assert node["health"] in ("ok", "attention", "critical", "offline", "idle")
    return node


def mtls_post(
    port: int, cert_dir: Path, path: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """POST JSON to the CA's mTLS port presenting the leaf in `cert_dir`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(cert_dir / "ca.pem"))
    context.load_cert_chain(cert_dir / "cert.pem", cert_dir / "key.pem")
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        headers = {"content-type": "application/json"}
        connection.request("POST", f"/v1/certmesh/{path}", json.dumps(body), headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_mesh_across_processes_join_renew_revoke(
    tmp_path: Path, ca_dir: Path, passphrase_file: Path, serve: Callable[..., Served]
) -> None:
    ca = serve_ca(serve, ca_dir, passphrase_file)
    member = tmp_path / "b"
    ca_fp = get_json(f"{ca.url}/v1/certmesh/status")[1]["ca_fingerprint"]

    minted = invite(ca_dir, "node-02")
    assert minted["hostname"] == "node-02"
    assert minted["ca_fingerprint"] == ca_fp
    assert re.fullmatch(rf"[0-9a-f]{{48}}\.{ca_fp}", minted["token"])

    joined = join(member, "node-02", ca, minted["token"])
    answer = as_json(joined)
    assert answer["hostname"] == "node-02" and answer["ca_fingerprint"] == ca_fp
    assert "confirmation code:" in joined.stderr
    state = json.loads((member / "certmesh" / "member.json").read_text())
    assert state["ca_mtls_port"] == ca.mtls_port
    assert state["ca_http_port"] == ca.http_port
    leaf_dir = member / "certs" / "node-02"
    joined_fp = cert_fingerprint(leaf_dir / "cert.pem")

    renewed = as_json(koi(member, "certmesh", "renew", "--force", "--json", hostname="node-02"))
    assert renewed["outcome"] == "renewed"
    renewed_fp = cert_fingerprint(leaf_dir / "cert.pem")
    assert renewed_fp != joined_fp
    roster = {m["hostname"]: m for m in get_json(f"{ca.url}/v1/certmesh/status")[1]["members"]}
    assert roster["node-02"]["cert_fingerprint"] == renewed_fp

    assert "revoked node-02" in ok(koi(ca_dir, "certmesh", "revoke", "node-02")).stdout

    # The CA refuses the member's own leaf on the mTLS port, and says why.
    csr = pki.build_csr(pki.generate_key(), "node-02", ["node-02", "node-02.local"]).decode()
    status, body = mtls_post(ca.mtls_port, leaf_dir, "renew", {"hostname": "node-02", "csr": csr})
    assert (status, body["error"]) == (403, "revoked")
    assert "mtls_revoked_rejected" in ok(koi(ca_dir, "certmesh", "log")).stdout

    # The member's own pass pulls the bundle, learns it is revoked, and fails loudly.
    refused = koi(member, "certmesh", "renew", "--force", "--json", hostname="node-02")
    assert refused.returncode != 0
    assert json.loads(refused.stdout)["outcome"] == "revoked"
    assert cert_fingerprint(leaf_dir / "cert.pem") == renewed_fp

    def assert_revoked(doc: dict[str, Any]) -> None:
        node = doc["node"]
        assert node["bundle"]["self_revoked"] is True
        assert node["health"] == "critical"

    assert_revoked(as_json(koi(member, "certmesh", "status", "--json", hostname="node-02")))

    # The CA restarted (same ports, a new process) still refuses the revoked member.
    assert ca.stop() == 0
    ca.start(expect_mtls=True)
    status, body = mtls_post(ca.mtls_port, leaf_dir, "renew", {"hostname": "node-02", "csr": csr})
    assert (status, body["error"]) == (403, "revoked")
    again = koi(member, "certmesh", "renew", "--force", "--json")
    assert again.returncode != 0
    assert json.loads(again.stdout)["outcome"] == "revoked"
    assert cert_fingerprint(leaf_dir / "cert.pem") == renewed_fp
    roster = {m["hostname"]: m for m in get_json(f"{ca.url}/v1/certmesh/status")[1]["members"]}
    assert roster["node-02"]["status"] == "revoked"

    # A member node restarted twice (new processes) still knows, also through its API.
    for _ in range(2):
        running = serve(member, "node-02")
        assert_revoked(as_json(koi(member, "certmesh", "status", "--json", hostname="node-02")))
        assert running.stop() == 0
    assert_revoked(as_json(koi(member, "certmesh", "status", "--json", hostname="node-02")))


def test_status_json_carries_koi_fields_and_the_node(
    tmp_path: Path, ca_dir: Path, passphrase_file: Path, serve: Callable[..., Served]
) -> None:
    ca = serve_ca(serve, ca_dir, passphrase_file)
    member = tmp_path / "b"
    ok(join(member, "node-02", ca, invite(ca_dir, "node-02")["token"]))

    ca_doc = as_json(koi(ca_dir, "certmesh", "status", "--json"))
    node = check_node_status(ca_doc, "ca", "ca-host")
    assert ca_doc["ca_initialized"] is True and ca_doc["ca_locked"] is False
    assert ca_doc["member_count"] == 2
    assert {m["hostname"] for m in ca_doc["members"]} == {"ca-host", "node-02"}
    assert node["bundle"]["seq"] == ca_doc["seq"]
    assert node["leaf"]["fingerprint"] == cert_fingerprint(ca_dir / "certs/ca-host/cert.pem")

    member_doc = as_json(koi(member, "certmesh", "status", "--json", hostname="node-02"))
    node = check_node_status(member_doc, "member", "node-02")
    assert member_doc["ca_initialized"] is False
    assert node["leaf"]["fingerprint"] == cert_fingerprint(member / "certs/node-02/cert.pem")
    assert node["bundle"]["self_revoked"] is False

    ok(koi(member, "certmesh", "renew", "--json", hostname="node-02"))
    node = check_node_status(
        as_json(koi(member, "certmesh", "status", "--json", hostname="node-02")),
        "member",
        "node-02",
    )
    assert node["renewal"]["last_outcome"] == "not_due"
    assert node["renewal"]["consecutive_failures"] == 0
    assert node["renewal"]["next_check_at"] > node["renewal"]["last_check_at"]
    assert node["bundle"]["seq"] == ca_doc["seq"]
    assert node["bundle"]["received_at"] is not None
    assert node["health"] == "ok"


def test_one_node_per_data_dir(
    tmp_path: Path, ca_dir: Path, passphrase_file: Path, serve: Callable[..., Served]
) -> None:
    ca = serve_ca(serve, ca_dir, passphrase_file)
    crumb = (ca_dir / "node.json").read_bytes()

    result = koi(
        ca_dir,
        "serve",
        "--http-port",
        str(free_port()),
        "--mtls-port",
        str(free_port()),
        "--approval",
        "deny",
        "--passphrase-file",
        str(passphrase_file),
        hostname="ca-host",
    )
    assert error_code(result) == "conflict"
    assert "already running" in result.stderr
    assert (ca_dir / "node.json").read_bytes() == crumb
    assert get_json(f"{ca.url}/v1/certmesh/status")[0] == 200

    async def start_in_process() -> None:
        config = NodeConfig(data_dir=ca_dir, hostname="ca-host", http_port=0, mtls_port=0)
        node = Node(config, deny_and_log_decider())
        with pytest.raises(NodeAlreadyRunning, match="already running"):
            await node.start()

    asyncio.run(start_in_process())
    assert (ca_dir / "node.json").read_bytes() == crumb

    # While the node runs the CLI goes through its API; the invite it gets is usable.
    via_api = invite(ca_dir, "node-02")
    ok(join(tmp_path / "b", "node-02", ca, via_api["token"]))
    assert ca.stop() == 0
    assert not (ca_dir / "node.json").exists()

    # With no node running the CLI does the work itself, under the data-dir lock.
    direct = invite(ca_dir, "node-03")
    assert set(direct) == set(via_api)
    status = as_json(koi(ca_dir, "certmesh", "status", "--json"))
    assert {m["hostname"] for m in status["members"]} == {"ca-host", "node-02"}
    ca = serve_ca(serve, ca_dir, passphrase_file)
    ok(join(tmp_path / "c", "node-03", ca, direct["token"]))
    status = get_json(f"{ca.url}/v1/certmesh/status")[1]
    assert {m["hostname"] for m in status["members"]} == {"ca-host", "node-02", "node-03"}


def test_errors_are_one_line_with_a_code(
    tmp_path: Path, ca_dir: Path, passphrase_file: Path, serve: Callable[..., Served]
) -> None:
    ca = serve_ca(serve, ca_dir, passphrase_file)
    ca_fp = get_json(f"{ca.url}/v1/certmesh/status")[1]["ca_fingerprint"]
    member = tmp_path / "b"
    audit = ca_dir / "logs" / "certmesh-audit.log"

    forged = f"{'0' * 48}.{ca_fp}"
    assert error_code(join(member, "node-02", ca, forged)) == "invalid_auth"
    assert "enroll_token_invalid" in audit.read_text()
    assert not (member / "certmesh" / "member.json").exists()

    good = invite(ca_dir, "node-02")["token"]
    other_ca = good.split(".")[0] + "." + "ab" * 32
    before = audit.read_bytes()
    result = join(member, "node-02", ca, other_ca)
    assert error_code(result) == "invalid_auth"
    assert "nothing was sent" in result.stderr
    assert audit.read_bytes() == before
    assert error_code(join(member, "node-02", ca, good.split(".")[0])) == "invalid_auth"

    assert error_code(koi(ca_dir, "certmesh", "revoke", "no-such-host")) == "not_found"
    assert error_code(koi(ca_dir, "certmesh", "invite", "bad_name!")) == "invalid_payload"
    ok(join(member, "node-02", ca, good))
    assert error_code(join(tmp_path / "b2", "node-02", ca, good)) == "invalid_auth"

    wrong = tmp_path / "wrong-passphrase"
    wrong.write_text("not the passphrase\n")
    unlock = koi(ca_dir, "certmesh", "unlock", "--passphrase-file", str(wrong))
    assert error_code(unlock) == "invalid_auth"

    assert ca.stop() == 0
    assert error_code(koi(ca_dir, "certmesh", "revoke", "no-such-host")) == "not_found"
    assert error_code(koi(ca_dir, "certmesh", "unlock", "--passphrase-file", str(wrong))) == (
        "invalid_auth"
    )
    again = koi(
        ca_dir, "certmesh", "create", "--passphrase-file", str(passphrase_file), hostname="ca-host"
    )
    assert error_code(again) == "conflict"
    unreachable = join(tmp_path / "d", "node-04", ca, good)
    assert error_code(unreachable) == "ca_unreachable"
    assert "no answer from" in unreachable.stderr


def test_join_writes_files_a_koi_member_expects(
    tmp_path: Path, ca_dir: Path, passphrase_file: Path, serve: Callable[..., Served]
) -> None:
    ca = serve_ca(serve, ca_dir, passphrase_file)
    member = tmp_path / "b"
    ok(join(member, "node-02", ca, invite(ca_dir, "node-02")["token"]))

    leaf_dir = member / "certs" / "node-02"
    assert {p.name for p in leaf_dir.iterdir()} >= {
        "key.pem",
        "cert.pem",
        "ca.pem",
        "fullchain.pem",
    }
    assert leaf_dir.joinpath("key.pem").stat().st_mode & 0o077 == 0
    ca_pem = (ca_dir / "certmesh" / "ca" / "ca-cert.pem").read_bytes()
    assert leaf_dir.joinpath("ca.pem").read_bytes().strip() == ca_pem.strip()
    state = json.loads((member / "certmesh" / "member.json").read_text())
    ca_der = x509.load_pem_x509_certificate(ca_pem).public_bytes(Encoding.DER)
    assert state["ca_fingerprint"] == hashlib.sha256(ca_der).hexdigest()
    assert state["hostname"] == "node-02" and state["ca_host"] == "127.0.0.1"


def primaries(data: Path) -> list[str]:
    roster = json.loads((data / "certmesh" / "roster.json").read_text())
    return [m["hostname"] for m in roster["members"] if m["role"] == "primary"]


def test_the_data_dir_keeps_the_name_given_at_create_and_join(
    tmp_path: Path, ca_dir: Path, passphrase_file: Path, serve: Callable[..., Served]
) -> None:
    renewed = as_json(
        koi(
            ca_dir,
            "certmesh",
            "renew",
            "--force",
            "--json",
            "--passphrase-file",
            str(passphrase_file),
        )
    )
    assert renewed["outcome"] == "renewed"
    assert primaries(ca_dir) == ["ca-host"]
    assert sorted(p.name for p in (ca_dir / "certs").iterdir()) == ["ca-host"]
    assert as_json(koi(ca_dir, "certmesh", "status", "--json"))["node"]["hostname"] == "ca-host"
    conflicting = koi(ca_dir, "certmesh", "status", hostname="other-host")
    assert error_code(conflicting) == "conflict"
    assert "ca-host" in conflicting.stderr

    ca = serve(ca_dir, None, passphrase_file, expect_mtls=True)
    assert json.loads((ca_dir / "node.json").read_text())["hostname"] == "ca-host"
    member = tmp_path / "b"
    ok(join(member, "node-02", ca, invite(ca_dir, "node-02")["token"]))

    doc = as_json(koi(member, "certmesh", "status", "--json"))
    assert doc["node"]["hostname"] == "node-02" and doc["node"]["role"] == "member"
    assert (
        "reload hook set for node-02"
        in ok(koi(member, "certmesh", "set-hook", "--reload", "/bin/true")).stdout
    )
    running = serve(member, None)
    doc = as_json(koi(member, "certmesh", "status", "--json"))
    assert doc["node"]["hostname"] == "node-02"
    ok(koi(member, "certmesh", "set-hook", "--reload", "/usr/bin/true"))
    assert running.stop() == 0
    state = json.loads((member / "certmesh" / "member.json").read_text())
    assert state["reload_hook"] == "/usr/bin/true"
    assert primaries(ca_dir) == ["ca-host"]


def test_create_and_join_through_running_nodes(
    tmp_path: Path, passphrase_file: Path, serve: Callable[..., Served]
) -> None:
    ca_dir, member = tmp_path / "a", tmp_path / "b"
    ca = serve(ca_dir, None)
    created = koi(
        ca_dir,
        "certmesh",
        "create",
        "--hostname",
        "ca-host",
        "--passphrase-file",
        str(passphrase_file),
    )
    assert "created the mesh CA on ca-host" in ok(created).stdout
    wait_for(lambda: ca._ready(expect_mtls=True), "the node's mTLS port")
    doc = as_json(koi(ca_dir, "certmesh", "status", "--json"))
    assert doc["node"]["role"] == "ca" and doc["node"]["hostname"] == "ca-host"
    assert doc["mtls_port"] == ca.mtls_port
    with socket.create_connection(("127.0.0.1", ca.mtls_port), timeout=5) as raw:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(ca_dir / "certmesh/ca/ca-cert.pem"))
        with context.wrap_socket(raw, server_hostname="ca-host") as tls:
            peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    assert pki.leaf_common_name(peer) == "ca-host"
    again = koi(ca_dir, "certmesh", "create", "--passphrase-file", str(passphrase_file))
    assert error_code(again) == "conflict"

    running = serve(member, None)
    code = invite(ca_dir, "node-02")["token"]
    joined = koi(member, "certmesh", "join", ca.url, "--invite", code, "--hostname", "node-02")
    assert re.search(r"confirmation code: \d{3} \d{3}", ok(joined).stderr)
    assert "joined as node-02" in joined.stdout
    doc = as_json(koi(member, "certmesh", "status", "--json"))
    assert doc["node"]["role"] == "member" and doc["node"]["hostname"] == "node-02"
    assert json.loads((member / "node.json").read_text())["hostname"] == "node-02"
    renewed = as_json(koi(member, "certmesh", "renew", "--force", "--json"))
    assert renewed["outcome"] == "renewed"
    assert running.stop() == 0
    assert primaries(ca_dir) == ["ca-host"]


def test_join_through_a_node_reports_the_cas_refusal(
    tmp_path: Path, ca_dir: Path, passphrase_file: Path, serve: Callable[..., Served]
) -> None:
    ca = serve_ca(serve, ca_dir, passphrase_file)
    member = tmp_path / "b"
    serve(member, None)
    forged = f"{'0' * 48}.{get_json(f'{ca.url}/v1/certmesh/status')[1]['ca_fingerprint']}"
    refused = koi(member, "certmesh", "join", ca.url, "--invite", forged, hostname="node-02")
    assert error_code(refused) == "invalid_auth"
    assert "confirmation code:" in refused.stderr
    assert not (member / "certmesh" / "member.json").exists()
    doc = as_json(koi(member, "certmesh", "status", "--json"))
    assert doc["node"]["role"] == "unconfigured"


def test_serve_with_a_wrong_passphrase_cleans_up(
    tmp_path: Path, ca_dir: Path, passphrase_file: Path, serve: Callable[..., Served]
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    ports = ["--http-port", str(free_port()), "--mtls-port", str(free_port())]
    result = koi(ca_dir, "serve", *ports, "--approval", "deny", "--passphrase-file", str(wrong))
    assert error_code(result) == "invalid_auth"
    assert not (ca_dir / "node.json").exists()
    assert not (ca_dir / "node.token").exists()
    serve_ca(serve, ca_dir, passphrase_file)  # the lock was released


def test_node_files_are_owner_only_and_http_binds_loopback(
    tmp_path: Path, ca_dir: Path, passphrase_file: Path, serve: Callable[..., Served]
) -> None:
    ca = serve_ca(serve, ca_dir, passphrase_file)
    for name in ("node.json", "node.token"):
        assert (ca_dir / name).stat().st_mode & 0o777 == 0o600, name
    assert json.loads((ca_dir / "node.json").read_text())["http"] == ca.url
    assert get_json(f"{ca.url}/v1/certmesh/status")[0] == 200
    with pytest.raises(OSError):  # 127.0.0.2 is loopback too, but not the bound address
        socket.create_connection(("127.0.0.2", ca.http_port), timeout=2).close()
    assert ca.stop() == 0

    wide = serve(tmp_path / "c", "node-03", http_bind="0.0.0.0")
    assert json.loads((wide.data / "node.json").read_text())["http"] == wide.url
    assert get_json(f"http://127.0.0.2:{wide.http_port}/v1/certmesh/status")[0] == 200
    assert as_json(koi(wide.data, "certmesh", "status", "--json"))["node"]["role"] == (
        "unconfigured"
    )


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_http_bind_ipv6_wildcard_keeps_the_cli_working(
    tmp_path: Path, serve: Callable[..., Served]
) -> None:
    node = serve(tmp_path / "v6", "node-06", http_bind="::")
    crumb = json.loads((node.data / "node.json").read_text())
    assert crumb["http"] == f"http://[::1]:{node.http_port}"
    assert as_json(koi(node.data, "certmesh", "status", "--json"))["node"]["hostname"] == (
        "node-06"
    )


def test_bad_input_gets_one_line(
    tmp_path: Path, ca_dir: Path, passphrase_file: Path, serve: Callable[..., Served]
) -> None:
    data = tmp_path / "x"
    for port in ("70000", "-1", "http"):
        result = koi(data, "serve", "--http-port", port)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "is not a port number (0 to 65535)" in result.stderr.splitlines()[-1]

    empty = tmp_path / "empty"
    empty.write_text("")
    result = koi(data, "certmesh", "create", "--passphrase-file", str(empty))
    assert error_code(result) == "usage" and "is empty" in result.stderr

    # One-shot commands print only their answer; -v adds the log lines.
    renew = ["certmesh", "renew", "--force", "--passphrase-file", str(passphrase_file)]
    assert " INFO " not in ok(koi(ca_dir, *renew)).stderr
    assert " INFO koi_tray.certmesh.ca: issued " in ok(koi(ca_dir, *renew, "-v")).stderr

    ca = serve_ca(serve, ca_dir, passphrase_file)
    garbage = join(data, "node-02", ca, "garbage")
    assert error_code(garbage) == "invalid_auth"
    assert "not an invite code" in garbage.stderr
    shouted = join(data, "node-02", ca, invite(ca_dir, "node-02")["token"].upper())
    assert as_json(shouted)["hostname"] == "node-02"

    quiet = ok(koi(ca_dir, "certmesh", "status"))
    assert quiet.stderr == ""
    assert "trust bundle: published here, seq" in quiet.stdout

    mine = koi(ca_dir, "certmesh", "set-hook", "--reload", "/bin/true")
    assert error_code(mine) == "invalid_payload" and "own host" in mine.stderr


def test_output_to_a_closed_pipe_exits_quietly(ca_dir: Path) -> None:
    process = subprocess.Popen(
        [*KOI, "--data-dir", str(ca_dir), "certmesh", "log"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # like `| head` that already exited
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) != 0
    assert stderr == ""


def test_a_failing_reload_hook_fails_the_command_but_keeps_the_renewal(
    tmp_path: Path, ca_dir: Path, passphrase_file: Path, serve: Callable[..., Served]
) -> None:
    ca = serve_ca(serve, ca_dir, passphrase_file)
    member = tmp_path / "b"
    ok(join(member, "node-02", ca, invite(ca_dir, "node-02")["token"]))
    ok(koi(member, "certmesh", "set-hook", "--reload", "/bin/false"))
    before = cert_fingerprint(member / "certs/node-02/cert.pem")

    result = koi(member, "certmesh", "renew", "--force")
    assert result.returncode == 1
    assert "renewed" in result.stdout and "reload hook FAILED" in result.stdout
    assert cert_fingerprint(member / "certs/node-02/cert.pem") != before


def test_autostart_from_the_cli_carries_the_tray_options(tmp_path: Path) -> None:
    data = tmp_path / "data"
    home = tmp_path / "home"
    env = {**cli_env(), "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    env["XDG_DATA_HOME"] = str(home / ".local" / "share")

    def autostart(*args: str) -> subprocess.CompletedProcess:
        argv = [*KOI, "--data-dir", str(data), "autostart", *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        return ok(done)

    enabled = autostart("enable", "--http-bind", "0.0.0.0")
    entry = home / ".config" / "autostart" / "koi-tray.desktop"
    exec_line = next(line for line in entry.read_text().splitlines() if line.startswith("Exec="))

    assert "start at login: enabled" in enabled.stdout
    assert f'--data-dir "{data}" tray --http-bind 0.0.0.0' in exec_line
    same = autostart("status", "--http-bind", "0.0.0.0")
    assert "enabled" in same.stdout and "other options" not in same.stdout
    assert "other options" in autostart("status").stdout
    assert "disabled" in autostart("disable").stdout
    assert not entry.exists()
