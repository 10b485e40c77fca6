"""The engine interface, held to one contract by both engines: llama.cpp's continuous batching
(on the shipped model) and the synthetic one."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from haifctl.errors import HaifError
from haifctl.runtime.base import CancelToken, LoadOptions, SamplingParams, TokenEvent
from haifctl.runtime.engine import LoadedModel, Step, deliver_to_queues
from haifctl.runtime.llamacpp import LlamaCppRuntime
from haifctl.runtime.synthetic import SyntheticRuntime

SLOTS = 4


class Recorder:
    """A sink that remembers how many events each step handed over."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def __call__(self, step: Step) -> None:
        self.steps.append(len(step))
        deliver_to_queues(step)


@pytest.fixture(params=["llama.cpp", "synthetic"])
def engine_model(
    request: pytest.FixtureRequest, model_path: Path
) -> Iterator[tuple[LoadedModel, Recorder]]:
    sink = Recorder()
    options = LoadOptions(slots=SLOTS, threads=1, n_ctx=512)
    if request.param == "llama.cpp":
        model: LoadedModel = LlamaCppRuntime().load(model_path, options, sink)
    else:
        model = SyntheticRuntime(step_s=0.001).load(Path("synthetic"), options, sink)
    yield model, sink
    model.close()


def run(
    model: LoadedModel, prompt: str, params: SamplingParams, cancel: CancelToken | None = None
) -> tuple[str, TokenEvent, int]:
    text, n, last = [], 0, None
    for event in model.generate(prompt, params, cancel):
        text.append(event.text)
        n += event.n_tokens
        last = event
    assert last is not None
    return "".join(text), last, n


def test_budget_is_exact_and_every_token_is_counted_once(
    engine_model: tuple[LoadedModel, Recorder],
) -> None:
    model, _ = engine_model
    _, last, n = run(
        model, "once upon a time", SamplingParams(max_tokens=37, ignore_eos=True, seed=1)
    )
    assert last.finish_reason == "length"
    assert last.completion_tokens == 37
    assert n == 37


def test_more_requests_than_slots_all_finish_and_share_steps(
    engine_model: tuple[LoadedModel, Recorder],
) -> None:
    model, sink = engine_model
    results: dict[int, tuple[str, TokenEvent, int]] = {}

    def one(i: int) -> None:
        results[i] = run(
            model, "once upon a time", SamplingParams(max_tokens=40 + i, ignore_eos=True, seed=i)
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(SLOTS + 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert {i: r[1].completion_tokens for i, r in results.items()} == {
        i: 40 + i for i in range(SLOTS + 2)
    }
    assert (
        max(sink.steps) >= 2
    )  # sequences were decoded together, their events handed over together
    assert max(sink.steps) <= SLOTS + 2  # never more events than sequences (plus finishes) a step


def test_cancel_stops_at_the_next_step(engine_model: tuple[LoadedModel, Recorder]) -> None:
    model, _ = engine_model
    cancel = CancelToken()
    seen = 0
    last = None
    for event in model.generate("once", SamplingParams(max_tokens=400, ignore_eos=True), cancel):
        seen += event.n_tokens
        if seen == 3:
            cancel.cancel()
        last = event
    assert last is not None
    assert last.finish_reason == "cancelled"
    assert last.completion_tokens < 100


def test_stop_string_is_never_shown(engine_model: tuple[LoadedModel, Recorder]) -> None:
    model, _ = engine_model
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    full = run(model, "once upon a time", params)[0]
    word = full.split()[5]
    text, last, _ = run(
        model,
        "once upon a time",
        SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, stop=(word,)),
    )
    assert last.finish_reason == "stop"
    assert full.startswith(text)
    assert word not in text


def test_closing_the_model_fails_waiting_consumers_instead_of_hanging(
    engine_model: tuple[LoadedModel, Recorder],
) -> None:
    model, _ = engine_model
    events = model.generate("once", SamplingParams(max_tokens=100_000, ignore_eos=True))
    next(events)
    closer = threading.Thread(target=model.close)
    closer.start()
    with pytest.raises(HaifError) as info:
        for _ in events:
            pass
    closer.join(timeout=30)
    assert info.value.code == "model_closed"


PINNED = """
import os, sys
from pathlib import Path
from haifctl.runtime.base import LoadOptions, SamplingParams
from haifctl.runtime.llamacpp import LlamaCppRuntime

os.sched_setaffinity(0, {int(c) for c in sys.argv[2].split(",")})
threads = int(sys.argv[3])
model = LlamaCppRuntime().load(Path(sys.argv[1]), LoadOptions(threads=threads, n_ctx=512), None)
prompt = " ".join(["Once upon a time there was a little girl."] * 12)  # a prompt on every thread
for _ in model.generate(prompt, SamplingParams(max_tokens=4, seed=1)):
    pass
for tid in sorted(os.listdir("/proc/self/task"), key=int):
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    allowed = next(line for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
    print(allowed.split()[-1])
model.close()
"""


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and two CPUs",
)
def test_an_engine_with_a_thread_for_each_cpu_pins_them(model_path: Path) -> None:
    """llama.cpp's threads, unpinned, are woken after idleness on the waking thread's CPU;
    an engine with as many threads as it has CPUs pins each to one (the engine's own to the
    first), and one with fewer pins nothing."""
    a, b = sorted(os.sched_getaffinity(0))[:2]

    def cpus_of_threads(threads: int) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", PINNED, str(model_path), f"{a},{b}", str(threads)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.split()
        return out

    pinned = cpus_of_threads(2)
    assert sorted(c for c in pinned if c in (str(a), str(b))) == [str(a), str(b)], pinned
    assert all(c in (str(a), str(b), f"{a},{b}", f"{a}-{b}") for c in pinned), pinned
    assert all("," in c or "-" in c for c in cpus_of_threads(1))  # one thread: none pinned
