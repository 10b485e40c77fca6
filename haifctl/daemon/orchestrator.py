"""The orchestrator: the live worker table, bounded per-model queues, scheduling and failover.

Workers register and heartbeat; a worker silent for ``heartbeat_timeout_s`` is dropped and its
unstarted requests go back to the front of their queue.  A request whose tokens had started to
stream ends with a ``worker_lost`` error instead of a silent retry.

Nothing the loop does per message or per tick grows with the cluster: each model has a heap of
its workers with a free slot (dispatch pops the least loaded), heartbeat and queue deadlines sit
in heaps (a sweep looks only at what is due), and the table's gauges are computed when Prometheus
scrapes them.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import msgspec
import zmq
from opentelemetry import trace
from opentelemetry.trace import StatusCode
from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from haifctl import wire
from haifctl.daemon.base import NOBLOCK, Daemon, bind, incoming, log, socket
from haifctl.errors import HaifError, Kind
from haifctl.rpc import RpcClient
from haifctl.tracing import Span, child_traceparent, parent_context

RETRYABLE = {"worker_busy", "worker_draining", "duplicate_request"}
RESOLVE_CACHE_S = 5.0
# The answer to a heartbeat, which workers send with no id, deadline or trace: encoded once.
ACK_KNOWN = wire.encode(wire.Ack(known=True))


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
    listed: bool = False  # counted among its models' workers with a free slot

    @property
    def free(self) -> int:
        return 0 if self.draining else self.slots - len(self.running)


@dataclass(frozen=True)
class Finished:
    at: float
    latency: float
    ttft: float | None
    tokens: int
    worker: str
    ok: bool


WINDOW_S = 60.0


@dataclass
class Pending:
    envelope: wire.Envelope
    infer: wire.Infer
    gateway: bytes
    model_ref: str
    enqueued_at: float
    worker: bytes | None = None
    streamed: bool = False
    first_at: float = 0.0
    traceparent: str = ""  # what the worker gets: a child of this request's span
    span: Span | None = None
    queue_span: Span | None = None
    attempts: int = 0
    tried: set[bytes] = field(default_factory=set)


class OrchestratorDaemon(Daemon):
    name = "orchestrator"

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
    ) -> None:
        super().__init__(ready_file)
        self.bind_address = bind_address
        self.registry_address = registry_address
        self.default_model = default_model
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.queue_size = queue_size
        self.max_attempts = max_attempts
        self.drain_grace_s = drain_grace_s
        self.workers: dict[bytes, WorkerRec] = {}
        self.pending: dict[str, Pending] = {}
        self.queues: dict[str, deque[str]] = {}
        self.resolved: dict[str, tuple[float, wire.ModelInfo | wire.Error]] = {}
        self.refreshing: dict[str, tuple[str, float]] = {}  # ref -> (request id, ask again after)
        self.refreshes: dict[str, str] = {}  # request id -> ref
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
        self.queue_wait: dict[str, Histogram] = {}
        # Gauges over the table are computed at scrape time, in the HTTP server's thread.
        for gauge in (self.metrics.workers, self.metrics.slots, self.metrics.queue_depth):
            self.metrics.registry.unregister(gauge)
        self.metrics.registry.register(TableGauges(self))

    def start(self) -> None:
        self.started_mono = time.monotonic()
        self.router = socket(self.ctx, zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker takes its name back
        self.endpoints["rpc"] = bind(self.router, self.bind_address)
        self.registry = RpcClient(self.ctx, self.registry_address, "registry")
        # Calls whose answer the loop does not wait for (status updates, cache refreshes): sent
        # on a socket of their own, answers read with everything else.
        self.registry_link = socket(self.ctx, zmq.DEALER)
        self.registry_link.connect(self.registry_address)
        self.watch(self.router, self.read)
        self.watch(self.registry_link, self.registry_answers)

    # loop ------------------------------------------------------------------------------------
    def read(self) -> None:
        self.read_router(self.router, self.handle, self.relay)

    def in_flight(self) -> int:
        return len(self.pending)

    def on_tick(self, now: float) -> None:
        self.sweep()

    def relay(self, frames: list[bytes]) -> None:
        """A worker's stream frame [worker, gateway, client, body(, started)]: forward
        [client, body] to the gateway as bytes.  Its arrival is the worker's proof of life; a
        ``Started`` note after the body names the requests whose first text it carries."""
        worker = self.workers.get(frames[0])
        if worker is None:
            self.counters["stray_worker_messages"] += 1
            return
        worker.last_seen = time.monotonic()
        self.counters["relayed_frames"] += 1
        try:
            self.router.send_multipart(frames[1 : 2 + wire.ROUTE_FRAMES], NOBLOCK)
        except zmq.ZMQError:
            self.counters["undeliverable"] += 1
        if len(frames) == 3 + wire.ROUTE_FRAMES:
            envelope = self.decode(frames[-1])
            if envelope is not None and isinstance(envelope.msg, wire.Started):
                self.started_streams(worker, envelope.msg)

    def send(self, identity: bytes, body: bytes) -> None:
        self.send_to(self.router, identity, body)

    def handle(self, identity: bytes, envelope: wire.Envelope, body: bytes) -> None:
        accepting = self.accepting
        msg = envelope.msg
        worker = self.workers.get(identity)
        if worker is not None:
            worker.last_seen = time.monotonic()
        if isinstance(msg, wire.Done | wire.Error) and worker is not None:
            self.from_worker(worker, envelope, body)
        elif isinstance(msg, wire.Heartbeat):
            self.heartbeat(identity, envelope, msg)
        elif isinstance(msg, wire.Register):
            self.register(identity, envelope, msg)
        elif isinstance(msg, wire.Infer):
            self.infer(identity, envelope, msg, accepting)
        elif isinstance(msg, wire.Cancel):
            self.cancel(envelope.id)
        elif isinstance(msg, wire.ResolveModel):
            self.send(identity, wire.reply(envelope, self.resolve(msg.ref)))
        elif isinstance(msg, wire.Ping):
            self.send(identity, wire.reply(envelope, self.pong()))
        elif isinstance(msg, wire.StatsRequest):
            self.send(identity, wire.reply(envelope, self.stats()))
        elif isinstance(msg, wire.ListModels):
            self.send(identity, wire.reply(envelope, self.list_models()))
        else:
            self.counters["unexpected_messages"] += 1

    # workers ---------------------------------------------------------------------------------
    def register(self, identity: bytes, envelope: wire.Envelope, msg: wire.Register) -> None:
        other = self.by_worker_id.get(msg.worker_id)
        if other is not None and other.identity != identity:
            self.drop_worker(other, "replaced by a new connection")
        known = self.workers.get(identity)
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
        )
        first = [ref for ref in rec.models if ref not in self.serving]
        if known is not None:
            rec.running = known.running
            self.unindex(known)
            if self.by_worker_id.get(known.worker_id) is known:
                del self.by_worker_id[known.worker_id]
        self.workers[identity] = rec
        self.by_worker_id[rec.worker_id] = rec
        self.index(rec)
        heapq.heappush(
            self.liveness, (rec.last_seen + self.heartbeat_timeout_s, next(self.seq), rec)
        )
        self.counters["registrations"] += 1
        log(
            self.name,
            "worker registered",
            worker=msg.worker_id,
            models=msg.models,
            slots=msg.slots,
            device=msg.device,
        )
        self.send(identity, wire.reply(envelope, wire.Ack(known=True)))
        for ref in first:  # the registry hears when a model gains its first worker, not each time
            self.set_status(ref, "deployed")
        self.pump()

    def heartbeat(self, identity: bytes, envelope: wire.Envelope, msg: wire.Heartbeat) -> None:
        worker = self.workers.get(identity)
        if worker is None:
            self.send(identity, wire.reply(envelope, wire.Ack(known=False)))
            return
        worker.served, worker.errors, worker.tokens = msg.served, msg.errors, msg.tokens
        if msg.draining != worker.draining:
            self.open_workers.update({ref: -1 if msg.draining else 1 for ref in worker.models})
            worker.draining = msg.draining
            self.reindex(worker)
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
        self.pump()

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
            return
        msg = envelope.msg
        self.release(worker, envelope.id)
        if isinstance(msg, wire.Error) and not pending.streamed and msg.code in RETRYABLE:
            pending.worker = None
            pending.tried.add(worker.identity)
            self.counters["retries"] += 1
            self.metrics.retries.inc()
            self.requeue(pending)
        elif isinstance(msg, wire.Done):
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
                ok=isinstance(msg, wire.Done),
            )
        )
        if worker is not None:
            self.release(worker, pending.envelope.id)
        queue = self.queues.get(pending.model_ref)
        if queue is not None and pending.envelope.id in queue:
            queue.remove(pending.envelope.id)
        self.counters["finished_" + type(msg).__name__.lower()] += 1
        self.send(pending.gateway, wire.reply(pending.envelope, msg))

    # requests --------------------------------------------------------------------------------
    def resolve(self, ref: str) -> wire.ModelInfo | wire.Error:
        """What a model reference names.  Only a reference never seen before waits for the
        registry; an answer older than RESOLVE_CACHE_S is still used while a fresh one is asked
        for in the background."""
        now = time.monotonic()
        cached = self.resolved.get(ref)
        if cached is not None:
            if cached[0] <= now:
                self.refresh(ref, now)
            return cached[1]
        try:
            reply = self.registry.call(wire.RegistryCall(op="resolve", args={"ref": ref}), 2.0)
        except HaifError as exc:
            return msgspec.structs.replace(exc.to_wire(), retry_after=2.0)
        answer = self.model_info(reply)
        self.resolved[ref] = (now + RESOLVE_CACHE_S, answer)
        return answer

    @staticmethod
    def model_info(reply: wire.Msg) -> wire.ModelInfo | wire.Error:
        if isinstance(reply, wire.RegistryReply) and isinstance(reply.result, dict):
            record = reply.result
            return wire.ModelInfo(
                ref=f"{record['name']}:{record['version']}",
                path=record["path"],
                context_length=record.get("context_length"),
                params=record.get("params") or {},
            )
        if isinstance(reply, wire.Error):
            return reply
        return wire.Error(
            kind=Kind.internal, code="protocol_error", message="unexpected registry answer"
        )

    def refresh(self, ref: str, now: float) -> None:
        """Ask the registry again about ``ref``, once at a time (again if unanswered in time)."""
        asked = self.refreshing.get(ref)
        if asked is not None:
            if asked[1] > now:
                return
            self.refreshes.pop(asked[0], None)
        request_id = wire.new_id()
        self.refreshing[ref] = (request_id, now + RESOLVE_CACHE_S)
        self.refreshes[request_id] = ref
        self.tell_registry(wire.RegistryCall(op="resolve", args={"ref": ref}), request_id)

    def set_status(self, ref: str, status: str) -> None:
        call = wire.RegistryCall(op="set_status", args={"ref": ref, "status": status})
        self.tell_registry(call, wire.new_id())

    def tell_registry(self, call: wire.RegistryCall, request_id: str) -> None:
        try:
            self.registry_link.send(wire.encode(call, request_id), NOBLOCK)
        except zmq.ZMQError:
            self.counters["registry_unsent"] += 1

    def registry_answers(self) -> None:
        """Answers to what tell_registry sent: fresh resolutions, and failed status updates."""
        for frames in incoming(self.registry_link):
            envelope = self.decode(frames[-1])
            if envelope is None:
                continue
            ref = self.refreshes.pop(envelope.id, None)
            if ref is not None:
                self.refreshing.pop(ref, None)
                answer = self.model_info(envelope.msg)
                self.resolved[ref] = (time.monotonic() + RESOLVE_CACHE_S, answer)
            elif isinstance(envelope.msg, wire.Error):
                log(
                    self.name,
                    "could not update model status",
                    level="warning",
                    error=envelope.msg.message,
                )

    def infer(
        self, gateway: bytes, envelope: wire.Envelope, msg: wire.Infer, accepting: bool
    ) -> None:
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
        if envelope.id in self.pending:
            return refuse(
                wire.Error(kind=Kind.invalid, code="duplicate_request", message="request id in use")
            )
        info = self.resolve(str(msg.request.get("model") or self.default_model))
        if isinstance(info, wire.Error):
            return refuse(info)
        if not self.open_workers[info.ref]:
            return refuse(
                wire.Error(
                    kind=Kind.unavailable,
                    code="unavailable",
                    message=f"no worker serves {info.ref}",
                    hint=f"start one: haifctl worker --orchestrator ADDRESS --model {info.ref}",
                    retry_after=2.0,
                )
            )
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
            )
        )
        queue = self.queues.setdefault(info.ref, deque())
        if not queue and self.dispatch(pending):
            self.pending[envelope.id] = pending
            return None
        if len(queue) >= self.queue_size:
            busy = self.busy[info.ref]
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
        worker = self.pick(pending.model_ref, pending.tried)
        if worker is None:
            return False
        if pending.queue_span is not None:
            pending.queue_span.set_attributes(
                {
                    "haif.worker": worker.worker_id,
                    "haif.attempt": pending.attempts + 1,
                    "haif.candidates": self.free_workers[pending.model_ref],
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
        worker.assigned += 1
        worker.running.add(pending.envelope.id)
        for ref in worker.models:
            self.busy[ref] += 1
        self.reindex(worker)
        env = pending.envelope
        self.send(
            worker.identity, wire.encode(pending.infer, env.id, env.deadline, pending.traceparent)
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
        while self.liveness and self.liveness[0][0] < now:
            _, _, worker = heapq.heappop(self.liveness)
            if self.workers.get(worker.identity) is not worker:
                continue  # dropped, or registered again (with an entry of its own)
            if now - worker.last_seen > self.heartbeat_timeout_s:
                self.drop_worker(worker, f"silent for {now - worker.last_seen:.1f}s")
            else:  # heard from since: one entry per worker, moved on to its new deadline
                deadline = worker.last_seen + self.heartbeat_timeout_s
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
        self.queues.setdefault(pending.model_ref, deque()).appendleft(pending.envelope.id)
        self.expire_later(pending)

    # worker index ----------------------------------------------------------------------------
    def index(self, worker: WorkerRec) -> None:
        """Enter a worker, newly in the table, in the per-model indexes."""
        for ref in worker.models:
            self.serving.setdefault(ref, {})[worker.identity] = worker
            self.busy[ref] += len(worker.running)
            if not worker.draining:
                self.open_workers[ref] += 1
        self.reindex(worker)

    def unindex(self, worker: WorkerRec) -> None:
        """Take a worker, just removed from the table, out of the per-model indexes."""
        worker.version = -1  # its heap entries go stale
        for ref in worker.models:
            serving = self.serving.get(ref, {})
            serving.pop(worker.identity, None)
            if not serving:
                self.serving.pop(ref, None)
                self.vacancies.pop(ref, None)
            self.busy[ref] -= len(worker.running)
            if not worker.draining:
                self.open_workers[ref] -= 1
            if worker.listed:
                self.free_workers[ref] -= 1
        worker.listed = False

    def reindex(self, worker: WorkerRec) -> None:
        """After a change in a worker's load or state: a fresh entry in its models' heaps of
        workers with a free slot, which makes the older ones stale."""
        worker.version = next(self.seq)
        free = worker.free > 0
        if free != worker.listed:
            self.free_workers.update({ref: 1 if free else -1 for ref in worker.models})
            worker.listed = free
        if not free:
            return
        entry = (len(worker.running) / worker.slots, worker.assigned, worker.version, worker)
        for ref in worker.models:
            heap = self.vacancies.setdefault(ref, [])
            heapq.heappush(heap, entry)
            if len(heap) > 4 * len(self.serving[ref]) + 64:  # mostly stale: rebuild
                heap[:] = [
                    (len(w.running) / w.slots, w.assigned, w.version, w)
                    for w in self.serving[ref].values()
                    if w.free > 0
                ]
                heapq.heapify(heap)

    def pick(self, ref: str, tried: set[bytes]) -> WorkerRec | None:
        """The least loaded worker of ``ref`` with a free slot (ties: the one sent the fewest
        requests), preferring one this request has not tried."""
        heap = self.vacancies.get(ref)
        if not heap:
            return None
        passed_over: list[tuple[float, int, int, WorkerRec]] = []
        chosen = None
        while heap:
            worker = heap[0][3]
            if worker.version != heap[0][2] or worker.free <= 0:
                heapq.heappop(heap)  # stale
            elif worker.identity in tried:
                passed_over.append(heapq.heappop(heap))
            else:
                chosen = worker
                break
        for entry in passed_over:
            heapq.heappush(heap, entry)
        if chosen is None and passed_over:
            chosen = passed_over[0][3]  # every free worker was tried: the best of them again
        return chosen

    def release(self, worker: WorkerRec, request_id: str) -> None:
        """A request left the worker's slot."""
        if request_id not in worker.running:
            return
        worker.running.discard(request_id)
        if self.workers.get(worker.identity) is worker:
            for ref in worker.models:
                self.busy[ref] -= 1
            self.reindex(worker)

    def list_models(self) -> wire.Msg:
        """Registered models, with how many live workers serve each."""
        try:
            reply = self.registry.call(wire.RegistryCall(op="list"), 2.0)
        except HaifError as exc:
            return msgspec.structs.replace(exc.to_wire(), retry_after=2.0)
        if not isinstance(reply, wire.RegistryReply) or not isinstance(reply.result, list):
            return (
                reply
                if isinstance(reply, wire.Error)
                else wire.Error(
                    kind=Kind.internal, code="protocol_error", message="unexpected registry answer"
                )
            )
        models = []
        for record in reply.result:
            ref = f"{record['name']}:{record['version']}"
            models.append(
                wire.ModelEntry(
                    ref=ref,
                    name=record["name"],
                    aliases=list(record.get("aliases") or []),
                    created_at=str(record.get("created_at", "")),
                    status=str(record.get("status", "")),
                    workers=len(self.serving.get(ref, ())),
                )
            )
        return wire.ModelList(models=models)

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
                )
                for w in self.workers.values()
            ],
            queues={ref: len(q) for ref, q in self.queues.items()},
            counters=dict(self.counters),
            window=self.window(),
            uptime_s=round(now - self.started_mono, 1),
        )

    def stop(self) -> None:
        self.registry.close()
        super().stop()


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
