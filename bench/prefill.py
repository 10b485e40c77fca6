"""A prompt's decode on the prefill context (flash attention) against the engine's own (plain
kernel, f32 keys), by prompt length: what PREFILL_MIN_TOKENS was chosen from.

    python bench/prefill.py [--threads 1] [--lengths 8,16,24,32,48,64,96,136]

The shipped model, loaded as a worker loads it (`--flash-attn auto`, so both contexts exist);
each length is the first N tokens of one of haifctl bench's prompts, decoded 60 times into an
empty sequence of each context (medians of the last 50).  Also the hand-over of a 133-token
prompt's cache (read out, values transposed, written into a slot).  Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import llama_cpp

from haifctl.loadgen import prompt_text
from haifctl.registry.service import builtin_model_path
from haifctl.runtime.base import LoadOptions
from haifctl.runtime.llamacpp import LlamaCppModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import fill

ROUNDS, WARM = 60, 10


def median_ms(run: object) -> float:
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        run()  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[WARM:])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lengths", default="8,16,24,32,48,64,96,136")
    args = parser.parse_args(argv)
    options = LoadOptions(n_ctx=2048, threads=args.threads, threads_batch=args.threads, slots=4)
    model = LlamaCppModel(builtin_model_path(), options)
    engine = model.engine
    prefill = engine.prefill  # type: ignore[attr-defined]
    if prefill is None:
        raise SystemExit("this build has no prefill context for the shipped model")
    contexts = {"flash": prefill._ctx, "plain": engine._ctx}  # type: ignore[attr-defined]
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    tokens = model.tokenize(prompt_text(200, 3))
    print(f"threads {args.threads}; ms per decode of the prompt's first N tokens")
    print("tokens    flash    plain  flash/plain")
    try:
        for n in (int(x) for x in args.lengths.split(",")):
            row = {}
            for name, ctx in contexts.items():

                def decode(ctx: object = ctx, n: int = n) -> None:
                    ctx.kv_cache_seq_rm(0, -1, -1)  # type: ignore[attr-defined]
                    fill(batch, tokens[:n], 0)
                    llama_cpp.llama_decode(ctx.ctx, batch)  # type: ignore[attr-defined]

                row[name] = median_ms(decode)
            flash, plain = row["flash"], row["plain"]
            print(f"{n:>6} {flash:>8.2f} {plain:>8.2f} {flash / plain:>12.2f}")
        fill(batch, tokens[:133], 0)

        class Seq:  # what hand_over reads of a sequence: its slot
            slot = 1

        def hand_over() -> None:
            prefill._ctx.kv_cache_seq_rm(0, -1, -1)
            llama_cpp.llama_decode(prefill.ctx, batch)
            prefill.hand_over(Seq, engine._ctx.ctx)  # type: ignore[arg-type, attr-defined]

        both = median_ms(hand_over)
        alone = median_ms(
            lambda: (
                prefill._ctx.kv_cache_seq_rm(0, -1, -1),
                llama_cpp.llama_decode(prefill.ctx, batch),
            )
        )
        print(f"hand-over of 133 tokens' cache: {both - alone:.2f} ms")
    finally:
        llama_cpp.llama_batch_free(batch)
        model.close()


if __name__ == "__main__":
    main(sys.argv[1:])
