"""The bridge's one link to the gateway: a DEALER shared by every HTTP request, replies routed
to each request's queue by request id.  Every send is awaited, so a send that fails fails its
request at once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any

import zmq
import zmq.asyncio

from haifctl import security, wire
from haifctl.daemon.base import log
from haifctl.daemon.bridge.errors import HTTPError
from haifctl.errors import HaifError, Kind, Unavailable

REQUEST_TIMEOUT_S = 300.0


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
                        queue.put_nowait(
                            wire.Chunk(
                                text=part.text, n_tokens=part.n_tokens, logprobs=part.logprobs
                            )
                        )
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
        try:  # awaited: pyzmq's asyncio send reports a failure through its future
            await self.sock.send(frame, zmq.NOBLOCK)
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
                    await self.sock.send(wire.encode(wire.Cancel(), request_id), zmq.NOBLOCK)
