"""The orchestrator: the live worker table, bounded per-model queues, scheduling and failover.

Workers register and heartbeat; a worker silent for ``heartbeat_timeout_s`` is dropped and its
unstarted requests go back to the front of their queue.  A request whose tokens had started to
stream ends with a ``worker_lost`` error instead of a silent retry.  Workers heartbeat
``HEARTBEATS_PER_TIMEOUT`` times per timeout (the answer to their Register says how often), and
any message of theirs, a streamed frame too, proves them alive.  A heartbeat is answered only
when the worker is unknown (it registers again) or asks, which it does when it has heard nothing
from here for a while: at the default 3 s timeout a thousand idle workers send about 670
heartbeats a second and get about 170 answers, where they sent 2,000 and got 2,000 at 0.5 s.

Nothing the loop does per message or per tick grows with the cluster: each pool (a model, and
apart, the model's workers that loaded it with embeddings: :func:`embed_pool`) has a queue and a
heap of its workers with a free slot (dispatch pops the least loaded), heartbeat and queue
deadlines sit in heaps (a sweep looks only at what is due), and the table's gauges are computed
when Prometheus scrapes them.

The loop never waits for another daemon.  Registry calls go out on a DEALER read by the same
poller and their answers are matched by id; requests naming a model being looked up are parked
on that one call.  A known model is served from the last good answer while the registry is away
(stale-while-error); a failed lookup is remembered briefly; status updates are fire-and-forget.

Models come and go on demand.  A request for a registered model that no worker has loaded makes
the orchestrator choose a worker where it fits (:func:`haifctl.placement.place`: memory free,
labels, spread or binpack; evicting the least recently used idle model when nothing fits) and
send it a :class:`wire.Load`; the request waits in the model's queue, one load per model at a
time, and a failed load fails its queue and is remembered for ``LOAD_FAILURE_S``.  An idle
model is unloaded when its keep-alive runs out (a heap of deadlines, swept like the others).
Each worker's slots are counted per model: a model's requests never wait for another's.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter  # not time.perf_counter: tests fake the module's clocks
from typing import Any, TypeVar

import msgspec
import zmq
from opentelemetry import trace
from opentelemetry.trace import StatusCode
from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from haifctl import wire
from haifctl.daemon.base import LOOP_TICK_MS, NOBLOCK, RCVMORE, Daemon, incoming, log
from haifctl.errors import HaifError, Kind
from haifctl.placement import (
    POLICIES,
    Candidate,
    Resident,
    estimate_bytes,
    matches,
    parse_keep_alive,
    place,
)
from haifctl.security import ADMIN, GATEWAY, ORCHESTRATOR, WORKER, role_of_frame
from haifctl.tracing import Span, child_traceparent, parent_context

RETRYABLE = {"worker_busy", "worker_draining", "duplicate_request", "model_not_loaded"}
LOAD_TIMEOUT_S = 600.0  # a load not done by then has failed
LOAD_FAILURE_S = 60.0  # a model that failed to load is not tried again for this long
RESOLVE_CACHE_S = 5.0  # a registry answer is fresh this long (then used while asking again)
FAILED_LOOKUP_S = (
    1.0  # an unknown model, or a registry that did not answer, is remembered this long
)
STALE_RETRY_S = 1.0  # while the registry is away, ask again about a known model this often
REGISTRY_TIMEOUT_S = 2.0
# The registry link is pinged this often; with no answer of any kind for REGISTRY_LINK_S the
# orchestrator is not ready (/readyz), though it goes on serving known models from its cache.
REGISTRY_PING_S = 2.0
REGISTRY_LINK_S = 3 * REGISTRY_PING_S
REGISTRY_PING_ID = "registry-ping"
MAX_RESOLVED = 1024  # model references remembered (least recently used forgotten first)
MAX_LOOKUPS = 1024  # registry calls in flight
MAX_PARKED = 4096  # requests waiting for a registry answer
# A model whose every worker went away keeps its queue this long for one to come back (a
# supervisor restarts a crashed worker in seconds); then the queue is answered 503.
ORPHAN_QUEUE_S = 15.0
# The answer to a heartbeat, which workers send with no id, deadline or trace: encoded once.
ACK_KNOWN = wire.encode(wire.Ack(known=True))
# Heartbeats a worker sends per heartbeat timeout: an idle worker is dropped once one of them is
# more than half the timeout late (after a stall of its own, the loop reads what waits before it
# judges anyone: see Daemon.serve); a busy one's streamed frames prove it alive as well.
HEARTBEATS_PER_TIMEOUT = 2
IDLE_TICK_S = 0.25  # how often the loop sweeps deadlines while it has no request
# From an Infer read by the loop to its dispatch handed to ZeroMQ: fine buckets around the
# 200 us the control plane aims at.
SCHEDULE_BUCKETS = (
    25e-6, 50e-6, 75e-6, 100e-6, 150e-6, 200e-6, 300e-6, 500e-6,
    1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 1.0,
)  # fmt: skip


def embed_pool(ref: str) -> str:
    """The pool of a model's workers that serve embeddings: a key of its own in every per-model
    index (a model reference holds no space, so no model's own key is one of these)."""
    return f"{ref} embeddings"


def pool_model(pool: str) -> str:
    """The model a pool belongs to."""
    return pool.removesuffix(embed_pool(""))


def selector_of(value: object) -> dict[str, str]:
    """Labels a request (or a model's registered params) selects workers by; anything but a
    mapping selects nothing."""
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def no_embeddings(ref: str) -> wire.Error:
    return wire.Error(
        kind=Kind.invalid,
        code="embeddings_unsupported",
        message=f"{ref} is served without embeddings: none of its workers was started with "
        "--embeddings",
        hint=f"start one: haifctl worker --orchestrator ADDRESS --model {ref} --embeddings",
    )


@dataclass
class WorkerRec:
    identity: bytes
    worker_id: str
    models: list[str]
    slots: int
    device: str
    n_ctx: int
    pid: int
    host: str
    last_seen: float
    gpu_name: str = ""
    gpu_memory_mb: int = 0
    running: set[str] = field(default_factory=set)
    served: int = 0
    errors: int = 0
    tokens: int = 0
    assigned: int = 0  # requests this orchestrator sent it: spreads ties across idle workers
    draining: bool = False
    version: int = 0  # which of its entries in the vacancy heaps is current
    # Requests it is stopping that are not its to run (see Ack.cancel): their text is dropped.
    orphans: set[str] = field(default_factory=set)
    listed: set[str] = field(default_factory=set)  # pools counting it as having a free slot
    embeddings: bool = False
    # The index keys it is listed under: its models, and their embedding pools when it has them.
    pools: list[str] = field(default_factory=list)
    # models on demand (what the worker announced; older workers announce none of it)
    loaded: dict[str, wire.ModelState] = field(default_factory=dict)
    memory_budget: int = 0  # bytes (0: unknown, taken as unlimited)
    memory_used: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    keep_alive_s: float | None = 300.0  # its own default for a model loaded on demand
    model_of: dict[str, str] = field(default_factory=dict)  # running request -> its model
    model_busy: Counter[str] = field(default_factory=Counter)
    last_used: dict[str, float] = field(default_factory=dict)  # model -> monotonic
    served_by: Counter[str] = field(default_factory=Counter)
    keep: dict[str, float | None] = field(default_factory=dict)  # keep-alive asked per model
    incoming: dict[str, int] = field(default_factory=dict)  # loads sent to it: model -> bytes
    on_demand: set[str] = field(default_factory=set)  # models loaded by this orchestrator

    def __post_init__(self) -> None:
        self.set_pools()

    def set_pools(self) -> None:
        self.pools = [*self.models, *(embed_pool(r) for r in self.models if self.embeddings)]

    @property
    def free(self) -> int:
        return 0 if self.draining else self.slots - len(self.running)

    def free_in(self, pool: str) -> int:
        """Free slots for ``pool``'s model (each loaded model has slots of its own)."""
        if self.draining:
            return 0
        state = self.loaded.get(pool_model(pool))
        if state is None:
            return self.slots - len(self.running)
        return state.slots - self.model_busy[state.ref]

    def load_in(self, pool: str) -> float:
        state = self.loaded.get(pool_model(pool))
        if state is None:
            return len(self.running) / self.slots
        return self.model_busy[state.ref] / max(1, state.slots)

    def ctx_of(self, model: str) -> int:
        state = self.loaded.get(model)
        return state.n_ctx if state is not None and state.n_ctx else self.n_ctx

    def keep_for(self, model: str) -> float | None:
        """How long ``model`` stays once idle: what the last request or the registry asked,
        else the worker's own setting for a model loaded on demand; one it started with stays.
        A worker that cannot load on demand (no memory budget) keeps its models whatever a
        request asks: it could not load them again."""
        if not self.memory_budget:
            return None
        if model in self.keep:
            return self.keep[model]
        return self.keep_alive_s if model in self.on_demand else None


class Finished(msgspec.Struct, frozen=True, gc=False):
    """A request that ended, for the stats window.  Atomic values only, never tracked by the
    garbage collector: as a dataclass, the 200,000 the window keeps made a full collection take
    29 ms on average (one every 60,000 requests, a stall behind whatever request was in hand;
    bench/orchestrator_dispatch.py)."""

    at: float
    latency: float
    ttft: float | None
    tokens: int
    worker: str
    ok: bool


WINDOW_S = 60.0

Answer = wire.ModelInfo | wire.Error
Waiter = Callable[[Any], None]  # called with a registry call's outcome


@dataclass
class Resolution:
    answer: Answer
    fresh_until: float


@dataclass
class Lookup:
    """One registry call in flight and whoever waits for its answer."""

    op: str  # "resolve" or "list"
    ref: str
    sent: float
    waiters: list[Waiter] = field(default_factory=list)


@dataclass
class Pending:
    envelope: wire.Envelope
    infer: wire.Infer
    gateway: bytes
    model_ref: str
    enqueued_at: float
    pool: str = ""  # the queue and the workers it waits for (embed_pool); "": the model's
    worker: bytes | None = None
    streamed: bool = False
    first_at: float = 0.0
    traceparent: str = ""  # what the worker gets: a child of this request's span
    span: Span | None = None
    queue_span: Span | None = None
    attempts: int = 0
    run: int = 0  # the latest dispatch's number, which the worker's answers carry
    tried: set[bytes] = field(default_factory=set)
    need_ctx: int = 0  # a worker must hold this much context (0: any)
    selector: dict[str, str] = field(default_factory=dict)  # labels its worker must carry
    keep_asked: bool = False  # the request named a keep_alive (None: keep loaded)
    keep_alive: float | None = None

    def __post_init__(self) -> None:
        self.pool = self.pool or self.model_ref


@dataclass
class LoadTask:
    """A model being loaded on a worker, and whoever waits for the outcome besides its queue."""

    ref: str
    worker: bytes
    worker_id: str
    sent: float
    need: int
    reason: str
    waiters: list[Callable[[wire.Msg], None]] = field(default_factory=list)


# What each role may send the orchestrator (anyone may ping, ask for stats or list models).
WORKER_MESSAGES = (
    *wire.FINAL,
    wire.ContextTooSmall,
    wire.Heartbeat,
    wire.LoadFailed,
    wire.Register,
    wire.ResolveModel,
)
GATEWAY_MESSAGES = (wire.Infer, wire.Cancel)
ADMIN_MESSAGES = (wire.ManageModel,)


class OrchestratorDaemon(Daemon):
    name = "orchestrator"
    listens = True

    def __init__(
        self,
        bind_address: str,
        registry_address: str,
        default_model: str,
        *,
        heartbeat_timeout_s: float = 3.0,
        queue_size: int = 64,
        max_attempts: int = 3,
        drain_grace_s: float = 30.0,
        ready_file: Path | None = None,
        placement: str = "spread",
    ) -> None:
        super().__init__(ready_file)
        if placement not in POLICIES:
            raise ValueError(f"placement {placement!r}: one of {', '.join(POLICIES)}")
        self.placement = placement
        self.bind_address = bind_address
        self.registry_address = registry_address
        self.default_model = default_model
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.heartbeat_s = heartbeat_timeout_s / HEARTBEATS_PER_TIMEOUT  # told to each worker
        self.queue_size = queue_size
        self.max_attempts = max_attempts
        self.drain_grace_s = drain_grace_s
        # workers find a restarted orchestrator at their next heartbeat: until then a model
        # with no worker yet is not refused
        self.startup_grace_s = max(5.0, 3 * heartbeat_timeout_s)
        self.started_mono = time.monotonic()
        self.workers: dict[bytes, WorkerRec] = {}
        self.pending: dict[str, Pending] = {}
        self.queues: dict[str, deque[str]] = {}
        self.instance = uuid.uuid4().hex[:12]
        self.instance_name = self.instance.encode()
        self.resolved: OrderedDict[str, Resolution] = OrderedDict()
        self.lookups: dict[str, Lookup] = {}  # registry call id -> call, oldest first
        self.resolving: dict[str, str] = {}  # model ref -> id of its resolve call in flight
        self.parked: set[str] = set()  # requests waiting for a model lookup
        self.registry_ok = True
        self.registry_seen: float | None = None  # the registry's last answer (monotonic)
        self.next_registry_ping = 0.0
        self.orphaned: dict[str, float] = {}  # model with a queue and no worker -> since when
        self.finished: deque[Finished] = deque(maxlen=200_000)
        # indexes over the worker table, kept by index/unindex/reindex
        self.serving: dict[str, dict[bytes, WorkerRec]] = {}  # model -> its workers
        self.by_worker_id: dict[str, WorkerRec] = {}
        self.open_workers: Counter[str] = Counter()  # model -> workers not draining
        self.free_workers: Counter[str] = Counter()  # model -> workers with a free slot
        self.busy: Counter[str] = Counter()  # model -> requests running on its workers
        # model -> heap of (load, assigned, version, worker); entries of an older version are
        # stale and skipped when they surface
        self.vacancies: dict[str, list[tuple[float, int, int, WorkerRec]]] = {}
        self.liveness: list[tuple[float, int, WorkerRec]] = []  # (heartbeat deadline, seq, worker)
        self.expiries: list[tuple[float, int, str]] = []  # (wall-clock deadline, seq, queued id)
        self.seq = itertools.count(1)
        # Dispatch numbers, from a random start: a restarted orchestrator's never match the
        # ones its predecessor gave the runs that its workers may still finish.
        self.runs = itertools.count(int.from_bytes(os.urandom(6), "big") | 1)
        self.queue_wait: dict[str, Histogram] = {}
        # models on demand
        self.loads: dict[str, LoadTask] = {}  # model -> its load in progress
        self.load_failures: dict[str, tuple[float, wire.Error]] = {}  # model -> (until, why)
        self.idle: list[tuple[float, int, WorkerRec, str, float]] = []  # keep-alive deadlines
        self.widest: dict[str, int] = {}  # model -> the largest context a worker has it with
        # model (NAME:VERSION) -> what the registry said of it, for loads the sweep starts
        self.infos: OrderedDict[str, wire.ModelInfo] = OrderedDict()
        self.rejoined = False  # a worker registered before came back: this is a restart
        self.load_retry: dict[str, float] = {}  # orphaned pool -> when to try a load again
        self.sizes: dict[str, int] = {}  # model -> the size in memory a worker last reported
        # Gauges over the table are computed at scrape time, in the HTTP server's thread.
        for gauge in (self.metrics.workers, self.metrics.slots, self.metrics.queue_depth):
            self.metrics.registry.unregister(gauge)
        self.metrics.registry.register(TableGauges(self))
        self.schedule = Histogram(
            "haif_schedule_seconds",
            "From a request read by the orchestrator to its dispatch to a worker, for requests "
            "dispatched on arrival (a queued request's wait: haif_queue_wait_seconds).",
            buckets=SCHEDULE_BUCKETS,
            registry=self.metrics.registry,
        )

    def start(self) -> None:
        self.started_mono = time.monotonic()
        self.router, self.endpoints["rpc"] = self.listen(zmq.ROUTER, self.bind_address)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting peer takes its name back
        # Every registry call: the loop sends and goes on; answers are read with everything
        # else.  IMMEDIATE: with the registry down a send fails at once instead of queueing.
        self.registry_link = self.dial(zmq.DEALER, self.registry_address, ORCHESTRATOR)
        self.registry_link.setsockopt(zmq.IMMEDIATE, 1)
        self.registry_link.connect(self.registry_address)
        self.watch(self.router, self.read)
        self.watch(self.registry_link, self.registry_answers)

    # loop ------------------------------------------------------------------------------------
    def read(self) -> None:
        """Every message waiting on the router, as :meth:`Daemon.read_router` reads them, but
        received until a recv finds none, rather than asking ZMQ_EVENTS before each one (two
        system calls a message there, one failed recv a wake-up here): most of what an idle
        cluster sends is heartbeats, and this is most of what each one costs."""
        recv, more = self.router.recv, self.router.getsockopt
        while True:
            try:
                first = recv(NOBLOCK, copy=False)
            except zmq.Again:
                return
            role = role_of_frame(first)
            frames = [first.bytes]
            while more(RCVMORE):
                frames.append(recv(NOBLOCK))
            if len(frames) == 2:
                envelope = self.decode(frames[1])
                if envelope is not None:
                    self.safely(self.handle, frames[0], envelope, frames[1], role)
            elif 2 + wire.ROUTE_FRAMES <= len(frames) <= 3 + wire.ROUTE_FRAMES:
                self.safely(self.relay, frames, role)
            else:
                self.count_malformed()

    def in_flight(self) -> int:
        return len(self.pending) + len(self.parked)

    def on_tick(self, now: float) -> None:
        self.sweep()
        # With nothing queued, parked or loading, only heartbeat and keep-alive deadlines are
        # due, for which a quarter of a second is soon enough: an idle loop wakes 4 times a
        # second instead of 20.
        busy = self.pending or self.parked or self.lookups or self.loads or self.orphaned
        self.tick_s = LOOP_TICK_MS / 1000 if busy else IDLE_TICK_S
        self.expire_lookups(now)
        if now >= self.next_registry_ping:
            self.next_registry_ping = now + REGISTRY_PING_S
            with contextlib.suppress(zmq.ZMQError):  # not connected: the answer never comes
                self.registry_link.send(wire.encode(wire.Ping(), REGISTRY_PING_ID), NOBLOCK)

    def ready_checks(self) -> dict[str, bool]:
        """Ready once the registry answers on our link (a ping every REGISTRY_PING_S): workers
        and gateways may then connect.  Workers are not required: they join a ready one."""
        seen = self.registry_seen
        linked = seen is not None and time.monotonic() - seen < REGISTRY_LINK_S
        return {**super().ready_checks(), "registry": linked}

    def health_detail(self) -> dict[str, Any]:
        return {"workers": len(self.workers), "registry_ok": self.registry_ok}

    def pong(self) -> wire.Pong:
        return msgspec.structs.replace(super().pong(), instance=self.instance)

    def relay(self, frames: list[bytes], role: str) -> None:
        """A worker's stream frame [worker, gateway, client, body(, started)]: forward
        [client, body] to the gateway as bytes.  Its arrival is the worker's proof of life; a
        ``Started`` note after the body names the requests whose first text it carries."""
        if role != WORKER:
            self.refuse_role(role, "stream")
            return None
        worker = self.worker_at(frames[0])
        if worker is None:
            self.counters["stray_worker_messages"] += 1
            return None
        worker.last_seen = time.monotonic()
        self.counters["relayed_frames"] += 1
        started = None
        if len(frames) == 3 + wire.ROUTE_FRAMES:
            envelope = self.decode(frames[-1])
            if envelope is not None and isinstance(envelope.msg, wire.Started):
                started = envelope.msg
        if worker.orphans and not self.without_orphans(worker, frames):
            return
        try:
            # the Started note goes on to the gateway too: it tells a started stream (which a
            # lost orchestrator fails) from one it may send again
            self.router.send_multipart(frames[1:], NOBLOCK)
        except zmq.ZMQError:
            self.counters["undeliverable"] += 1
        if started is not None:
            self.started_streams(worker, started)

    def without_orphans(self, worker: WorkerRec, frames: list[bytes]) -> bool:
        """Drop the text of requests the worker is stopping (rare: only right after it
        registered again), rewriting ``frames`` in place; False when nothing is left."""
        body = wire.decode(frames[1 + wire.ROUTE_FRAMES])
        if not isinstance(body.msg, wire.Chunks):
            return False
        parts = [p for p in body.msg.parts if p.id not in worker.orphans]
        if not parts:
            return False
        frames[1 + wire.ROUTE_FRAMES] = wire.encode(wire.Chunks(parts=parts))
        if len(frames) == 3 + wire.ROUTE_FRAMES:
            note = wire.decode(frames[-1]).msg
            ids = [i for i in getattr(note, "ids", []) if i not in worker.orphans]
            frames[-1] = wire.encode(wire.Started(ids=ids))
        return True

    def send(self, identity: bytes, body: bytes) -> None:
        self.send_to(self.router, identity, body)

    def worker_at(self, identity: bytes) -> WorkerRec | None:
        """The worker behind a connection: its own, or one of its engines' links (named
        ``identity NUL n NUL instance``), on which a worker's engines send their streams and
        ends.  None for a link named after another instance of the orchestrator: what it
        carries was queued for a predecessor of ours (while this one started), for requests
        we never sent there, and may have sent again."""
        worker = self.workers.get(identity)
        if worker is None and b"\x00" in identity:
            name, _, link = identity.partition(b"\x00")
            _, named, instance = link.partition(b"\x00")
            if named and instance != self.instance_name:
                self.counters["stale_link_messages"] += 1
                return None
            worker = self.workers.get(name)
        return worker

    def handle(self, identity: bytes, envelope: wire.Envelope, body: bytes, role: str) -> None:
        msg = envelope.msg
        if type(msg) is wire.Heartbeat and role == WORKER:  # most of what an idle cluster sends
            self.heartbeat(identity, envelope, msg)
            return
        accepting = self.accepting
        if (
            (isinstance(msg, WORKER_MESSAGES) and role != WORKER)
            or (isinstance(msg, GATEWAY_MESSAGES) and role != GATEWAY)
            or (isinstance(msg, ADMIN_MESSAGES) and role != ADMIN)
        ):
            refusal = self.refuse_role(role, type(msg).__name__.lower())
            if envelope.id and not isinstance(msg, (*wire.FINAL, wire.Cancel)):
                self.send(identity, wire.reply(envelope, refusal))
            return
        worker = self.worker_at(identity)
        if worker is not None:
            worker.last_seen = time.monotonic()
        if isinstance(msg, (*wire.FINAL, wire.ContextTooSmall)) and worker is not None:
            self.from_worker(worker, envelope, body)
        elif isinstance(msg, wire.LoadFailed) and worker is not None:
            self.load_failed(worker, msg)
        elif isinstance(msg, wire.ManageModel):
            self.manage(msg, lambda answer: self.send(identity, wire.reply(envelope, answer)))
        elif isinstance(msg, wire.Register):
            self.register(identity, envelope, msg)
        elif isinstance(msg, wire.Infer):
            self.infer(identity, envelope, msg, accepting)
        elif isinstance(msg, wire.Cancel):
            self.cancel(envelope.id)
        elif isinstance(msg, wire.ResolveModel):
            self.resolve(msg.ref, lambda answer: self.send(identity, wire.reply(envelope, answer)))
        elif isinstance(msg, wire.Ping):
            self.send(identity, wire.reply(envelope, self.pong()))
        elif isinstance(msg, wire.StatsRequest):
            self.send(identity, wire.reply(envelope, self.stats()))
        elif isinstance(msg, wire.ListModels):
            self.list_models(lambda answer: self.send(identity, wire.reply(envelope, answer)))
        else:
            self.counters["unexpected_messages"] += 1

    # workers ---------------------------------------------------------------------------------
    def register(self, identity: bytes, envelope: wire.Envelope, msg: wire.Register) -> None:
        """A worker joins, or announces itself again after a silence.  A worker keeps its
        identity across silences: what it reports running and what this table says it runs
        are reconciled (requests failed or moved meanwhile are stopped), and nothing it still
        runs is forgotten.  A new process under a known identity replaces the old record."""
        other = self.by_worker_id.get(msg.worker_id)
        if other is not None and other.identity != identity:
            self.drop_worker(other, "replaced by a new connection")
        known = self.workers.get(identity)
        if known is not None and (known.pid, known.host) != (msg.pid, msg.host):
            self.drop_worker(known, "restarted")
            known = None
        rec = WorkerRec(
            identity=identity,
            worker_id=msg.worker_id,
            models=list(msg.models),
            slots=max(1, msg.slots),
            device=msg.device,
            n_ctx=msg.n_ctx,
            pid=msg.pid,
            host=msg.host,
            last_seen=time.monotonic(),
            gpu_name=msg.gpu_name,
            gpu_memory_mb=msg.gpu_memory_mb,
            embeddings=msg.embeddings,
            loaded={state.ref: state for state in msg.loaded if state.ref in msg.models},
            memory_budget=msg.memory_budget,
            memory_used=msg.memory_used,
            labels=dict(msg.labels),
            keep_alive_s=msg.keep_alive_s,
        )
        first = [ref for ref in rec.models if ref not in self.serving]
        ours = {
            rid
            for rid in msg.running
            if (p := self.pending.get(rid)) is not None and p.worker == identity
        }
        rec.orphans = set(msg.running) - ours
        # Busy until their Done or Error: what it still runs, ours or not, and what we sent it
        # that it has not answered yet (messages on one connection arrive in order).
        rec.running = set(msg.running)
        gone: list[str] = []
        if known is not None:
            rec.running |= known.running
            rec.draining = known.draining
            rec.assigned = known.assigned
            rec.model_of = {r: m for r, m in known.model_of.items() if r in rec.running}
            rec.last_used = known.last_used
            rec.served_by = known.served_by
            rec.keep = known.keep
            rec.on_demand = known.on_demand & set(rec.models)
            rec.incoming = {r: n for r, n in known.incoming.items() if r not in rec.models}
            gone = [ref for ref in known.models if ref not in rec.models]
            self.unindex(known)
            if self.by_worker_id.get(known.worker_id) is known:
                del self.by_worker_id[known.worker_id]
        for rid in ours:
            pending = self.pending[rid]
            rec.model_of.setdefault(rid, pending.model_ref)
        rec.model_busy = Counter(rec.model_of.get(rid, "") for rid in rec.running)
        # what it loaded on demand (for an orchestrator that restarted, keep-alive applies)
        rec.on_demand |= {ref for ref, state in rec.loaded.items() if state.on_demand}
        for ref, state in rec.loaded.items():
            if state.size_bytes and (ref in self.sizes or len(self.sizes) < MAX_RESOLVED):
                self.sizes[ref] = state.size_bytes
        self.workers[identity] = rec
        self.by_worker_id[rec.worker_id] = rec
        self.index(rec)
        heapq.heappush(
            self.liveness, (rec.last_seen + self.heartbeat_timeout_s, next(self.seq), rec)
        )
        self.counters["registrations"] += 1
        self.rejoined = self.rejoined or msg.rejoin
        log(
            self.name,
            "worker registered" if known is None else "worker registered again",
            worker=msg.worker_id,
            models=msg.models,
            slots=msg.slots,
            device=msg.device,
            running=len(rec.running),
            orphans=len(rec.orphans),
            embeddings=msg.embeddings,
        )
        ack = wire.Ack(
            known=True,
            cancel=sorted(rec.orphans),
            heartbeat_s=self.heartbeat_s,
            instance=self.instance,
        )
        self.send(identity, wire.reply(envelope, ack))
        for ref in rec.pools:
            self.orphaned.pop(ref, None)
            self.load_retry.pop(ref, None)
        for ref in first:  # the registry hears when a model gains its first worker, not each time
            self.set_status(ref, "deployed")
        for ref in gone:
            if ref not in self.serving:
                self.set_status(ref, "registered")
        self.loads_arrived(rec)
        self.pump()

    def heartbeat(self, identity: bytes, envelope: wire.Envelope, msg: wire.Heartbeat) -> None:
        """Note a worker's proof of life and counters; answer only a worker that asks, or one
        this orchestrator does not know (it registers again)."""
        worker = self.workers.get(identity)
        if worker is None:
            self.send(identity, wire.reply(envelope, wire.Ack(known=False)))
            return
        worker.last_seen = time.monotonic()
        worker.served, worker.errors, worker.tokens = msg.served, msg.errors, msg.tokens
        if msg.memory_budget:
            worker.memory_budget, worker.memory_used = msg.memory_budget, msg.memory_used
        if msg.draining != worker.draining:
            self.open_workers.update({ref: -1 if msg.draining else 1 for ref in worker.pools})
            worker.draining = msg.draining
            self.reindex(worker)
            if msg.draining:
                self.lose_loads(worker, "began draining")
                for ref in worker.pools:  # the last worker of a model drains: nobody waits
                    self.answer_orphaned_queue(ref, "its last worker is shutting down")
        if not msg.ack:
            return
        if envelope.id or envelope.deadline or envelope.traceparent:
            self.send(identity, wire.reply(envelope, wire.Ack(known=True)))
        else:
            self.send(identity, ACK_KNOWN)

    def drop_worker(self, worker: WorkerRec, reason: str) -> None:
        if self.workers.get(worker.identity) is not worker:
            return
        del self.workers[worker.identity]
        self.unindex(worker)
        if self.by_worker_id.get(worker.worker_id) is worker:
            del self.by_worker_id[worker.worker_id]
        self.counters["workers_dropped"] += 1
        log(
            self.name,
            "worker dropped",
            level="warning",
            worker=worker.worker_id,
            reason=reason,
            running=len(worker.running),
        )
        for request_id in list(worker.running):
            pending = self.pending.get(request_id)
            if pending is None:
                continue
            if pending.streamed:
                self.counters["streams_lost"] += 1
                self.metrics.streams_lost.inc()
                self.finish(
                    pending,
                    wire.Error(
                        kind=Kind.unavailable,
                        code="worker_lost",
                        message=f"worker {worker.worker_id} went away mid-stream",
                        hint="retry the request",
                        retry_after=1.0,
                    ),
                )
            else:
                self.counters["failovers"] += 1
                self.metrics.failovers.inc()
                pending.worker = None
                pending.tried.add(worker.identity)
                self.requeue(pending)
        for ref in worker.models:
            if ref not in self.serving:
                self.set_status(ref, "registered")
        self.lose_loads(worker, "went away")
        for ref in worker.pools:
            if not self.open_workers[ref] and self.queues.get(ref):
                # a crashed worker is usually restarted in seconds: its queue waits that long
                self.orphaned.setdefault(ref, time.monotonic())
        self.pump()

    def lose_loads(self, worker: WorkerRec, why: str) -> None:
        """The loads sent to ``worker`` will not finish (it went away, or drains): whoever
        waits for them hears so, and their queues wait as those whose worker went away do
        (the sweep places the model again)."""
        for ref in list(worker.incoming):
            task = self.loads.get(ref)
            if task is None or task.worker != worker.identity:
                continue
            lost = wire.Error(
                kind=Kind.unavailable,
                code="worker_lost",
                message=f"worker {worker.worker_id} {why} while loading {ref}",
                retry_after=2.0,
            )
            self.load_ended(ref, lost)
            for pool in (ref, embed_pool(ref)):
                if self.queues.get(pool) and not self.open_workers[pool]:
                    self.orphaned.setdefault(pool, time.monotonic())

    def answer_orphaned_queue(self, ref: str, why: str) -> None:
        """A model (a pool) with no worker left to take its queue: answer the queue 503 at
        once (400 for embeddings of a model whose workers have none)."""
        self.orphaned.pop(ref, None)
        self.load_retry.pop(ref, None)
        if self.open_workers[ref] or pool_model(ref) in self.loads:
            return
        model = ref.removesuffix(embed_pool(""))
        error = wire.Error(
            kind=Kind.unavailable,
            code="unavailable",
            message=f"no worker can run {ref}: {why}",
            hint="retry shortly, or start a worker for it",
            retry_after=2.0,
        )
        if model != ref and self.open_workers[model]:
            error = no_embeddings(model)
        queue = self.queues.get(ref)
        while queue:
            pending = self.pending.get(queue.popleft())
            if pending is None:
                continue
            self.counters["unserved_queued"] += 1
            self.finish(pending, error)

    def started_streams(self, worker: WorkerRec, msg: wire.Started) -> None:
        """These requests have streamed: from now on a lost worker fails them, never retries."""
        now = time.monotonic()
        for request_id in msg.ids:
            pending = self.pending.get(request_id)
            if pending is not None and pending.worker == worker.identity and not pending.streamed:
                pending.streamed = True
                pending.first_at = now

    def from_worker(self, worker: WorkerRec, envelope: wire.Envelope, body: bytes) -> None:
        pending = self.pending.get(envelope.id)
        if pending is None or pending.worker != worker.identity:
            self.counters["stray_worker_messages"] += 1
            worker.orphans.discard(envelope.id)
            self.release(worker, envelope.id)  # an orphan's end frees its slot
            self.pump()
            return
        if envelope.run and envelope.run != pending.run:
            # The end of an earlier run of this request on this worker (sent before a restart
            # of ours, or before it was sent here again), overtaken by the new dispatch: the
            # new run holds the slot and will end on its own.
            self.counters["stale_run_ends"] += 1
            return
        msg = envelope.msg
        self.release(worker, envelope.id)
        if isinstance(msg, wire.ContextTooSmall):
            self.refit(pending, worker, msg)
        elif isinstance(msg, wire.Error) and not pending.streamed and msg.code in RETRYABLE:
            pending.worker = None
            pending.tried.add(worker.identity)
            self.counters["retries"] += 1
            self.metrics.retries.inc()
            log(
                self.name,
                "a worker refused a request; it is tried again",
                level="debug",
                request_id=envelope.id,
                worker=worker.worker_id,
                code=msg.code,
                attempts=pending.attempts,
            )
            self.requeue(pending)
            if worker.draining:  # sent it before we knew; if it was the last one, nobody waits
                for ref in worker.pools:
                    self.answer_orphaned_queue(ref, "its last worker is shutting down")
        elif isinstance(msg, wire.Done):
            worker.served_by[pending.model_ref] += 1
            queue_ms = round((time.monotonic() - pending.enqueued_at) * 1000 - msg.generation_ms, 3)
            self.finish(pending, msgspec.structs.replace(msg, queue_ms=max(0.0, queue_ms)))
        else:
            self.finish(pending, msg)
        self.pump()

    def finish(self, pending: Pending, msg: wire.Msg) -> None:
        self.pending.pop(pending.envelope.id, None)
        for span in (pending.queue_span, pending.span):
            if span is not None:
                if isinstance(msg, wire.Error):
                    span.set_status(StatusCode.ERROR, msg.code)
                span.end()
        now = time.monotonic()
        worker = self.workers.get(pending.worker) if pending.worker is not None else None
        self.finished.append(
            Finished(
                at=now,
                latency=now - pending.enqueued_at,
                ttft=pending.first_at - pending.enqueued_at if pending.first_at else None,
                tokens=msg.completion_tokens if isinstance(msg, wire.Done) else 0,
                worker=worker.worker_id if worker is not None else "",
                ok=not isinstance(msg, wire.Error),
            )
        )
        if worker is not None:
            self.release(worker, pending.envelope.id)
        queue = self.queues.get(pending.pool)
        if queue is not None and pending.envelope.id in queue:
            queue.remove(pending.envelope.id)
        self.counters["finished_" + type(msg).__name__.lower()] += 1
        self.send(pending.gateway, wire.reply(pending.envelope, msg))

    # the registry ----------------------------------------------------------------------------
    def resolve(self, ref: str, then: Callable[[Answer], None]) -> None:
        """Call ``then`` with what a model reference names: at once when known (a stale answer
        too, while a fresh one is asked for), else when the registry answers."""
        if len(ref) > wire.MAX_MODEL_REF_CHARS:
            then(
                wire.Error(
                    kind=Kind.invalid,
                    code="invalid_model_ref",
                    message=f"a model name is at most {wire.MAX_MODEL_REF_CHARS} characters; "
                    f"this one has {len(ref)}",
                )
            )
            return
        known = self.resolved.get(ref)
        if known is not None:
            self.resolved.move_to_end(ref)
            if known.fresh_until > time.monotonic():
                then(known.answer)
                return
            if isinstance(known.answer, wire.ModelInfo):
                self.ask_registry("resolve", ref, None)
                then(known.answer)
                return
        self.ask_registry("resolve", ref, then)

    def ask_registry(self, op: str, ref: str, waiter: Waiter | None) -> None:
        """Send one registry call (one per model at a time) and park ``waiter`` on it."""
        call_id = self.resolving.get(ref) if op == "resolve" else None
        if call_id is not None:
            if waiter is not None:
                self.lookups[call_id].waiters.append(waiter)
            return
        lookup = Lookup(op, ref, time.monotonic(), [waiter] if waiter is not None else [])
        if len(self.lookups) >= MAX_LOOKUPS:
            return self.settle(
                lookup,
                wire.Error(
                    kind=Kind.overloaded,
                    code="overloaded",
                    message="too many model lookups at once",
                    retry_after=1.0,
                ),
            )
        call_id = wire.new_id()
        args = {"ref": ref} if op == "resolve" else {}
        if not self.tell_registry(wire.RegistryCall(op=op, args=args), call_id):
            return self.settle(lookup, self.registry_down("not connected"))
        self.lookups[call_id] = lookup
        if op == "resolve":
            self.resolving[ref] = call_id
        return None

    def registry_down(self, why: str) -> wire.Error:
        return wire.Error(
            kind=Kind.unavailable,
            code="registry_unreachable",
            message=f"the model registry is unreachable ({why})",
            hint="`haifctl status` shows the cluster",
            retry_after=2.0,
        )

    def expire_lookups(self, now: float) -> None:
        """Calls unanswered for REGISTRY_TIMEOUT_S fail (oldest first: sent in order)."""
        while self.lookups:
            call_id, lookup = next(iter(self.lookups.items()))
            if now - lookup.sent < REGISTRY_TIMEOUT_S:
                break
            del self.lookups[call_id]
            self.settle(lookup, self.registry_down(f"no answer in {REGISTRY_TIMEOUT_S:g}s"))

    def settle(self, lookup: Lookup, reply: wire.Msg) -> None:
        """A registry call's outcome: remember it and answer everyone parked on it."""
        if lookup.op == "resolve":
            call_id = self.resolving.get(lookup.ref)
            if call_id is not None and call_id not in self.lookups:  # this call's entry
                del self.resolving[lookup.ref]
            reply = self.remember(lookup.ref, self.model_info(reply))
        elif isinstance(reply, wire.RegistryReply | wire.Error):
            self.registry_reachable(not self.registry_trouble(reply))
        for waiter in lookup.waiters:
            self.safely(waiter, reply)

    @staticmethod
    def registry_trouble(reply: wire.Msg) -> bool:
        """An error that says nothing about the model: the registry (or its database) failed."""
        return isinstance(reply, wire.Error) and reply.kind in (
            Kind.unavailable,
            Kind.timeout,
            Kind.internal,
        )

    def remember(self, ref: str, answer: Answer) -> Answer:
        """Cache a lookup's outcome; while the registry is in trouble a known model keeps its
        last good answer (stale-while-error) and the trouble is reported, not cached long."""
        now = time.monotonic()
        trouble = self.registry_trouble(answer)
        self.registry_reachable(not trouble)
        known = self.resolved.get(ref)
        if trouble and known is not None and isinstance(known.answer, wire.ModelInfo):
            known.fresh_until = now + STALE_RETRY_S
            self.counters["registry_stale_answers"] += 1
            self.metrics.registry_stale.inc()
            return known.answer
        ttl = RESOLVE_CACHE_S if isinstance(answer, wire.ModelInfo) else FAILED_LOOKUP_S
        self.resolved[ref] = Resolution(answer, now + ttl)
        self.resolved.move_to_end(ref)
        while len(self.resolved) > MAX_RESOLVED:
            self.resolved.popitem(last=False)
        return answer

    def registry_reachable(self, ok: bool) -> None:
        """Log when the registry goes away and when it comes back, not at every call."""
        if ok == self.registry_ok:
            return
        self.registry_ok = ok
        if ok:
            log(self.name, "registry answering again")
        else:
            self.counters["registry_outages"] += 1
            log(
                self.name,
                "registry unreachable; known models are served from their last good answer",
                level="warning",
            )

    @staticmethod
    def model_info(reply: wire.Msg) -> Answer:
        if isinstance(reply, wire.RegistryReply) and isinstance(reply.result, dict):
            record = reply.result
            return wire.ModelInfo(
                ref=f"{record['name']}:{record['version']}",
                path=record["path"],
                context_length=record.get("context_length"),
                params=record.get("params") or {},
                size_bytes=int(record.get("size_bytes") or 0),
                sha256=str(record.get("sha256") or ""),
            )
        if isinstance(reply, wire.Error):
            return reply
        return wire.Error(
            kind=Kind.internal, code="protocol_error", message="unexpected registry answer"
        )

    def set_status(self, ref: str, status: str) -> None:
        """Fire and forget: nobody waits for it; a failure is logged when its answer comes."""
        call = wire.RegistryCall(op="set_status", args={"ref": ref, "status": status})
        self.tell_registry(call, wire.new_id())

    def tell_registry(self, call: wire.RegistryCall, call_id: str) -> bool:
        try:
            self.registry_link.send(wire.encode(call, call_id), NOBLOCK)
            return True
        except zmq.ZMQError:
            self.counters["registry_unsent"] += 1
            return False

    def registry_answers(self) -> None:
        """Answers to registry calls: lookups, and failed status updates."""
        for frames in incoming(self.registry_link):
            envelope = self.decode(frames[-1])
            if envelope is None:
                continue
            self.registry_seen = time.monotonic()  # any answer proves the link
            if envelope.id == REGISTRY_PING_ID:
                continue
            lookup = self.lookups.pop(envelope.id, None)
            if lookup is not None:
                self.settle(lookup, envelope.msg)
            elif isinstance(envelope.msg, wire.Error):
                log(
                    self.name,
                    "could not update model status",
                    level="warning",
                    error=envelope.msg.message,
                )

    def list_models(self, then: Callable[[wire.Msg], None]) -> None:
        """Registered models, with how many live workers serve each."""

        def answer(reply: wire.Msg) -> None:
            if isinstance(reply, wire.Error):
                return then(reply)
            if not isinstance(reply, wire.RegistryReply) or not isinstance(reply.result, list):
                return then(
                    wire.Error(
                        kind=Kind.internal,
                        code="protocol_error",
                        message="unexpected registry answer",
                    )
                )
            models = []
            # the most memory one worker that loads on demand has (once per list, not per model)
            room = max(
                (w.memory_budget for w in self.workers.values() if not w.draining),
                default=0,
            )
            for record in reply.result:
                ref = f"{record['name']}:{record['version']}"
                workers = len(self.serving.get(ref, ()))
                need = max(
                    estimate_bytes(int(record.get("size_bytes") or 0)), self.sizes.get(ref, 0)
                )
                models.append(
                    wire.ModelEntry(
                        ref=ref,
                        name=record["name"],
                        aliases=list(record.get("aliases") or []),
                        created_at=str(record.get("created_at", "")),
                        status=str(record.get("status", "")),
                        workers=workers,
                        loadable=not workers and room >= need and record.get("status") != "retired",
                    )
                )
            return then(wire.ModelList(models=models))

        self.ask_registry("list", "", answer)

    # models on demand ------------------------------------------------------------------------
    def note_info(self, info: wire.ModelInfo) -> None:
        self.infos[info.ref] = info
        self.infos.move_to_end(info.ref)
        if len(self.infos) > MAX_RESOLVED:
            self.infos.popitem(last=False)

    def any_matching(self, pool: str, selector: dict[str, str]) -> bool:
        """Whether a worker with these labels serves ``pool`` (only asked when a request
        selects labels: a scan of that model's workers)."""
        return any(
            matches(w.labels, selector) and not w.draining
            for w in self.serving.get(pool, {}).values()
        )

    def labelled(self, selector: dict[str, str]) -> bool:
        """Whether any worker of the cluster carries ``selector``'s labels (asked only when a
        load cannot be placed: a scan of the table)."""
        return any(matches(w.labels, selector) for w in self.workers.values())

    def candidates(
        self, ref: str, embed: bool, only: WorkerRec | None, evictable: bool = False
    ) -> Iterator[Candidate]:
        """Workers that could load ``ref``: open, announcing a memory budget (they load on
        demand), without it, with embeddings when needed; with their loaded models when
        ``evictable`` (only asked for when nothing fits as it is)."""
        for w in [only] if only is not None else self.workers.values():
            if (
                w.draining
                or not w.memory_budget  # a worker that cannot load on demand
                or ref in w.models
                or ref in w.incoming
                or (embed and not w.embeddings)
            ):
                continue
            residents = [
                Resident(
                    m,
                    state.size_bytes,
                    busy=w.model_busy[m],
                    last_used=w.last_used.get(m, 0.0),
                    pinned=bool(self.queues.get(m)),
                )
                for m, state in (w.loaded.items() if evictable else ())
            ]
            yield Candidate(
                key=w.identity,
                name=w.worker_id,
                budget=w.memory_budget,
                used=w.memory_used + sum(w.incoming.values()),
                load=len(w.running) / max(1, w.slots),
                labels=w.labels,
                residents=residents,
            )

    def start_load(
        self,
        info: wire.ModelInfo,
        selector: dict[str, str],
        *,
        embed: bool = False,
        n_ctx: int = 0,
        only: WorkerRec | None = None,
        why: str = "",
        parent: Span | None = None,
    ) -> wire.Error | None:
        """Have ``info`` loaded where the placement policy puts it (evicting idle models if it
        must); None when a load is on its way (this one, or one already going)."""
        ref = info.ref
        if ref in self.loads:
            return None
        failed = self.load_failures.get(ref)
        if failed is not None:
            if failed[0] > time.monotonic():
                return failed[1]
            del self.load_failures[ref]
        # what a worker reported the model taking, KV cache included, when one has loaded it;
        # else its file and some room
        need = max(estimate_bytes(info.size_bytes), self.sizes.get(ref, 0))
        started = time.monotonic()
        decision = place(self.candidates(ref, embed, only), need, self.placement, selector)
        if decision.key is None and decision.seen:  # nothing fits as it is: what to evict
            candidates = self.candidates(ref, embed, only, evictable=True)
            decision = place(candidates, need, self.placement, selector)
        cost_us = round((time.monotonic() - started) * 1e6, 1)
        if decision.key is None and selector and not self.labelled(selector):
            # labels no worker of the cluster carries: the request's to change, not capacity
            wanted = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
            carried = sorted(
                {f"{k}={v}" for w in self.workers.values() for k, v in w.labels.items()}
            )
            return wire.Error(
                kind=Kind.invalid,
                code="no_matching_workers",
                message=f"no worker carries the labels {wanted}",
                hint=f"workers carry: {', '.join(carried) or 'no labels'} "
                "(start one with haifctl worker --label KEY=VALUE)",
            )
        if decision.key is None and not decision.seen and selector:
            wanted = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
            return wire.Error(
                kind=Kind.unavailable,
                code="no_room",
                message=f"no worker with the labels {wanted} serves {ref} or can load it",
                hint="start a worker with them: haifctl worker --label KEY=VALUE ...",
                retry_after=5.0,
            )
        if decision.key is None and not decision.seen:
            return wire.Error(
                kind=Kind.unavailable,
                code="unavailable",
                message=f"no worker serves {ref}",
                hint=f"start one: haifctl worker --orchestrator ADDRESS --model {ref}",
                retry_after=2.0,
            )
        if decision.key is None or decision.key not in self.workers:
            self.counters["loads_refused"] += 1
            log(self.name, "no room to load", level="debug", model=ref, reason=decision.reason)
            return wire.Error(
                kind=Kind.unavailable,
                code="no_room",
                message=f"cannot load {ref}: {decision.reason}",
                hint="unload a model (haifctl models unload NAME), or start a worker with "
                "more memory",
                retry_after=5.0,
            )
        worker = self.workers[decision.key]
        for victim in decision.evict:
            self.unload(worker, victim, f"evicted to make room for {ref}")
        self.send(
            worker.identity,
            wire.encode(
                wire.Load(
                    ref=ref,
                    path=info.path,
                    sha256=info.sha256,
                    n_ctx=n_ctx,
                    context_length=info.context_length,
                )
            ),
        )
        worker.incoming[ref] = need
        if "keep_alive" in info.params:
            with contextlib.suppress(HaifError):
                worker.keep[ref] = parse_keep_alive(info.params["keep_alive"])
        self.loads[ref] = LoadTask(
            ref, worker.identity, worker.worker_id, time.monotonic(), need, decision.reason
        )
        self.counters["loads"] += 1
        log(
            self.name,
            "loading a model",
            level="debug",
            model=ref,
            worker=worker.worker_id,
            why=why,
            placement=decision.reason,
            evicted=decision.evict,
            n_ctx=n_ctx or None,
            decision_us=cost_us,
        )
        if self.tracing is not None:
            span = self.tracing.tracer.start_span(
                "placement",
                context=trace.set_span_in_context(parent) if parent is not None else None,
                attributes={
                    "haif.model": ref,
                    "haif.worker": worker.worker_id,
                    "haif.placement": self.placement,
                    "haif.reason": decision.reason,
                    "haif.evicted": ",".join(decision.evict),
                    "haif.decision_us": cost_us,
                },
            )
            span.end()
        return None

    def loads_arrived(self, worker: WorkerRec) -> None:
        """A worker announced its models: the loads sent to it that are in are done."""
        for ref in [r for r, t in self.loads.items() if t.worker == worker.identity]:
            if ref in worker.models:
                task = self.load_ended(ref, None)
                worker.on_demand.add(ref)
                if task is not None:
                    log(
                        self.name,
                        "model loaded on demand",
                        model=ref,
                        worker=worker.worker_id,
                        load_ms=round((time.monotonic() - task.sent) * 1000, 1),
                    )
                now = time.monotonic()
                worker.last_used.setdefault(ref, now)
                self.idle_later(worker, ref, now)
            elif ref not in worker.incoming:  # a new process under that name: it forgot
                forgot = wire.Error(
                    kind=Kind.unavailable,
                    code="worker_lost",
                    message=f"worker {worker.worker_id} restarted while loading {ref}",
                    retry_after=2.0,
                )
                self.load_ended(ref, forgot)

    def load_ended(self, ref: str, error: wire.Error | None) -> LoadTask | None:
        """A load is over (``error``: it failed): answer whoever waited for it."""
        task = self.loads.pop(ref, None)
        if task is None:
            return None
        worker = self.workers.get(task.worker)
        if worker is not None:
            worker.incoming.pop(ref, None)
        answer: wire.Msg = error or wire.ModelPlaced(
            ref=ref, workers=[task.worker_id], message="loaded"
        )
        for waiter in task.waiters:
            self.safely(waiter, answer)
        return task

    def load_failed(self, worker: WorkerRec, msg: wire.LoadFailed) -> None:
        """A worker could not load a model: its queue fails with the reason, and the model is
        not tried again for LOAD_FAILURE_S (a bad file stays bad)."""
        worker.incoming.pop(msg.ref, None)
        task = self.loads.get(msg.ref)
        if task is None or task.worker != worker.identity:
            return
        error = wire.Error(kind=msg.kind, code=msg.code, message=msg.message, hint=msg.hint)
        self.load_ended(msg.ref, error)
        self.load_failures[msg.ref] = (time.monotonic() + LOAD_FAILURE_S, error)
        self.counters["loads_failed"] += 1
        log(
            self.name,
            "model load failed",
            level="warning",
            model=msg.ref,
            worker=worker.worker_id,
            error=msg.message,
        )
        for pool in (msg.ref, embed_pool(msg.ref)):
            if not self.open_workers[pool]:
                self.fail_queue(pool, error)

    def fail_queue(self, pool: str, error: wire.Error) -> None:
        self.orphaned.pop(pool, None)
        queue = self.queues.get(pool)
        while queue:
            pending = self.pending.get(queue.popleft())
            if pending is not None:
                self.finish(pending, error)

    def unload(self, worker: WorkerRec, ref: str, why: str) -> None:
        """Stop sending ``ref`` to ``worker`` and tell it to unload it (requests still running
        there finish first)."""
        if ref not in worker.models:
            return
        state = worker.loaded.pop(ref, None)
        self.set_models(worker, [m for m in worker.models if m != ref])
        worker.memory_used = max(0, worker.memory_used - (state.size_bytes if state else 0))
        worker.on_demand.discard(ref)
        self.send(worker.identity, wire.encode(wire.Unload(ref=ref)))
        self.counters["unloads"] += 1
        log(self.name, "unloading a model", model=ref, worker=worker.worker_id, why=why)
        if ref not in self.serving:
            self.set_status(ref, "registered")

    def idle_later(self, worker: WorkerRec, model: str, now: float) -> None:
        """``model`` went idle on ``worker``: note when its keep-alive runs out."""
        keep = worker.keep_for(model)
        if keep is not None and keep <= 0 and not self.queues.get(model):
            self.unload(worker, model, "keep-alive 0: unloaded after its request")
        elif keep is not None:
            entry = (now + keep, next(self.seq), worker, model, worker.last_used.get(model, now))
            heapq.heappush(self.idle, entry)

    def expire_idle(self, now: float) -> None:
        """Unload models whose keep-alive ran out (entries made stale by a later use, or by
        the worker going away, are skipped)."""
        while self.idle and self.idle[0][0] <= now:
            _, _, worker, model, stamp = heapq.heappop(self.idle)
            if (
                self.workers.get(worker.identity) is not worker
                or model not in worker.models
                or worker.model_busy[model]
                or worker.last_used.get(model) != stamp
                or self.queues.get(model)
            ):
                continue
            keep = worker.keep_for(model)
            self.unload(worker, model, f"idle past its keep-alive ({keep:g}s)" if keep else "idle")

    def refit(self, pending: Pending, worker: WorkerRec, msg: wire.ContextTooSmall) -> None:
        """A worker's context is too small for the prompt and max_tokens: send the request to
        a worker with a larger one, or have one loaded with it, or run it where the prompt
        fits (generation stops when the context is full), or refuse it naming the largest."""
        model = pending.model_ref
        widest = self.widest.get(model, 0)
        info = self.infos.get(model)
        trained = info.context_length or 0 if info is not None else 0
        route = "a worker with a larger context"
        if widest >= msg.need:
            pending.need_ctx = msg.need
        elif (
            info is not None
            and trained >= msg.need
            and self.start_load(
                info,
                pending.selector,
                n_ctx=msg.need,
                why="a longer context",
                parent=pending.span,
            )
            is None
        ):
            pending.need_ctx = msg.need
            route = "a load with a larger context"
        elif max(widest, msg.n_ctx) > msg.prompt_tokens:
            pending.need_ctx = max(widest, msg.n_ctx)
            pending.infer = msgspec.structs.replace(pending.infer, truncate=True)
            route = "the largest context, generation cut where it is full"
        else:
            largest = max(widest, msg.n_ctx)
            self.counters["rejected_context_too_small"] += 1
            self.finish(
                pending,
                wire.Error(
                    kind=Kind.invalid,
                    code="context_too_small",
                    message=f"the prompt is {msg.prompt_tokens} tokens (with max_tokens, "
                    f"{msg.need}); the largest context available for {model} is {largest}",
                    hint="shorten the prompt, or load the model with a larger context: "
                    "haifctl models load NAME --n-ctx N",
                ),
            )
            return
        self.counters["context_reroutes"] += 1
        log(
            self.name,
            "context too small; routing again",
            level="debug",
            request_id=pending.envelope.id,
            model=model,
            worker=worker.worker_id,
            need=msg.need,
            n_ctx=msg.n_ctx,
            to=route,
        )
        if pending.queue_span is None and self.tracing is not None and pending.span is not None:
            pending.queue_span = self.tracing.tracer.start_span(
                "queue wait",
                context=trace.set_span_in_context(pending.span),
                attributes={"haif.reroute": route},
            )
        pending.worker = None
        self.requeue(pending)

    def manage(self, msg: wire.ManageModel, then: Callable[[wire.Msg], None]) -> None:
        """An operator's load or unload (``haifctl models load/unload``)."""
        if msg.op not in ("load", "unload"):
            then(wire.Error(kind=Kind.invalid, code="invalid_request", message=f"op {msg.op!r}"))
            return
        only = None
        if msg.worker:
            only = self.by_worker_id.get(msg.worker)
            if only is None:
                then(
                    wire.Error(
                        kind=Kind.not_found,
                        code="worker_not_found",
                        message=f"no worker {msg.worker!r} is connected",
                        hint="`haifctl ps` lists the workers",
                    )
                )
                return

        def resolved(info: Answer) -> None:
            if isinstance(info, wire.Error):
                return then(info)
            ref = info.ref
            self.note_info(info)
            holders = [w for w in self.serving.get(ref, {}).values() if only is None or w is only]
            if msg.op == "unload":
                if not holders:
                    return then(
                        wire.Error(
                            kind=Kind.not_found,
                            code="not_loaded",
                            message=f"{ref} is not loaded"
                            + (f" on {msg.worker}" if msg.worker else ""),
                        )
                    )
                for w in holders:
                    self.unload(w, ref, "asked by an operator")
                return then(
                    wire.ModelPlaced(
                        ref=ref,
                        workers=[w.worker_id for w in holders],
                        message="unloaded",
                    )
                )
            if holders and not msg.n_ctx:
                return then(
                    wire.ModelPlaced(
                        ref=ref,
                        workers=[w.worker_id for w in holders],
                        message="already loaded",
                    )
                )
            self.load_failures.pop(ref, None)  # asked by hand: try again
            error = self.start_load(
                info,
                selector_of(info.params.get("labels")),
                n_ctx=msg.n_ctx,
                only=only,
                why="asked by an operator",
            )
            if error is not None:
                return then(error)
            self.loads[ref].waiters.append(then)
            return None

        self.resolve(msg.ref, resolved)

    # requests --------------------------------------------------------------------------------
    def infer(
        self, gateway: bytes, envelope: wire.Envelope, msg: wire.Infer, accepting: bool
    ) -> None:
        arrived = perf_counter()

        def refuse(error: wire.Error) -> None:
            self.counters["rejected_" + error.code] += 1
            self.metrics.rejected.labels(self.name, error.code).inc()
            self.send(gateway, wire.reply(envelope, error))

        if not accepting:
            return refuse(
                wire.Error(
                    kind=Kind.unavailable,
                    code="unavailable",
                    message="the orchestrator is shutting down",
                    retry_after=2.0,
                )
            )
        if wire.expired(envelope):
            return refuse(
                wire.Error(
                    kind=Kind.timeout, code="deadline_exceeded", message="the deadline had passed"
                )
            )
        if envelope.id in self.parked or envelope.id in self.pending:
            known = self.pending.get(envelope.id)
            if known is None or known.gateway == gateway:
                # The same request again from the same gateway (sent again after its link to
                # us was reset): it is already here.
                self.counters["duplicates_ignored"] += 1
                return None
            return refuse(
                wire.Error(kind=Kind.invalid, code="duplicate_request", message="request id in use")
            )
        if len(self.parked) >= MAX_PARKED:
            return refuse(
                wire.Error(
                    kind=Kind.overloaded,
                    code="overloaded",
                    message="too many requests waiting for a model lookup",
                    retry_after=1.0,
                )
            )
        self.parked.add(envelope.id)
        asked_registry = False

        def resolved(info: Answer) -> None:
            if envelope.id not in self.parked:
                return None  # cancelled meanwhile
            self.parked.discard(envelope.id)
            if isinstance(info, wire.Error):
                return refuse(info)
            # a request that waited for the registry is not timed: that wait is not ours
            return self.admit(
                gateway, envelope, msg, info, refuse, 0.0 if asked_registry else arrived
            )

        self.resolve(str(msg.request.get("model") or self.default_model), resolved)
        asked_registry = True  # resolved() not called by now: it waits for the registry
        return None

    def admit(
        self,
        gateway: bytes,
        envelope: wire.Envelope,
        msg: wire.Infer,
        info: wire.ModelInfo,
        refuse: Callable[[wire.Error], None],
        arrived: float = 0.0,
    ) -> None:
        """Queue (or dispatch at once) a request whose model is known: an embed request in
        the model's embedding pool, any other in the model's own.  ``arrived``: when the loop
        read it (perf_counter; 0: not timed), for the scheduling histogram."""
        embed = msg.request.get("op") == "embed"
        pool = embed_pool(info.ref) if embed else info.ref
        self.note_info(info)
        selector = selector_of(msg.request.get("labels") or info.params.get("labels"))
        keep_asked = msg.request.get("keep_alive") is not None
        try:
            keep = parse_keep_alive(msg.request["keep_alive"]) if keep_asked else None
        except HaifError as exc:
            return refuse(exc.to_wire())
        # Just restarted, workers are on their way back (one that was registered before has
        # said so, or none has come yet): wait for them rather than load the model elsewhere.
        young = time.monotonic() - self.started_mono < self.startup_grace_s and (
            self.rejoined or not self.workers
        )
        waits_for = ""
        load = False
        if not self.open_workers[pool] and young:
            # Just started (a restart): workers are on their way back; the request waits for
            # them in the queue, as long as a queue whose workers went away does.  When the
            # model's workers are back, those with embeddings have until the grace ends.
            since = time.monotonic()
            if embed and self.open_workers[info.ref]:
                since = self.started_mono + self.startup_grace_s - ORPHAN_QUEUE_S
            self.orphaned.setdefault(pool, since)
        elif not self.open_workers[pool] or (selector and not self.any_matching(pool, selector)):
            # Nobody (with these labels) has it loaded: load it where it fits; the request
            # waits in the queue meanwhile.
            load = True
        infer = wire.Infer(
            request=msg.request,
            client=msg.client,
            model_ref=info.ref,
            model_path=info.path,
            model_params=info.params,
            n_ctx_train=info.context_length,
            route=[*msg.route[:1], gateway],
        )
        pending = self.traced(
            Pending(
                envelope=envelope,
                infer=infer,
                gateway=gateway,
                model_ref=info.ref,
                enqueued_at=time.monotonic(),
                pool=pool,
                selector=selector,
                keep_asked=keep_asked,
                keep_alive=keep,
            )
        )
        if load:
            error = self.start_load(
                info, selector, embed=embed, why="requested", parent=pending.span
            )
            if error is not None:
                # no worker of the cluster makes embeddings (a scan, on this error path only):
                # the request's model cannot give them, whatever loads
                if embed and (
                    self.open_workers[info.ref]
                    or not any(w.embeddings for w in self.workers.values())
                ):
                    error = no_embeddings(info.ref)
                for span in (pending.queue_span, pending.span):
                    if span is not None:
                        span.set_status(StatusCode.ERROR, error.code)
                        span.end()
                return refuse(error)
            waits_for = self.loads[info.ref].worker_id if info.ref in self.loads else ""
        if waits_for:
            self.counters["waited_for_load"] += 1
            if pending.queue_span is not None:
                pending.queue_span.set_attributes(
                    {"haif.waits_for_load": info.ref, "haif.load_worker": waits_for}
                )
            log(
                self.name,
                "request waits for a load",
                level="debug",
                request_id=envelope.id,
                model=info.ref,
                worker=waits_for,
            )
        queue = self.queues.setdefault(pool, deque())
        if not queue and self.dispatch(pending):
            self.pending[envelope.id] = pending
            if arrived:
                self.schedule.observe(perf_counter() - arrived)
            return None
        if len(queue) >= self.queue_size:
            busy = self.busy[pool]
            return refuse(
                wire.Error(
                    kind=Kind.overloaded,
                    code="overloaded",
                    message=f"{info.ref}: every slot is busy and the queue is full "
                    f"({busy} running, {len(queue)} queued)",
                    hint="retry later",
                    retry_after=1.0,
                )
            )
        self.pending[envelope.id] = pending
        queue.append(envelope.id)
        self.expire_later(pending)
        return None

    def traced(self, pending: Pending) -> Pending:
        """Open the request's spans (when tracing is on): the whole stay, and the queue wait."""
        pending.traceparent = pending.envelope.traceparent
        if self.tracing is not None:
            tracer = self.tracing.tracer
            pending.span = tracer.start_span(
                "orchestrator request",
                context=parent_context(pending.envelope.traceparent),
                attributes={
                    "haif.request_id": pending.envelope.id,
                    "haif.model": pending.model_ref,
                },
            )
            pending.traceparent = child_traceparent(pending.span)
            pending.queue_span = tracer.start_span(
                "queue wait", context=trace.set_span_in_context(pending.span)
            )
        return pending

    def dispatch(self, pending: Pending) -> bool:
        worker = self.pick(pending)
        if worker is None:
            return False
        model = pending.model_ref
        ctx = worker.ctx_of(model)
        trained = pending.infer.n_ctx_train or 0
        if not pending.infer.truncate and ctx >= self.widest.get(model, 0) and ctx >= trained:
            # no worker has a larger context, nor could a load have one: a prompt that fits
            # runs, max_tokens or not
            pending.infer = msgspec.structs.replace(pending.infer, truncate=True)
        if pending.queue_span is not None:
            pending.queue_span.set_attributes(
                {
                    "haif.worker": worker.worker_id,
                    "haif.attempt": pending.attempts + 1,
                    "haif.candidates": self.free_workers[pending.pool],
                }
            )
            pending.queue_span.end()
            pending.queue_span = None
        queue_wait = self.queue_wait.get(pending.model_ref)
        if queue_wait is None:  # labels() takes a lock and builds a key: once per model
            queue_wait = self.queue_wait[pending.model_ref] = self.metrics.queue_wait.labels(
                pending.model_ref
            )
        queue_wait.observe(time.monotonic() - pending.enqueued_at)
        pending.worker = worker.identity
        pending.attempts += 1
        pending.run = next(self.runs)
        worker.assigned += 1
        worker.running.add(pending.envelope.id)
        worker.model_of[pending.envelope.id] = model
        worker.model_busy[model] += 1
        worker.last_used[model] = time.monotonic()
        if pending.keep_asked:
            worker.keep[model] = pending.keep_alive
        for ref in (model, embed_pool(model)) if worker.loaded else worker.pools:
            if ref in self.serving and worker.identity in self.serving[ref]:
                self.busy[ref] += 1
        self.reindex(worker)
        env = pending.envelope
        self.send(
            worker.identity,
            wire.encode(pending.infer, env.id, env.deadline, pending.traceparent, pending.run),
        )
        self.counters["dispatched"] += 1
        return True

    def pump(self) -> None:
        for queue in self.queues.values():
            while queue:
                pending = self.pending.get(queue[0])
                if pending is None:
                    queue.popleft()
                    continue
                if pending.attempts >= self.max_attempts:
                    queue.popleft()
                    self.finish(
                        pending,
                        wire.Error(
                            kind=Kind.unavailable,
                            code="unavailable",
                            retry_after=2.0,
                            message="no worker could run the request",
                        ),
                    )
                    continue
                if not self.dispatch(pending):
                    break
                queue.popleft()

    def cancel(self, request_id: str) -> None:
        if request_id in self.parked:
            self.parked.discard(request_id)
            self.counters["cancelled"] += 1
            return
        pending = self.pending.get(request_id)
        if pending is None:
            return
        self.counters["cancelled"] += 1
        if pending.worker is None:
            # the client withdrew it, and has gone: nobody reads this answer
            self.finish(
                pending,
                wire.Error(kind=Kind.invalid, code="cancelled", message="cancelled by the client"),
            )
        else:
            self.send(pending.worker, wire.encode(wire.Cancel(), request_id))

    def sweep(self) -> None:
        """Drop silent workers and expire queued requests: only the heaps' due entries."""
        now = time.monotonic()
        self.expire_idle(now)
        for ref, task in list(self.loads.items()):
            if now - task.sent > LOAD_TIMEOUT_S:
                error = wire.Error(
                    kind=Kind.unavailable,
                    code="load_timeout",
                    message=f"{ref} was not loaded on {task.worker_id} in {LOAD_TIMEOUT_S:g}s",
                    retry_after=5.0,
                )
                self.load_ended(ref, error)
                self.load_failures[ref] = (now + LOAD_FAILURE_S, error)
                for pool in (ref, embed_pool(ref)):
                    if not self.open_workers[pool]:
                        self.fail_queue(pool, error)
        young = now - self.started_mono < self.startup_grace_s and (
            self.rejoined or not self.workers
        )
        for ref, since in list(self.orphaned.items()):
            model = pool_model(ref)
            if model in self.loads:
                continue  # its load is on its way
            info = self.infos.get(model)
            if not young and info is not None and self.load_retry.get(ref, 0.0) <= now:
                # no worker (back) for it: load it somewhere else (a placement looks at every
                # worker: tried once a second, not every tick)
                self.load_retry[ref] = now + 1.0
                refused = self.start_load(info, {}, embed=ref != model, why="no worker")
                if refused is None:
                    self.orphaned.pop(ref, None)
                    self.load_retry.pop(ref, None)
                    log(
                        self.name,
                        "queued requests wait for a load",
                        level="debug",
                        model=model,
                        queued=len(self.queues.get(ref, ())),
                    )
                    continue
            if now - since > ORPHAN_QUEUE_S:
                self.answer_orphaned_queue(ref, f"no worker came back in {ORPHAN_QUEUE_S:g}s")
        while self.liveness and self.liveness[0][0] < now:
            _, _, worker = heapq.heappop(self.liveness)
            if self.workers.get(worker.identity) is not worker:
                continue  # dropped, or registered again (with an entry of its own)
            seen = self.heard_since(worker.last_seen)
            if now - seen > self.heartbeat_timeout_s:
                self.drop_worker(worker, f"silent for {now - worker.last_seen:.1f}s")
            else:  # heard from since (or we were paused): moved on to its new deadline
                deadline = seen + self.heartbeat_timeout_s
                heapq.heappush(self.liveness, (deadline, next(self.seq), worker))
        wall = time.time()
        while self.expiries and self.expiries[0][0] < wall:
            _, _, request_id = heapq.heappop(self.expiries)
            pending = self.pending.get(request_id)
            if pending is None or pending.worker is not None:
                continue  # finished, or running: only a queued request expires here
            self.counters["expired_in_queue"] += 1
            self.finish(
                pending,
                wire.Error(
                    kind=Kind.timeout,
                    code="deadline_exceeded",
                    message="the deadline passed in the queue",
                ),
            )
        queued = sum(len(queue) for queue in self.queues.values())
        if len(self.expiries) > 2 * queued + 1024:  # entries of requests long since dispatched
            self.expiries = [e for e in self.expiries if self.queued(e[2])]
            heapq.heapify(self.expiries)

    def queued(self, request_id: str) -> bool:
        pending = self.pending.get(request_id)
        return pending is not None and pending.worker is None

    def expire_later(self, pending: Pending) -> None:
        """Note a queued request's deadline for the sweep."""
        if pending.envelope.deadline > 0:
            entry = (pending.envelope.deadline, next(self.seq), pending.envelope.id)
            heapq.heappush(self.expiries, entry)

    def requeue(self, pending: Pending) -> None:
        """Put an unstarted request back at the front of its queue (retry, failover)."""
        self.queues.setdefault(pending.pool, deque()).appendleft(pending.envelope.id)
        self.expire_later(pending)

    # worker index ----------------------------------------------------------------------------
    def index(self, worker: WorkerRec) -> None:
        """Enter a worker, newly in the table, in the per-model indexes."""
        for ref in worker.pools:
            model = pool_model(ref)
            self.serving.setdefault(ref, {})[worker.identity] = worker
            self.busy[ref] += worker.model_busy[model] if worker.loaded else len(worker.running)
            if not worker.draining:
                self.open_workers[ref] += 1
            if ref == model:
                self.widest[model] = max(self.widest.get(model, 0), worker.ctx_of(model))
        self.reindex(worker)

    def unindex(self, worker: WorkerRec) -> None:
        """Take a worker, just removed from the table, out of the per-model indexes."""
        worker.version = -1  # its heap entries go stale
        for ref in worker.pools:
            model = pool_model(ref)
            serving = self.serving.get(ref, {})
            serving.pop(worker.identity, None)
            if not serving:
                self.serving.pop(ref, None)
                self.vacancies.pop(ref, None)
            self.busy[ref] -= worker.model_busy[model] if worker.loaded else len(worker.running)
            if not worker.draining:
                self.open_workers[ref] -= 1
            if ref in worker.listed:
                self.free_workers[ref] -= 1
            if ref == model and self.widest.get(model, 0) <= worker.ctx_of(model):
                rest = [w.ctx_of(model) for w in serving.values()]
                if rest:
                    self.widest[model] = max(rest)
                else:
                    self.widest.pop(model, None)
        worker.listed = set()

    def set_models(self, worker: WorkerRec, models: list[str]) -> None:
        """Change which models a worker in the table is listed for (an unload ordered here:
        from now on it gets none of that model's requests)."""
        self.unindex(worker)
        worker.models = models
        worker.set_pools()
        self.index(worker)

    def reindex(self, worker: WorkerRec) -> None:
        """After a change in a worker's load or state: a fresh entry in its models' heaps of
        workers with a free slot, which makes the older ones stale."""
        worker.version = next(self.seq)
        for ref in worker.pools:
            free = worker.free_in(ref) > 0
            if free != (ref in worker.listed):
                self.free_workers[ref] += 1 if free else -1
                if free:
                    worker.listed.add(ref)
                else:
                    worker.listed.discard(ref)
            if not free:
                continue
            heap = self.vacancies.setdefault(ref, [])
            heapq.heappush(heap, (worker.load_in(ref), worker.assigned, worker.version, worker))
            if len(heap) > 4 * len(self.serving[ref]) + 64:  # mostly stale: rebuild
                heap[:] = [
                    (w.load_in(ref), w.assigned, w.version, w)
                    for w in self.serving[ref].values()
                    if w.free_in(ref) > 0
                ]
                heapq.heapify(heap)

    def pick(self, pending: Pending) -> WorkerRec | None:
        """The least loaded worker of the request's pool with a free slot (ties: the one sent
        the fewest requests) and the context and labels it needs, preferring one this request
        has not tried."""
        ref, tried = pending.pool, pending.tried
        heap = self.vacancies.get(ref)
        if not heap:
            return None
        model = pool_model(ref)
        passed_over: list[tuple[float, int, int, WorkerRec]] = []
        unfit: list[tuple[float, int, int, WorkerRec]] = []
        chosen = None
        while heap:
            worker = heap[0][3]
            if worker.version != heap[0][2] or worker.free_in(ref) <= 0:
                heapq.heappop(heap)  # stale
            elif (pending.need_ctx and worker.ctx_of(model) < pending.need_ctx) or (
                pending.selector and not matches(worker.labels, pending.selector)
            ):
                unfit.append(heapq.heappop(heap))
            elif worker.identity in tried:
                passed_over.append(heapq.heappop(heap))
            else:
                chosen = worker
                break
        for entry in (*passed_over, *unfit):
            heapq.heappush(heap, entry)
        if chosen is None and passed_over:
            chosen = passed_over[0][3]  # every free worker was tried: the best of them again
        return chosen

    def release(self, worker: WorkerRec, request_id: str) -> None:
        """A request left the worker's slot."""
        if request_id not in worker.running:
            return
        worker.running.discard(request_id)
        model = worker.model_of.pop(request_id, "")
        worker.model_busy[model] -= 1
        if self.workers.get(worker.identity) is worker:
            for ref in (model, embed_pool(model)) if worker.loaded else worker.pools:
                if ref in self.serving and worker.identity in self.serving[ref]:
                    self.busy[ref] -= 1
            self.reindex(worker)
            if model and not worker.model_busy[model]:
                now = time.monotonic()
                worker.last_used[model] = now
                self.idle_later(worker, model, now)

    def window(self) -> wire.Window:
        now = time.monotonic()
        while self.finished and now - self.finished[0].at > WINDOW_S:
            self.finished.popleft()
        items = list(self.finished)
        span = min(WINDOW_S, max(1.0, now - self.started_mono))
        latencies = sorted(f.latency for f in items if f.ok)
        ttfts = sorted(f.ttft for f in items if f.ttft is not None)
        per_worker: dict[str, float] = {}
        for f in items:
            if f.worker:
                per_worker[f.worker] = per_worker.get(f.worker, 0.0) + f.tokens / span

        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)

        return wire.Window(
            seconds=round(span, 1),
            requests=len(items),
            errors=sum(not f.ok for f in items),
            requests_per_s=round(len(items) / span, 3),
            tokens_per_s=round(sum(f.tokens for f in items) / span, 1),
            latency_p50_ms=pct(latencies, 0.5),
            latency_p95_ms=pct(latencies, 0.95),
            ttft_p50_ms=pct(ttfts, 0.5),
            ttft_p95_ms=pct(ttfts, 0.95),
            worker_tokens_per_s={k: round(v, 1) for k, v in per_worker.items()},
        )

    @staticmethod
    def model_state(w: WorkerRec, state: wire.ModelState, now: float) -> wire.ModelState:
        """A loaded model as ``haifctl ps`` shows it: the worker's facts and this table's use."""
        busy = w.model_busy[state.ref]
        idle = 0.0 if busy else now - w.last_used.get(state.ref, now)
        keep = w.keep_for(state.ref)
        return msgspec.structs.replace(
            state,
            busy=busy,
            served=w.served_by[state.ref],
            idle_s=round(idle, 1),
            keep_alive_left_s=None if keep is None else round(max(0.0, keep - idle), 1),
        )

    def stats(self) -> wire.Stats:
        now = time.monotonic()
        return wire.Stats(
            daemon=self.name,
            workers=[
                wire.WorkerState(
                    worker_id=w.worker_id,
                    models=w.models,
                    slots=w.slots,
                    busy=len(w.running),
                    device=w.device,
                    gpu_name=w.gpu_name,
                    gpu_memory_mb=w.gpu_memory_mb,
                    n_ctx=w.n_ctx,
                    served=w.served,
                    errors=w.errors,
                    tokens=w.tokens,
                    last_seen_s=round(now - w.last_seen, 3),
                    pid=w.pid,
                    host=w.host,
                    loaded=[self.model_state(w, state, now) for state in w.loaded.values()],
                    loading=sorted(w.incoming),
                    memory_budget=w.memory_budget,
                    memory_used=w.memory_used,
                    labels=w.labels,
                )
                for w in self.workers.values()
            ],
            queues={ref: len(q) for ref, q in self.queues.items()},
            counters=dict(self.counters),
            window=self.window(),
            uptime_s=round(now - self.started_mono, 1),
        )


K = TypeVar("K")
V = TypeVar("V")


def _items(table: dict[K, V]) -> list[tuple[K, V]]:
    """The items of a dict that the loop's thread may change meanwhile (a copy is one C call)."""
    for _ in range(100):
        try:
            return list(table.copy().items())
        except RuntimeError:  # changed size during the copy: try again
            continue
    return []


class TableGauges(Collector):
    """haif_workers, haif_worker_slots and haif_queue_depth, read from the orchestrator's table
    when Prometheus scrapes (in the HTTP server's thread) instead of set every tick for every
    worker.  Same names, help and labels as the gauges in :mod:`haifctl.telemetry`."""

    def __init__(self, daemon: OrchestratorDaemon) -> None:
        self.daemon = daemon
        m = daemon.metrics
        self.help = {
            metric.name: metric.documentation
            for gauge in (m.workers, m.slots, m.queue_depth)
            for metric in gauge.describe()
        }

    def families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        def family(name: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, self.help[name], labels=labels)

        return (
            family("haif_workers", ["state"]),
            family("haif_worker_slots", ["worker", "kind"]),
            family("haif_queue_depth", ["model"]),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(self.families())

    def collect(self) -> Iterator[Metric]:
        workers, slots, depth = self.families()
        states = {"ready": 0, "busy": 0, "draining": 0}
        for _, w in _items(self.daemon.workers):
            states["draining" if w.draining else ("busy" if w.free <= 0 else "ready")] += 1
            slots.add_metric([w.worker_id, "busy"], len(w.running))
            slots.add_metric([w.worker_id, "total"], w.slots)
        for state, n in states.items():
            workers.add_metric([state], n)
        for ref, queue in _items(self.daemon.queues):
            depth.add_metric([ref], len(queue))
        return iter((workers, slots, depth))
