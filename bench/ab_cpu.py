"""CPU per generated token of two haifctl builds, each a cluster of its own on this machine.

Throughput on a shared 2-core machine moves several percent between runs; the CPU the
cluster's processes spend per token moves much less.  For each build in turn (A, B, A, B ...):
the same `haifctl bench` load through its bridge, and the user+system CPU of every daemon
(from /proc) before and after, divided by the tokens the load generated.

    python bench/ab_cpu.py /tmp/oldvenv/bin/haifctl            # B = the older build
    python bench/ab_cpu.py OLD --concurrency 8 --requests 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

NEW = str(Path(sys.executable).parent / "haifctl")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def status(haifctl: str, home: str) -> dict[str, object]:
    out = subprocess.run(
        [haifctl, "status", "--json"],
        env={**os.environ, "HAIF_HOME": home},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data: dict[str, object] = json.loads(out)
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old", help="haifctl of build B")
    parser.add_argument("--new", default=NEW, help="haifctl of build A (default: this one)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    builds = {"A": args.new, "B": args.old}
    homes = {name: tempfile.mkdtemp() for name in builds}
    try:
        daemons: dict[str, list[int]] = {}
        bridges: dict[str, str] = {}
        for name, haifctl in builds.items():
            env = {**os.environ, "HAIF_HOME": homes[name]}
            subprocess.run(
                [haifctl, "up", "--bridge-bind", "127.0.0.1:0"],
                env=env,
                check=False,
                capture_output=True,
            )
            info = status(haifctl, homes[name])
            rows = info["daemons"]
            assert isinstance(rows, list)
            daemons[name] = [int(d["pid"]) for d in rows]
            bridges[name] = next(str(d["endpoint"]) for d in rows if d["name"] == "bridge")
        tokens = args.requests * args.tokens
        per_token: dict[str, list[float]] = {name: [] for name in builds}
        for _ in range(args.rounds):
            for name in builds:
                before = sum(cpu_s(pid) for pid in daemons[name])
                subprocess.run(
                    [
                        NEW,
                        "bench",
                        bridges[name],
                        "-c",
                        str(args.concurrency),
                        "-r",
                        str(args.requests),
                        "-n",
                        str(args.tokens),
                        "--json",
                    ],
                    check=True,
                    capture_output=True,
                )
                used = sum(cpu_s(pid) for pid in daemons[name]) - before
                per_token[name].append(used / tokens * 1e6)
        print(
            f"{args.concurrency} streams, {args.requests} requests x {args.tokens} tokens, "
            f"{args.rounds} rounds; cluster CPU per token (us), A={args.new} B={args.old}"
        )
        for name, values in per_token.items():
            print(f"  {name}: " + "  ".join(f"{v:7.1f}" for v in values))
        ratios = [a / b for a, b in zip(per_token["A"], per_token["B"], strict=True)]
        print("  A/B: " + "  ".join(f"{r:7.3f}" for r in ratios))
    finally:
        for name, haifctl in builds.items():
            subprocess.run(
                [haifctl, "down"],
                env={**os.environ, "HAIF_HOME": homes[name]},
                check=False,
                capture_output=True,
            )


if __name__ == "__main__":
    main()
