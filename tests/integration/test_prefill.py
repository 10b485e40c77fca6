"""Prompts fed with flash attention in a context of their own, generation without (the shipped
model on a CPU, ``--flash-attn auto``): the cache moves between the two contexts, and the text is
the text the plain kernel alone writes."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from haifctl.loadgen import prompt_text
from haifctl.runtime import llamacpp
from haifctl.runtime.base import CancelToken, LoadOptions, SamplingParams, TokenEvent
from haifctl.runtime.llamacpp import (
    N_BATCH,
    PREFILL_MIN_TOKENS,
    LlamaCppModel,
    LlamaCppRuntime,
    transpose_values,
)

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
# words of haifctl bench's text: a prompt under PREFILL_MIN_TOKENS, a few chunks' worth of
# one (N_BATCH tokens a step), and sizes between
WORDS = (3, 20, 60, 150, 480)


def collect(events: Iterator[TokenEvent]) -> str:
    return "".join(event.text for event in events)


def load(model_path: Path, flash_attn: str, slots: int = 4) -> LlamaCppModel:
    return LlamaCppRuntime().load(
        model_path, LoadOptions(threads=1, threads_batch=2, slots=slots, flash_attn=flash_attn)
    )


def concurrently(model: LlamaCppModel, prompts: list[str]) -> list[str]:
    """Every prompt at once (the engine admits them together, each in a slot of its own)."""
    texts: dict[int, str] = {}

    def run(i: int) -> None:
        texts[i] = collect(model.generate(prompts[i], GREEDY))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [texts[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def plain(model_path: Path) -> Iterator[LlamaCppModel]:
    """The reference: flash attention off, every prompt fed by the generating context."""
    model = load(model_path, "off")
    assert model.engine.prefill is None  # type: ignore[attr-defined]
    yield model
    model.close()


def test_auto_feeds_prompts_with_flash_attention_and_writes_the_plain_kernels_text(
    model_path: Path, plain: LlamaCppModel
) -> None:
    prompts = [prompt_text(words, i) for i, words in enumerate(WORDS)]
    lengths = [len(plain.tokenize(p)) for p in prompts]
    assert min(lengths) < PREFILL_MIN_TOKENS
    assert max(lengths) > 2 * N_BATCH
    expected = [collect(plain.generate(p, GREEDY)) for p in prompts]
    model = load(model_path, "auto")
    try:
        assert model.device.flash_attn == "off"
        assert model.device.flash_prefill
        prefill = model.engine.prefill  # type: ignore[attr-defined]
        assert prefill is not None
        assert [collect(model.generate(p, GREEDY)) for p in prompts] == expected
        assert concurrently(model, prompts[::-1]) == expected[::-1]
        assert model.engine.prefill is prefill  # type: ignore[attr-defined]  # never fell back
        assert prefill.seq is None
    finally:
        model.close()


def test_flash_attn_on_or_off_has_no_prefill_context(model_path: Path) -> None:
    for choice in ("on", "off"):
        model = load(model_path, choice, slots=1)
        try:
            assert not model.device.flash_prefill
            assert model.engine.prefill is None  # type: ignore[attr-defined]
        finally:
            model.close()


def test_a_cache_layout_it_does_not_know_falls_back_to_the_plain_kernel(
    model_path: Path, plain: LlamaCppModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were a llama.cpp build to write a sequence's state differently, the prompt is fed again
    by the generating context, and the engine stops using the prefill context."""
    prompt = prompt_text(60, 7)
    expected = collect(plain.generate(prompt, GREEDY))

    def unknown(state: bytes, n_stream: int) -> bytes:
        raise ValueError("a layout this test invents")

    monkeypatch.setattr(llamacpp, "transpose_values", unknown)
    model = load(model_path, "auto")
    try:
        assert model.engine.prefill is not None  # type: ignore[attr-defined]
        assert collect(model.generate(prompt, GREEDY)) == expected
        assert model.engine.prefill is None  # type: ignore[attr-defined]
        assert collect(model.generate(prompt_text(60, 8), GREEDY))
    finally:
        model.close()


def test_a_sequence_cancelled_while_its_prompt_is_fed_leaves_the_prefill_context_free(
    model_path: Path, plain: LlamaCppModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_prompt = prompt_text(480, 3)  # three steps of N_BATCH tokens
    cancel = CancelToken()
    chunks = []
    feed = llamacpp.Prefill.feed

    def feed_then_cancel(self: llamacpp.Prefill, seq: object, threads: int) -> int:
        index = feed(self, seq, threads)  # type: ignore[arg-type]
        chunks.append(index)
        cancel.cancel()  # the user hangs up after the first chunk
        return index

    monkeypatch.setattr(llamacpp.Prefill, "feed", feed_then_cancel)
    model = load(model_path, "auto")
    try:
        prefill = model.engine.prefill  # type: ignore[attr-defined]
        events = list(model.generate(long_prompt, GREEDY, cancel))
        assert events[-1].finish_reason == "cancelled"
        assert chunks == [-1]  # one chunk fed, the prompt not through
        assert prefill.seq is None
        monkeypatch.setattr(llamacpp.Prefill, "feed", feed)
        prompt = prompt_text(60, 9)
        assert collect(model.generate(prompt, GREEDY)) == collect(plain.generate(prompt, GREEDY))
    finally:
        model.close()


def test_a_chats_next_turn_reuses_its_cached_history(
    model_path: Path, plain: LlamaCppModel
) -> None:
    """A prompt that starts as a slot's cache (more than half of it) is fed from where they
    differ, by the generating context, as without the prefill context."""
    history = prompt_text(150, 1)
    turns = [history, history + " Then the dog ran home and slept."]
    expected = [collect(plain.generate(t, GREEDY)) for t in turns]
    model = load(model_path, "auto", slots=1)
    try:
        engine = model.engine
        assert collect(model.generate(turns[0], GREEDY)) == expected[0]
        job = model.job(turns[1], GREEDY)
        slot, reused = engine._take_slot(job.prompt)  # type: ignore[attr-defined]
        engine._free.append(slot)  # type: ignore[attr-defined]
        assert len(reused) > len(job.prompt) // 2
        assert collect(model.generate(turns[1], GREEDY)) == expected[1]
    finally:
        model.close()


def state(cells: int, width: int = 8, layers: int = 2, n_stream: int = 1) -> bytes:
    """A sequence's state as llama.cpp writes it from a flash-attention context: f32 keys,
    f16 values whose element j of cell c is c * 100 + j."""
    out = [struct.pack("<IiII", 0xAF143CD8, 0, n_stream, cells)]
    out += [struct.pack("<iIi", c, 1, 0) for c in range(cells)]
    out.append(struct.pack("<II", 0, layers))
    for _ in range(layers):
        out.append(struct.pack("<iQ", 0, 4 * width) + bytes(4 * width * cells))
    for _ in range(layers):
        values = [c * 100 + j for c in range(cells) for j in range(width)]
        out.append(struct.pack("<iQ", 1, 2 * width) + struct.pack(f"<{len(values)}H", *values))
    return b"".join(out)


def test_transpose_values_writes_one_row_per_value_dimension() -> None:
    cells, width, layers = 3, 8, 2
    out = transpose_values(state(cells, width, layers), n_stream=4)
    assert out[:8] == state(cells)[:8]  # magic and sequence id as they were
    assert struct.unpack_from("<II", out, 8) == (4, cells)
    at = 16 + 12 * cells
    assert struct.unpack_from("<II", out, at) == (1, layers)  # values transposed
    at += 8 + layers * (12 + 4 * width * cells)
    for _ in range(layers):
        assert struct.unpack_from("<iII", out, at) == (1, 2, width)
        at += 12
        rows = struct.unpack_from(f"<{width * cells}H", out, at)
        assert list(rows) == [c * 100 + j for j in range(width) for c in range(cells)]
        at += 2 * width * cells
    assert out[at:] == bytes(4 * 3)  # the three other streams hold no cells


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (state(3)[:-1], "truncated"),
        (state(3) + b"\0", "1 bytes left over"),
        (state(3, n_stream=2), "2 streams"),
        (state(0), "0 cells"),
        (b"\0" * 7, "truncated"),
    ],
)
def test_transpose_values_refuses_what_it_does_not_know(blob: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        transpose_values(blob, n_stream=4)


def test_a_sequence_done_at_its_first_token_never_moves_its_cache(
    model_path: Path, plain: LlamaCppModel
) -> None:
    """The first token comes from the prefill context and the cache moves a step later: a
    request that ends at that token (max_tokens 1) leaves the prefill context free and its slot
    empty, and the next request is unaffected."""
    model = load(model_path, "auto", slots=1)
    try:
        engine = model.engine
        one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        prompt = prompt_text(60, 4)
        assert collect(model.generate(prompt, one)) == collect(plain.generate(prompt, one))
        assert engine.prefill.seq is None  # type: ignore[attr-defined]
        assert engine._cached == [[]]  # type: ignore[attr-defined]
        other = prompt_text(60, 5)
        assert collect(model.generate(other, GREEDY)) == collect(plain.generate(other, GREEDY))
    finally:
        model.close()
