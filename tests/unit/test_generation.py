"""A generation's counts and timings, on a clock the test moves."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from haifctl import generation
from haifctl.generation import Generation, model_at
from haifctl.runtime.base import TokenEvent


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(generation, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    return now


def test_timings_of_a_finished_generation(clock: list[float]) -> None:
    g = Generation("m:1", load_ms=12.3456)
    clock[0] = 100.25
    g.record(TokenEvent(text="Once", n_tokens=1))
    for _ in range(9):
        clock[0] += 0.1
        g.record(TokenEvent(text=" x", n_tokens=1))
    clock[0] += 0.1
    g.record(TokenEvent(text="", finish_reason="length", prompt_tokens=5, completion_tokens=11))
    assert g.ttft_ms == 250.0
    assert g.generation_ms == 1250.0
    assert g.tokens_per_second == 10.0  # 10 tokens after the first, in 1 s
    done = g.completion(served_by="cluster", worker="w1")
    assert done.text == "Once" + " x" * 9
    assert (done.finish_reason, done.worker, done.served_by) == ("length", "w1", "cluster")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (
        5,
        11,
        16,
    )
    assert done.timings.load_ms == 12.346
    assert done.timings.time_to_first_token_ms == 250.0


def test_a_generation_cut_short_keeps_what_it_produced(clock: list[float]) -> None:
    g = Generation("m:1")
    clock[0] = 100.5
    g.record(TokenEvent(text="a", n_tokens=2))
    clock[0] = 101.5
    g.record(TokenEvent(text="b", n_tokens=1))
    g.stop(prompt_tokens=4)
    g.stop(prompt_tokens=99)  # once stopped, it stays as it was
    done = g.completion()
    assert (done.finish_reason, done.text) == ("cancelled", "ab")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (4, 3)
    assert done.timings.tokens_per_second == 2.0


def test_no_tokens_no_first_token_time(clock: list[float]) -> None:
    g = Generation("m:1")
    clock[0] = 101.0
    g.record(TokenEvent(text="", finish_reason="stop"))
    assert g.ttft_ms is None
    assert g.tokens_per_second == 0.0
    assert g.generation_ms == 1000.0


def test_a_model_given_as_a_path_is_known_by_that_path(model_path: Path) -> None:
    info = model_at(str(model_path))
    assert info.ref == info.path == str(model_path)
    assert info.context_length is not None
    assert info.params == {}
