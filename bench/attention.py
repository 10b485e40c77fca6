"""llama.cpp's attention settings on this CPU: flash attention on or off, keys cached as f16 or
f32, threads; a prompt's time and generation tokens/s at 1 and 8 sequences.

    python bench/attention.py [MODEL.gguf] [--threads 1,2] [--words 60]

Each setting is its own context of the same model (decoding straight through llama.cpp, as the
worker's engine does: 8 sequences each in a KV stream of its own).  A prompt: `--words` words of
haifctl bench's text (p50 of 17 after 3 warm-ups); generation: 200 steps from the prompt's end.
This is what `--flash-attn auto` and the f32 keys for small heads were chosen from.  Prints
figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp._logger
from llama_cpp import _internals

from haifctl.loadgen import prompt_text

HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parent / "haifctl" / "data" / "stories260K.gguf"
STEPS = 200
F16, F32 = llama_cpp.GGML_TYPE_F16, llama_cpp.GGML_TYPE_F32
# flash attention, (key type, value type) cached
KV_SETTINGS = (
    (False, (F16, F16)),
    (False, (F32, F16)),
    (False, (F32, F32)),
    (True, (F16, F16)),
    (True, (F32, F32)),
)


def fill(batch: Any, tokens: list[int], seq: int, start: int = 0, last_logits: bool = True) -> None:
    for j, token in enumerate(tokens):
        batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, start + j, 1
        batch.seq_id[j][0] = seq
        batch.logits[j] = last_logits and j == len(tokens) - 1
    batch.n_tokens = len(tokens)


def measure(
    model: Any, flash: bool, key_type: int, value_type: int, threads: int, seqs: int, words: int
) -> str:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 2048 * seqs, 512, 512
    params.n_seq_max = seqs
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = False
    params.type_k, params.type_v = key_type, value_type
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if flash
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    try:
        times, tokens = [], []
        for i in range(20):
            tokens = model.tokenize(prompt_text(words, i).encode(), add_bos=True, special=False)
            ctx.kv_cache_seq_rm(0, -1, -1)
            fill(batch, tokens, 0)
            started = time.perf_counter()
            if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
                raise SystemExit("llama_decode failed")
            times.append((time.perf_counter() - started) * 1000)
        prompt_ms = statistics.median(times[3:])
        for seq in range(1, seqs):  # the other sequences start from the same prompt
            ctx.kv_cache_seq_rm(seq, -1, -1)
            fill(batch, tokens, seq, last_logits=False)
            llama_cpp.llama_decode(ctx.ctx, batch)
        started = time.perf_counter()
        for step in range(STEPS):
            for seq in range(seqs):
                batch.token[seq], batch.pos[seq], batch.n_seq_id[seq] = 5, len(tokens) + step, 1
                batch.seq_id[seq][0], batch.logits[seq] = seq, True
            batch.n_tokens = seqs
            llama_cpp.llama_decode(ctx.ctx, batch)
        tok_s = seqs * STEPS / (time.perf_counter() - started)
    finally:
        llama_cpp.llama_batch_free(batch)
        ctx.close()
    return f"{len(tokens):>7} {prompt_ms:>10.2f} {tok_s:>9,.0f}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(SHIPPED))
    parser.add_argument("--threads", default="1")
    parser.add_argument("--words", type=int, default=60)
    args = parser.parse_args(argv)
    llama_cpp.llama_backend_init()
    llama_cpp._logger.set_verbose(False)  # llama.cpp's own log lines: errors only
    mparams = llama_cpp.llama_model_default_params()
    model = _internals.LlamaModel(path_model=args.model, params=mparams, verbose=False)
    m = model.model
    head = llama_cpp.llama_model_n_embd(m) // max(1, llama_cpp.llama_model_n_head(m))
    print(f"{Path(args.model).name}: head size {head}")
    print("flash    k/v threads seqs prompt prompt_ms gen_tok/s")
    for threads in (int(t) for t in args.threads.split(",")):
        for seqs in (1, 8):
            for flash, kv in KV_SETTINGS:
                row = measure(model, flash, *kv, threads, seqs, args.words)
                name = "/".join("f32" if t == F32 else "f16" for t in kv)
                print(f"{'on' if flash else 'off':>5} {name:>7} {threads:>7} {seqs:>4} {row}")
    model.close()


if __name__ == "__main__":
    main(sys.argv[1:])
