"""A burst: N members renew at once when their CA comes back after an outage.

The CA runs as `koi-tray serve` in its own process; the members renew from two child
processes, all at the same instant, each retrying (after 0.5 s) until its renewal is
installed, as a member's renewal loop would after an outage. Prints how many were served,
lost and retried, and the time to drain. Run: `.venv/bin/python bench/renewal_burst.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _mesh import PASSPHRASE, describe_ms  # noqa: E402
from ca_renewals import start_koi, wait_for_port  # noqa: E402

from koi_tray.certmesh import keystore, pki  # noqa: E402
from koi_tray.certmesh.ca import PRESETS, CertificateAuthority, JoinRequest  # noqa: E402
from koi_tray.certmesh.clock import SystemClock  # noqa: E402
from koi_tray.certmesh.layout import DataDir  # noqa: E402
from koi_tray.certmesh.member import Membership  # noqa: E402


def enrol(root: Path, count: int) -> list[str]:
    """Create the CA and enrol `count` members on disk; return their data dirs."""
    ca = CertificateAuthority.create(
        DataDir(root / "ca"),
        "ca-host",
        PASSPHRASE,
        PRESETS["just-me"],
        "bench",
        kdf=keystore.FAST_TEST_KDF,
    )
    roots = []
    for n in range(count):
        host = f"node-{n:04d}"
        key = pki.generate_key()
        csr = pki.build_csr(key, host, [host, f"{host}.local"]).decode()
        answer = ca.finish_join(
            ca.check_join(JoinRequest(host, csr, ca.mint_invite(host).code)), None
        )
        membership = Membership.install_join(
            DataDir(root / host),
            SystemClock(),
            key,
            answer.to_json(),
            ca_host="127.0.0.1",
            ca_http_port=5641,
            pinned_fingerprint=ca.ca_fingerprint,
            sans=[host, f"{host}.local"],
        )
        roots.append(str(membership.data.root))
    return roots


async def members_side(port: int, start_at: float, roots: list[str]) -> None:
    """Child: renew every member at `start_at`, retrying until installed; print a report."""
    from dataclasses import replace

    from koi_tray.api.client import HttpCaLink
    from koi_tray.certmesh.member import new_renewal_request

    members = []
    for root in roots:
        membership = Membership.load(DataDir(Path(root)), SystemClock())
        membership.state = replace(membership.state, ca_mtls_port=port)
        members.append(membership)
    await asyncio.sleep(max(0.0, start_at - time.time()))

    async def one(membership: Membership) -> tuple[float, int]:
        began = time.perf_counter()
        attempts = 0
        while True:
            attempts += 1
            request = new_renewal_request(membership.state)
            try:
                answer = await HttpCaLink(membership).renew(request.csr_pem)
                await asyncio.to_thread(membership.install_renewal, request.key, answer)
                return time.perf_counter() - began, attempts
            except Exception:
                if attempts >= 200:
                    raise
                await asyncio.sleep(0.5)

    results = await asyncio.gather(*(one(m) for m in members), return_exceptions=True)
    done = [r for r in results if isinstance(r, tuple)]
    print(
        json.dumps(
            {
                "done": [d for d, _ in done],
                "attempts": [a for _, a in done],
                "lost": sum(isinstance(r, BaseException) for r in results),
            }
        )
    )


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        roots = enrol(root, count)
        koi, port = start_koi(root)
        await wait_for_port(port)
        start_at = time.time() + 3.0
        halves = [roots[: count // 2], roots[count // 2 :]]
        children = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--members-side",
                str(port),
                str(start_at),
                *half,
                stdout=subprocess.PIPE,
            )
            for half in halves
        ]
        outputs = [json.loads((await child.communicate())[0]) for child in children]
        drained = time.time() - start_at
        koi.terminate()
        koi.wait(20)
        roster = json.loads((root / "ca" / "certmesh" / "roster.json").read_text())

    done = [d for out in outputs for d in out["done"]]
    attempts = [a for out in outputs for a in out["attempts"]]
    lost = sum(out["lost"] for out in outputs)
    installed = sum(
        1
        for m in roster["members"]
        if m["hostname"].startswith("node-") and m.get("previous_cert_fingerprint")
    )
    print(f"burst of {count} members renewing at once against `koi-tray serve`:")
    print(f"  served {len(done)}, lost {lost}; roster shows {installed} renewed members")
    print(
        f"  retries: {sum(attempts) - len(attempts)} in all, at most {max(attempts) - 1} "
        "for one member"
    )
    print(
        f"  time from the burst to its last renewal: {drained:.1f} s "
        f"({len(done) / drained:.0f} renewals/s)"
    )
    print(f"  per member (including retries): {describe_ms(done)}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--members-side":
        asyncio.run(members_side(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--members", type=int, default=1000)
        asyncio.run(main(parser.parse_args().members))
