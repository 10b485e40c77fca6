"""The orchestrator: the live worker table, bounded per-model queues, scheduling and failover.

Workers register and heartbeat; a worker silent for ``heartbeat_timeout_s`` is dropped and its
unstarted requests go back to the front of their queue.  A request whose tokens had started to
stream ends with a ``worker_lost`` error instead of a silent retry.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from haifctl import wire
from haifctl.daemon.base import Daemon, bind, log, socket
from haifctl.errors import HaifError, Kind
from haifctl.rpc import RpcClient
from haifctl.tracing import Span, child_traceparent, parent_context

RETRYABLE = {"worker_busy", "worker_draining", "duplicate_request"}
RESOLVE_CACHE_S = 5.0


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
        self.finished: deque[Finished] = deque(maxlen=200_000)

    def start(self) -> None:
        self.started_mono = time.monotonic()
        self.router = socket(self.ctx, zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker takes its name back
        self.endpoints["rpc"] = bind(self.router, self.bind_address)
        self.registry = RpcClient(self.ctx, self.registry_address, "registry")
        self.watch(self.router, self.read)

    # loop ------------------------------------------------------------------------------------
    def read(self) -> None:
        self.read_router(self.router, self.handle, self.relay)

    def in_flight(self) -> int:
        return len(self.pending)

    def on_tick(self, now: float) -> None:
        self.sweep()

    def relay(self, frames: list[bytes]) -> None:
        """A worker's stream frame [worker, gateway, client, body]: forward it to the gateway
        as bytes.  Its arrival is the worker's proof of life."""
        worker = self.workers.get(frames[0])
        if worker is None:
            self.counters["stray_worker_messages"] += 1
            return
        worker.last_seen = time.monotonic()
        self.counters["relayed_frames"] += 1
        try:
            self.router.send_multipart(frames[1:], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.counters["undeliverable"] += 1

    def send(self, identity: bytes, body: bytes) -> None:
        self.send_to(self.router, identity, body)

    def handle(self, identity: bytes, envelope: wire.Envelope, body: bytes) -> None:
        accepting = self.accepting
        msg = envelope.msg
        worker = self.workers.get(identity)
        if worker is not None:
            worker.last_seen = time.monotonic()
        if isinstance(msg, wire.Started) and worker is not None:
            self.started_streams(worker, msg)
        elif isinstance(msg, wire.Done | wire.Error) and worker is not None:
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
        for other in [w for w in self.workers.values() if w.worker_id == msg.worker_id]:
            if other.identity != identity:
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
        if known is not None:
            rec.running = known.running
        self.workers[identity] = rec
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
        for ref in msg.models:
            self.set_status(ref, "deployed")
        self.pump()

    def heartbeat(self, identity: bytes, envelope: wire.Envelope, msg: wire.Heartbeat) -> None:
        worker = self.workers.get(identity)
        if worker is None:
            self.send(identity, wire.reply(envelope, wire.Ack(known=False)))
            return
        worker.served, worker.errors, worker.tokens = msg.served, msg.errors, msg.tokens
        worker.draining = msg.draining
        self.send(identity, wire.reply(envelope, wire.Ack(known=True)))

    def drop_worker(self, worker: WorkerRec, reason: str) -> None:
        self.workers.pop(worker.identity, None)
        for kind in ("busy", "total"):
            with contextlib.suppress(KeyError):
                self.metrics.slots.remove(worker.worker_id, kind)
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
                self.queues.setdefault(pending.model_ref, deque()).appendleft(request_id)
        for ref in worker.models:
            if not any(ref in w.models for w in self.workers.values()):
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
        worker.running.discard(envelope.id)
        if isinstance(msg, wire.Error) and not pending.streamed and msg.code in RETRYABLE:
            pending.worker = None
            pending.tried.add(worker.identity)
            self.counters["retries"] += 1
            self.metrics.retries.inc()
            self.queues.setdefault(pending.model_ref, deque()).appendleft(envelope.id)
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
        if pending.worker is not None and pending.worker in self.workers:
            self.workers[pending.worker].running.discard(pending.envelope.id)
        queue = self.queues.get(pending.model_ref)
        if queue is not None and pending.envelope.id in queue:
            queue.remove(pending.envelope.id)
        self.counters["finished_" + type(msg).__name__.lower()] += 1
        self.send(pending.gateway, wire.reply(pending.envelope, msg))

    # requests --------------------------------------------------------------------------------
    def resolve(self, ref: str) -> wire.ModelInfo | wire.Error:
        now = time.monotonic()
        cached = self.resolved.get(ref)
        if cached is not None and cached[0] > now:
            return cached[1]
        answer: wire.ModelInfo | wire.Error
        try:
            reply = self.registry.call(wire.RegistryCall(op="resolve", args={"ref": ref}), 2.0)
        except HaifError as exc:
            return msgspec.structs.replace(exc.to_wire(), retry_after=2.0)
        if isinstance(reply, wire.RegistryReply) and isinstance(reply.result, dict):
            record = reply.result
            answer = wire.ModelInfo(
                ref=f"{record['name']}:{record['version']}",
                path=record["path"],
                context_length=record.get("context_length"),
                params=record.get("params") or {},
            )
        elif isinstance(reply, wire.Error):
            answer = reply
        else:
            answer = wire.Error(
                kind=Kind.internal, code="protocol_error", message="unexpected registry answer"
            )
        self.resolved[ref] = (now + RESOLVE_CACHE_S, answer)
        return answer

    def set_status(self, ref: str, status: str) -> None:
        try:
            self.registry.call(
                wire.RegistryCall(op="set_status", args={"ref": ref, "status": status}), 1.0
            )
        except HaifError as exc:
            log(self.name, "could not update model status", level="warning", error=exc.message)

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
        if not any(info.ref in w.models and not w.draining for w in self.workers.values()):
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
            busy = sum(len(w.running) for w in self.workers.values() if info.ref in w.models)
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
        candidates = [
            w for w in self.workers.values() if pending.model_ref in w.models and w.free > 0
        ]
        if not candidates:
            return False
        fresh = [w for w in candidates if w.identity not in pending.tried] or candidates
        worker = min(fresh, key=lambda w: (len(w.running) / w.slots, w.assigned))
        worker.assigned += 1
        if pending.queue_span is not None:
            pending.queue_span.set_attributes(
                {
                    "haif.worker": worker.worker_id,
                    "haif.attempt": pending.attempts + 1,
                    "haif.candidates": len(candidates),
                }
            )
            pending.queue_span.end()
            pending.queue_span = None
        self.metrics.queue_wait.labels(pending.model_ref).observe(
            time.monotonic() - pending.enqueued_at
        )
        pending.worker = worker.identity
        pending.attempts += 1
        worker.running.add(pending.envelope.id)
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

    def gauges(self) -> None:
        states = {"ready": 0, "busy": 0, "draining": 0}
        for w in self.workers.values():
            state = "draining" if w.draining else ("busy" if w.free == 0 else "ready")
            states[state] += 1
            self.metrics.slots.labels(w.worker_id, "busy").set(len(w.running))
            self.metrics.slots.labels(w.worker_id, "total").set(w.slots)
        for state, n in states.items():
            self.metrics.workers.labels(state).set(n)
        for ref, queue in self.queues.items():
            self.metrics.queue_depth.labels(ref).set(len(queue))

    def sweep(self) -> None:
        self.gauges()
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if now - worker.last_seen > self.heartbeat_timeout_s:
                self.drop_worker(worker, f"silent for {now - worker.last_seen:.1f}s")
        wall = time.time()
        for queue in self.queues.values():
            for request_id in [r for r in queue if r in self.pending]:
                pending = self.pending[request_id]
                if wire.expired(pending.envelope, wall):
                    self.counters["expired_in_queue"] += 1
                    self.finish(
                        pending,
                        wire.Error(
                            kind=Kind.timeout,
                            code="deadline_exceeded",
                            message="the deadline passed in the queue",
                        ),
                    )

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
                    workers=sum(ref in w.models for w in self.workers.values()),
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
