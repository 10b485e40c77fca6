"""The llama.cpp runtime on the real shipped model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from haifctl.errors import InvalidInput
from haifctl.generation import LocalGeneration, model_at
from haifctl.runtime.base import CancelToken, LoadOptions, SamplingParams, TokenEvent
from haifctl.runtime.llamacpp import LlamaCppModel, LlamaCppRuntime
from haifctl.schema import validate_request


@pytest.fixture(scope="module")
def model(model_path: Path) -> Iterator[LlamaCppModel]:
    loaded = LlamaCppRuntime().load(model_path, LoadOptions(n_ctx=4096, threads=1))
    yield loaded
    loaded.close()


def collect(events: Iterator[TokenEvent]) -> tuple[str, TokenEvent, int]:
    pieces, n = [], 0
    last = None
    for event in events:
        pieces.append(event.text)
        n += 1
        last = event
    assert last is not None
    return "".join(pieces), last, n


def test_model_facts(model: LlamaCppModel, model_path: Path) -> None:
    assert model.info.n_ctx == 2048  # 4096 asked; capped at what the model was trained on
    assert model.info.n_ctx_train == 2048
    assert model.info.n_vocab == 512
    assert model.info.bos_token == "<s>"
    assert model.device.backend in ("cpu", "cuda", "metal", "vulkan", "rocm", "hip", "sycl", "gpu")
    assert model.slots >= 1


def test_generation_streams_real_text(model: LlamaCppModel) -> None:
    text, last, n_events = collect(
        model.generate("Once upon a time", SamplingParams(max_tokens=48, seed=1))
    )
    assert last.finish_reason == "length"
    assert last.completion_tokens == 48
    assert last.prompt_tokens == model.count_tokens("Once upon a time") == 5
    assert n_events > 10  # a stream, not one blob
    words = text.split()
    assert len(words) > 15
    # a model trained on children's stories writes English words, not noise
    assert (
        sum(
            w.strip('.,!?"').lower() in {"the", "a", "she", "he", "was", "and", "to"} for w in words
        )
        >= 3
    )


def test_seed_makes_output_repeatable(model: LlamaCppModel) -> None:
    params = SamplingParams(max_tokens=40, seed=1234, temperature=0.9)
    first = collect(model.generate("Once upon a time", params))[0]
    assert collect(model.generate("Once upon a time", params))[0] == first
    other = collect(
        model.generate("Once upon a time", SamplingParams(max_tokens=40, seed=99, temperature=0.9))
    )[0]
    assert other != first


def test_stop_strings_end_the_text_before_them(model: LlamaCppModel) -> None:
    params = SamplingParams(max_tokens=200, seed=5, temperature=0.0)
    full = collect(model.generate("Once upon a time", params))[0]
    stop = full.split()[6]  # a word that the greedy completion certainly produces
    text, last, _ = collect(
        model.generate(
            "Once upon a time",
            SamplingParams(max_tokens=200, seed=5, temperature=0.0, stop=(stop,)),
        )
    )
    assert last.finish_reason == "stop"
    assert stop not in text
    assert full.startswith(text)
    assert last.completion_tokens < 200


def test_cancel_stops_generation_early(model: LlamaCppModel) -> None:
    cancel = CancelToken()
    events = model.generate("Once upon a time", SamplingParams(max_tokens=1000, seed=2), cancel)
    seen = 0
    last = None
    for event in events:
        last = event
        if event.n_tokens:
            seen += 1
            if seen == 5:
                cancel.cancel()
    assert last is not None
    assert last.finish_reason == "cancelled"
    # The engine thread runs a little ahead of its reader, so it stops a few tokens after the
    # fifth, and far before the 1000 asked for.
    assert 5 <= last.completion_tokens < 500


def test_an_interrupted_generation_ends_cancelled_though_the_engine_finished(
    model: LlamaCppModel, model_path: Path
) -> None:
    """Ctrl-C while `haifctl infer` still writes text out: the engine may have made every token
    already (they wait in the stream), but the caller stopped short of them, so it ends as
    cancelled (and the CLI says "stopped" and exits 130)."""
    request = validate_request({"prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True})
    generation = LocalGeneration(model_at(str(model_path)), model, request, 8)
    events = iter(generation)
    assert next(events).n_tokens == 1
    deadline = time.monotonic() + 30
    while model.engine.busy():  # the engine made all 8 tokens: they wait in the stream
        assert time.monotonic() < deadline, "the engine never finished"
        time.sleep(0.001)
    generation.cancel()
    done = generation.completion()
    assert done.finish_reason == "cancelled"
    assert done.usage.completion_tokens == 8  # what the engine made is still counted
    events.close()


def test_closing_the_stream_frees_the_model(model: LlamaCppModel) -> None:
    events = model.generate("Once upon a time", SamplingParams(max_tokens=500))
    next(events)
    events.close()  # a client that goes away
    _text, last, _ = collect(model.generate("The dog", SamplingParams(max_tokens=8)))
    assert last.completion_tokens == 8


def test_concurrent_callers_all_complete(model: LlamaCppModel) -> None:
    results: dict[int, TokenEvent] = {}

    def run(i: int) -> None:
        results[i] = collect(model.generate("One day", SamplingParams(max_tokens=30 + i, seed=i)))[
            1
        ]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r.completion_tokens for i, r in results.items()} == {i: 30 + i for i in range(4)}


def test_prompt_longer_than_context_is_refused(model: LlamaCppModel) -> None:
    with pytest.raises(InvalidInput, match="context window holds 2048") as info:
        model.generate("once " * 3000, SamplingParams(max_tokens=5))
    assert info.value.code == "prompt_too_long"


def test_budget_is_capped_by_context(model: LlamaCppModel) -> None:
    prompt = "once " * 1010
    n_prompt = model.count_tokens(prompt)
    assert 2048 - 100 < n_prompt < 2048
    _, last, _ = collect(
        model.generate(prompt, SamplingParams(max_tokens=500, seed=1, stop=("\x00",)))
    )
    assert last.completion_tokens <= 2048 - n_prompt
    assert last.finish_reason in ("length", "stop")


def test_close_is_idempotent(model_path: Path) -> None:
    loaded = LlamaCppRuntime().load(model_path, LoadOptions(n_ctx=256))
    assert loaded.info.n_ctx == 256
    loaded.close()
    loaded.close()
    with pytest.raises(Exception, match="unloaded"):
        loaded.generate("x", SamplingParams())
