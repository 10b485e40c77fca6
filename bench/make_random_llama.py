"""Write a random-weight Llama GGUF (f16) of any shape, with a synthetic SPM vocabulary.

    python bench/make_random_llama.py OUT N_LAYER N_EMBD N_HEAD N_HEAD_KV N_FF N_VOCAB

TinyLlama-1.1B's shape is `22 2048 32 4 5632 32000` (2.2 GB, about 25 s); `llama-quantize OUT
Q4.gguf q4_0` then makes a 607 MiB Q4_0.  Speed depends on the shape and the quantisation, not
on the weights' values, so such a model measures throughput as well as the real one; its text is
noise.  Needs numpy and the `gguf` package.
"""

from __future__ import annotations

import sys

import gguf
import numpy as np

CONTEXT = 4096


def main(argv: list[str]) -> None:
    if len(argv) != 7:
        sys.exit(__doc__)
    out = argv[0]
    n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab = map(int, argv[1:])
    if n_embd % n_head or n_head % n_head_kv or n_vocab < 260:
        sys.exit("N_EMBD must divide by N_HEAD, N_HEAD by N_HEAD_KV, and N_VOCAB be 260 or more")
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(out, "llama")
    w.add_name("random-llama")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(1)  # mostly f16

    # <unk> <s> </s>, the 256 byte tokens, then "▁w0", "▁w1", ... up to the vocabulary size
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(6)
    i = 0
    while len(tokens) < n_vocab:
        tokens.append("\u2581w" + str(i))
        scores.append(-float(i))
        types.append(1)
        i += 1
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def weight(name: str, *shape: int) -> None:
        values = rng.standard_normal(shape, dtype=np.float32) * 0.02
        w.add_tensor(name, values.astype(np.float16))

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    head_dim = n_embd // n_head
    weight("token_embd.weight", n_vocab, n_embd)
    for layer in range(n_layer):
        p = f"blk.{layer}."
        norm(p + "attn_norm.weight", n_embd)
        weight(p + "attn_q.weight", n_embd, n_embd)
        weight(p + "attn_k.weight", n_head_kv * head_dim, n_embd)
        weight(p + "attn_v.weight", n_head_kv * head_dim, n_embd)
        weight(p + "attn_output.weight", n_embd, n_embd)
        norm(p + "ffn_norm.weight", n_embd)
        weight(p + "ffn_gate.weight", n_ff, n_embd)
        weight(p + "ffn_up.weight", n_ff, n_embd)
        weight(p + "ffn_down.weight", n_embd, n_ff)
    norm("output_norm.weight", n_embd)
    weight("output.weight", n_vocab, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1:])
