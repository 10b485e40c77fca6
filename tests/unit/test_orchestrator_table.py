"""The orchestrator's worker table and its indexes, driven in-process through ``handle``: the
scheduling policy, failover, heartbeat and queue deadlines, and the gauges read at scrape time."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import zmq
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from haifctl import wire
from haifctl.daemon import orchestrator as orchestrator_module
from haifctl.daemon.orchestrator import OrchestratorDaemon, Resolution
from haifctl.security import GATEWAY as GATEWAY_ROLE
from haifctl.security import WORKER

MODEL = "m:1"
GATEWAY = b"gateway"


class Clock:
    """Monotonic and wall clocks the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now


class Harness:
    def __init__(self, daemon: OrchestratorDaemon, clock: Clock) -> None:
        self.d = daemon
        self.clock = clock
        self.sent: list[tuple[bytes, wire.Envelope]] = []
        self.seq = 0
        self.registry: zmq.Socket[bytes]

    def told_registry(self) -> list[tuple[bytes, wire.Envelope]]:
        """What the orchestrator sent the registry without waiting for an answer."""
        told = []
        while self.registry.poll(0):
            identity, body = self.registry.recv_multipart()
            told.append((identity, wire.decode(body)))
        return told

    def deliver(
        self,
        identity: bytes,
        msg: wire.Msg,
        request_id: str = "",
        deadline: float = 0.0,
        run: int = 0,
    ) -> None:
        """As the ROUTER hands it over, with the role the sender's key gives it."""
        body = wire.encode(msg, request_id, deadline, run=run)
        role = GATEWAY_ROLE if identity == GATEWAY else WORKER
        self.d.handle(identity, wire.decode(body), body, role)

    def register(self, name: str, slots: int = 1, identity: bytes | None = None) -> bytes:
        identity = identity or name.encode()
        register = wire.Register(
            worker_id=name, models=[MODEL], slots=slots, device="cpu", n_ctx=512, pid=1, host="h"
        )
        self.deliver(identity, register)
        return identity

    def heartbeat(self, identity: bytes, draining: bool = False) -> None:
        beat = wire.Heartbeat(
            worker_id=identity.decode(), busy=0, served=0, errors=0, tokens=0, draining=draining
        )
        self.deliver(identity, beat)

    def infer(self, deadline: float = 0.0) -> str:
        self.seq += 1
        request_id = f"r{self.seq}"
        self.deliver(GATEWAY, wire.Infer(request={"prompt": "x"}), request_id, deadline)
        return request_id

    def infer_model(self, model: str) -> str:
        self.seq += 1
        request_id = f"r{self.seq}"
        self.deliver(GATEWAY, wire.Infer(request={"prompt": "x", "model": model}), request_id)
        return request_id

    def done(self, identity: bytes, request_id: str, run: int = 0) -> None:
        done = wire.Done(
            finish_reason="stop",
            prompt_tokens=1,
            completion_tokens=1,
            model=MODEL,
            worker=identity.decode(),
            time_to_first_token_ms=None,
            generation_ms=0.0,
        )
        self.deliver(identity, done, request_id, run=run)

    def refuse(self, identity: bytes, request_id: str) -> None:
        self.deliver(identity, wire.Error(code="worker_busy", message="full"), request_id)

    def where(self, request_id: str) -> bytes | None:
        """The worker the request was last sent to."""
        for identity, envelope in reversed(self.sent):
            if envelope.id == request_id and isinstance(envelope.msg, wire.Infer):
                return identity
        return None

    def answer(self, request_id: str) -> wire.Msg | None:
        for identity, envelope in self.sent:
            if identity == GATEWAY and envelope.id == request_id:
                return envelope.msg
        return None

    def gauges(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = generate_latest(self.d.metrics.registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name in ("haif_workers", "haif_worker_slots", "haif_queue_depth")
        }


@pytest.fixture
def h(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    clock = Clock()
    fake_time = SimpleNamespace(monotonic=clock.monotonic, time=clock.time)
    monkeypatch.setattr(orchestrator_module, "time", fake_time)
    monkeypatch.setattr(wire, "time", fake_time)
    daemon = OrchestratorDaemon(
        "tcp://127.0.0.1:0", "tcp://127.0.0.1:1", MODEL, heartbeat_timeout_s=3.0, queue_size=8
    )
    harness = Harness(daemon, clock)
    daemon.started_mono = clock.now
    daemon.startup_grace_s = 0.0  # a daemon long up (one test sets it back)
    daemon.resolved[MODEL] = Resolution(
        wire.ModelInfo(ref=MODEL, path="/m", context_length=0), float("inf")
    )
    # the registry at the end of the orchestrator's link for calls it does not wait on
    harness.registry = daemon.ctx.socket(zmq.ROUTER)
    harness.registry.bind("inproc://registry")
    daemon.registry_link = daemon.ctx.socket(zmq.DEALER)
    daemon.registry_link.connect("inproc://registry")
    monkeypatch.setattr(
        daemon, "send", lambda identity, body: harness.sent.append((identity, wire.decode(body)))
    )
    try:
        yield harness
    finally:
        daemon.ctx.destroy(linger=0)


def test_idle_workers_take_turns_and_the_least_loaded_goes_first(h: Harness) -> None:
    a, b, c = h.register("a", slots=2), h.register("b", slots=2), h.register("c", slots=4)
    first = [h.where(h.infer()) for _ in range(3)]
    assert sorted(first) == [a, b, c]  # ties at load 0: each idle worker once
    # now a and b are half full and c a quarter: c is the least loaded
    assert h.where(h.infer()) == c


def test_a_retry_goes_to_a_worker_it_has_not_tried(h: Harness) -> None:
    a, b = h.register("a", slots=2), h.register("b", slots=2)
    request_id = h.infer()
    first = h.where(request_id)
    assert first is not None
    h.refuse(first, request_id)
    second = h.where(request_id)
    assert second == (b if first == a else a)
    # every worker tried: it may go back to the first rather than wait
    h.refuse(second, request_id)
    assert h.where(request_id) == first


def runs(h: Harness, request_id: str) -> list[int]:
    """The run number of each dispatch of ``request_id``, in order."""
    return [e.run for _, e in h.sent if e.id == request_id and isinstance(e.msg, wire.Infer)]


def test_the_late_end_of_an_earlier_run_does_not_end_the_new_one(h: Harness) -> None:
    """A request sent to the same worker again (refused, or sent again after an orchestrator
    restart) is a new run: the end of an earlier run, overtaken on its way by the new
    dispatch, neither ends the request nor frees the slot; the new run's own end does."""
    a = h.register("a", slots=1)
    request_id = h.infer()
    h.deliver(
        a, wire.Error(code="worker_busy", message="full"), request_id, run=runs(h, request_id)[0]
    )
    first, second = runs(h, request_id)
    assert h.where(request_id) == a  # the only worker: tried again
    assert first
    assert second not in (0, first)
    waiting = h.infer()
    h.done(a, request_id, run=first)  # the earlier run's end, late
    assert h.answer(request_id) is None
    assert h.where(waiting) is None  # the slot is still the new run's
    assert h.d.counters["stale_run_ends"] == 1
    h.done(a, request_id, run=second)
    assert isinstance(h.answer(request_id), wire.Done)
    assert h.where(waiting) == a


def test_a_restarted_orchestrator_numbers_its_runs_afresh(h: Harness) -> None:
    """Run numbers start at random: a new orchestrator's first runs are not its
    predecessor's, so a run that predecessor started cannot pass for one of its own."""
    other = OrchestratorDaemon("tcp://127.0.0.1:0", "tcp://127.0.0.1:1", MODEL)
    try:
        assert abs(next(h.d.runs) - next(other.runs)) > 1_000_000
    finally:
        other.ctx.destroy(linger=0)


def test_draining_workers_get_nothing(h: Harness) -> None:
    a, b = h.register("a", slots=4), h.register("b", slots=4)
    h.heartbeat(a, draining=True)
    assert {h.where(h.infer()) for _ in range(4)} == {b}
    h.heartbeat(b, draining=True)
    answer = h.answer(h.infer())
    assert isinstance(answer, wire.Error)
    assert answer.code == "unavailable"


def test_a_full_cluster_queues_and_a_finished_request_makes_room(h: Harness) -> None:
    a = h.register("a", slots=1)
    running, queued = h.infer(), h.infer()
    assert h.where(queued) is None
    assert h.gauges()[("haif_queue_depth", (("model", MODEL),))] == 1
    h.done(a, running)
    assert isinstance(h.answer(running), wire.Done)
    assert h.where(queued) == a


def test_heartbeats_keep_a_worker_and_silence_drops_it(h: Harness) -> None:
    a, b = h.register("a"), h.register("b")
    request_id = h.infer()
    quiet = h.where(request_id)
    talker = b if quiet == a else a
    for _ in range(5):  # 5 s: the talker keeps beating, the other one is silent
        h.clock.now += 1.0
        h.heartbeat(talker)
        h.d.sweep()
    assert set(h.d.workers) == {talker}
    # its unstarted request failed over to the live worker
    assert h.where(request_id) == talker
    assert h.d.counters["failovers"] == 1


def test_a_worker_that_comes_back_under_a_new_connection_replaces_the_old(h: Harness) -> None:
    h.register("a")
    new = h.register("a", identity=b"a/2")
    assert set(h.d.workers) == {new}
    assert h.d.by_worker_id["a"].identity == new
    assert h.d.counters["workers_dropped"] == 1
    h.clock.now += 2.0
    h.heartbeat(new)
    h.clock.now += 2.0
    h.d.sweep()  # the old connection's deadline has passed: it must not touch the new one
    assert set(h.d.workers) == {new}
    assert h.d.counters["workers_dropped"] == 1


def test_a_queued_request_expires_at_its_deadline(h: Harness) -> None:
    h.register("a", slots=1)
    h.infer()
    wall = h.clock.time()
    late, later = h.infer(deadline=wall + 1.0), h.infer(deadline=wall + 5.0)
    h.clock.now += 2.0
    h.heartbeat(b"a")
    h.d.sweep()
    expired = h.answer(late)
    assert isinstance(expired, wire.Error)
    assert expired.code == "deadline_exceeded"
    assert h.answer(later) is None
    assert h.gauges()[("haif_queue_depth", (("model", MODEL),))] == 1


def test_gauges_are_read_from_the_table_when_scraped(h: Harness) -> None:
    h.register("a", slots=1)
    b, c = h.register("b", slots=2), h.register("c", slots=1)
    h.heartbeat(c, draining=True)
    for _ in range(2):
        h.infer()
    g = h.gauges()
    assert g[("haif_workers", (("state", "busy"),))] == 1  # a: its one slot taken
    assert g[("haif_workers", (("state", "ready"),))] == 1  # b: one of two taken
    assert g[("haif_workers", (("state", "draining"),))] == 1
    assert g[("haif_worker_slots", (("kind", "busy"), ("worker", "b")))] == 1
    assert g[("haif_worker_slots", (("kind", "total"), ("worker", "b")))] == 2
    h.clock.now += 10.0
    h.heartbeat(b)
    h.d.sweep()  # a and c went silent; a's request failed over to b, which is now full
    g = h.gauges()
    assert ("haif_worker_slots", (("kind", "total"), ("worker", "a"))) not in g
    assert g[("haif_worker_slots", (("kind", "busy"), ("worker", "b")))] == 2
    assert g[("haif_workers", (("state", "busy"),))] == 1
    assert g[("haif_workers", (("state", "ready"),))] == 0
    assert g[("haif_workers", (("state", "draining"),))] == 0


def test_the_indexes_stay_small_and_agree_with_the_table(h: Harness) -> None:
    workers = [h.register(f"w{i}", slots=2) for i in range(20)]
    for _ in range(2000):
        request_id = h.infer()
        worker = h.where(request_id)
        assert worker is not None
        h.done(worker, request_id)
    heap = h.d.vacancies[MODEL]
    assert len(heap) <= 4 * len(workers) + 64
    live = {entry[3].identity for entry in heap if entry[3].version == entry[2]}
    assert live == set(workers)
    assert h.d.busy[MODEL] == 0
    assert h.d.free_workers[MODEL] == len(workers)
    assert h.d.open_workers[MODEL] == len(workers)
    assert len(h.d.liveness) == len(workers)


def test_the_registry_hears_of_a_models_first_and_last_worker_only(h: Harness) -> None:
    a = h.register("a")
    b = h.register("b")
    h.clock.now += 2.0
    h.heartbeat(b)
    h.clock.now += 2.0
    h.d.sweep()  # a went silent
    assert set(h.d.workers) == {b}
    h.clock.now += 4.0
    h.d.sweep()  # and now b
    calls = [envelope.msg for _, envelope in h.told_registry()]
    assert calls == [
        wire.RegistryCall(op="set_status", args={"ref": MODEL, "status": "deployed"}),
        wire.RegistryCall(op="set_status", args={"ref": MODEL, "status": "registered"}),
    ]
    assert a not in h.d.workers


def test_a_stale_resolution_is_used_while_a_fresh_one_is_asked_for(h: Harness) -> None:
    a = h.register("a", slots=4)
    h.told_registry()
    h.d.resolved[MODEL] = Resolution(
        wire.ModelInfo(ref=MODEL, path="/old", context_length=0), h.clock.now - 1
    )
    for _ in range(2):
        h.infer()
    sent = [e.msg for i, e in h.sent if i == a and isinstance(e.msg, wire.Infer)]
    assert [m.model_path for m in sent] == ["/old", "/old"]  # nobody waited for the registry
    (registry_peer, asked), *more = h.told_registry()
    assert asked.msg == wire.RegistryCall(op="resolve", args={"ref": MODEL})
    assert more == []  # one question at a time
    record = {"name": "m", "version": "1", "path": "/new", "context_length": 0, "params": {}}
    h.registry.send_multipart(
        [registry_peer, wire.encode(wire.RegistryReply(result=record), asked.id)]
    )
    assert h.d.registry_link.poll(5000)
    h.d.registry_answers()
    h.infer()
    sent = [e.msg for i, e in h.sent if i == a and isinstance(e.msg, wire.Infer)]
    assert sent[-1].model_path == "/new"
    assert not h.d.lookups
    assert not h.d.resolving


# the registry: never waited for -----------------------------------------------------------
def answer_registry(h: Harness, peer: bytes, asked: wire.Envelope, msg: wire.Msg) -> None:
    h.registry.send_multipart([peer, wire.encode(msg, asked.id)])
    assert h.d.registry_link.poll(5000)
    h.d.registry_answers()


RECORD = {"name": "other", "version": "1", "path": "/o", "context_length": 0, "params": {}}


def test_requests_for_an_unknown_model_wait_on_one_registry_call(h: Harness) -> None:
    a = h.register("a", slots=4)
    h.told_registry()
    ids = [h.infer_model("other") for _ in range(3)]
    assert h.d.in_flight() == 3  # parked, not refused, and the loop went on
    (peer, asked), *more = h.told_registry()
    assert asked.msg == wire.RegistryCall(op="resolve", args={"ref": "other"})
    assert more == []  # one call for the three
    answer_registry(h, peer, asked, wire.RegistryReply(result=RECORD))
    for request_id in ids:  # each answered once the model is known: no worker serves it
        error = h.answer(request_id)
        assert isinstance(error, wire.Error)
        assert error.message == "no worker serves other:1"
    assert a not in {h.where(i) for i in ids}
    assert h.d.in_flight() == 0


def test_a_registry_that_does_not_answer_fails_the_parked_requests_after_its_timeout(
    h: Harness,
) -> None:
    h.register("a")
    h.told_registry()
    request_id = h.infer_model("other")
    assert h.answer(request_id) is None
    h.clock.now += orchestrator_module.REGISTRY_TIMEOUT_S + 0.1
    h.d.on_tick(h.clock.now)
    error = h.answer(request_id)
    assert isinstance(error, wire.Error)
    assert error.code == "registry_unreachable"
    assert error.retry_after
    # remembered briefly: the next request is answered at once, without asking again
    h.told_registry()
    again = h.infer_model("other")
    assert isinstance(h.answer(again), wire.Error)
    assert h.told_registry() == []


def test_a_known_model_is_served_from_its_last_good_answer_while_the_registry_is_away(
    h: Harness,
) -> None:
    a = h.register("a", slots=8)
    h.told_registry()
    h.clock.now += 3600  # the cached answer is long stale
    h.heartbeat(a)
    h.d.resolved[MODEL].fresh_until = h.clock.now - 1
    first = h.infer()
    assert h.where(first) == a  # served at once from the stale answer
    (_, asked), *_ = h.told_registry()
    assert asked.msg == wire.RegistryCall(op="resolve", args={"ref": MODEL})
    h.clock.now += orchestrator_module.REGISTRY_TIMEOUT_S + 0.1
    h.heartbeat(a)
    h.d.on_tick(h.clock.now)  # the refresh times out: the registry is away
    assert h.d.counters["registry_stale_answers"] == 1
    assert not h.d.registry_ok
    for _ in range(3):
        assert h.where(h.infer()) == a
    assert h.d.workers[a].running  # and running streams were never touched


def test_an_unknown_model_answer_is_cached_briefly_and_names_are_capped(h: Harness) -> None:
    h.register("a")
    h.told_registry()
    first = h.infer_model("ghost")
    (peer, asked), *_ = h.told_registry()
    answer_registry(
        h, peer, asked, wire.Error(kind="not_found", code="model_not_found", message="no")
    )
    error = h.answer(first)
    assert isinstance(error, wire.Error)
    assert error.code == "model_not_found"
    h.infer_model("ghost")
    assert h.told_registry() == []  # remembered
    h.clock.now += orchestrator_module.FAILED_LOOKUP_S + 0.1
    h.infer_model("ghost")
    assert len(h.told_registry()) == 1  # briefly
    long_name = h.infer_model("x" * (wire.MAX_MODEL_REF_CHARS + 1))
    error = h.answer(long_name)
    assert isinstance(error, wire.Error)
    assert error.code == "invalid_model_ref"
    assert h.told_registry() == []  # refused before any lookup


def test_the_model_cache_is_bounded(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orchestrator_module, "MAX_RESOLVED", 50)
    h.register("a")
    h.told_registry()
    for i in range(300):
        request_id = h.infer_model(f"unique-{i}")
        (peer, asked), *_ = h.told_registry()
        answer_registry(h, peer, asked, wire.Error(kind="not_found", code="nf", message="no"))
        assert isinstance(h.answer(request_id), wire.Error)
    assert len(h.d.resolved) <= 50
    assert not h.d.lookups
    assert not h.d.parked


# workers coming back ------------------------------------------------------------------------
def test_a_worker_registering_again_keeps_its_requests_and_stops_the_ones_given_up(
    h: Harness,
) -> None:
    a = h.register("a", slots=2)
    ours = h.infer()
    assert h.where(ours) == a
    # it reports ours, and one the orchestrator no longer has (failed while it was silent)
    register = wire.Register(
        worker_id="a",
        models=[MODEL],
        slots=2,
        device="cpu",
        n_ctx=512,
        pid=1,
        host="h",
        running=[ours, "given-up"],
    )
    h.deliver(a, register)
    ack = [e.msg for i, e in h.sent if i == a and isinstance(e.msg, wire.Ack)][-1]
    assert isinstance(ack, wire.Ack)
    assert ack.cancel == ["given-up"]
    rec = h.d.workers[a]
    assert rec.running == {ours, "given-up"}  # both hold a slot until they end
    assert rec.free == 0
    waiting = h.infer()
    assert h.where(waiting) is None  # so nothing is sent to it, and refused as busy
    # the orphan's end frees its slot, for the request that waited
    h.deliver(a, wire.Error(code="cancelled", message="stopped"), "given-up")
    assert h.d.workers[a].running == {ours, waiting}
    h.done(a, ours)
    assert isinstance(h.answer(ours), wire.Done)


def test_a_new_process_under_a_known_identity_replaces_the_old_record(h: Harness) -> None:
    a = h.register("a", slots=1)
    running = h.infer()
    assert h.where(running) == a
    restarted = wire.Register(
        worker_id="a", models=[MODEL], slots=1, device="cpu", n_ctx=512, pid=2, host="h"
    )
    h.deliver(a, restarted)
    # the old process's request was not started: it goes to the new one
    assert h.d.workers[a].pid == 2
    assert h.where(running) == a
    assert sum(1 for i, e in h.sent if e.id == running and isinstance(e.msg, wire.Infer)) == 2


def test_draining_the_last_worker_answers_its_queue_at_once(h: Harness) -> None:
    a = h.register("a", slots=1)
    running, queued = h.infer(), h.infer()
    assert h.where(queued) is None
    h.heartbeat(a, draining=True)
    error = h.answer(queued)
    assert isinstance(error, wire.Error)
    assert error.code == "unavailable"
    assert error.retry_after
    assert h.answer(running) is None  # the running one goes on
    h.done(a, running)
    assert isinstance(h.answer(running), wire.Done)


def test_a_just_started_orchestrator_queues_until_workers_are_back(h: Harness) -> None:
    h.d.startup_grace_s = 10.0
    queued = h.infer()
    assert h.answer(queued) is None
    a = h.register("a")
    assert h.where(queued) == a


def test_embed_requests_go_only_to_workers_with_embeddings(h: Harness) -> None:
    plain = h.register("plain", slots=2)

    def embed() -> str:
        h.seq += 1
        request_id = f"e{h.seq}"
        h.deliver(GATEWAY, wire.Infer(request={"op": "embed", "input": ["x"]}), request_id)
        return request_id

    refused = h.answer(embed())
    assert isinstance(refused, wire.Error)
    assert (refused.kind, refused.code) == ("invalid", "embeddings_unsupported")
    assert MODEL in refused.message
    register = wire.Register(
        worker_id="emb",
        models=[MODEL],
        slots=1,
        device="cpu",
        n_ctx=512,
        pid=2,
        host="h",
        embeddings=True,
    )
    h.deliver(b"emb", register)
    pool = orchestrator_module.embed_pool(MODEL)
    running, queued = embed(), embed()
    assert h.where(running) == b"emb"
    assert h.where(queued) is None  # its one slot is taken: the embed waits, plain or not
    assert h.d.queues[pool] == deque([queued])
    # a generation may still go to either; the embedding worker's slot counts in both pools
    assert h.where(h.infer()) == plain
    assert (h.d.busy[MODEL], h.d.busy[pool]) == (2, 1)
    h.deliver(
        b"emb",
        wire.Embeddings(vectors=[b"\0\0\0\0"], prompt_tokens=1, model=MODEL, worker="emb"),
        running,
    )
    assert isinstance(h.answer(running), wire.Embeddings)
    assert h.where(queued) == b"emb"
    # the last embedding worker goes: its pool is gone from every index, the model's stays
    h.clock.now += 2.0
    h.heartbeat(plain)
    h.clock.now += 2.0
    h.d.sweep()
    assert set(h.d.workers) == {plain}
    assert pool not in h.d.serving
    assert pool not in h.d.vacancies
    assert (h.d.open_workers[pool], h.d.free_workers[pool], h.d.busy[pool]) == (0, 0, 0)
    assert h.d.open_workers[MODEL] == 1
