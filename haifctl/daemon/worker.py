"""The worker daemon: loads a model, joins an orchestrator, runs requests, streams tokens.

One thread per running request generates tokens and hands encoded frames to the main loop over an
inproc socket (ZeroMQ sockets belong to one thread); the main loop owns the orchestrator link,
heartbeats, re-registers when the orchestrator forgets it, and drains on SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import socket as pysocket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import zmq

from haifctl import wire
from haifctl.config import Settings
from haifctl.daemon.base import Daemon, log, socket
from haifctl.errors import HaifError, Kind, Unavailable
from haifctl.generation import load_model, looks_like_path, model_at, render_prompt
from haifctl.rpc import RpcClient
from haifctl.runtime.base import CancelToken, LoadedModel, SamplingParams, TokenEvent
from haifctl.schema import validate_request

FLUSH_EVERY_S = 0.002  # coalesce tokens into frames at most this long after the first
FLUSH_TOKENS = 16


class WorkerDaemon(Daemon):
    name = "worker"

    def __init__(
        self,
        orchestrator: str,
        model_ref: str,
        settings: Settings,
        *,
        worker_id: str | None = None,
        heartbeat_s: float = 0.5,
        orchestrator_timeout_s: float = 3.0,
        drain_grace_s: float = 30.0,
        ready_file: Path | None = None,
    ) -> None:
        super().__init__(ready_file)
        self.orchestrator = orchestrator
        self.model_ref = model_ref
        self.settings = settings
        self.worker_id = worker_id or f"{pysocket.gethostname()}-{os.getpid()}"
        self.heartbeat_s = heartbeat_s
        self.orchestrator_timeout_s = orchestrator_timeout_s
        self.drain_grace_s = drain_grace_s
        self.loaded: LoadedModel | None = None
        self.model: wire.ModelInfo | None = None
        self.cancels: dict[str, CancelToken] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.results_address = f"inproc://results-{uuid.uuid4().hex}"

    # start -----------------------------------------------------------------------------------
    def resolve(self, deadline_s: float = 60.0) -> wire.ModelInfo:
        if looks_like_path(self.model_ref):
            return model_at(self.model_ref)
        rpc = RpcClient(self.ctx, self.orchestrator, "orchestrator")
        end = time.monotonic() + deadline_s
        try:
            while True:
                try:
                    answer = rpc.call(wire.ResolveModel(ref=self.model_ref), timeout=2.0)
                    break
                except Unavailable:
                    if time.monotonic() > end or self.should_exit:
                        raise
                    log(self.name, "waiting for the orchestrator", address=self.orchestrator)
        finally:
            rpc.close()
        if isinstance(answer, wire.Error):
            raise HaifError.from_wire(answer)
        if not isinstance(answer, wire.ModelInfo):
            raise HaifError("protocol_error", f"unexpected answer {type(answer).__name__}")
        return answer

    def start(self) -> None:
        self.results = socket(self.ctx, zmq.PULL)
        self.results.bind(self.results_address)
        self.model = self.resolve()
        started = time.perf_counter()
        self.loaded = load_model(self.settings, self.model)
        self.metrics.model_load.labels(self.model.ref).set(time.perf_counter() - started)
        # One token before joining: the engine thread's first decode sets up its thread pool
        # and buffers, which would otherwise land on the first user's time to first token.
        for _ in self.loaded.generate("", SamplingParams(max_tokens=1, seed=0)):
            pass
        log(
            self.name,
            "model loaded",
            model=self.model.ref,
            path=self.model.path,
            load_ms=round((time.perf_counter() - started) * 1000, 1),
            device=self.loaded.device.backend,
            slots=self.loaded.slots,
        )
        self.gpu = self.gpu_facts()
        self.connect()
        self.endpoints["orchestrator"] = self.orchestrator

    def connect(self) -> None:
        """(Re)open the orchestrator link and announce ourselves."""
        old = getattr(self, "dealer", None)
        if old is not None:
            old.close(linger=0)
        self.dealer = socket(self.ctx, zmq.DEALER)
        self.dealer.setsockopt(zmq.ROUTING_ID, f"{self.worker_id}/{uuid.uuid4().hex[:8]}".encode())
        self.dealer.connect(self.orchestrator)
        self.last_ack = time.monotonic()
        self.register()

    def gpu_facts(self) -> tuple[str, int]:
        """GPU name and memory (MiB) for the registration, when nvidia-smi can tell."""
        assert self.loaded is not None
        if self.loaded.device.backend != "cuda" or shutil.which("nvidia-smi") is None:
            return "", 0
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.splitlines()[0]
            name, memory = (part.strip() for part in out.split(","))
            return name, int(float(memory))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return "", 0

    def register(self) -> None:
        assert self.loaded is not None
        assert self.model is not None
        self.dealer.send(
            wire.encode(
                wire.Register(
                    worker_id=self.worker_id,
                    models=[self.model.ref],
                    slots=self.loaded.slots,
                    device=self.loaded.device.backend,
                    gpu_name=self.gpu[0],
                    gpu_memory_mb=self.gpu[1],
                    n_ctx=self.loaded.info.n_ctx,
                    pid=os.getpid(),
                    host=pysocket.gethostname(),
                )
            )
        )

    # loop ------------------------------------------------------------------------------------
    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.dealer, zmq.POLLIN)
        poller.register(self.results, zmq.POLLIN)
        next_beat = 0.0
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if self.should_exit and drain_until is None:
                drain_until = now + self.drain_grace_s
                log(self.name, "draining", in_flight=len(self.threads))
                next_beat = 0.0  # tell the orchestrator now
            if drain_until is not None and (
                not self.threads or self.force_exit or now > drain_until
            ):
                for token in self.cancels.values():
                    token.cancel()
                break
            if now >= next_beat:
                self.heartbeat(draining=drain_until is not None)
                next_beat = now + self.heartbeat_s
                if now - self.last_ack > self.orchestrator_timeout_s:
                    log(self.name, "orchestrator silent; reconnecting", level="warning")
                    poller.unregister(self.dealer)
                    self.connect()
                    poller.register(self.dealer, zmq.POLLIN)
            timeout = max(1, int((next_beat - time.monotonic()) * 1000))
            events = dict(poller.poll(min(timeout, 50)))
            if self.results in events:
                self.drain_results()
            if self.dealer in events:
                self.safely(self.drain_orchestrator, drain_until is None)

    def heartbeat(self, draining: bool) -> None:
        self.dealer.send(
            wire.encode(
                wire.Heartbeat(
                    worker_id=self.worker_id,
                    busy=len(self.threads),
                    served=self.counters["served"],
                    errors=self.counters["errors"],
                    tokens=self.counters["tokens"],
                    draining=draining,
                )
            )
        )

    def drain_results(self) -> None:
        while True:
            try:
                request_id, body, last = self.results.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.dealer.send(body)
            if last == b"1":
                self.threads.pop(request_id.decode(), None)
                self.cancels.pop(request_id.decode(), None)

    def drain_orchestrator(self, accepting: bool) -> None:
        while True:
            try:
                frame = self.dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            envelope = self.decode(frame)
            if envelope is None:
                continue
            msg = envelope.msg
            if isinstance(msg, wire.Ack):
                self.last_ack = time.monotonic()
                if not msg.known:
                    log(self.name, "orchestrator does not know us; registering again")
                    self.register()
            elif isinstance(msg, wire.Infer):
                self.last_ack = time.monotonic()
                self.accept(envelope, msg, accepting)
            elif isinstance(msg, wire.Cancel):
                token = self.cancels.get(envelope.id)
                if token is not None:
                    token.cancel()
                    self.counters["cancelled"] += 1
                    log(self.name, "cancelled", request_id=envelope.id)
            elif isinstance(msg, wire.Ping):
                self.dealer.send(wire.reply(envelope, self.pong()))
            else:
                self.counters["unexpected_messages"] += 1

    def accept(self, envelope: wire.Envelope, msg: wire.Infer, accepting: bool) -> None:
        assert self.loaded is not None
        refusal = None
        if not accepting:
            refusal = wire.Error(
                kind=Kind.unavailable, code="worker_draining", message="the worker is shutting down"
            )
        elif len(self.threads) >= self.loaded.slots:
            refusal = wire.Error(
                kind=Kind.overloaded, code="worker_busy", message="no free slot on this worker"
            )
        elif envelope.id in self.threads:
            refusal = wire.Error(
                kind=Kind.invalid, code="duplicate_request", message="request id already running"
            )
        if refusal is not None:
            self.dealer.send(wire.reply(envelope, refusal))
            return
        self.cancels[envelope.id] = CancelToken()
        thread = threading.Thread(
            target=self.generate, args=(envelope, msg), name=f"gen-{envelope.id[:8]}", daemon=True
        )
        self.threads[envelope.id] = thread
        thread.start()

    # generation thread -----------------------------------------------------------------------
    def generate(self, envelope: wire.Envelope, msg: wire.Infer) -> None:
        assert self.loaded is not None
        assert self.model is not None
        push = socket(self.ctx, zmq.PUSH)
        push.connect(self.results_address)
        rid = envelope.id.encode()

        def send(m: wire.Msg, last: bool = False) -> None:
            push.send_multipart([rid, wire.reply(envelope, m), b"1" if last else b"0"])

        started = time.perf_counter()
        started_ns = time.time_ns()
        first: float | None = None
        pending: list[str] = []
        n_pending = 0
        flushed_at = started
        try:
            request = validate_request(msg.request, "request")
            params = request.sampling(msg.model_params, self.settings.max_tokens)
            prompt = render_prompt(request, self.loaded)
            for event in self.loaded.generate(prompt, params, self.cancels[envelope.id]):
                now = time.perf_counter()
                if event.n_tokens and first is None:
                    first = now
                if event.text or event.n_tokens:
                    pending.append(event.text)
                    n_pending += event.n_tokens
                # First token at once (time to first token), then coalesce for throughput.
                if pending and (
                    event.finish_reason is not None
                    or first == now
                    or n_pending >= FLUSH_TOKENS
                    or now - flushed_at >= FLUSH_EVERY_S
                ):
                    send(wire.Chunk(text="".join(pending), n_tokens=n_pending))
                    pending, n_pending, flushed_at = [], 0, now
                if event.finish_reason is not None:
                    self.record(event, started, first, now)
                    self.trace(envelope, started_ns, started, first, now, event, None)
                    self.counters["served"] += 1
                    self.counters["tokens"] += event.completion_tokens
                    send(
                        wire.Done(
                            finish_reason=event.finish_reason,
                            prompt_tokens=event.prompt_tokens,
                            completion_tokens=event.completion_tokens,
                            model=self.model.ref,
                            worker=self.worker_id,
                            time_to_first_token_ms=(
                                round((first - started) * 1000, 3) if first else None
                            ),
                            generation_ms=round((now - started) * 1000, 3),
                        ),
                        last=True,
                    )
                    return
            raise HaifError("internal_error", "the runtime ended a stream without finishing it")
        except HaifError as exc:
            self.counters["errors"] += 1
            self.metrics.requests.labels(self.name, "generate", exc.code).inc()
            now = time.perf_counter()
            self.trace(envelope, started_ns, started, first, now, None, exc.code)
            send(exc.to_wire(), last=True)
        except Exception as exc:  # never let one request kill the worker
            self.counters["errors"] += 1
            log(self.name, "generation failed", level="error", error=repr(exc))
            send(
                wire.Error(
                    kind=Kind.internal, code="internal_error", message=f"worker error: {exc}"
                ),
                last=True,
            )
        finally:
            push.close(linger=-1)

    def record(self, event: TokenEvent, started: float, first: float | None, now: float) -> None:
        assert self.model is not None
        model = self.model.ref
        m = self.metrics
        m.requests.labels(self.name, "generate", event.finish_reason or "stop").inc()
        m.request_duration.labels(self.name, "generate").observe(now - started)
        m.prompt_tokens.labels(model).inc(event.prompt_tokens)
        m.generated_tokens.labels(model).inc(event.completion_tokens)
        if first is not None:
            m.ttft.labels(self.name, model).observe(first - started)
            if event.completion_tokens > 1:
                m.tpot.labels(model).observe((now - first) / (event.completion_tokens - 1))

    def trace(
        self,
        envelope: wire.Envelope,
        started_ns: int,
        started: float,
        first: float | None,
        now: float,
        event: TokenEvent | None,
        error: str | None,
    ) -> None:
        """Spans for one generation: the whole of it, prompt processing, and decoding."""
        if self.tracing is None:
            return
        from opentelemetry import trace as otel
        from opentelemetry.trace import StatusCode

        from haifctl.tracing import parent_context

        def at(t: float) -> int:
            return started_ns + int((t - started) * 1e9)

        tracer = self.tracing.tracer
        span = tracer.start_span(
            "worker generate",
            context=parent_context(envelope.traceparent),
            start_time=started_ns,
            attributes={
                "haif.request_id": envelope.id,
                "haif.worker": self.worker_id,
                "haif.model": self.model.ref if self.model else "",
            },
        )
        inside = otel.set_span_in_context(span)
        if event is not None:
            span.set_attributes(
                {
                    "haif.finish_reason": event.finish_reason or "",
                    "haif.prompt_tokens": event.prompt_tokens,
                    "haif.completion_tokens": event.completion_tokens,
                }
            )
            prompt = tracer.start_span(
                "prompt processing",
                context=inside,
                start_time=started_ns,
                attributes={"haif.prompt_tokens": event.prompt_tokens},
            )
            prompt.end(end_time=at(first if first is not None else now))
            if first is not None:
                decode = tracer.start_span(
                    "generation",
                    context=inside,
                    start_time=at(first),
                    attributes={"haif.completion_tokens": event.completion_tokens},
                )
                decode.end(end_time=at(now))
        if error is not None:
            span.set_status(StatusCode.ERROR, error)
        span.end(end_time=at(now))

    def stop(self) -> None:
        for thread in list(self.threads.values()):
            thread.join(timeout=5)
        if self.loaded is not None:
            self.loaded.close()
        super().stop()
