"""The bridge's edge: who may call (API keys, or loopback while none exist), how much a client
may send and hold (body size, head and body timeouts, connections per address), and the
request's span and metrics.  All of it runs before a route reads the body."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI
from opentelemetry.trace import StatusCode

from haifctl import tracing, wire
from haifctl.daemon.base import log
from haifctl.daemon.bridge.direct import ROUTES, serve
from haifctl.daemon.bridge.errors import HTTPError, error_response, status_of
from haifctl.errors import HaifError, Kind, Unavailable
from haifctl.keys import KeyStore
from haifctl.telemetry import Metrics
from haifctl.tracing import SpanKind, child_traceparent, parent_context

if TYPE_CHECKING:
    from haifctl.config import Settings

# One size limit from the HTTP edge to the ZeroMQ link: a body the bridge accepts fits one frame
# to the gateway (whose socket drops the whole connection, every client's replies with it, on a
# larger message), and a request that still grows past the frame cap once encoded is refused.
MAX_BODY_BYTES = wire.MAX_FRAME_BYTES

NO_KEYS_HINT = (
    "create one with `haifctl keys create --name NAME` (or set HAIF_API_KEYS); the bridge "
    "takes it up at once"
)
# A refusal made before the body is read closes the connection: the client stops sending a body
# nobody reads (and uvicorn stops buffering it).
CLOSE = {"Connection": "close"}


@dataclass(frozen=True)
class EdgeLimits:
    """What one HTTP client may hold at the bridge: the ``bridge_*`` settings."""

    header_timeout_s: float = 10.0
    idle_timeout_s: float = 15.0
    max_client_connections: int = 256

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgeLimits:
        return cls(
            header_timeout_s=settings.bridge_header_timeout,
            idle_timeout_s=settings.bridge_idle_timeout,
            max_client_connections=settings.bridge_max_client_connections,
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def protected(path: str) -> bool:
    """The routes that need a key: the OpenAI API, ``/infer``, ``/tokenize`` and
    ``/detokenize`` (health, docs and the chat page stay open)."""
    return path == "/v1" or path.startswith(("/v1/", "/infer", "/tokenize", "/detokenize"))


class Auth:
    """Who may use the protected routes: a holder of an API key or, while none is configured,
    anyone, but only on a bridge bound to loopback.  A bridge on another address without keys
    (the last one revoked while it runs) refuses everyone: it never serves off loopback without
    keys.  Keys are looked up on every request, so a created or revoked key counts at once; each
    change of state is logged once."""

    def __init__(self, keys: KeyStore, host: str) -> None:
        self.keys = keys
        self.host = host
        self.loopback = is_loopback(host)
        self.state = ""

    def mode(self) -> Literal["keys", "loopback", "locked"]:
        """``keys``; ``loopback`` (no keys, open to local clients); or ``locked`` (no keys off
        loopback: every protected route is refused)."""
        mode: Literal["keys", "loopback", "locked"] = (
            "keys" if self.keys.enabled else ("loopback" if self.loopback else "locked")
        )
        if mode != self.state:
            if mode == "locked":
                log(
                    "bridge",
                    "no API keys: refusing every request",
                    "warning",
                    bind=self.host,
                    hint=NO_KEYS_HINT,
                )
            elif self.state:
                log("bridge", "API keys changed", auth=mode)
            self.state = mode
        return mode

    def locked(self) -> HaifError:
        return Unavailable(
            "no_api_keys",
            f"the bridge listens on {self.host} and has no API keys, so it refuses every request",
            NO_KEYS_HINT,
            retry_after=30.0,
        )

    def check(self, authorization: str) -> str:
        """The caller's key id ("local" on an open loopback bridge), else raise."""
        mode = self.mode()
        if mode == "loopback":
            return "local"
        if mode == "locked":
            raise self.locked()
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        key_id = self.keys.verify(token) if scheme.lower() == "bearer" and token else None
        if key_id is None:
            raise HaifError(
                "unauthorized",
                "missing or invalid API key (send Authorization: Bearer KEY)",
                kind=Kind.unauthorised,
            )
        return key_id


def body_too_large() -> HTTPError:
    return HTTPError("body_too_large", f"request body over {MAX_BODY_BYTES // 1024} KiB")


class Edge:
    """The outermost ASGI layer, in front of the FastAPI app (pure ASGI: no per-chunk task
    hops).  Before the body is read it checks the API key of a protected route and a declared
    Content-Length; while the body is read it counts it (chunked bodies declare no length) and
    answers 413 the moment it passes the limit, or 408 when the client stops sending it.  It
    serves the generating routes itself (``direct``) and hands the others to the app.  It also
    opens the request's span (which lasts until the last byte of a streamed response) and
    counts the request by
    route and status."""

    def __init__(
        self,
        app: FastAPI,
        metrics: Metrics | None,
        tracer: tracing.Tracing | None,
        auth: Auth,
        limits: EdgeLimits,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.tracer = tracer
        self.auth = auth
        self.limits = limits

    def rejected(self, error: HaifError) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels("bridge", error.code).inc()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        state = scope.setdefault("state", {})
        path: str = scope["path"]
        try:
            if protected(path):
                state["key"] = self.auth.check(headers.get(b"authorization", b"").decode("latin-1"))
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                raise body_too_large()
        except HaifError as refusal:
            self.rejected(refusal)
            await error_response(refusal, CLOSE)(scope, receive, send)
            return
        incoming = headers.get(b"traceparent", b"").decode("latin-1")
        state["traceparent"] = incoming
        span = None
        if self.tracer is not None and path.startswith(("/v1/", "/infer")):
            span = self.tracer.tracer.start_span(
                f"{scope['method']} {path}", context=parent_context(incoming), kind=SpanKind.SERVER
            )
            state["traceparent"] = child_traceparent(span)
            state["span"] = span
        started = time.monotonic()
        status = 500
        responding = False  # the response has started
        answered = False  # the edge refused the body itself; the app's answer is dropped
        body_done = False
        received = 0

        async def answer(refusal: HaifError) -> dict[str, Any]:
            nonlocal answered, status
            answered = True
            if not responding:
                self.rejected(refusal)
                status = status_of(refusal)
                await error_response(refusal, CLOSE)(scope, receive, send)
            return {"type": "http.disconnect"}

        async def receiving() -> Any:
            nonlocal body_done, received
            if answered:
                return {"type": "http.disconnect"}
            if body_done:  # e.g. a streamed response listening for the client hanging up
                return await receive()
            try:
                async with asyncio.timeout(self.limits.idle_timeout_s):
                    message = await receive()
            except TimeoutError:
                return await answer(
                    HTTPError(
                        "body_timeout",
                        f"the request body stalled for {self.limits.idle_timeout_s:g} s",
                    )
                )
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    return await answer(body_too_large())
                body_done = not message.get("more_body", False)
            return message

        async def sending(message: Any) -> None:
            nonlocal status, responding
            if answered:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                responding = True
            await send(message)

        try:
            # the generating routes are served here, past no other layer (see ``direct``)
            direct = ROUTES.get(path) if scope["method"] == "POST" else None
            if direct is not None:
                await serve(self.app, direct, scope, receiving, sending)
            else:
                await self.app(scope, receiving, sending)
        except Exception:
            if not answered:  # the app failing over a body the edge refused is no error
                raise
        finally:
            if span is not None:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
                span.end()
            if self.metrics is not None:
                route = getattr(scope.get("route"), "path", "other")
                self.metrics.requests.labels("bridge", route, str(status)).inc()
                self.metrics.request_duration.labels("bridge", route).observe(
                    time.monotonic() - started
                )


def edge_protocol(limits: EdgeLimits) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol with what it lacks against slow and greedy clients: a
    deadline for each request head (uvicorn's keep-alive timeout only covers a silent
    connection between requests, so one that trickles a head, or sends none, is held forever),
    and a cap on the connections one client address holds at once (one past it gets a 429 and
    is closed).  A stalled body is the edge's (``Edge``: 408)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    per_client: dict[str, int] = {}  # open connections by client address, for this server
    refusal = json.dumps(
        {
            "error": {
                "message": "too many connections from your address "
                f"(at most {limits.max_client_connections})",
                "type": "rate_limit_error",
                "param": None,
                "code": "too_many_connections",
            }
        }
    ).encode()
    too_many = (
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
        b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
        % (len(refusal), refusal)
    )
    timed_out = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"

    class EdgeProtocol(HttpToolsProtocol):
        refused = False
        address = ""
        head_timer: asyncio.TimerHandle | None = None
        head_started = False  # bytes of a request head have come

        def connection_made(self, transport: Any) -> None:
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            cap = limits.max_client_connections
            if cap > 0 and per_client.get(address, 0) >= cap:
                self.refused = True
                transport.write(too_many)
                transport.close()
                return
            self.address = address
            per_client[address] = per_client.get(address, 0) + 1
            super().connection_made(transport)
            self.arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.refused:
                return
            self.disarm_head_timer()
            left = per_client.get(self.address, 1) - 1
            if left > 0:
                per_client[self.address] = left
            else:
                per_client.pop(self.address, None)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self.refused:
                super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.head_started = True
            if self.head_timer is None:
                self.arm_head_timer()

        def on_headers_complete(self) -> None:
            self.disarm_head_timer()
            self.head_started = False
            super().on_headers_complete()

        def arm_head_timer(self) -> None:
            if limits.header_timeout_s > 0:
                self.head_timer = self.loop.call_later(limits.header_timeout_s, self.head_timed_out)

        def disarm_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def head_timed_out(self) -> None:
            self.head_timer = None
            if not self.transport.is_closing():
                if self.head_started:
                    self.transport.write(timed_out)
                self.transport.close()

    return EdgeProtocol
