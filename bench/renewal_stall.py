"""The CA loop's longest stall while 100 members renew at once over mTLS.

The CA node runs in this process; the members renew from a child process (their own
loop), all at once, with fresh mTLS connections. A 1 ms ticker on the CA's loop records
how late each tick fires. Run: `.venv/bin/python bench/renewal_stall.py [--members N]`.
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

from _mesh import describe_ms, join_directly, percentile, start_ca  # noqa: E402

from koi_tray.compose.hosts import freeze_startup_objects  # noqa: E402


async def renew_all(roots: list[str]) -> None:
    """Child side: renew every member at once; print per-renewal latencies as JSON."""
    from koi_tray.api.client import HttpCaLink
    from koi_tray.certmesh.clock import SystemClock
    from koi_tray.certmesh.layout import DataDir
    from koi_tray.certmesh.member import Membership, new_renewal_request

    members = [Membership.load(DataDir(Path(root)), SystemClock()) for root in roots]

    async def one(membership: Membership) -> float:
        request = new_renewal_request(membership.state)
        began = time.perf_counter()
        answer = await HttpCaLink(membership).renew(request.csr_pem)
        elapsed = time.perf_counter() - began
        membership.install_renewal(request.key, answer)
        return elapsed

    results = await asyncio.gather(*(one(m) for m in members), return_exceptions=True)
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    print(
        json.dumps(
            {"latencies": [r for r in results if isinstance(r, float)], "failures": failures}
        )
    )


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        node = await start_ca(root)
        roots = [str(join_directly(node, root, f"node-{n:03d}").data.root) for n in range(count)]
        freeze_startup_objects()  # as `koi-tray serve` and the tray do once the node runs

        lateness: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                expected = loop.time() + 0.001
                await asyncio.sleep(0.001)
                lateness.append(max(0.0, loop.time() - expected))

        tick = asyncio.create_task(ticker())
        began = time.perf_counter()
        child = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client", *roots, stdout=subprocess.PIPE
        )
        out, _ = await child.communicate()
        elapsed = time.perf_counter() - began
        stop.set()
        await tick
        await node.shutdown()

    report = json.loads(out)
    print(f"{count} members renewing at once over fresh mTLS connections:")
    print(
        f"  renewals: {len(report['latencies'])} ok, {len(report['failures'])} failed, "
        f"all done in {elapsed:.2f} s (incl. child start-up)"
    )
    print(f"  renewal latency: {describe_ms(report['latencies'])}")
    print(f"  CA loop lateness per 1 ms tick: {describe_ms(lateness)}")
    print(
        f"  longest stall: {max(lateness) * 1000:.1f} ms (goal <= 50 ms); "
        f"p99 {percentile(lateness, 99) * 1000:.1f} ms (goal <= 20 ms)"
    )
    for failure in report["failures"][:5]:
        print(f"  failure: {failure}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        asyncio.run(renew_all(sys.argv[2:]))
    else:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--members", type=int, default=100)
        asyncio.run(main(parser.parse_args().members))
