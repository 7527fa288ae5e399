"""Approval latency: from a join's arrival at the CA to the decider being called.

1,000 joins over real HTTP on loopback, 16 at a time, to a CA that needs approval and an
instant decider. Prints p50/p99/max. Run: `.venv/bin/python bench/approval_latency.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _mesh import describe_ms, start_ca  # noqa: E402

from koi_tray.api.client import fetch_json  # noqa: E402
from koi_tray.certmesh import pki  # noqa: E402
from koi_tray.certmesh.approval import Approved  # noqa: E402


async def main(joins: int, concurrency: int) -> None:
    arrived: dict[str, float] = {}
    asked: dict[str, float] = {}

    async def decider(request):
        asked[request.hostname] = time.perf_counter()
        return Approved("bench")

    with tempfile.TemporaryDirectory() as tmp:
        node = await start_ca(Path(tmp), decider, preset="team")
        real_join = node.join

        async def timed_join(join):
            arrived[join.hostname] = time.perf_counter()
            return await real_join(join)

        node.join = timed_join
        url = f"http://127.0.0.1:{node.address('http')[1]}/v1/certmesh/join"
        bodies = []
        for n in range(joins):
            host = f"node-{n:04d}"
            code = node.ca.mint_invite(host).code.split(".")[0]
            key = pki.generate_key()
            csr = pki.build_csr(key, host, [host]).decode()
            bodies.append({"hostname": host, "csr": csr, "invite_token": code})

        gate = asyncio.Semaphore(concurrency)

        async def send(body):
            async with gate:
                await fetch_json("POST", url, body=body)

        began = time.perf_counter()
        await asyncio.gather(*(send(b) for b in bodies))
        elapsed = time.perf_counter() - began
        await node.shutdown()

    latencies = [asked[h] - arrived[h] for h in asked]
    print(f"approval latency (arrival → decider call), {joins} joins, {concurrency} at a time:")
    print(f"  {describe_ms(latencies)}")
    print(
        f"  joins completed: {len(asked)}/{joins} in {elapsed:.1f} s "
        f"({joins / elapsed:.0f} joins/s end to end)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--joins", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.joins, args.concurrency))
