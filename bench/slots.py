"""Batched decoding: total tokens/s for 1..N concurrent streams, one slot versus N slots.

    python bench/slots.py [MODEL.gguf] [--tokens 64] [--threads 0]

With no model, the shipped one.  For a realistic shape without downloading anything, write a
random-weight GGUF with the gguf package (throughput depends on shape and quantisation, not on
the weights).  Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from haifctl.registry.service import builtin_model_path
from haifctl.runtime.base import LoadOptions, SamplingParams
from haifctl.runtime.llamacpp import LlamaCppRuntime


def total_tps(path: Path, slots: int, streams: int, tokens: int, threads: int) -> float:
    model = LlamaCppRuntime().load(path, LoadOptions(slots=slots, threads=threads, n_ctx=1024))
    counts: list[int] = []

    def run(seed: int) -> None:
        params = SamplingParams(max_tokens=tokens, seed=seed, ignore_eos=True)
        counts.append(sum(e.n_tokens for e in model.generate("Once upon a time", params)))

    try:
        run(0)  # warm up
        counts.clear()
        workers = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(counts) / (time.perf_counter() - start)
    finally:
        model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    path = args.model or builtin_model_path()
    print(f"model {path.name}, {args.tokens} tokens per stream")
    print(f"{'streams':>8}{'1 slot tok/s':>16}{'N slots tok/s':>16}")
    for streams in (1, 4, 8):
        one = total_tps(path, 1, streams, args.tokens, args.threads)
        many = total_tps(path, max(2, streams), streams, args.tokens, args.threads)
        print(f"{streams:>8}{one:>16,.1f}{many:>16,.1f}")


if __name__ == "__main__":
    main()
