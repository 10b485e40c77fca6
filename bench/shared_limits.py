"""What sharing the gateway's limits through Redis costs a request.

Starts a cluster (registry, orchestrator, gateway, one worker) with the limits in-process, then
one whose gateway admits every request through Redis, alternately, and times sequential
one-token requests sent as the HTTP bridge sends them (one API key id), after a warm-up:

    .venv/bin/python bench/shared_limits.py [--redis redis://127.0.0.1:6379/0] [--runs 3]

Limits are set high enough never to refuse; the Redis keys it writes are deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from haifctl import wire
from haifctl.security import BRIDGE
from tests.cluster import Cluster

WARMUP = 100


def run(label: str, env: dict[str, str], requests: int) -> list[float]:
    for name in ("HAIF_REDIS_URL", "HAIF_REDIS_PREFIX"):
        os.environ.pop(name, None)
    os.environ.update(env)
    os.environ["HAIF_RATE_LIMIT"] = os.environ["HAIF_RATE_BURST"] = "1000000"
    workdir = Path(tempfile.mkdtemp(prefix="haif-bench-"))
    os.environ["HAIF_HOME"] = str(workdir / "home")
    cluster = Cluster(workdir, workers=1)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = cluster.dealer(ctx, cluster.gateway, BRIDGE)
    latencies = []
    try:
        for i in range(WARMUP + requests):
            request_id = wire.new_id()
            started = time.perf_counter()
            request = wire.Infer(request={"prompt": "Once", "max_tokens": 1}, client="key_bench")
            sock.send(wire.encode(request, request_id, time.time() + 30))
            while True:
                envelope = wire.decode(sock.recv())
                if envelope.id == request_id and isinstance(envelope.msg, wire.Done | wire.Error):
                    break
            if not isinstance(envelope.msg, wire.Done):
                raise SystemExit(f"{label}: {envelope.msg}")
            if i >= WARMUP:
                latencies.append((time.perf_counter() - started) * 1000)
    finally:
        sock.close(linger=0)
        ctx.destroy(linger=0)
        cluster.stop()
    latencies.sort()
    print(
        f"{label:>6}: p50 {latencies[len(latencies) // 2]:.2f} ms, "
        f"mean {statistics.mean(latencies):.2f} ms, "
        f"p90 {latencies[int(len(latencies) * 0.9)]:.2f} ms ({requests} requests)",
        flush=True,
    )
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    prefix = f"haif-bench-{uuid.uuid4().hex[:8]}"
    try:
        for _ in range(args.runs):
            run("local", {}, args.requests)
            run("redis", {"HAIF_REDIS_URL": args.redis, "HAIF_REDIS_PREFIX": prefix}, args.requests)
    finally:
        client = redis.Redis.from_url(args.redis)
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)


if __name__ == "__main__":
    main()
