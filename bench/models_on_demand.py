"""Models on demand: the time to first token of a request that loads its model, and what a
placement decision costs the orchestrator with many workers.

    python bench/models_on_demand.py [--loads 40] [--workers 1000] [--decisions 2000]
                                     [--model PATH]

Load on demand: `haifctl up --workers 1` in a temporary home, as a user would; the model (the
shipped one by default) registered under 8 names; requests cycle through them with
``keep_alive: 0``, so each one finds its model unloaded and waits for a load.  Their time to
first token (client side) is set against requests for the same model once it stays loaded.

Placement: an orchestrator in this process (not started: no sockets) with N simulated workers
registered as real ones register (each with two models loaded and a memory budget), timing
:meth:`OrchestratorDaemon.start_load` (the candidates, the decision, the orders it sends),
for each policy, and when every worker is full so that the decision must pick evictions.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from haifctl import wire
from haifctl.client import ClusterClient
from haifctl.daemon.orchestrator import OrchestratorDaemon
from haifctl.registry.service import builtin_model_path
from haifctl.security import Keyring

HAIFCTL = str(Path(sys.executable).parent / "haifctl")
MIB = 1 << 20


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ttft_ms(client: ClusterClient, model: str, keep_alive: object) -> float:
    body = {"prompt": "Once upon a time", "max_tokens": 4, "model": model, "seed": 1}
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    started = time.perf_counter()
    first = None
    for msg in client.stream(body, timeout=120):
        if isinstance(msg, wire.Chunk) and first is None:
            first = time.perf_counter()
        if isinstance(msg, wire.Error):
            raise SystemExit(f"{model}: {msg.code}: {msg.message}")
    return ((first or time.perf_counter()) - started) * 1000


def load_on_demand(loads: int, model: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="haif-bench-"))
    env = {**os.environ, "HAIF_HOME": str(home), "HAIF_SLOTS": "1"}

    def haifctl(*args: str) -> str:
        proc = subprocess.run(
            [HAIFCTL, *args], env=env, capture_output=True, text=True, timeout=300
        )
        if proc.returncode:
            raise SystemExit(f"haifctl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    names = [f"bench-{i}" for i in range(8)]
    try:
        haifctl("up", "--workers", "1", "--bridge-bind", "127.0.0.1:0")
        for name in names:
            copy = shutil.copy(model, home / f"{name}.gguf")
            haifctl("models", "register", str(copy), "--name", name)
        gateway = next(
            d["endpoint"]
            for d in json.loads((home / "run" / "cluster.json").read_text())["daemons"]
            if d["name"] == "gateway"
        )
        with ClusterClient(gateway, Keyring.ensure(home)) as client:
            ttft_ms(client, "stories260K", None)  # warm the path
            before = client.stats().counters.get("loads", 0)
            cold = [ttft_ms(client, names[i % len(names)], 0) for i in range(loads)]
            made = client.stats().counters.get("loads", 0) - before
            ttft_ms(client, names[0], -1)  # loaded, and kept: the same model, warm
            warm = [ttft_ms(client, names[0], None) for _ in range(loads)]
        size = model.stat().st_size / MIB
        print(
            f"load on demand ({model.name}, {size:.1f} MiB, {loads} requests each; "
            f"{made} loads for the {loads} requests to unloaded models):"
        )
        for label, values in (("model unloaded", cold), ("model loaded", warm)):
            print(
                f"  {label:<15} TTFT p50 {pct(values, 0.5):8.1f} ms   "
                f"p99 {pct(values, 0.99):8.1f} ms"
            )
        print(f"  the load adds about {pct(cold, 0.5) - pct(warm, 0.5):.1f} ms (p50)")
    finally:
        subprocess.run([HAIFCTL, "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)


def simulated(n: int, full: bool) -> OrchestratorDaemon:
    """An orchestrator whose table holds ``n`` workers, each with two models loaded."""
    daemon = OrchestratorDaemon("tcp://127.0.0.1:0", "tcp://127.0.0.1:1", "m:1")
    daemon.send = lambda identity, body: None  # type: ignore[method-assign]
    daemon.set_status = lambda ref, status: None  # type: ignore[method-assign]
    budget = 8 * 1024 * MIB
    size = (budget // 2 if full else 1024 * MIB) - MIB
    with contextlib.redirect_stdout(io.StringIO()):  # one "worker registered" line each
        for i in range(n):
            add_worker(daemon, i, size, budget)
    return daemon


def add_worker(daemon: OrchestratorDaemon, i: int, size: int, budget: int) -> None:
    """Register simulated worker ``i`` as a real one registers."""
    models = [f"a{i % 7}:1", f"b{i % 11}:1"]
    register = wire.Register(
        worker_id=f"w{i}",
        models=models,
        slots=4,
        device="cpu",
        n_ctx=4096,
        pid=i,
        host="h",
        loaded=[wire.ModelState(ref=m, size_bytes=size, slots=2, n_ctx=4096) for m in models],
        memory_budget=budget,
        memory_used=2 * size,
    )
    daemon.register(f"w{i}".encode(), wire.Envelope(1, "", 0.0, "", register), register)


def placement_cost(n: int, decisions: int) -> None:
    info = wire.ModelInfo(ref="new:1", path="/m", context_length=4096, size_bytes=900 * MIB)
    print(f"placement with {n} simulated workers ({decisions} decisions each):")
    for label, policy, full in (
        ("spread", "spread", False),
        ("binpack", "binpack", False),
        ("evicting (full)", "spread", True),
    ):
        daemon = simulated(n, full)
        daemon.placement = policy
        times = []
        for _ in range(decisions):
            with contextlib.redirect_stdout(io.StringIO()):  # its log lines
                started = time.perf_counter()
                error = daemon.start_load(info, {})
                times.append((time.perf_counter() - started) * 1e6)
            if error is not None:
                raise SystemExit(f"{label}: {error.message}")
            task = daemon.loads.pop(info.ref)
            worker = daemon.workers[task.worker]
            worker.incoming.pop(info.ref, None)
            if full:  # a fresh table, so that every decision has the same evictions to find
                daemon.ctx.destroy(linger=0)
                daemon = simulated(n, full)
                daemon.placement = policy
                if len(times) >= max(1, decisions // 20):
                    break
        print(
            f"  {label:<16} p50 {pct(times, 0.5):8.1f} us   p99 {pct(times, 0.99):8.1f} us"
            f"   ({len(times)} decisions)"
        )
        daemon.ctx.destroy(linger=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loads", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--model", type=Path, default=builtin_model_path())
    parser.add_argument("--skip-cluster", action="store_true", help="placement figures only")
    args = parser.parse_args()
    placement_cost(args.workers, args.decisions)
    if not args.skip_cluster:
        load_on_demand(args.loads, args.model)


if __name__ == "__main__":
    main()
