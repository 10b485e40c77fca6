"""The gateway: the cluster's RPC front door.

Validates every request against the schema and the limits, rate-limits per client key (token
bucket) and caps its requests in flight, refuses revoked keys, attaches a deadline, forwards to
the orchestrator and relays the token stream back.  Invalid requests are answered with a typed
error and never forwarded.  Several gateways share those limits through Redis when one is
configured (see :mod:`haifctl.coordination`); each records the usage of every request that ends
with the registry (see :mod:`haifctl.usage`).

It watches the orchestrator: pings every second, and the orchestrator's instance id in each
Pong.  An orchestrator silent for ``orchestrator_timeout_s`` or answering under a new instance
id is lost: every stream that had started ends with an explicit ``orchestrator_lost`` error,
and every request that had not is sent again (same id, so a live orchestrator that only
stalled recognises it) once an orchestrator answers, or answered 503 after
``ORCHESTRATOR_GRACE_S``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq
from opentelemetry.trace import StatusCode

from haifctl import wire
from haifctl.coordination import (
    RATE_LIMITED,
    TOO_MANY_CONCURRENT,
    Coordinator,
    Decision,
    KeyLimits,
)
from haifctl.daemon.base import (
    Daemon,
    incoming,
    log,
    trace_id,
)
from haifctl.errors import HaifError, InvalidInput, Kind, Unavailable
from haifctl.schema import MAX_TOKENS_HINT, InferenceRequest, Request, validate_any
from haifctl.security import ADMIN, BRIDGE, GATEWAY
from haifctl.tracing import Span, SpanKind, child_traceparent, parent_context
from haifctl.usage import UsageRecorder

PING_EVERY_S = 1.0
ORCHESTRATOR_GRACE_S = 10.0  # unstarted requests wait this long for a lost orchestrator


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 256 * 1024
    max_tokens_cap: int = 4096
    request_timeout_s: float = 300.0
    rate_per_s: float = 50.0  # per client key
    burst: float = 100.0
    max_concurrent_per_key: int = 0  # requests in flight per client key (0: no cap)


@dataclass
class Route:
    client: bytes
    deadline: float
    stats: bool = False
    started: float = 0.0
    request_id: str = ""
    traceparent: str = ""
    client_key: str = ""
    span: Span | None = None
    model: str = ""  # as the request named it (the Done names the model that served it)
    forward: bytes = b""  # what was sent to the orchestrator, to send again if it is lost
    sent: bool = False  # forwarded to the orchestrator we have now
    streamed: bool = False  # its first text has passed: never sent again


@dataclass
class Pending:
    """A valid request waiting for its admission (the limits shared through Redis answer
    asynchronously); it becomes a :class:`Route` once admitted."""

    identity: bytes
    envelope: wire.Envelope
    request: Request
    key: str
    cancelled: bool = False


class GatewayDaemon(Daemon):
    name = "gateway"
    listens = True

    def __init__(
        self,
        bind_address: str,
        orchestrator: str,
        *,
        limits: Limits | None = None,
        drain_grace_s: float = 30.0,
        orchestrator_timeout_s: float = 3.0,
        ready_file: Path | None = None,
        registry: str = "",
        redis_url: str = "",
        redis_prefix: str = "haif",
    ) -> None:
        super().__init__(ready_file)
        self.bind_address = bind_address
        self.orchestrator = orchestrator
        self.limits = limits or Limits()
        self.drain_grace_s = drain_grace_s
        self.next_ping = 0.0
        self.routes: dict[str, Route] = {}
        self.admitting: dict[str, Pending] = {}  # waiting for the shared limits' answer
        self.registry = registry  # where usage goes; "" records none
        self.redis_url = redis_url
        self.redis_prefix = redis_prefix
        self.limiter: Coordinator | None = None
        self.usage: UsageRecorder | None = None
        self.last_orchestrator_pong = 0.0
        self.orchestrator_timeout_s = orchestrator_timeout_s
        self.orchestrator_instance = ""
        self.lost_since: float | None = None  # the orchestrator is lost: since when
        self.abandoned: list[str] = []  # streams failed when it was lost: cancelled if it stalled
        self.identity = f"gateway/{uuid.uuid4().hex[:12]}".encode()

    def start(self) -> None:
        self.router, self.endpoints["rpc"] = self.listen(zmq.ROUTER, self.bind_address)
        self.watch(self.router, self.read_clients)
        self.connect()
        self.last_orchestrator_pong = time.monotonic()  # silence is counted from here
        self.metrics.limits_shared.set(0)
        self.limiter = Coordinator(
            KeyLimits(
                self.limits.rate_per_s, self.limits.burst, self.limits.max_concurrent_per_key
            ),
            self.ctx,
            redis_url=self.redis_url,
            prefix=self.redis_prefix,
            on_change=self.limits_changed,
        )
        limiter = self.limiter
        if limiter.socket is not None:
            self.watch(limiter.socket, lambda: self.admitted(limiter.decisions()))
        if self.registry:
            sock = self.dial(zmq.DEALER, self.registry, GATEWAY)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # no registry connected: keep the rows here
            sock.connect(self.registry)
            usage = self.usage = UsageRecorder(sock, self.metrics)
            self.watch(sock, lambda: usage.read(self.decode))

    def limits_changed(self, shared: bool, why: str) -> None:
        """Redis went away or came back (called from the coordination thread)."""
        self.metrics.limits_shared.set(1 if shared else 0)
        if shared:
            log(self.name, "limits shared through redis", prefix=self.redis_prefix)
        else:
            self.metrics.limits_fallbacks.inc()
            log(self.name, "redis unreachable: local limits", level="warning", error=why[:200])

    def health_detail(self) -> dict[str, Any]:
        """How the limits are kept (``shared``, ``local``, or ``local-fallback`` while Redis is
        away) and the usage rows waiting for the registry: facts, not readiness (no request
        fails for either)."""
        detail: dict[str, Any] = {"limits": self.limiter.mode if self.limiter else "local"}
        if self.usage is not None:
            detail["usage_pending"] = self.usage.pending
        return detail

    def stop(self) -> None:
        if self.limiter is not None:
            self.limiter.close()
        super().stop()

    def connect(self) -> None:
        """A fresh link to the orchestrator under our stable identity: whatever the old one
        had queued for a lost orchestrator is dropped, never delivered late."""
        old = getattr(self, "dealer", None)
        if old is not None:
            self.unwatch(old)
            old.close(linger=0)
        self.dealer = self.dial(zmq.DEALER, self.orchestrator, GATEWAY)
        self.dealer.setsockopt(zmq.ROUTING_ID, self.identity)
        self.dealer.connect(self.orchestrator)
        self.watch(self.dealer, self.read_orchestrator)

    @property
    def orchestrator_ok(self) -> bool:
        return self.lost_since is None and self.orchestrator_instance != ""

    def pong(self) -> wire.Pong:
        pong = super().pong()
        return wire.Pong(
            daemon=pong.daemon,
            pid=pong.pid,
            version=pong.version,
            ready=self.started and self.orchestrator_ok,
        )

    def ready_checks(self) -> dict[str, bool]:
        """Ready with an orchestrator that answers its pings (and has not restarted since)."""
        return {**super().ready_checks(), "orchestrator": self.orchestrator_ok}

    # loop ------------------------------------------------------------------------------------
    def in_flight(self) -> int:
        return len(self.routes) + len(self.admitting)

    def on_tick(self, now: float) -> None:
        if now >= self.next_ping:
            self.dealer.send(wire.encode(wire.Ping(), "gateway-ping"))
            self.next_ping = now + min(PING_EVERY_S, self.orchestrator_timeout_s / 4)
        if self.usage is not None:
            self.usage.tick(now)
        silent = now - self.heard_since(self.last_orchestrator_pong)
        if self.lost_since is None and silent > self.orchestrator_timeout_s:
            self.orchestrator_lost(f"silent for {silent:.1f}s")
        self.sweep()

    def on_drain(self) -> None:
        if self.lost_since is not None:
            self.answer_unsent("the gateway is shutting down and the orchestrator is away")

    # the orchestrator's health ---------------------------------------------------------------
    def orchestrator_pong(self, pong: wire.Pong) -> None:
        self.last_orchestrator_pong = time.monotonic()
        if self.orchestrator_instance and pong.instance != self.orchestrator_instance:
            if self.lost_since is None:
                self.orchestrator_lost("restarted")
            self.abandoned.clear()  # a new orchestrator never knew them
        elif self.lost_since is not None:
            for request_id in self.abandoned:  # it only stalled: stop what we gave up on
                self.dealer.send(wire.encode(wire.Cancel(), request_id))
            self.abandoned.clear()
        self.orchestrator_instance = pong.instance
        if self.lost_since is not None:
            unsent = [route for route in self.routes.values() if not route.sent]
            log(self.name, "orchestrator answering", instance=pong.instance, resent=len(unsent))
            self.lost_since = None
            for route in unsent:
                self.counters["resent"] += 1
                self.dealer.send(route.forward)
                route.sent = True

    def orchestrator_lost(self, why: str) -> None:
        """Answer every started stream with an error now; keep the rest to send again."""
        self.lost_since = time.monotonic()
        self.counters["orchestrator_losses"] += 1
        self.metrics.orchestrator_losses.inc()
        failed = 0
        for request_id, route in list(self.routes.items()):
            if route.stats or route.streamed:
                failed += 1
                if not route.stats:
                    self.abandoned.append(request_id)
                self.answer(
                    request_id,
                    wire.Error(
                        kind=Kind.unavailable,
                        code="orchestrator_lost",
                        message=f"the orchestrator went away mid-request ({why})",
                        hint="retry the request",
                        retry_after=2.0,
                    ),
                )
            else:
                route.sent = False
        log(
            self.name,
            "orchestrator lost",
            level="warning",
            reason=why,
            failed=failed,
            waiting=len(self.routes),
        )
        self.connect()

    def answer_unsent(self, why: str) -> None:
        for request_id, route in list(self.routes.items()):
            if not route.sent:
                self.answer(
                    request_id,
                    wire.Error(
                        kind=Kind.unavailable,
                        code="unavailable",
                        message=f"no orchestrator to run the request: {why}",
                        hint="retry shortly; `haifctl status` shows the cluster",
                        retry_after=2.0,
                    ),
                )

    def answer(self, request_id: str, error: wire.Error) -> None:
        """End a request here with ``error``: forget its route, count it, tell its client."""
        route = self.routes.pop(request_id)
        if not route.stats:
            self.observe(route, error)
        self.to_client(route.client, wire.encode(error, request_id))

    def release(self, route: Route) -> None:
        """An admitted request has ended: give its concurrency slot back."""
        if self.limiter is not None and self.limits.max_concurrent_per_key > 0:
            self.limiter.release(route.request_id, route.client_key)

    def read_clients(self) -> None:
        self.read_router(self.router, self.from_client)

    def read_orchestrator(self) -> None:
        """[body] is a message to decode; [client, body] a stream frame, forwarded as bytes."""
        link = self.dealer
        for frames in incoming(link):
            # anything from the orchestrator proves it alive (its Pong also names its instance)
            self.last_orchestrator_pong = time.monotonic()
            if len(frames) == 1:
                self.safely(self.from_orchestrator, frames[0])
            elif 2 <= len(frames) <= 3:
                try:
                    self.router.send_multipart(frames[:2], zmq.NOBLOCK)
                except zmq.ZMQError:
                    self.counters["undeliverable"] += 1
                if len(frames) == 3:  # a Started note: these streams can no longer be resent
                    self.safely(self.mark_started, frames[2])
            else:
                self.count_malformed()
            if self.dealer is not link:
                return  # a restarted orchestrator's Pong made a new link: the old one is closed

    def mark_started(self, note: bytes) -> None:
        envelope = self.decode(note)
        if envelope is not None and isinstance(envelope.msg, wire.Started):
            for request_id in envelope.msg.ids:
                route = self.routes.get(request_id)
                if route is not None:
                    route.streamed = True

    def to_client(self, identity: bytes, body: bytes) -> None:
        self.send_to(self.router, identity, body)

    def from_client(self, identity: bytes, envelope: wire.Envelope, body: bytes, role: str) -> None:
        accepting = self.accepting
        msg = envelope.msg
        if role not in (BRIDGE, ADMIN):  # the handshake already refuses anyone else
            self.refuse_role(role, type(msg).__name__.lower())
            return
        if isinstance(msg, wire.Infer):
            # The client's identity for rate limits and logs: the API key the bridge checked,
            # or our own name for the peer; never a name another peer put in the message.
            client = (msg.client or "bridge") if role == BRIDGE else f"{role}:{identity.hex()}"
            self.infer(identity, envelope, msg, accepting, client)
        elif isinstance(msg, wire.Cancel):
            pending = self.admitting.get(envelope.id)
            if pending is not None and pending.identity == identity:
                pending.cancelled = True  # its admission, when it comes, is given back
            route = self.routes.get(envelope.id)
            if route is not None and route.client == identity:
                del self.routes[envelope.id]
                self.dealer.send(wire.encode(wire.Cancel(), envelope.id))
                if not route.stats:
                    self.observe(route, None)
        elif isinstance(msg, wire.Ping):
            self.to_client(identity, wire.reply(envelope, self.pong()))
        elif isinstance(msg, wire.StatsRequest | wire.ListModels):
            if not envelope.id or envelope.id in self.routes:
                return
            forward = wire.encode(msg, envelope.id)
            route = Route(identity, time.monotonic() + 5.0, stats=True, forward=forward)
            self.routes[envelope.id] = route
            if self.lost_since is None:
                self.dealer.send(forward)
                route.sent = True
        else:
            self.counters["unexpected_messages"] += 1

    def infer(
        self,
        identity: bytes,
        envelope: wire.Envelope,
        msg: wire.Infer,
        accepting: bool,
        key: str,
    ) -> None:
        def refuse(error: HaifError) -> None:
            self.refuse(identity, envelope, error)

        if not envelope.id or envelope.id in self.routes or envelope.id in self.admitting:
            return refuse(InvalidInput("invalid_request", "missing or duplicate request id"))
        if not accepting:
            return refuse(
                Unavailable("unavailable", "the gateway is shutting down", retry_after=2.0)
            )
        try:
            request = validate_any(msg.request, "request")
        except HaifError as exc:
            return refuse(exc)
        if isinstance(request, InferenceRequest):
            size = len(request.prompt or "") + sum(len(m.content) for m in request.messages or [])
            size += len(request.system or "")
        else:  # embed, tokenize, detokenize: the text (or token ids) they carry
            size = request.size
        if size > self.limits.max_prompt_chars:
            return refuse(
                InvalidInput(
                    "prompt_too_large",
                    f"the prompt is {size} characters; the limit is {self.limits.max_prompt_chars}",
                    "shorten the prompt",
                )
            )
        max_tokens = request.max_tokens if isinstance(request, InferenceRequest) else None
        if max_tokens is not None and max_tokens > self.limits.max_tokens_cap:
            return refuse(
                InvalidInput(
                    "invalid_request",
                    f"max_tokens: {max_tokens} is over the limit of {self.limits.max_tokens_cap}",
                    MAX_TOKENS_HINT,
                )
            )
        limiter = self.limiter
        assert limiter is not None  # made in start(), before any message is read
        if limiter.revoked(key):
            return refuse(
                HaifError(
                    "key_revoked",
                    "this API key has been revoked",
                    "ask for a new key",
                    kind=Kind.unauthorised,
                )
            )
        pending = Pending(identity, envelope, request, key)
        hold_s = self.limits.request_timeout_s + 5.0  # a dead gateway's slots expire by then
        decision = limiter.admit(envelope.id, key, hold_s)
        if decision is None:  # the shared limits answer on their socket
            self.admitting[envelope.id] = pending
            return None
        self.admitted([decision], pending)
        return None

    def admitted(self, decisions: Iterable[Decision], pending: Pending | None = None) -> None:
        """Forward each admitted request; refuse the others with how long to wait."""
        for decision in decisions:
            waiting = pending or self.admitting.pop(decision.request_id, None)
            if waiting is None:  # cannot happen: every admission is answered once
                self.counters["stray_admissions"] += 1
                continue
            if waiting.cancelled:
                if decision.admitted and self.limiter is not None:
                    self.limiter.release(decision.request_id, waiting.key)
                continue
            if decision.admitted:
                self.forward(waiting)
                continue
            key = waiting.key
            if decision.reason == TOO_MANY_CONCURRENT:
                error = HaifError(
                    TOO_MANY_CONCURRENT,
                    f"client {key[:16]} has {self.limits.max_concurrent_per_key} requests in "
                    "flight, its limit",
                    "wait for one to finish",
                    kind=Kind.overloaded,
                    retry_after=round(decision.wait_s, 3),
                )
            else:
                error = HaifError(
                    RATE_LIMITED,
                    f"too many requests for client {key[:16]}",
                    "slow down",
                    kind=Kind.overloaded,
                    retry_after=round(decision.wait_s, 3),
                )
            self.refuse(waiting.identity, waiting.envelope, error)

    def refuse(self, identity: bytes, envelope: wire.Envelope, error: HaifError) -> None:
        self.counters[f"rejected_{error.code}"] += 1
        self.metrics.rejected.labels(self.name, error.code).inc()
        self.metrics.requests.labels(self.name, "infer", error.code).inc()
        self.to_client(identity, wire.reply(envelope, error.to_wire()))

    def forward(self, pending: Pending) -> None:
        identity, envelope, request, key = (
            pending.identity,
            pending.envelope,
            pending.request,
            pending.key,
        )
        now = time.time()
        deadline = now + self.limits.request_timeout_s
        if envelope.deadline > 0:
            deadline = min(deadline, envelope.deadline)
        mono_deadline = time.monotonic() + (deadline - now)
        span = None
        traceparent = envelope.traceparent
        if self.tracing is not None:
            span = self.tracing.tracer.start_span(
                "gateway infer",
                context=parent_context(envelope.traceparent),
                kind=SpanKind.SERVER,
                attributes={"haif.request_id": envelope.id, "haif.client": key},
            )
            traceparent = child_traceparent(span)
        forward = wire.Infer(request=msgspec.to_builtins(request), client=key, route=[identity])
        route = self.routes[envelope.id] = Route(
            identity,
            mono_deadline,
            started=time.monotonic(),
            request_id=envelope.id,
            traceparent=traceparent,
            client_key=key,
            span=span,
            model=request.model or "",
            forward=wire.encode(forward, envelope.id, deadline, traceparent),
        )
        if self.lost_since is None:
            self.dealer.send(route.forward)
            route.sent = True
        self.counters["forwarded"] += 1

    def from_orchestrator(self, body: bytes) -> None:
        envelope = self.decode(body)
        if envelope is None:
            return
        msg = envelope.msg
        if isinstance(msg, wire.Pong) and envelope.id == "gateway-ping":
            self.orchestrator_pong(msg)
            return
        route = self.routes.get(envelope.id)
        if route is None:
            self.counters["stray_replies"] += 1
            return
        if isinstance(msg, wire.Stats) and route.stats:
            counters = {**msg.counters, **{f"gateway_{k}": v for k, v in self.counters.items()}}
            merged = msgspec.structs.replace(msg, counters=counters)
            body = wire.reply(envelope, merged)
        self.routes.pop(envelope.id, None)
        if not route.stats:
            self.observe(route, msg)
        self.to_client(route.client, body)

    def observe(self, route: Route, msg: wire.Msg | None) -> None:
        """A request has ended (``msg`` None: its client cancelled it): give back its slot,
        end its span, log it, count it, and record its usage."""
        now = time.monotonic()
        self.release(route)
        if msg is None:
            outcome = "cancelled"
        else:
            ok = isinstance(msg, wire.Done | wire.Embeddings | wire.Tokens)
            outcome = "ok" if ok else getattr(msg, "code", "error")
        done = msg if isinstance(msg, wire.Done) else None
        # an embedding or token answer, summed up as a generation would be: its model, its
        # worker, and the tokens an embed read
        answer = msg if isinstance(msg, wire.Embeddings | wire.Tokens) else None
        if answer is not None:
            done = wire.Done(
                finish_reason="stop",
                prompt_tokens=answer.prompt_tokens if isinstance(answer, wire.Embeddings) else 0,
                completion_tokens=0,
                model=answer.model,
                worker=answer.worker,
                time_to_first_token_ms=None,
                generation_ms=0.0,
            )
        if route.span is not None:
            route.span.set_attribute("haif.outcome", outcome)
            if done is not None:
                route.span.set_attributes(
                    {
                        "haif.model": done.model,
                        "haif.worker": done.worker,
                        "haif.completion_tokens": done.completion_tokens,
                    }
                )
            else:
                route.span.set_status(StatusCode.ERROR, outcome)
            route.span.end()
        log(
            self.name,
            "request finished",
            level="info" if done else "warning",
            request_id=route.request_id,
            trace_id=trace_id(route.traceparent),
            client=route.client_key,
            outcome=outcome,
            duration_ms=round((now - route.started) * 1000, 3),
            model=done.model if done else None,
            worker=done.worker if done else None,
            tokens=done.completion_tokens if done else 0,
        )
        self.metrics.requests.labels(self.name, "infer", outcome).inc()
        self.metrics.request_duration.labels(self.name, "infer").observe(now - route.started)
        ttft: float | None = None
        if isinstance(msg, wire.Done) and msg.time_to_first_token_ms is not None:
            # Stream frames pass through undecoded: the first token reached us when the
            # request's time here, less what the worker spent after its first token, had passed.
            after_first = (msg.generation_ms - msg.time_to_first_token_ms) / 1000
            ttft = max(0.0, now - route.started - after_first)
            self.metrics.ttft.labels(self.name, msg.model).observe(ttft)
        elif isinstance(msg, wire.Error):
            self.metrics.rejected.labels(self.name, msg.code).inc()
        if self.usage is not None:
            self.usage.add(
                route.request_id,
                route.client_key,
                done.model if done else route.model,
                done.worker if done else "",
                done.prompt_tokens if done else 0,
                done.completion_tokens if done else 0,
                None if ttft is None else round(ttft * 1000, 3),
                round((now - route.started) * 1000, 3),
                outcome,
            )

    def sweep(self) -> None:
        now = time.monotonic()
        if self.lost_since is not None and now - self.lost_since > ORCHESTRATOR_GRACE_S:
            self.answer_unsent(f"the orchestrator has been away {ORCHESTRATOR_GRACE_S:g}s")
        for request_id, route in list(self.routes.items()):
            if now > route.deadline + 0.5:
                self.counters["deadline_exceeded"] += 1
                if not route.stats:
                    self.dealer.send(wire.encode(wire.Cancel(), request_id))
                self.answer(
                    request_id,
                    wire.Error(
                        kind=Kind.timeout,
                        code="deadline_exceeded",
                        message="the request ran out of time",
                    ),
                )
