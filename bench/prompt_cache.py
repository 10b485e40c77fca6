"""Time to first token of a conversation's next turn, with the history in a slot's cache.

    python bench/prompt_cache.py [--turns 15] [--words 200]

The in-process engine (the shipped model, 1 thread, 4 slots): each round sends a conversation
so far (about 450 tokens), then the same history with a new question.  The first is processed
whole; the second finds the history in the slot its first turn left and is fed from where they
differ.  Prints the medians; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

from haifctl.loadgen import prompt_text
from haifctl.registry.service import builtin_model_path
from haifctl.runtime.base import LoadOptions, SamplingParams
from haifctl.runtime.llamacpp import LlamaCppModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=15)
    parser.add_argument("--words", type=int, default=200)
    args = parser.parse_args()
    model = LlamaCppModel(builtin_model_path(), LoadOptions(n_ctx=2048, threads=1, slots=4))
    one = SamplingParams(max_tokens=1)

    def ttft_ms(prompt: str) -> float:
        start = time.perf_counter()
        for _ in model.generate(prompt, one):
            pass
        return (time.perf_counter() - start) * 1000

    first, next_turn = [], []
    try:
        for i in range(args.turns):
            history = prompt_text(args.words, i * 7)  # a different conversation each round
            first.append(ttft_ms(history))
            next_turn.append(ttft_ms(history + " And then what happened next?"))
        tokens = len(model.tokenize(history))
    finally:
        model.close()
    print(
        f"history of {tokens} tokens: first turn p50 {statistics.median(first):.1f} ms, "
        f"next turn (history cached) p50 {statistics.median(next_turn):.1f} ms"
    )


if __name__ == "__main__":
    main()
