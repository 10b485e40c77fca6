"""The HTTP bridge: REST ``/infer``, an OpenAI-compatible API with SSE streaming, and the web chat
page, all translated to gateway RPCs.  No business logic lives here: validation, limits and
scheduling are the gateway's and the orchestrator's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import signal
import socket as pysocket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import zmq
import zmq.asyncio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from opentelemetry.trace import StatusCode
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from haifctl import __version__, security, tracing, wire
from haifctl.daemon.base import Daemon, log
from haifctl.errors import HaifError, Kind, Unavailable
from haifctl.keys import KeyStore
from haifctl.schema import MAX_TOKENS_LIMIT, MAX_TOP_K, check_text
from haifctl.telemetry import Metrics
from haifctl.tracing import SpanKind, child_traceparent, parent_context

if TYPE_CHECKING:
    from haifctl.config import Settings

# One size limit from the HTTP edge to the ZeroMQ link: a body the bridge accepts fits one frame
# to the gateway (whose socket drops the whole connection, every client's replies with it, on a
# larger message), and a request that still grows past the frame cap once encoded is refused.
MAX_BODY_BYTES = wire.MAX_FRAME_BYTES
REQUEST_TIMEOUT_S = 300.0

# The HTTP status of each kind of error.
STATUS = {
    Kind.invalid: 400,
    Kind.unauthorised: 401,
    Kind.forbidden: 403,
    Kind.not_found: 404,
    Kind.overloaded: 429,
    Kind.internal: 500,
    Kind.unavailable: 503,
    Kind.timeout: 504,
}
# Invalid input that HTTP has a finer status for: clients act on 413 (shrink the request) where a
# plain 400 would only tell them to fix it.
STATUS_OF_CODE = {"prompt_too_large": 413, "body_too_large": 413, "body_timeout": 408}


def status_of(error: HaifError) -> int:
    return getattr(error, "status", None) or STATUS_OF_CODE.get(error.code) or STATUS[error.kind]


def public_message(error: HaifError) -> str:
    """The message of an error response, which has no field of its own for the hint."""
    return error.message + (f" ({error.hint})" if error.hint else "")


class ClosingStream(StreamingResponse):
    """Closes its body iterator however the response ends, so that a client that disconnects
    mid-stream cancels the generation on the worker right away (not when GC gets to it)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class HTTPError(HaifError):
    """A mistake the bridge finds in a request itself, naming the field it is about (the
    OpenAI error body's ``param``)."""

    kind = Kind.invalid

    def __init__(
        self, code: str, message: str, param: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(code, message)
        self.param = param
        self.status = status


def error_response(error: HaifError, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the OpenAI shape, ``{"error": {"message", "type", "param", "code"}}``: the
    one shape every refusal of the bridge has, whichever layer makes it."""
    status = status_of(error)
    error_type = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        error_type = "authentication_error"
    elif status == 429:
        error_type = "rate_limit_error"
    headers = dict(headers or {})
    if error.retry_after is not None or status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after or 1)))
    body = {
        "error": {
            "message": public_message(error),
            "type": error_type,
            "param": getattr(error, "param", None),
            "code": error.code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


# --- the edge: auth, body limits, trace context, request metrics -----------------------------

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
    """The routes that need a key: the OpenAI API and ``/infer`` (health, docs and the chat
    page stay open)."""
    return path == "/v1" or path.startswith(("/v1/", "/infer"))


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
    """Pure ASGI middleware (no per-chunk task hops, unlike ``@app.middleware``).  Before the
    body is read it checks the API key of a protected route and a declared Content-Length; while
    the body is read it counts it (chunked bodies declare no length) and answers 413 the moment
    it passes the limit, or 408 when the client stops sending it.  It also opens the request's
    span (which lasts until the last byte of a streamed response) and counts the request by
    route and status."""

    def __init__(
        self,
        app: Any,
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


# --- the gateway link ----------------------------------------------------------------------


class GatewayLink:
    """One DEALER to the gateway, shared by every HTTP request; replies routed by request id."""

    def __init__(self, address: str, keyring: security.Keyring | None) -> None:
        self.address = address
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        if keyring is not None:
            keyring.client(self.sock, security.BRIDGE)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(address)
        self.waiting: dict[str, asyncio.Queue[wire.Msg]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.reader = loop.create_task(self._read())
        monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.watcher = loop.create_task(self._watch(monitor))

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Fail every waiting request at once when the connection to the gateway drops (the
        gateway restarted, or refused a frame it could not take): the gateway answers the DEALER
        that reconnects as a new peer, so no reply to a request sent before can arrive, and
        waiting for one would hang each request until its deadline."""
        from zmq.utils.monitor import parse_monitor_message

        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED and self.waiting:
                    lost = Unavailable(
                        "gateway_link_lost",
                        "the connection to the gateway dropped before the answer came",
                        retry_after=1.0,
                    ).to_wire()
                    log("bridge", "gateway link lost", "warning", requests=len(self.waiting))
                    for queue in self.waiting.values():
                        queue.put_nowait(lost)
        finally:
            monitor.close(linger=0)

    async def _read(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                envelope = wire.decode(frame)
            except wire.BadFrame:
                continue
            msg = envelope.msg
            if isinstance(msg, wire.Chunks):  # several streams' text, one frame
                for part in msg.parts:
                    queue = self.waiting.get(part.id)
                    if queue is not None:
                        queue.put_nowait(wire.Chunk(text=part.text, n_tokens=part.n_tokens))
                continue
            queue = self.waiting.get(envelope.id)
            if queue is not None:
                queue.put_nowait(msg)

    async def close(self) -> None:
        for task in (self.reader, self.watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.watcher is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
        self.sock.close(linger=0)
        self.ctx.term()

    def open(
        self, msg: wire.Msg, deadline: float = 0.0, traceparent: str = ""
    ) -> tuple[str, asyncio.Queue[wire.Msg]]:
        """Send one request; raise, leaving nothing waiting, when it cannot go: a message the
        gateway's socket would refuse (over ``wire.MAX_FRAME_BYTES``, which makes libzmq drop the
        whole connection) is a 413 here instead."""
        request_id = wire.new_id()
        try:
            frame = wire.encode(msg, request_id, deadline, traceparent)
        except (UnicodeEncodeError, OverflowError) as exc:
            # the request bodies' validation refuses such values first; this is the backstop
            raise HTTPError(
                "invalid_request", f"the request holds a value that cannot be sent: {exc}"
            ) from None
        if len(frame) > wire.MAX_FRAME_BYTES:
            raise HTTPError(
                "body_too_large",
                f"the request takes {len(frame)} bytes on the wire, over the limit of "
                f"{wire.MAX_FRAME_BYTES} (send fewer or shorter messages)",
            )
        queue: asyncio.Queue[wire.Msg] = asyncio.Queue()
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError:
            raise Unavailable(
                "gateway_unreachable", "the link to the gateway is full", retry_after=1.0
            ) from None
        self.waiting[request_id] = queue
        return request_id, queue

    def done(self, request_id: str) -> None:
        self.waiting.pop(request_id, None)

    async def call(self, msg: wire.Msg, timeout: float = 2.0) -> wire.Msg:
        request_id, queue = self.open(msg)
        try:
            return await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            raise Unavailable(
                "gateway_unreachable", "the gateway did not answer", retry_after=2.0
            ) from None
        finally:
            self.done(request_id)

    async def stream(
        self, request: dict[str, Any], client: str, traceparent: str = ""
    ) -> AsyncIterator[wire.Msg]:
        """Yield Chunk messages then one Done; raise HaifError for an Error.  Leaving early
        (the HTTP client disconnected) cancels the generation on the worker."""
        deadline = time.time() + REQUEST_TIMEOUT_S
        request_id, queue = self.open(
            wire.Infer(request=request, client=client), deadline, traceparent
        )
        finished = False
        end = asyncio.get_running_loop().time() + REQUEST_TIMEOUT_S + 1
        try:
            while True:
                if queue.empty():  # wait with a timer, not a task per message (wait_for)
                    try:
                        async with asyncio.timeout_at(end):
                            msg = await queue.get()
                    except TimeoutError:
                        raise HaifError(
                            "deadline_exceeded", "the request ran out of time", kind=Kind.timeout
                        ) from None
                else:
                    msg = queue.get_nowait()
                if isinstance(msg, wire.Error):
                    finished = True
                    raise HaifError.from_wire(msg)
                if isinstance(msg, wire.Done):
                    finished = True
                yield msg
                if finished:
                    return
        finally:
            self.done(request_id)
            if not finished:
                with contextlib.suppress(zmq.ZMQError):
                    self.sock.send(wire.encode(wire.Cancel(), request_id), zmq.NOBLOCK)


# --- request bodies --------------------------------------------------------------------------

# Text a client sends: valid Unicode (JSON's "\ud800" escape decodes to a lone surrogate, which no
# UTF-8 encoder takes); integers are bounded as the request schema bounds them (the wire's
# msgpack holds none over 2**64 - 1).
Text = Annotated[str, AfterValidator(check_text)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_K)]
Stop = Text | list[Text] | None


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tokens: MaxTokens | None = None
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: TopK | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stop: Stop = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise HTTPError(
                    "unsupported", "only text content parts are supported", param="messages"
                )
            try:
                parts.append(check_text(part["text"]))
            except ValueError as exc:
                raise HTTPError("invalid_request", f"messages: {exc}", param="messages") from None
        return "".join(parts)


class InferBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    params: Sampling | None = None
    stream: bool = False


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIBase(BaseModel):
    model: Text | None = None
    max_tokens: MaxTokens | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    user: Text | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    # extensions, as llama.cpp's server has them
    top_k: TopK | None = None
    ignore_eos: bool = False


class CompletionBody(OpenAIBase):
    prompt: Text | list[Text]
    echo: bool = False
    logprobs: int | None = None
    suffix: Text | None = None


class ChatBody(OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None


def _stop(stop: Stop) -> list[str] | None:
    if stop is None:
        return None
    return [stop] if isinstance(stop, str) else stop


def _sampling(body: OpenAIBase) -> dict[str, Any]:
    if body.n != 1:
        raise HTTPError("unsupported", "n: only 1 is supported", param="n")
    out: dict[str, Any] = {
        "model": body.model or None,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stop": _stop(body.stop),
        "top_k": body.top_k,
        "ignore_eos": body.ignore_eos or None,
    }
    if body.presence_penalty or body.frequency_penalty:
        # llama.cpp's repeat penalty is the nearest knob; map a positive penalty onto it.
        out["repeat_penalty"] = (
            1.0 + max(body.presence_penalty or 0, body.frequency_penalty or 0) / 2
        )
    return {k: v for k, v in out.items() if v is not None}


# --- the application -------------------------------------------------------------------------


def create_app(
    gateway: str,
    keys: KeyStore,
    *,
    on_ready: Callable[[], None] | None = None,
    metrics: Metrics | None = None,
    keyring: security.Keyring | None = None,
    host: str = "127.0.0.1",
    limits: EdgeLimits | None = None,
) -> FastAPI:
    """The bridge's app; ``on_ready`` runs once the gateway link is open (the daemon announces
    itself there).  ``host`` is the address it listens on: off loopback, it serves protected
    routes only with API keys."""
    link: GatewayLink | None = None
    tracer = tracing.setup("bridge")
    auth = Auth(keys, host)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal link
        link = GatewayLink(gateway, keyring)
        link.start()
        log(
            "bridge",
            "gateway link open",
            gateway=gateway,
            auth=auth.mode(),
        )
        if on_ready is not None:
            on_ready()
        yield
        await link.close()
        if tracer is not None:
            tracer.shutdown()
        log("bridge", "stopped")

    app = FastAPI(
        title="haifctl bridge",
        version=__version__,
        description="REST and OpenAI-compatible access to a haifctl cluster.",
        lifespan=lifespan,
    )

    def gw() -> GatewayLink:
        assert link is not None
        return link

    @app.exception_handler(HaifError)
    async def _http_error(request: Request, exc: HaifError) -> Response:
        if metrics is not None and status_of(exc) in (400, 401, 413):
            # refusals the bridge itself makes; the gateway counts its own
            metrics.rejected.labels("bridge", exc.code).inc()
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        # A value our validators refused says more than the union member it did not match.
        first = next((e for e in errors if e.get("type") == "value_error"), None)
        first = first or (errors[0] if errors else {})
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _tag(p))
        said = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        message = f"{where}: {said}" if where else said
        return await _http_error(
            request, HTTPError("invalid_request", message, param=where or None)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _routing(request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's own refusals (no such route, wrong method) in the OpenAI shape too."""
        code = {404: "route_not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "invalid_request" if exc.status_code == 400 else "http_error"
        )
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{request.method} {request.url.path}: {message.lower()}"
        error = HTTPError(code, message, status=exc.status_code)
        return error_response(error, dict(exc.headers or {}))

    app.add_middleware(
        Edge, metrics=metrics, tracer=tracer, auth=auth, limits=limits or EdgeLimits()
    )

    async def client_key(request: Request) -> str:
        """The caller's key id, as the edge checked it before reading the body."""
        key = getattr(request.state, "key", None)
        if key is None:  # a route needing a key that the edge does not guard: never serve it
            raise HaifError("unauthorized", "this route needs an API key", kind=Kind.unauthorised)
        return str(key)

    # health --------------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The bridge is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "Not ready"}})
    async def readyz() -> Response:
        """Ready when the gateway answers, at least one worker serves a model and the bridge
        can let clients in (``auth``: keys, loopback, or locked with no keys off loopback)."""
        mode = auth.mode()
        extra: dict[str, Any] = {"auth": mode}
        if mode == "locked":
            extra["detail"] = public_message(auth.locked())
        try:
            pong = await gw().call(wire.Ping(), 1.0)
            stats = await gw().call(wire.StatsRequest(), 2.0)
        except HaifError as exc:
            return JSONResponse({"status": "unavailable", "reason": exc.message, **extra}, 503)
        workers = len(stats.workers) if isinstance(stats, wire.Stats) else 0
        ready = isinstance(pong, wire.Pong) and pong.ready and workers > 0 and mode != "locked"
        body = {"status": "ready" if ready else "unavailable", "workers": workers, **extra}
        return JSONResponse(body, 200 if ready else 503)

    # models --------------------------------------------------------------------------------
    @app.get("/v1/models", tags=["openai"])
    async def list_models(key: str = Depends(client_key)) -> dict[str, Any]:
        """The registered models (an alias is listed as a model too), served or not."""
        answer = await gw().call(wire.ListModels(), 5.0)
        if isinstance(answer, wire.Error):
            raise HaifError.from_wire(answer)
        if not isinstance(answer, wire.ModelList):
            raise Unavailable("unavailable", "unexpected gateway answer")
        data = []
        for m in answer.models:
            created = _epoch(m.created_at)
            for model_id in (m.ref, *m.aliases):
                data.append(
                    {
                        "id": model_id,
                        "object": "model",
                        "created": created,
                        "owned_by": "haifctl",
                        "status": m.status,
                        "workers": m.workers,
                    }
                )
        return {"object": "list", "data": data}

    # inference -----------------------------------------------------------------------------
    async def run(request: dict[str, Any], key: str, tp: str) -> tuple[str, wire.Done]:
        text: list[str] = []
        done: wire.Done | None = None
        async for msg in gw().stream(request, key, tp):
            if isinstance(msg, wire.Chunk):
                text.append(msg.text)
            elif isinstance(msg, wire.Done):
                done = msg
        assert done is not None
        return "".join(text), done

    def usage(done: wire.Done) -> dict[str, int]:
        return {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
        }

    def finish(reason: str) -> str:
        return "length" if reason == "length" else "stop"

    async def first_then_rest(
        request: dict[str, Any], key: str, tp: str
    ) -> tuple[wire.Msg, AsyncIterator[wire.Msg]]:
        """Start streaming; errors before the first token become a proper HTTP status."""
        stream = gw().stream(request, key, tp).__aiter__()
        first = await stream.__anext__()
        return first, stream

    def sse(data: Any, event: str | None = None) -> bytes:
        prefix = f"event: {event}\n" if event else ""
        return f"{prefix}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    async def guarded(
        gen: AsyncGenerator[bytes], rest: AsyncIterator[wire.Msg]
    ) -> AsyncIterator[bytes]:
        """A stream cut after headers were sent ends with an error event, not a hang; leaving
        early closes the gateway stream, which cancels the generation."""
        try:
            async for chunk in gen:
                yield chunk
        except HaifError as exc:
            yield sse({"error": {"message": public_message(exc), "code": exc.code}})
        finally:
            await gen.aclose()
            aclose = getattr(rest, "aclose", None)
            if aclose is not None:
                await aclose()

    @app.post("/infer", tags=["haifctl"])
    async def infer(body: InferBody, request: Request, key: str = Depends(client_key)) -> Response:
        """Run one request: a prompt or chat messages; SSE token events with "stream": true."""
        fields: dict[str, Any] = {"model": body.model, "prompt": body.prompt}
        if body.messages is not None:
            fields["messages"] = [
                {"role": _role(m.role), "content": m.text()} for m in body.messages
            ]
            fields.pop("prompt")
        if body.params is not None:
            fields.update(body.params.model_dump(exclude_none=True))
            if "stop" in fields:
                fields["stop"] = _stop(fields["stop"])
        fields = {k: v for k, v in fields.items() if v is not None}
        tp = getattr(request.state, "traceparent", "")
        request_id = "inf-" + wire.new_id()[:24]

        def final(done: wire.Done, output: str) -> dict[str, Any]:
            return {
                "id": request_id,
                "model": done.model,
                "output": output,
                "usage": usage(done),
                "finish_reason": done.finish_reason,
                "worker": done.worker,
                "timings": {
                    "time_to_first_token_ms": done.time_to_first_token_ms,
                    "generation_ms": done.generation_ms,
                    "queue_ms": done.queue_ms,
                },
            }

        if not body.stream:
            output, done = await run(fields, key, tp)
            return JSONResponse(final(done, output))
        first, rest = await first_then_rest(fields, key, tp)

        async def events() -> AsyncGenerator[bytes]:
            parts: list[str] = []
            msg: wire.Msg | None = first
            while msg is not None:
                if isinstance(msg, wire.Chunk):
                    parts.append(msg.text)
                    yield sse({"text": msg.text, "tokens": msg.n_tokens}, "token")
                elif isinstance(msg, wire.Done):
                    yield sse(final(msg, "".join(parts)), "done")
                    return
                msg = await anext(rest, None)

        return ClosingStream(guarded(events(), rest), media_type="text/event-stream")

    @app.post("/v1/completions", tags=["openai"])
    async def completions(
        body: CompletionBody, request: Request, key: str = Depends(client_key)
    ) -> Response:
        """OpenAI text completions."""
        if body.echo or body.logprobs is not None or body.suffix is not None:
            raise HTTPError(
                "unsupported", "echo, logprobs and suffix are not supported", param="echo"
            )
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise HTTPError(
                    "unsupported", "prompt: give one prompt per request", param="prompt"
                )
            prompt = prompt[0]
        fields = {**_sampling(body), "prompt": prompt, "max_tokens": body.max_tokens or 16}
        return await openai_response(fields, body, request, key, chat=False)

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(
        body: ChatBody, request: Request, key: str = Depends(client_key)
    ) -> Response:
        """OpenAI chat completions; messages use the model's chat template."""
        if body.logprobs:
            raise HTTPError("unsupported", "logprobs are not supported", param="logprobs")
        fields = {
            **_sampling(body),
            "messages": [{"role": _role(m.role), "content": m.text()} for m in body.messages],
        }
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None:
            fields["max_tokens"] = max_tokens
        return await openai_response(fields, body, request, key, chat=True)

    async def openai_response(
        fields: dict[str, Any], body: OpenAIBase, request: Request, key: str, *, chat: bool
    ) -> Response:
        tp = getattr(request.state, "traceparent", "")
        created = int(time.time())
        prefix = "chatcmpl-" if chat else "cmpl-"
        response_id = prefix + wire.new_id()[:24]
        model_name = body.model or ""
        if not body.stream:
            text, done = await run(fields, key, tp)
            choice: dict[str, Any] = {
                "index": 0,
                "finish_reason": finish(done.finish_reason),
                "logprobs": None,
            }
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return JSONResponse(
                {
                    "id": response_id,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": done.model,
                    "choices": [choice],
                    "usage": usage(done),
                    "system_fingerprint": f"haifctl-{__version__}",
                }
            )
        first, rest = await first_then_rest(fields, key, tp)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, reason: str | None, role: bool = False) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if piece is not None:
                    delta["content"] = piece
                c["delta"] = delta
            else:
                c["text"] = piece or ""
            out = {
                "id": response_id,
                "object": obj,
                "created": created,
                "model": model_name or "",
                "choices": [c],
            }
            if include_usage:
                out["usage"] = None
            return out

        def data(obj: Any) -> bytes:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

        async def events() -> AsyncGenerator[bytes]:
            if chat:
                yield data(chunk("", None, role=True))
            msg: wire.Msg | None = first
            while msg is not None:
                if isinstance(msg, wire.Chunk):
                    yield data(chunk(msg.text, None))
                elif isinstance(msg, wire.Done):
                    yield data(chunk(None if chat else "", finish(msg.finish_reason)))
                    if include_usage:
                        last = {
                            "id": response_id,
                            "object": obj,
                            "created": created,
                            "model": model_name or msg.model,
                            "choices": [],
                            "usage": usage(msg),
                        }
                        yield data(last)
                    yield b"data: [DONE]\n\n"
                    return
                msg = await anext(rest, None)

        return ClosingStream(guarded(events(), rest), media_type="text/event-stream")

    # the chat page -------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = (resources.files("haifctl") / "web" / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    return app


def _tag(part: Any) -> bool:
    """Whether a part of a pydantic error location names a union member (``str``,
    ``list[...]``, ``function-after[...]``) rather than a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def _epoch(iso: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


def parse_http_bind(bind: str) -> tuple[str, int]:
    bind = bind.removeprefix("http://")
    host, _, port = bind.rpartition(":")
    return (host or "127.0.0.1").strip("[]"), int(port or 8080)


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


class BridgeDaemon(Daemon):
    """Runs the app on uvicorn; SIGTERM lets in-flight responses finish (graceful shutdown).
    The ready file and /metrics are the base class's, as for every daemon; the loop is
    uvicorn's."""

    name = "bridge"

    def __init__(
        self,
        gateway: str,
        bind: str,
        keys: KeyStore,
        ready_file: Path | None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        limits: EdgeLimits | None = None,
    ) -> None:
        super().__init__(ready_file)
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.gateway = gateway
        self.host, self.port = parse_http_bind(bind)
        self.keys = keys
        if limits is None:  # the bridge_* settings of the home the keys live in
            from haifctl.config import resolve

            limits = EdgeLimits.from_settings(resolve({"home": keys.path.parent}))
        self.limits = limits

    def run(self) -> None:
        import uvicorn

        family = pysocket.AF_INET6 if ":" in self.host else pysocket.AF_INET
        sock = pysocket.socket(family, pysocket.SOCK_STREAM)
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(2048)
        host, port = sock.getsockname()[:2]
        self.endpoints["rpc"] = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.serve_metrics()
        app = create_app(
            self.gateway,
            self.keys,
            on_ready=self.announce_ready,
            metrics=self.metrics,
            keyring=self.keyring,
            host=self.host,
            limits=self.limits,
        )
        # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with a
        # handler of ours in place that re-raise is a no-op and the process exits with 0.
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGINT, lambda *_: None)
        config = uvicorn.Config(
            app,
            http=edge_protocol(self.limits),
            timeout_keep_alive=max(1, math.ceil(self.limits.idle_timeout_s)),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=30,
            lifespan="on",
        )
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            self.ctx.destroy(linger=0)


__all__ = ["BridgeDaemon", "create_app"]
