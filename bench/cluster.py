"""In-process versus through the cluster (gateway + orchestrator + worker), same workload.

    python bench/cluster.py [--requests N] [--workers W]

The shipped model, 128-token completions (end-of-text ignored so every run is the same length),
one stream at a time and 8 concurrent streams.  The cluster is started with `haifctl up` in a
temporary home, exactly as a user would, and stopped afterwards.  Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from haifctl import wire
from haifctl.client import ClusterClient
from haifctl.config import resolve
from haifctl.registry.service import builtin_model_path
from haifctl.runtime.base import LoadOptions, SamplingParams
from haifctl.runtime.llamacpp import LlamaCppRuntime

HAIFCTL = str(Path(sys.executable).parent / "haifctl")
TOKENS = 128
PROMPT = "Once upon a time"

# one request: returns (time to first token, total time), in seconds
OneRequest = Callable[[int], tuple[float, float]]


def local_runner() -> tuple[OneRequest, Callable[[], None]]:
    settings = resolve()  # the same HAIF_THREADS etc. as the cluster's worker gets
    options = LoadOptions(n_ctx=settings.n_ctx, threads=settings.threads)
    model = LlamaCppRuntime().load(builtin_model_path(), options)

    def one(seed: int) -> tuple[float, float]:
        params = SamplingParams(max_tokens=TOKENS, ignore_eos=True, seed=seed)
        start = time.perf_counter()
        first = None
        for event in model.generate(PROMPT, params):
            if first is None and event.n_tokens:
                first = time.perf_counter() - start
        return first or 0.0, time.perf_counter() - start

    return one, model.close


def cluster_runner(gateway: str) -> tuple[OneRequest, Callable[[], None]]:
    local = threading.local()
    clients: list[ClusterClient] = []

    def one(seed: int) -> tuple[float, float]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = ClusterClient(gateway)
            clients.append(client)
        request = {"prompt": PROMPT, "max_tokens": TOKENS, "ignore_eos": True, "seed": seed}
        start = time.perf_counter()
        first = None
        for msg in client.stream(request):
            if first is None and isinstance(msg, wire.Chunk):
                first = time.perf_counter() - start
            if isinstance(msg, wire.Error):
                raise RuntimeError(msg.message)
        return first or 0.0, time.perf_counter() - start

    def close() -> None:
        for client in clients:
            client.close()

    return one, close


def bridge_runner(url: str) -> tuple[OneRequest, Callable[[], None]]:
    import openai

    local = threading.local()

    def one(seed: int) -> tuple[float, float]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = openai.OpenAI(base_url=f"{url}/v1", api_key="-")
        start = time.perf_counter()
        first = None
        stream = client.completions.create(
            model="stories260K",
            prompt=PROMPT,
            max_tokens=TOKENS,
            seed=seed,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
        return first or 0.0, time.perf_counter() - start

    return one, lambda: None


def measure(one: OneRequest, requests: int, concurrency: int) -> dict[str, float]:
    for seed in range(3):  # warm up
        one(seed)
    results: list[tuple[float, float]] = []
    lock = threading.Lock()
    per_thread = max(1, requests // concurrency)

    def worker(base: int) -> None:
        for i in range(per_thread):
            r = one(base * 1000 + i)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {
        "stream_tps": statistics.median(TOKENS / r[1] for r in results),
        "aggregate_tps": TOKENS * len(results) / wall,
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "ttft_p95_ms": ttfts[int(0.95 * (len(ttfts) - 1))] * 1000,
    }


class _Sink:
    """An OTLP/HTTP endpoint that accepts and drops spans: tracing on, at its real cost."""

    def __enter__(self) -> str:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_port}"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def running_cluster(
    workers: int, env_extra: dict[str, str], pids: dict[str, int] | None = None
) -> Iterator[dict[str, str]]:
    """`haifctl up` in a temporary home, as a user would; yields each daemon's endpoint (and
    fills ``pids`` with each daemon's process id)."""
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "HAIF_HOME": home, **env_extra}
        if "OTEL_EXPORTER_OTLP_ENDPOINT" not in env_extra:
            env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        up = [HAIFCTL, "up", "--workers", str(workers), "--bridge-bind", "127.0.0.1:0"]
        subprocess.run(up, env=env, check=True, stdout=subprocess.DEVNULL)
        try:
            status = subprocess.run(
                [HAIFCTL, "status", "--json"], env=env, check=True, capture_output=True, text=True
            )
            daemons = json.loads(status.stdout)["daemons"]
            if pids is not None:
                pids.update({d["name"]: d["pid"] for d in daemons})
            yield {d["name"]: d["endpoint"] for d in daemons}
        finally:
            subprocess.run([HAIFCTL, "down"], env=env, check=True, stdout=subprocess.DEVNULL)


def gateway_run(requests: int, workers: int, tracing_endpoint: str | None) -> dict[str, float]:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": tracing_endpoint} if tracing_endpoint else {}
    with running_cluster(workers, env) as endpoints:
        one, close = cluster_runner(endpoints["gateway"])
        result = measure(one, requests, 1)
        close()
        return result


def telemetry(requests: int, workers: int, rounds: int) -> None:
    """Tracing off versus on (exporting to a local sink), alternated to even out drift."""
    off, on = [], []
    with _Sink() as endpoint:
        for _ in range(rounds):
            off.append(gateway_run(requests, workers, None)["stream_tps"])
            on.append(gateway_run(requests, workers, endpoint)["stream_tps"])
    a, b = statistics.median(off), statistics.median(on)
    print(
        f"tracing off: {a:,.0f} tok/s; on (OTLP to a local sink): {b:,.0f} tok/s; "
        f"difference {(a - b) / a:+.1%} (median of {rounds} rounds, 1 stream, "
        f"{requests} x {TOKENS}-token requests each; metrics are on in both)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--telemetry",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only compare tracing off and on, over ROUNDS alternating rounds",
    )
    args = parser.parse_args()
    if args.telemetry:
        telemetry(args.requests, args.workers, args.telemetry)
        return

    one, close = local_runner()
    local1 = measure(one, args.requests, 1)
    local8 = measure(one, args.requests, 8)
    close()

    with running_cluster(args.workers, {}) as endpoints:
        one, close = cluster_runner(endpoints["gateway"])
        cluster1 = measure(one, args.requests, 1)
        cluster8 = measure(one, args.requests, 8)
        close()
        one, close = bridge_runner(endpoints["bridge"])
        bridge1 = measure(one, args.requests, 1)
        bridge8 = measure(one, args.requests, 8)

    print(
        f"workload: {TOKENS}-token completions of the shipped model, {args.requests} requests "
        f"per row; cluster = gateway + orchestrator + {args.workers} worker(s) on loopback"
    )
    print(f"{'':<26}{'stream tok/s':>14}{'total tok/s':>14}{'TTFT p50 ms':>14}{'TTFT p95 ms':>14}")
    rows = (
        ("in-process, 1 stream", local1),
        ("gateway, 1 stream", cluster1),
        ("bridge + OpenAI SDK, 1", bridge1),
        ("in-process, 8 streams", local8),
        ("gateway, 8 streams", cluster8),
        ("bridge + OpenAI SDK, 8", bridge8),
    )
    for label, r in rows:
        print(
            f"{label:<26}{r['stream_tps']:>14,.0f}{r['aggregate_tps']:>14,.0f}"
            f"{r['ttft_p50_ms']:>14.2f}{r['ttft_p95_ms']:>14.2f}"
        )
    for label, r in (("gateway", cluster1), ("bridge", bridge1)):
        print(
            f"{label} / in-process, 1 stream: {r['stream_tps'] / local1['stream_tps']:.1%} of "
            f"tokens/s; added TTFT p50 {r['ttft_p50_ms'] - local1['ttft_p50_ms']:.2f} ms"
        )


if __name__ == "__main__":
    main()
