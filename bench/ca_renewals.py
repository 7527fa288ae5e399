"""CA renewals per second: koi-tray's real `/renew` next to `cfssl serve`, same CSRs, same client.

Both servers run as their own processes on loopback with mutual TLS: `koi-tray serve` on a
CA with M enrolled members, and Debian's `cfssl serve` (package golang-cfssl) signing with
the same CA key and an equivalent leaf profile (90 days, digital signature + key
encipherment, server + client auth). One asyncio client drives both:

- fresh: a new mTLS connection per renewal, closed loop at concurrency 16 and 64;
- kept-alive: each connection carries two renewals, the most koi-tray allows on one
  connection, since a member may present only its current or previous leaf;
- open loop: renewals started at a fixed rate over fresh connections.

Every renewal uses a new key and CSR, and the member presents its newest leaf; each
server has its own pool of members, so neither sees the other's certificates. Server CPU
per renewal comes from /proc/<pid>/stat. Run: `.venv/bin/python bench/ca_renewals.py`.
The client shares the machine's two cores with the server, so absolute rates are lower
than on a dedicated CA; the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))

from _mesh import PASSPHRASE, percentile  # noqa: E402

from koi_tray.certmesh import keystore, pki  # noqa: E402
from koi_tray.certmesh.ca import PRESETS, CertificateAuthority, JoinRequest  # noqa: E402
from koi_tray.certmesh.layout import DataDir  # noqa: E402

CFSSL_CONFIG = {
    "signing": {
        "default": {"expiry": "2160h"},
        "profiles": {
            "leaf": {
                "expiry": "2160h",
                "usages": ["digital signature", "key encipherment", "server auth", "client auth"],
            }
        },
    }
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Member:
    hostname: str
    files: Path
    context: ssl.SSLContext | None = None

    def install(self, key_pem: bytes, cert_pem: bytes, ca_pem: Path) -> None:
        (self.files / "key.pem").write_bytes(key_pem)
        (self.files / "cert.pem").write_bytes(cert_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cafile=str(ca_pem))
        context.load_cert_chain(self.files / "cert.pem", self.files / "key.pem")
        self.context = context


class Server:
    """One server under test: how to build its request and read its answer."""

    def __init__(self, name: str, url: str, pid: int) -> None:
        self.name = name
        self.url = url
        self.pid = pid

    def body(self, member: Member, csr: str) -> dict[str, object]:
        if self.name == "cfssl":
            return {"certificate_request": csr, "profile": "leaf"}
        return {"hostname": member.hostname, "csr": csr}

    @staticmethod
    def certificate(answer: dict) -> str:
        if "result" in answer:
            return answer["result"]["certificate"]
        return answer["service_cert"]


async def renew(server: Server, member: Member, ca_pem: Path, session=None) -> float:
    key = pki.generate_key()
    csr = pki.build_csr(key, member.hostname, [member.hostname]).decode()
    began = time.perf_counter()
    if session is None:
        connector = aiohttp.TCPConnector(ssl=member.context, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as own:
            async with own.post(server.url, json=server.body(member, csr)) as response:
                answer = await response.json(content_type=None)
    else:
        async with session.post(server.url, json=server.body(member, csr)) as response:
            answer = await response.json(content_type=None)
    elapsed = time.perf_counter() - began
    if response.status != 200:
        raise RuntimeError(f"{server.name} answered {response.status}: {answer}")
    member.install(pki.key_to_pem(key), Server.certificate(answer).encode(), ca_pem)
    return elapsed


@dataclass
class Figures:
    label: str
    rate: float
    latencies: list[float]
    cpu_ms: float
    errors: int

    def line(self) -> str:
        ms = [v * 1000 for v in self.latencies] or [float("nan")]
        return (
            f"{self.label:<34} {self.rate:7.1f}/s  p50 {percentile(ms, 50):6.1f} ms  "
            f"p99 {percentile(ms, 99):6.1f} ms  server CPU {self.cpu_ms:5.2f} ms/renewal"
            f"  errors {self.errors}"
        )


async def closed_loop(server, members, ca_pem, concurrency, count, kept_alive) -> Figures:
    queue = list(members)
    latencies: list[float] = []
    errors = 0
    cpu_before = cpu_seconds(server.pid)
    began = time.perf_counter()

    async def worker() -> None:
        nonlocal errors
        while len(latencies) + errors < count and queue:
            member = queue.pop(0)
            try:
                if kept_alive:
                    connector = aiohttp.TCPConnector(ssl=member.context, limit=1)
                    async with aiohttp.ClientSession(connector=connector) as session:
                        for _ in range(2):
                            latencies.append(await renew(server, member, ca_pem, session))
                else:
                    latencies.append(await renew(server, member, ca_pem))
            except Exception as exc:
                errors += 1
                if errors == 1:
                    print(f"  first error from {server.name}: {exc!r}"[:300], flush=True)
            queue.append(member)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    cpu = (cpu_seconds(server.pid) - cpu_before) * 1000 / max(1, len(latencies))
    mode = "kept-alive" if kept_alive else "fresh"
    label = f"{server.name} {mode} c={concurrency}"
    return Figures(label, len(latencies) / elapsed, latencies, cpu, errors)


async def open_loop(server, members, ca_pem, rate: float, seconds: float) -> Figures:
    latencies: list[float] = []
    errors = 0
    tasks = []
    cpu_before = cpu_seconds(server.pid)
    began = time.perf_counter()
    busy: set[str] = set()

    async def one(member: Member) -> None:
        nonlocal errors
        busy.add(member.hostname)
        try:
            latencies.append(await renew(server, member, ca_pem))
        except Exception:
            errors += 1
        finally:
            busy.discard(member.hostname)

    for n in range(int(rate * seconds)):
        target = began + n / rate
        await asyncio.sleep(max(0.0, target - time.perf_counter()))
        idle = [m for m in members[n % len(members) :] + members if m.hostname not in busy]
        if not idle:
            errors += 1  # every member is still waiting: the server has fallen behind
            continue
        member = idle[0]
        tasks.append(asyncio.create_task(one(member)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - began
    cpu = (cpu_seconds(server.pid) - cpu_before) * 1000 / max(1, len(latencies))
    return Figures(
        f"{server.name} open loop {rate:.0f}/s", len(latencies) / elapsed, latencies, cpu, errors
    )


def prepare(root: Path, count: int) -> tuple[Path, list[Member], CertificateAuthority]:
    data = DataDir(root / "ca")
    ca = CertificateAuthority.create(
        data, "ca-host", PASSPHRASE, PRESETS["just-me"], "bench", kdf=keystore.FAST_TEST_KDF
    )
    members = []
    for n in range(count):
        host = f"node-{n:04d}"
        key = pki.generate_key()
        csr = pki.build_csr(key, host, [host]).decode()
        answer = ca.finish_join(
            ca.check_join(JoinRequest(host, csr, ca.mint_invite(host).code)), None
        )
        member = Member(host, root / "members" / host)
        member.files.mkdir(parents=True)
        member.install(pki.key_to_pem(key), answer.service_cert_pem.encode(), data.ca_cert)
        members.append(member)
    return data.ca_cert, members, ca


async def wait_for_port(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_koi(root: Path) -> tuple[subprocess.Popen, int]:
    http_port, mtls_port = free_port(), free_port()
    (root / "pw").write_text(PASSPHRASE + "\n")
    command = [
        sys.executable,
        "-m",
        "koi_tray",
        "--data-dir",
        str(root / "ca"),
        "--hostname",
        "ca-host",
        "serve",
        "--approval",
        "deny",
        "--passphrase-file",
        str(root / "pw"),
        "--http-port",
        str(http_port),
        "--mtls-port",
        str(mtls_port),
        "--mtls-bind",
        "127.0.0.1",
    ]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return process, mtls_port


def start_cfssl(root: Path, ca: CertificateAuthority) -> tuple[subprocess.Popen, int]:
    port = free_port()
    (root / "cfssl.json").write_text(json.dumps(CFSSL_CONFIG))
    (root / "ca-key.pem").write_bytes(pki.key_to_pem(ca._require_key()))
    leaf = ca.leaf_store
    command = [
        "cfssl",
        "serve",
        "-address",
        "127.0.0.1",
        "-port",
        str(port),
        "-ca",
        str(ca.data.ca_cert),
        "-ca-key",
        str(root / "ca-key.pem"),
        "-config",
        str(root / "cfssl.json"),
        "-tls-cert",
        str(leaf.path("fullchain.pem")),
        "-tls-key",
        str(leaf.path("key.pem")),
        "-mutual-tls-ca",
        str(ca.data.ca_cert),
        "-loglevel",
        "5",
    ]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return process, port


async def main(args: argparse.Namespace) -> None:
    if shutil.which("cfssl") is None:
        sys.exit("cfssl is not installed: apt-get install golang-cfssl")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ca_pem, members, ca = prepare(root, 2 * args.members)
        pools = {"koi-tray": members[: args.members], "cfssl": members[args.members :]}
        cfssl, cfssl_port = start_cfssl(root, ca)
        koi, koi_port = start_koi(root)
        try:
            await wait_for_port(cfssl_port)
            await wait_for_port(koi_port)
            servers = [
                Server("koi-tray", f"https://127.0.0.1:{koi_port}/v1/certmesh/renew", koi.pid),
                Server("cfssl", f"https://127.0.0.1:{cfssl_port}/api/v1/cfssl/sign", cfssl.pid),
            ]
            results: dict[str, list[Figures]] = {s.name: [] for s in servers}
            for kept_alive, concurrency in ((False, 16), (False, 64), (True, 16)):
                for server in servers:
                    figures = await closed_loop(
                        server, pools[server.name], ca_pem, concurrency, args.count, kept_alive
                    )
                    results[server.name].append(figures)
                    print(figures.line(), flush=True)
            for rate in args.rates:
                for server in servers:
                    figures = await open_loop(
                        server, pools[server.name], ca_pem, rate, args.seconds
                    )
                    results[server.name].append(figures)
                    print(figures.line(), flush=True)
        finally:
            for process in (koi, cfssl):
                process.terminate()
                process.wait(10)

    print("\nkoi-tray / cfssl rate ratios:")
    for koi_fig, cfssl_fig in zip(results["koi-tray"], results["cfssl"], strict=True):
        mode = koi_fig.label.removeprefix("koi-tray ")
        print(f"  {mode:<26} {koi_fig.rate / cfssl_fig.rate:5.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--count", type=int, default=600, help="renewals per closed-loop run")
    parser.add_argument("--rates", type=float, nargs="*", default=[50.0, 100.0, 150.0])
    parser.add_argument("--seconds", type=float, default=4.0)
    asyncio.run(main(parser.parse_args()))
