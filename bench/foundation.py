"""Figures for the foundation: generation speed, cold-start first token, registry latency.

    python bench/foundation.py [--runs N]

Postgres figures need HAIF_BENCH_POSTGRES_URL (or HAIF_TEST_POSTGRES_URL).  Prints a table; it
asserts nothing, it measures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from haifctl.registry.service import builtin_model_path, open_registry
from haifctl.runtime.base import LoadOptions, SamplingParams
from haifctl.runtime.llamacpp import LlamaCppRuntime

HAIFCTL = str(Path(sys.executable).parent / "haifctl")


def row(what: str, value: str, how: str) -> None:
    print(f"{what:<56} {value:>16}   {how}")


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def generation(runs: int) -> None:
    path = builtin_model_path()
    model = LlamaCppRuntime().load(path, LoadOptions())
    params = SamplingParams(max_tokens=256, ignore_eos=True, seed=1)
    rates = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        n = 0
        for event in model.generate("Once upon a time", params):
            n += event.n_tokens
        rates.append(n / (time.perf_counter() - start))
    rates = rates[1:]  # the first run warms caches
    row(
        "in-process tokens/s (1 stream, 256 tokens)",
        f"{statistics.median(rates):,.0f}",
        f"median of {runs}; best {max(rates):,.0f}; threads={model.device.threads}",
    )
    model.close()
    # The bindings' own loop, on a model of its own and from this same thread, for reference.
    import llama_cpp

    llama = llama_cpp.Llama(str(path), n_ctx=2048, n_threads=model.device.threads, verbose=False)
    raw = []
    for _ in range(runs):
        start = time.perf_counter()
        out = llama.create_completion("Once upon a time", max_tokens=256, seed=1)
        raw.append(out["usage"]["completion_tokens"] / (time.perf_counter() - start))
    llama.close()
    row(
        "  llama-cpp-python create_completion, same",
        f"{statistics.median(raw):,.0f}",
        "reference: the bindings' own loop (stops at end-of-text)",
    )


def cold_start(runs: int) -> None:
    for first_use in (True, False):
        samples = []
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as home:
                env = {**os.environ, "HAIF_HOME": home}
                if not first_use:
                    subprocess.run(
                        [HAIFCTL, "models", "list"], env=env, check=True, capture_output=True
                    )
                start = time.perf_counter()
                proc = subprocess.Popen(
                    [HAIFCTL, "infer", "Once upon a time", "-n", "256"],
                    stdout=subprocess.PIPE,
                    env=env,
                )
                assert proc.stdout is not None
                proc.stdout.read(1)
                samples.append(time.perf_counter() - start)
                proc.communicate()
        label = "first use (creates registry)" if first_use else "registry exists"
        row(
            f"haifctl infer start -> first token, {label}",
            f"{statistics.median(samples) * 1000:,.0f} ms",
            f"median of {runs} cold processes",
        )


def registry(url: str, label: str, runs: int) -> None:
    model = builtin_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(shutil.copy(model, Path(tmp) / "m.gguf"))
        with open_registry(url) as reg:
            reg.ensure_builtin()
            names = iter(f"bench-{uuid.uuid4().hex[:8]}" for _ in range(runs))
            register = timed(lambda: reg.register(copy, name=next(names)), runs)
            listing = timed(reg.all, runs)
            resolve = timed(lambda: reg.resolve("stories260K"), runs)
            n = len(reg.all())
            for record in reg.all():
                if record.name.startswith("bench-"):
                    reg.remove(record.ref)
    row(
        f"registry register, {label}",
        f"{statistics.median(register) * 1000:.2f} ms",
        f"median of {runs}; includes sha256 + GGUF read of a 1.2 MB file",
    )
    row(
        f"registry list ({n} models), {label}",
        f"{statistics.median(listing) * 1000:.2f} ms",
        f"median of {runs}",
    )
    row(
        f"registry resolve NAME, {label}",
        f"{statistics.median(resolve) * 1000:.2f} ms",
        f"median of {runs}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    print(f"{'what':<56} {'figure':>16}   how")
    generation(args.runs)
    cold_start(max(3, args.runs // 2))
    with tempfile.TemporaryDirectory() as tmp:
        registry(f"sqlite://{tmp}/bench.db", "SQLite", args.runs * 3)
    pg = os.environ.get("HAIF_BENCH_POSTGRES_URL") or os.environ.get("HAIF_TEST_POSTGRES_URL")
    if pg:
        import psycopg

        schema = f"haif_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(pg, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        try:
            sep = "&" if "?" in pg else "?"
            registry(f"{pg}{sep}options=-csearch_path%3D{schema}", "Postgres", args.runs * 3)
        finally:
            with psycopg.connect(pg, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    else:
        print("(Postgres figures skipped: set HAIF_BENCH_POSTGRES_URL=postgresql://...)")


if __name__ == "__main__":
    main()
