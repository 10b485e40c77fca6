"""The HTTP bridge's own CPU: per request, and per streamed frame, with nothing else running.

    python bench/bridge_cpu.py [--requests 2000] [--concurrency 8] [--frames 1,32] [--rounds 3]
    python bench/bridge_cpu.py --haifctl /tmp/oldvenv/bin/haifctl   # another build's bridge

Starts one bridge (`haifctl daemon bridge`, as `haifctl up` does) in front of a stand-in
gateway in this process, which answers every request at once with FRAMES stream frames of
text and a Done, so nothing else in the cluster costs anything.  The client streams OpenAI
completions through the bridge; the bridge process's user+system CPU (from /proc) is divided by
the requests and frames it served.  Rounds alternate between builds when several are given.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import zmq

from haifctl import wire
from haifctl.security import Keyring

TICK = os.sysconf("SC_CLK_TCK")
HERE = str(Path(sys.executable).parent / "haifctl")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class StandInGateway(threading.Thread):
    """Answers each Infer with ``frames`` Chunks frames and a Done, at once."""

    def __init__(self, home: Path) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        Keyring.ensure(home).server(self.sock, "gateway")
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.frames = 1
        self.stopped = False

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self.stopped:
            if not poller.poll(100):
                continue
            peer, frame = self.sock.recv_multipart()
            envelope = wire.decode(frame)
            if not isinstance(envelope.msg, wire.Infer):
                continue
            rid = envelope.id
            for i in range(self.frames):
                part = wire.Part(rid, f" word{i}", 1)
                self.sock.send_multipart([peer, wire.encode(wire.Chunks(parts=[part]))])
            done = wire.Done(
                finish_reason="length",
                prompt_tokens=4,
                completion_tokens=self.frames,
                model="stand-in:1",
                worker="stand-in",
                time_to_first_token_ms=0.1,
                generation_ms=0.2,
            )
            self.sock.send_multipart([peer, wire.reply(envelope, done)])


async def load(url: str, requests: int, concurrency: int) -> int:
    body = {"model": "m", "prompt": "x", "max_tokens": 512, "stream": True}
    frames = 0
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        queue = list(range(requests))

        async def runner() -> None:
            nonlocal frames
            while queue:
                queue.pop()
                async with client.stream("POST", url + "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            frames += 1

        await asyncio.gather(*(runner() for _ in range(concurrency)))
    return frames


def start_bridge(haifctl: str, home: Path, gateway: str) -> tuple[subprocess.Popen[bytes], str]:
    ready = home / f"bridge-{time.monotonic_ns()}.ready"
    env = {**os.environ, "HAIF_HOME": str(home)}
    proc = subprocess.Popen(
        [
            haifctl,
            "daemon",
            "bridge",
            "--gateway",
            gateway,
            "--bind",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
            "--metrics-port",
            "0",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 60
    while not ready.exists():  # the daemon's readiness probe, with a deadline
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"the bridge did not start ({haifctl})")
        time.sleep(0.02)
    return proc, str(json.loads(ready.read_text())["endpoints"]["rpc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--frames", default="1,32", help="stream frames per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--haifctl", action="append", help="a haifctl build (repeatable)")
    args = parser.parse_args()
    builds = args.haifctl or [HERE]
    home = Path(tempfile.mkdtemp(prefix="bridge-cpu-"))
    gateway = StandInGateway(home)
    gateway.start()
    bridges = {b: start_bridge(b, home, gateway.address) for b in builds}
    results: dict[tuple[str, int], list[float]] = {}
    try:
        for _proc, url in bridges.values():
            asyncio.run(load(url, 50, args.concurrency))  # warm up
        for _ in range(args.rounds):
            for frames in (int(f) for f in args.frames.split(",")):
                gateway.frames = frames
                for build, (proc, url) in bridges.items():
                    before = cpu_s(proc.pid)
                    seen = asyncio.run(load(url, args.requests, args.concurrency))
                    used = cpu_s(proc.pid) - before
                    results.setdefault((build, frames), []).append(used / args.requests * 1e6)
                    if seen < args.requests * frames:
                        print(f"warning: {seen} frames seen, expected {args.requests * frames}")
    finally:
        for proc, _ in bridges.values():
            proc.terminate()
            proc.wait(30)
        gateway.stopped = True
    print(
        f"bridge CPU per request (us), {args.requests} streamed completions at "
        f"{args.concurrency} concurrent, median of {args.rounds} rounds [all rounds]"
    )
    for (build, frames), values in results.items():
        print(
            f"{build}  frames={frames:>3}  {statistics.median(values):8.0f}  "
            f"[{', '.join(f'{v:.0f}' for v in values)}]"
        )


if __name__ == "__main__":
    main()
