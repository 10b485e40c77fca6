"""The bridge's one link to the gateway: a DEALER shared by every HTTP request, replies routed
to each request's queue by request id.  Every send is awaited, so a send that fails fails its
request at once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any, cast

import zmq

from haifctl import security, wire
from haifctl.daemon.base import log
from haifctl.daemon.bridge.errors import HTTPError
from haifctl.errors import HaifError, Kind, Unavailable

REQUEST_TIMEOUT_S = 300.0


class GatewayLink:
    """One DEALER to the gateway, shared by every HTTP request; replies routed by request id.

    The socket is a plain one read from the event loop's own readiness callback: each time its
    descriptor wakes the loop, every message waiting is read and handed to its request's queue,
    without a future per message (pyzmq's asyncio sockets cost about a quarter of the bridge's
    CPU per streamed frame that way).  Sends never block: one that cannot go raises at once."""

    def __init__(self, address: str, keyring: security.Keyring | None) -> None:
        self.address = address
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        if keyring is not None:
            keyring.client(self.sock, security.BRIDGE)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(address)
        self.waiting: dict[str, asyncio.Queue[wire.Msg]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.monitor: zmq.Socket[bytes] | None = None
        self.draining = False  # a drain is scheduled
        self.up = False  # connected to the gateway (and through the CURVE handshake)

    def start(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self.drain)
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
        )
        loop.add_reader(self.monitor.fileno(), self.watch)
        # ZeroMQ's descriptors signal only once their socket's events have been read: read them
        # now, or the first message (or disconnection) would never wake the loop
        self.drain()
        self.watch()

    def watch(self) -> None:
        """Fail every waiting request at once when the connection to the gateway drops (the
        gateway restarted, or refused a frame it could not take): the gateway answers the DEALER
        that reconnects as a new peer, so no reply to a request sent before can arrive, and
        waiting for one would hang each request until its deadline."""
        from zmq.utils.monitor import parse_monitor_message

        monitor = self.monitor
        assert monitor is not None
        while cast(int, monitor.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            event = parse_monitor_message(monitor.recv_multipart())
            if event["event"] != zmq.EVENT_DISCONNECTED:
                self.up = True
                continue
            self.up = False
            if self.waiting:
                lost = Unavailable(
                    "gateway_link_lost",
                    "the connection to the gateway dropped before the answer came",
                    retry_after=1.0,
                ).to_wire()
                log("bridge", "gateway link lost", "warning", requests=len(self.waiting))
                for queue in self.waiting.values():
                    queue.put_nowait(lost)

    def drain(self) -> None:
        """Read every message waiting on the socket.  ZeroMQ's descriptor is edge-triggered, and
        a send may consume its edge: after each send the loop is asked to drain again."""
        self.draining = False
        sock = self.sock
        waiting = self.waiting
        while cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            try:
                envelope = wire.decode(sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            except wire.BadFrame:
                continue
            msg = envelope.msg
            if isinstance(msg, wire.Chunks):  # several streams' text, one frame
                for part in msg.parts:
                    queue = waiting.get(part.id)
                    if queue is not None:
                        queue.put_nowait(
                            wire.Chunk(
                                text=part.text, n_tokens=part.n_tokens, logprobs=part.logprobs
                            )
                        )
                continue
            queue = waiting.get(envelope.id)
            if queue is not None:
                queue.put_nowait(msg)

    def send(self, frame: bytes) -> None:
        """Send at once or raise zmq.ZMQError; then look for replies the send's edge hid."""
        self.sock.send(frame, zmq.NOBLOCK)
        if not self.draining and self.loop is not None:
            self.draining = True
            self.loop.call_soon(self.drain)

    async def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
            if self.monitor is not None:
                self.loop.remove_reader(self.monitor.fileno())
        if self.monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.ctx.term()

    async def open(
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
            self.send(frame)
        except zmq.ZMQError:
            raise Unavailable(
                "gateway_unreachable", "the link to the gateway is full", retry_after=1.0
            ) from None
        self.waiting[request_id] = queue
        return request_id, queue

    def done(self, request_id: str) -> None:
        self.waiting.pop(request_id, None)

    async def call(self, msg: wire.Msg, timeout: float = 2.0) -> wire.Msg:
        request_id, queue = await self.open(msg)
        try:
            return await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            raise Unavailable(
                "gateway_unreachable", "the gateway did not answer", retry_after=2.0
            ) from None
        finally:
            self.done(request_id)

    async def ask(self, request: dict[str, Any], client: str, traceparent: str = "") -> wire.Msg:
        """Send a request that answers with one message (an embed, tokenize or detokenize
        ``op``) and return that message; raise HaifError for an Error.  Leaving early (the
        HTTP client disconnected) withdraws it."""
        async with contextlib.aclosing(self.stream(request, client, traceparent)) as messages:
            async for msg in messages:
                if isinstance(msg, wire.ANSWERS):
                    return msg
        raise HaifError("protocol_error", "the request ended without an answer")

    async def stream(
        self, request: dict[str, Any], client: str, traceparent: str = ""
    ) -> AsyncGenerator[wire.Msg]:
        """Yield Chunk messages then one Done (or the one answer of a request that generates
        nothing); raise HaifError for an Error.  Leaving early
        (the HTTP client disconnected) cancels the generation on the worker."""
        deadline = time.time() + REQUEST_TIMEOUT_S
        request_id, queue = await self.open(
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
                if isinstance(msg, wire.FINAL):
                    finished = True
                yield msg
                if finished:
                    return
        finally:
            self.done(request_id)
            if not finished:
                with contextlib.suppress(zmq.ZMQError):
                    self.send(wire.encode(wire.Cancel(), request_id))
