"""The orchestrator's side of heartbeats (which it answers, how often it asks for them, what else
proves a worker alive) and its scheduling histogram, driven in-process through ``handle``."""

from __future__ import annotations

from types import SimpleNamespace

import msgspec
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from haifctl import wire
from haifctl.daemon.base import LOOP_TICK_MS
from haifctl.daemon.orchestrator import HEARTBEATS_PER_TIMEOUT, IDLE_TICK_S
from haifctl.security import WORKER
from tests.unit.test_orchestrator_table import Harness
from tests.unit.test_orchestrator_table import h as h  # the fixture


def acks(h: Harness, identity: bytes) -> list[wire.Ack]:
    return [e.msg for i, e in h.sent if i == identity and isinstance(e.msg, wire.Ack)]


def beat(h: Harness, identity: bytes, ack: bool) -> None:
    h.deliver(
        identity,
        wire.Heartbeat(worker_id=identity.decode(), busy=0, served=0, errors=0, tokens=0, ack=ack),
    )


def relaying(h: Harness, worker: bytes) -> tuple[str, wire.Infer, list[list[bytes]]]:
    """A request sent to ``worker`` (its id and what the worker got), and the list of frames
    the orchestrator relays to gateways from then on."""
    request_id = h.infer()
    infer = next(e.msg for i, e in h.sent if i == worker and e.id == request_id)
    assert isinstance(infer, wire.Infer)
    relayed: list[list[bytes]] = []
    router = SimpleNamespace(send_multipart=lambda frames, flags: relayed.append(frames))
    h.d.router = router  # type: ignore[assignment]
    return request_id, infer, relayed


def scheduled(h: Harness) -> float:
    """How many dispatches haif_schedule_seconds has counted."""
    text = generate_latest(h.d.metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "haif_schedule_seconds_count":
                return sample.value
    raise AssertionError("haif_schedule_seconds is not exported")


def test_the_answer_to_a_register_says_how_often_to_heartbeat(h: Harness) -> None:
    a = h.register("a")
    (ack,) = acks(h, a)
    assert ack.known
    assert ack.heartbeat_s == h.d.heartbeat_timeout_s / HEARTBEATS_PER_TIMEOUT


def test_a_heartbeat_is_answered_only_when_it_asks(h: Harness) -> None:
    a = h.register("a")
    h.sent.clear()
    beat(h, a, ack=False)
    beat(h, a, ack=False)
    assert acks(h, a) == []
    beat(h, a, ack=True)
    assert [ack.known for ack in acks(h, a)] == [True]


def test_a_heartbeat_without_the_ack_field_is_answered_as_before(h: Harness) -> None:
    """A worker from before the field never sends it: it gets its answer every time."""
    a = h.register("a")
    h.sent.clear()
    beat = wire.Heartbeat(worker_id="a", busy=0, served=0, errors=0, tokens=0)
    raw = msgspec.msgpack.decode(wire.encode(beat))
    del raw[-1]["ack"]  # what an older worker puts on the wire (the envelope is an array)
    body = msgspec.msgpack.encode(raw)
    h.d.handle(a, wire.decode(body), body, WORKER)
    assert [ack.known for ack in acks(h, a)] == [True]


def test_an_unknown_workers_heartbeat_gets_the_register_again_answer(h: Harness) -> None:
    beat(h, b"stranger", ack=False)  # it does not ask: it is answered all the same
    assert [ack.known for ack in acks(h, b"stranger")] == [False]
    assert b"stranger" not in h.d.workers


def test_a_silent_worker_is_dropped_within_the_timeout_and_a_beating_one_stays(
    h: Harness,
) -> None:
    a, b = h.register("a"), h.register("b")
    interval = h.d.heartbeat_timeout_s / HEARTBEATS_PER_TIMEOUT
    for _ in range(2 * HEARTBEATS_PER_TIMEOUT):  # two timeouts: b beats, a says nothing
        h.clock.now += interval
        beat(h, b, ack=False)
        h.d.sweep()
    assert set(h.d.workers) == {b}
    assert a not in h.d.workers
    assert h.d.counters["workers_dropped"] == 1


def test_a_streaming_worker_needs_no_heartbeat(h: Harness) -> None:
    """Its stream frames prove it alive: a worker busy streaming is not dropped for silence."""
    a = h.register("a")
    _, infer, relayed = relaying(h, a)
    for _ in range(4 * HEARTBEATS_PER_TIMEOUT):  # four timeouts without a heartbeat
        h.clock.now += h.d.heartbeat_timeout_s / HEARTBEATS_PER_TIMEOUT
        h.d.relay([a, *reversed(infer.route), b"text"], "worker")
        h.d.sweep()
    assert a in h.d.workers
    assert len(relayed) == 4 * HEARTBEATS_PER_TIMEOUT
    assert h.d.counters["workers_dropped"] == 0


def test_the_scheduling_histogram_counts_dispatches_on_arrival(h: Harness) -> None:
    a = h.register("a", slots=1)
    assert scheduled(h) == 0
    running = h.infer()
    assert h.where(running) == a
    assert scheduled(h) == 1
    queued = h.infer()  # no free slot: it waits (haif_queue_wait_seconds has that wait)
    assert h.where(queued) is None
    assert scheduled(h) == 1
    h.done(a, running)
    assert h.where(queued) == a
    assert scheduled(h) == 1  # dispatched from the queue: not a scheduling latency


def test_an_idle_loop_sweeps_less_often(h: Harness) -> None:
    a = h.register("a", slots=1)
    h.d.on_tick(h.clock.now)
    assert h.d.tick_s == IDLE_TICK_S
    request_id = h.infer()
    h.d.on_tick(h.clock.now)
    assert h.d.tick_s == LOOP_TICK_MS / 1000  # a request in flight: deadlines are swept often
    h.done(a, request_id)
    h.d.on_tick(h.clock.now)
    assert h.d.tick_s == IDLE_TICK_S


def test_silence_during_the_orchestrators_own_pause_is_not_counted(h: Harness) -> None:
    """Paused for three timeouts (SIGSTOP, a starved CPU), the loop has not heard its workers'
    heartbeats yet: no worker is dropped for that time.  Silence while it listens still counts,
    so a worker that is gone is dropped one timeout later, pauses or not."""
    a, b = h.register("a"), h.register("b")
    timeout = h.d.heartbeat_timeout_s
    h.clock.now += 3 * timeout
    h.d.paused(h.clock.now, 3 * timeout)
    h.d.sweep()
    assert set(h.d.workers) == {a, b}
    beat(h, b, ack=False)  # what b sent during the pause, read now; a is gone
    h.clock.now += 0.6 * timeout
    h.d.paused(h.clock.now, 0.5 * timeout)  # another, shorter pause
    h.d.sweep()
    assert set(h.d.workers) == {a, b}
    h.clock.now += 0.6 * timeout  # a: 1.2 timeouts since the first pause, 0.7 of them heard
    beat(h, b, ack=False)
    h.d.sweep()
    assert set(h.d.workers) == {a, b}
    h.clock.now += 0.4 * timeout  # a: 1.1 timeouts of silence while listening
    beat(h, b, ack=False)
    h.d.sweep()
    assert set(h.d.workers) == {b}
    assert h.d.counters["workers_dropped"] == 1
    assert h.d.counters["loop_pauses"] == 2


def test_a_link_named_after_another_orchestrator_instance_is_not_heard(h: Harness) -> None:
    """A worker names its engines' links after the orchestrator instance it registered with
    (the Register's answer says which).  What a link named after another instance carries
    was queued for a predecessor, which this orchestrator replaced while the link
    reconnected: its text is not relayed and its Done ends nothing.  A link named after
    this instance, or one from before the names carried it, is heard."""
    a = h.register("a", slots=2)
    (ack,) = acks(h, a)
    assert ack.instance == h.d.instance
    request_id, infer, relayed = relaying(h, a)
    stale = a + b"\x001\x00" + b"0123456789ab"
    ours = a + b"\x001\x00" + h.d.instance.encode()
    unnamed = a + b"\x001"
    h.d.relay([stale, *reversed(infer.route), b"text"], WORKER)
    h.done(stale, request_id)
    assert relayed == []
    assert h.answer(request_id) is None
    assert h.d.counters["stale_link_messages"] == 2
    h.d.relay([ours, *reversed(infer.route), b"text"], WORKER)
    h.d.relay([unnamed, *reversed(infer.route), b"text"], WORKER)
    assert len(relayed) == 2
    h.done(ours, request_id)
    assert isinstance(h.answer(request_id), wire.Done)
