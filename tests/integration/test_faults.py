"""Fault injection under load: every request gets an answer (its text and Done, or an explicit
error) within a stated bound; no request that had not started is lost; streams running
elsewhere are untouched.

Each test starts a real cluster (registry, orchestrator, gateway, workers: separate processes
on loopback ports), puts requests in flight, then kills (-9), stops (SIGSTOP) or drains one
daemon.  The bound for an answer is the time the work takes plus the detection time (the
heartbeat timeout, 1 s here) plus what the fault itself costs (a restart)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq

from haifctl import wire
from tests.cluster import Cluster

HEARTBEAT_TIMEOUT = 1.0
LONG = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}


@dataclass
class Outcome:
    msgs: list[wire.Msg] = field(default_factory=list)
    answered_at: float = 0.0
    error: BaseException | None = None

    @property
    def final(self) -> wire.Msg | None:
        return self.msgs[-1] if self.msgs else None

    @property
    def text(self) -> str:
        return "".join(m.text for m in self.msgs if isinstance(m, wire.Chunk))

    @property
    def streamed(self) -> bool:
        return any(isinstance(m, wire.Chunk) for m in self.msgs)


class Load:
    """Requests in flight on threads of their own, each through its own client."""

    def __init__(self, cluster: Cluster, n: int, request: dict[str, object]) -> None:
        self.outcomes = [Outcome() for _ in range(n)]
        self.threads = [
            threading.Thread(target=self.run, args=(cluster, request, o), daemon=True)
            for o in self.outcomes
        ]
        for t in self.threads:
            t.start()

    @staticmethod
    def run(cluster: Cluster, request: dict[str, object], outcome: Outcome) -> None:
        try:
            with cluster.client() as client:
                for msg in client.stream(request, timeout=120):
                    outcome.msgs.append(msg)
        except BaseException as exc:  # recorded: the test asserts on it
            outcome.error = exc
        outcome.answered_at = time.monotonic()

    def wait(self, bound_s: float) -> list[Outcome]:
        """Every request answered within ``bound_s``, or the test fails."""
        end = time.monotonic() + bound_s
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        hung = sum(t.is_alive() for t in self.threads)
        assert hung == 0, f"{hung} requests unanswered after {bound_s}s"
        for o in self.outcomes:
            assert o.error is None, o.error
            assert isinstance(o.final, wire.Done | wire.Error), o.msgs[-3:]
        return self.outcomes


def busy_workers(cluster: Cluster) -> int:
    with cluster.client() as client:
        return sum(w.busy for w in client.stats().workers)


def worker_ids(cluster: Cluster) -> set[str]:
    with cluster.client() as client:
        return {w.worker_id for w in client.stats().workers}


def wait_until(probe: object, timeout: float = 30.0) -> None:
    """Probe a condition until it holds (the probe's interval is not a wait for readiness)."""
    assert callable(probe)
    end = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < end, "condition never held"
        time.sleep(0.02)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, workers=2, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    yield c
    c.stop()


def restart_orchestrator(cluster: Cluster) -> None:
    """A new orchestrator process on the same port (what the supervisor does)."""
    cluster.start(
        "orchestrator",
        [
            "daemon",
            "orchestrator",
            "--registry",
            cluster.registry,
            "--heartbeat-timeout",
            str(HEARTBEAT_TIMEOUT),
            "--bind",
            cluster.orchestrator,
        ],
    ).wait_ready()


def test_orchestrator_killed_mid_load(cluster: Cluster) -> None:
    """kill -9 the orchestrator with two streams running and four queued: the running ones end
    with an explicit orchestrator_lost error within the heartbeat timeout; the queued ones are
    sent again to its successor and served in full, each with the one text its seed gives:
    never the text of a run the dead orchestrator started as well."""
    seeded = {**LONG, "seed": 7}
    load = Load(cluster, 6, seeded)
    wait_until(lambda: busy_workers(cluster) == 2)
    killed_at = time.monotonic()
    cluster.procs["orchestrator"].kill(signal.SIGKILL)
    cluster.procs["orchestrator"].stop()
    restart_orchestrator(cluster)
    outcomes = load.wait(bound_s=90)
    lost = [o for o in outcomes if isinstance(o.final, wire.Error)]
    served = [o for o in outcomes if isinstance(o.final, wire.Done)]
    for o in lost:
        assert isinstance(o.final, wire.Error)
        assert o.final.code == "orchestrator_lost", o.final
        assert o.final.retry_after
        assert o.streamed  # only a stream that had started is failed
        # detected within the heartbeat timeout (plus the gateway's tick and a loaded machine)
        assert o.answered_at - killed_at < HEARTBEAT_TIMEOUT + 3.0
    assert len(lost) <= 2
    assert len(served) >= 4
    with cluster.client() as client:  # the seed's text, alone on a quiet cluster
        text = "".join(m.text for m in client.stream(seeded) if isinstance(m, wire.Chunk))
    for o in served:
        assert isinstance(o.final, wire.Done)
        assert o.final.completion_tokens == 400  # whole, from one run: never a spliced retry
        assert o.text == text


def test_orchestrator_stopped_and_resumed(cluster: Cluster) -> None:
    """SIGSTOP the orchestrator for three heartbeat timeouts, then SIGCONT: the same instance
    comes back.  Streams that had started end with an error; the rest are sent again, which the
    orchestrator recognises (same id, same gateway) instead of running them twice."""
    load = Load(cluster, 6, LONG)
    wait_until(lambda: busy_workers(cluster) == 2)
    orch = cluster.procs["orchestrator"]
    orch.kill(signal.SIGSTOP)
    try:
        time.sleep(3 * HEARTBEAT_TIMEOUT)  # the fault itself: how long it stays stopped
    finally:
        orch.kill(signal.SIGCONT)
    outcomes = load.wait(bound_s=90)
    served = [o for o in outcomes if isinstance(o.final, wire.Done)]
    for o in outcomes:
        if isinstance(o.final, wire.Error):
            assert o.final.code in ("orchestrator_lost", "worker_lost"), o.final
    assert len(served) >= 4
    for o in served:
        assert isinstance(o.final, wire.Done)
        assert o.final.completion_tokens == 400
    with cluster.client() as client:
        stats = client.stats()
    # nothing ran twice: the workers generated once per request at most
    assert sum(w.served + w.errors for w in stats.workers) <= 6 + 2
    assert stats.counters.get("duplicates_ignored", 0) + stats.counters.get("dispatched", 0) >= 6
    # the workers were there all along: what they sent while it was stopped is read, not judged
    assert stats.counters.get("workers_dropped", 0) == 0


@pytest.mark.parametrize(
    ("daemon", "verdict"), [("orchestrator", "worker dropped"), ("gateway", "orchestrator lost")]
)
def test_a_paused_daemon_does_not_blame_its_peers(
    cluster: Cluster, daemon: str, verdict: str
) -> None:
    """SIGSTOP the orchestrator (or the gateway) for three heartbeat timeouts, then SIGCONT:
    its peers went on sending (heartbeats, pongs) and it was the one not listening, so on waking
    it drops no worker (declares no orchestrator lost), and the next request is served."""
    proc = cluster.procs[daemon]
    proc.kill(signal.SIGSTOP)
    try:
        time.sleep(3 * HEARTBEAT_TIMEOUT)  # the fault itself: how long it stays stopped
    finally:
        proc.kill(signal.SIGCONT)
    with cluster.client() as client:  # answered after the woken loop's first turn and tick
        msgs = list(client.stream({"prompt": "Once", "max_tokens": 8, "seed": 1}))
        stats = client.stats()
    assert isinstance(msgs[-1], wire.Done), msgs[-1]
    assert verdict not in [e.get("msg") for e in proc.log_events()]
    assert stats.counters.get("workers_dropped", 0) == 0
    assert {w.worker_id for w in stats.workers} == {"worker-1", "worker-2"}


def test_registry_down_leaves_running_and_known_models_alone(cluster: Cluster) -> None:
    """kill -9 the registry under load: running streams finish, requests for the known model
    keep being served from the orchestrator's last good answer, an unknown model is answered
    503 at once, and no worker misses a heartbeat."""
    load = Load(cluster, 2, LONG)
    wait_until(lambda: busy_workers(cluster) == 2)
    cluster.procs["registry"].kill(signal.SIGKILL)
    cluster.procs["registry"].stop()
    with cluster.client() as client:
        # past the cache's freshness, so the orchestrator has to ask the registry again
        time.sleep(6.0)  # the fault's duration, not a readiness wait
        started = time.monotonic()
        msgs = list(client.stream({"prompt": "Once", "max_tokens": 8, "seed": 1}))
        assert isinstance(msgs[-1], wire.Done), msgs[-1]
        msgs = list(client.stream({"prompt": "Once", "model": "ghost-model", "max_tokens": 8}))
        error = msgs[-1]
        assert isinstance(error, wire.Error)
        assert error.code == "registry_unreachable"
        assert error.retry_after
        assert time.monotonic() - started < 5.0  # never the 2 s stall per request of before
        stats = client.stats()
    for o in load.wait(bound_s=60):
        assert isinstance(o.final, wire.Done), o.final
        assert o.final.completion_tokens == 400
    assert stats.counters.get("workers_dropped", 0) == 0
    assert stats.counters.get("registry_stale_answers", 0) >= 1


def test_worker_stopped_and_resumed_rejoins_under_its_own_name(cluster: Cluster) -> None:
    """SIGSTOP a worker past the heartbeat timeout under load, then SIGCONT: its started stream
    ends with worker_lost, its queued work runs elsewhere, and once back it registers under the
    same identity, reports what it still runs, and a burst afterwards is served with no 503."""
    load = Load(cluster, 6, {**LONG, "max_tokens": 200})
    wait_until(lambda: busy_workers(cluster) == 2)
    worker = cluster.procs["worker-1"]
    worker.kill(signal.SIGSTOP)
    try:
        wait_until(lambda: worker_ids(cluster) == {"worker-2"})
    finally:
        worker.kill(signal.SIGCONT)
    for o in load.wait(bound_s=90):
        if isinstance(o.final, wire.Error):
            assert o.final.code == "worker_lost"
            assert o.streamed
    cluster.wait_workers(2, ids={"worker-1", "worker-2"})
    burst = Load(cluster, 10, {"prompt": "Once", "max_tokens": 20})
    for o in burst.wait(bound_s=90):
        assert isinstance(o.final, wire.Done), o.final
    events = [e.get("msg") for e in cluster.procs["orchestrator"].log_events()]
    assert "worker registered again" in events or events.count("worker registered") >= 3


def test_draining_the_only_worker_answers_its_queue_at_once(tmp_path: Path) -> None:
    """SIGTERM the only worker with one request running and three queued: the running one
    finishes; the queued ones get 503 with Retry-After at once, not at their deadline."""
    c = Cluster(tmp_path, workers=1, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    try:
        load = Load(c, 4, {**LONG, "max_tokens": 800})
        wait_until(lambda: busy_workers(c) == 1)
        with c.client() as client:
            wait_until(lambda: sum(client.stats().queues.values()) == 3)
        drained_at = time.monotonic()
        c.procs["worker-1"].kill(signal.SIGTERM)
        outcomes = load.wait(bound_s=60)
        done = [o for o in outcomes if isinstance(o.final, wire.Done)]
        refused = [o for o in outcomes if isinstance(o.final, wire.Error)]
        assert len(done) == 1
        assert len(refused) == 3
        for o in refused:
            assert isinstance(o.final, wire.Error)
            assert o.final.code == "unavailable"
            assert o.final.retry_after
            assert o.answered_at - drained_at < 5.0
    finally:
        c.stop()


def test_a_request_the_last_worker_refuses_as_it_drains_is_answered_at_once(
    tmp_path: Path,
) -> None:
    """The orchestrator sent a request to its only worker just before that worker said it
    drains (a slot came free as SIGTERM arrived); the worker refuses it (worker_draining, to
    be tried elsewhere), and with no other worker the client hears at once, not at its
    deadline."""
    bare = Cluster(tmp_path, workers=0)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        worker = bare.hand_made_worker(ctx, "last")
        client = bare.dealer(ctx, bare.gateway)
        bare.dispatched(client, worker, "late")
        beat = wire.Heartbeat(
            worker_id="last", busy=1, served=0, errors=0, tokens=0, draining=True, ack=False
        )
        worker.send(wire.encode(beat))
        draining = wire.Error(kind="unavailable", code="worker_draining", message="shutting down")
        sent_at = time.monotonic()
        worker.send(wire.encode(draining, "late"))
        assert client.poll(5000), "the refused request was left waiting"
        answer = wire.decode(client.recv())
        assert answer.id == "late"
        assert isinstance(answer.msg, wire.Error)
        assert answer.msg.code == "unavailable"
        assert answer.msg.retry_after
        assert time.monotonic() - sent_at < 5.0
    finally:
        ctx.destroy(linger=0)
        bare.stop()
