"""The orchestrator's side of models on demand, message by message with a clock moved by hand:
per-model slots, a load lost with its worker, keep-alive deadlines, one load per model, and
the context a request needs."""

from __future__ import annotations

import pytest

from haifctl import wire
from tests.unit.test_orchestrator_table import GATEWAY, MODEL, Harness, Resolution
from tests.unit.test_orchestrator_table import h as h  # the fixture

MIB = 1 << 20
OTHER = wire.ModelInfo(ref="other:1", path="/o", context_length=2048, size_bytes=MIB)


def join(h: Harness, name: str, models: list[str], n_ctx: int = 512, **extra: object) -> bytes:
    """A worker that loads on demand: a memory budget, and each model with one slot."""
    register = wire.Register(
        worker_id=name,
        models=models,
        slots=len(models),
        device="cpu",
        n_ctx=n_ctx,
        pid=hash(name) % 1000,
        host="h",
        loaded=[wire.ModelState(ref=m, size_bytes=2 * MIB, slots=1, n_ctx=n_ctx) for m in models],
        memory_budget=100 * MIB,
        memory_used=2 * MIB * len(models),
        **extra,  # type: ignore[arg-type]
    )
    h.deliver(name.encode(), register)
    return name.encode()


def sent(h: Harness, kind: type[wire.Msg]) -> list[tuple[bytes, wire.Msg]]:
    return [(i, e.msg) for i, e in h.sent if isinstance(e.msg, kind)]


def ask(h: Harness, model: str, **request: object) -> str:
    h.seq += 1
    request_id = f"r{h.seq}"
    infer = wire.Infer(request={"prompt": "x", "model": model, **request})
    h.deliver(GATEWAY, infer, request_id)
    return request_id


@pytest.fixture
def od(h: Harness) -> Harness:
    h.d.resolved["other"] = Resolution(OTHER, float("inf"))
    return h


def test_each_model_has_its_own_slots(od: Harness) -> None:
    a = join(od, "a", [MODEL, "other:1"])
    first, second = ask(od, MODEL), ask(od, MODEL)
    assert od.where(first) == a
    assert od.where(second) is None  # the model's one slot is taken
    assert od.where(ask(od, "other")) == a  # the other model's is not


def test_a_load_lost_with_its_worker_is_placed_again(od: Harness) -> None:
    a = join(od, "a", [MODEL])
    request = ask(od, "other")
    assert sent(od, wire.Load) == [(a, wire.Load(ref="other:1", path="/o", context_length=2048))]
    b = join(od, "b", [MODEL])
    od.clock.now += 10  # a falls silent; b goes on heartbeating
    od.heartbeat(b)
    od.d.sweep()
    od.d.sweep()
    loads = sent(od, wire.Load)
    assert [i for i, _ in loads] == [a, b]
    join(od, "b", [MODEL, "other:1"])  # b announces it
    assert od.where(request) == b


def test_keep_alive_zero_unloads_after_the_request_and_minus_one_keeps(od: Harness) -> None:
    a = join(od, "a", [MODEL])
    request = ask(od, "other", keep_alive=0)
    join(od, "a", [MODEL, "other:1"])
    assert od.where(request) == a
    od.done(a, request)
    od.d.sweep()
    assert sent(od, wire.Unload) == [(a, wire.Unload(ref="other:1"))]
    assert od.d.workers[a].models == [MODEL]  # nothing more goes to it there
    kept = ask(od, MODEL, keep_alive=-1)
    od.done(a, kept)
    od.clock.now += 3600
    od.heartbeat(a)
    od.d.sweep()
    assert len(sent(od, wire.Unload)) == 1


def test_concurrent_requests_share_one_load_and_a_failed_one_is_remembered(od: Harness) -> None:
    a = join(od, "a", [MODEL])
    requests = [ask(od, "other") for _ in range(3)]
    assert len(sent(od, wire.Load)) == 1
    failed = wire.LoadFailed(ref="other:1", code="checksum_mismatch", message="other:1: bad")
    od.deliver(a, failed)
    for request in requests:
        answer = od.answer(request)
        assert isinstance(answer, wire.Error)
        assert answer.code == "checksum_mismatch"
    again = od.answer(ask(od, "other"))
    assert isinstance(again, wire.Error)
    assert again.code == "checksum_mismatch"
    assert len(sent(od, wire.Load)) == 1  # not loaded again in a loop


def test_a_context_too_small_goes_to_a_larger_one_or_is_refused(od: Harness) -> None:
    small = join(od, "small", [MODEL], n_ctx=128)
    large = join(od, "large", [MODEL], n_ctx=1024)
    request = ask(od, MODEL)
    assert od.where(request) == small  # both idle: the one that joined first
    infer = sent(od, wire.Infer)[-1][1]
    assert isinstance(infer, wire.Infer)
    assert not infer.truncate  # a larger context exists: the worker may send it back
    od.deliver(small, wire.ContextTooSmall(need=300, prompt_tokens=200, n_ctx=128), request)
    assert od.where(request) == large
    infer = sent(od, wire.Infer)[-1][1]
    assert isinstance(infer, wire.Infer)
    assert infer.truncate  # the largest there is: it runs there whatever max_tokens says
    refused = ask(od, MODEL)
    target = od.where(refused)
    assert target is not None
    od.deliver(target, wire.ContextTooSmall(need=5000, prompt_tokens=4000, n_ctx=128), refused)
    answer = od.answer(refused)
    assert isinstance(answer, wire.Error)
    assert answer.code == "context_too_small"
    assert "1024" in answer.message


def test_a_worker_that_drains_while_loading_has_its_load_placed_again(od: Harness) -> None:
    a = join(od, "a", [MODEL])
    request = ask(od, "other")
    b = join(od, "b", [MODEL])
    assert [i for i, _ in sent(od, wire.Load)] == [a]
    od.heartbeat(a, draining=True)  # it will not load anything now
    od.d.sweep()
    assert [i for i, _ in sent(od, wire.Load)] == [a, b]
    join(od, "b", [MODEL, "other:1"])
    assert od.where(request) == b
