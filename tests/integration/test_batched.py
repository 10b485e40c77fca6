"""Several sequences of one model at once (llama.cpp batched decoding, one sequence id each)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from haifctl import wire
from haifctl.errors import InvalidInput
from haifctl.runtime.base import CancelToken, LoadOptions, SamplingParams, TokenEvent
from haifctl.runtime.llamacpp import LlamaCppModel, LlamaCppRuntime
from tests.cluster import Cluster


@pytest.fixture(scope="module")
def batched(model_path: Path) -> Iterator[LlamaCppModel]:
    loaded = LlamaCppRuntime().load(model_path, LoadOptions(slots=4, threads=1))
    assert loaded.slots == 4
    yield loaded
    loaded.close()


def collect(events: Iterator[TokenEvent]) -> tuple[str, TokenEvent]:
    text, last = [], None
    for event in events:
        text.append(event.text)
        last = event
    assert last is not None
    return "".join(text), last


def test_batched_output_matches_one_sequence_at_a_time(
    batched: LlamaCppModel, model_path: Path
) -> None:
    single = LlamaCppRuntime().load(model_path, LoadOptions(threads=1))
    try:
        params = SamplingParams(max_tokens=40, seed=11, temperature=0.8)
        alone = collect(single.generate("Once upon a time", params))[0]
    finally:
        single.close()
    # the same sampler chain and seed give the same story, batched or not
    assert collect(batched.generate("Once upon a time", params))[0] == alone


def test_concurrent_sequences_share_one_model(batched: LlamaCppModel) -> None:
    results: dict[int, tuple[str, TokenEvent]] = {}

    def run(i: int) -> None:
        params = SamplingParams(max_tokens=30 + i, seed=i, ignore_eos=True)
        results[i] = collect(batched.generate("One day", params))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]  # more than 4 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r[1].completion_tokens for i, r in results.items()} == {i: 30 + i for i in range(6)}
    assert all(r[1].finish_reason == "length" for r in results.values())
    # each sequence is its own: the same seed alone gives the same text as it did in the crowd
    again = collect(
        batched.generate("One day", SamplingParams(max_tokens=33, seed=3, ignore_eos=True))
    )
    assert again[0] == results[3][0]


def test_stop_cancel_and_context_limits(batched: LlamaCppModel) -> None:
    full = collect(
        batched.generate("Once upon a time", SamplingParams(max_tokens=60, temperature=0))
    )[0]
    word = full.split()[4]
    text, last = collect(
        batched.generate(
            "Once upon a time", SamplingParams(max_tokens=60, temperature=0, stop=(word,))
        )
    )
    assert last.finish_reason == "stop"
    assert full.startswith(text)
    assert word not in text
    cancel = CancelToken()
    seen = 0
    for event in batched.generate("Once", SamplingParams(max_tokens=1000, ignore_eos=True), cancel):
        seen += event.n_tokens
        if seen == 3:
            cancel.cancel()
        last = event
    assert last.finish_reason == "cancelled"
    assert last.completion_tokens < 500
    prompt = "once " * 1010  # close to the 2048-token context of each sequence
    _, last = collect(batched.generate(prompt, SamplingParams(max_tokens=500, ignore_eos=True)))
    assert last.completion_tokens <= 2048 - last.prompt_tokens


def test_a_worker_with_two_slots_runs_two_requests_at_once(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, workers=1, slots=2)
    try:
        with cluster.client() as client:
            assert client.stats().workers[0].slots == 2
            streams = [
                client.stream(
                    {"prompt": "Once upon a time", "max_tokens": 1900, "ignore_eos": True}
                )
            ]
            with cluster.client() as other:
                streams.append(
                    other.stream({"prompt": "The dog", "max_tokens": 1900, "ignore_eos": True})
                )
                firsts = [next(s) for s in streams]
                assert all(isinstance(f, wire.Chunk) for f in firsts)
                # both started before either finished: two sequences on one worker
                assert max(w.busy for w in client.stats().workers) == 2
                finals = [list(s)[-1] for s in streams]
        assert all(isinstance(f, wire.Done) and f.completion_tokens == 1900 for f in finals)
    finally:
        cluster.stop()


def test_a_prompt_that_starts_as_a_cached_one_reuses_it_and_gives_the_same_text(
    model_path: Path,
) -> None:
    """A slot keeps its cache when its sequence ends; a later prompt sharing its start (a
    chat's next turn) is fed from where they differ, and writes what a cold start writes."""
    story = "Once upon a time, there was a little girl named Lily. She loved to play outside."
    turns = [story, story + " One day she found a big red ball.", story, "The dog ran home."]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    def run(prompts: list[str], slots: int) -> list[str]:
        model = LlamaCppRuntime().load(model_path, LoadOptions(slots=slots, threads=1))
        try:
            return [collect(model.generate(p, greedy))[0] for p in prompts]
        finally:
            model.close()

    warm = run(turns, slots=2)  # each turn after the first finds a cached prefix
    cold = [run([p], slots=1)[0] for p in turns]  # each on a fresh model
    assert warm == cold
    model = LlamaCppRuntime().load(model_path, LoadOptions(slots=2, threads=1))
    try:
        engine = model.engine
        collect(model.generate(turns[0], greedy))
        cached = [len(c) for c in engine._cached]  # type: ignore[attr-defined]
        assert max(cached) == len(model.tokenize(turns[0])) + 23  # prompt + tokens decoded
        job = model.job(turns[1], greedy)
        slot, reused = engine._take_slot(job.prompt)  # type: ignore[attr-defined]
        # the story's tokens (less one or two where the longer text tokenises differently)
        assert len(reused) >= len(model.tokenize(turns[0])) - 2
        assert reused == job.prompt[: len(reused)]
        engine._free.append(slot)  # type: ignore[attr-defined]
    finally:
        model.close()


def test_attention_follows_the_head_size_and_flash_attn(model_path: Path) -> None:
    """The shipped model's heads are 8 wide: on a CPU, "auto" turns flash attention off and
    caches keys as f32 (6 bytes of KV per element pair instead of 4); "on" is flash attention
    with f16 keys.  Either way the model writes text."""
    chosen = {}
    for choice in ("auto", "on"):
        model = LlamaCppRuntime().load(model_path, LoadOptions(threads=1, flash_attn=choice))
        try:
            assert model.head_dim == 8
            chosen[choice] = (model.device.flash_attn, model.keys_f32, model.kv_bytes_per_token())
            params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
            text, last = collect(model.generate("Once upon a time", params))
            assert last.completion_tokens == 12
            assert text.strip()
        finally:
            model.close()
    per_layer_pair = chosen["on"][2] // 4
    assert chosen == {
        "auto": ("off", True, per_layer_pair * 6),
        "on": ("on", False, per_layer_pair * 4),
    }


def test_unknown_flash_attn_is_refused_before_loading(model_path: Path) -> None:
    with pytest.raises(InvalidInput, match="auto, on, off"):
        LlamaCppRuntime().load(model_path, LoadOptions(flash_attn="fast"))


def test_prompt_steps_on_more_threads_give_the_same_tokens(model_path: Path) -> None:
    """A worker switches llama.cpp between --threads-batch threads for steps that feed a prompt
    and --threads for the others; the tokens do not depend on it."""
    prompt = " ".join(["Once upon a time there was a little dog named Spot."] * 6)
    texts = []
    for threads_batch in (1, 2):
        model = LlamaCppRuntime().load(
            model_path, LoadOptions(threads=1, threads_batch=threads_batch, slots=2)
        )
        try:
            assert model.device.threads_batch == threads_batch
            params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
            texts.append(collect(model.generate(prompt, params))[0])
        finally:
            model.close()
    assert texts[0]
    assert texts[0] == texts[1]
