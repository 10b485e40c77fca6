"""CPU per generated token in each daemon, through the HTTP bridge, at 1/8/32 streams.

    python bench/relay_cpu.py [--streams 1,8,32] [--tokens 256] [--rounds 2] [--slots 0]

Starts a cluster with `haifctl up` in a temporary home (as a user would), runs N concurrent
OpenAI streaming completions through the bridge (ignore_eos, so each yields exactly --tokens),
counts tokens from each response's `usage`, and reads every daemon's CPU time (user + system,
from /proc) before and after.  CPU time, unlike wall time, barely moves when something else
shares the machine, so this is the figure to compare across changes: the relays' cost per token
(bridge + gateway + orchestrator) against the worker's.  Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from cluster import running_cluster

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def one(client: httpx.AsyncClient, url: str, tokens: int, seed: int) -> tuple[int, float]:
    body = {
        "prompt": "Once upon a time",
        "max_tokens": tokens,
        "stream": True,
        "ignore_eos": True,
        "seed": seed,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft = 0.0
    used = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if not ttft and data.get("choices") and data["choices"][0].get("text"):
                ttft = time.perf_counter() - started
            if data.get("usage"):
                used = data["usage"]["completion_tokens"]
    return used, ttft


async def load(url: str, streams: int, requests: int, tokens: int) -> tuple[int, float, float]:
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        await one(client, url, 4, 0)  # warm the connection pool
        queue = list(range(requests))
        results: list[tuple[int, float]] = []

        async def runner() -> None:
            while queue:
                results.append(await one(client, url, tokens, queue.pop()))

        started = time.perf_counter()
        await asyncio.gather(*(runner() for _ in range(streams)))
        wall = time.perf_counter() - started
    ttfts = sorted(t for _, t in results)
    return sum(n for n, _ in results), wall, ttfts[len(ttfts) // 2]


def main() -> None:
    # `timeout` and Ctrl-C alike: leave through the finally blocks that stop the cluster
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--requests",
        type=int,
        default=0,
        help="requests per round (default: 4 per stream); "
        "with --tokens 1 the figures are CPU per request",
    )
    parser.add_argument("--slots", default="", help="HAIF_SLOTS for the worker (default: its own)")
    args = parser.parse_args()
    env = {"HAIF_SLOTS": args.slots} if args.slots else {}
    env["HAIF_RATE_LIMIT"] = "100000"  # many short requests measure cost, not the rate limit
    env["HAIF_RATE_BURST"] = "100000"
    pids: dict[str, int] = {}
    with running_cluster(1, env, pids) as endpoints:
        url = endpoints["bridge"]
        names = ["bridge", "gateway", "orchestrator", "worker-1"]
        print(f"{'streams':>7} {'tok/s':>8} {'TTFT p50':>9}  CPU us/token: " + "  ".join(names))
        for streams in (int(s) for s in args.streams.split(",")):
            for _ in range(args.rounds):
                before = {n: cpu_seconds(pids[n]) for n in names}
                requests = args.requests or streams * 4
                used, wall, ttft = asyncio.run(load(url, streams, requests, args.tokens))
                cost = {n: (cpu_seconds(pids[n]) - before[n]) / used * 1e6 for n in names}
                relays = cost["bridge"] + cost["gateway"] + cost["orchestrator"]
                print(
                    f"{streams:>7} {used / wall:>8,.0f} {ttft * 1000:>7.1f}ms  "
                    + "  ".join(f"{cost[n]:>6.1f}" for n in names)
                    + f"   relays {relays:.1f}"
                )


if __name__ == "__main__":
    main()
