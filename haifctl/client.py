"""A client of a haifctl cluster's gateway: ping, stats, and streamed inference."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from haifctl import wire
from haifctl.errors import Unavailable
from haifctl.rpc import RpcClient
from haifctl.security import ADMIN, Keyring


class _Stream:
    """A DEALER to the gateway and a monitor of its connection: a gateway that dies takes its
    requests with it, so a stream waiting on it ends when the connection closes, not when its
    timeout runs out."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], address: str, keyring: Keyring):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        keyring.client(self.sock, ADMIN)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(address)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)

    def wait(self, timeout_ms: int) -> bool:
        """True once a message is waiting; False at the timeout.  Raises when the connection
        to the gateway closed (the request it held is gone with it)."""
        ready = dict(self.poller.poll(timeout_ms))
        if self.monitor in ready:
            event = parse_monitor_message(self.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                raise Unavailable(
                    "gateway_lost",
                    "the gateway closed the connection while the request was in flight",
                    "the request may not have finished; `haifctl status` shows the cluster",
                )
        return self.sock in ready

    def forget_past_events(self) -> None:
        """Drop what the monitor saw while no request was in flight: a gateway restarted
        between two streams took nothing with it (the socket reconnects by itself)."""
        while self.monitor.poll(0, zmq.POLLIN):
            self.monitor.recv_multipart()

    def close(self, linger: int = 0) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=linger)


class ClusterClient:
    def __init__(self, address: str, keyring: Keyring, key: str = "") -> None:
        self.address = address
        self.key = key
        self.keyring = keyring
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.rpc = RpcClient(self.ctx, address, "gateway", keyring)
        self._idle: _Stream | None = None  # kept connected between streams

    def close(self) -> None:
        self.rpc.close()
        if self._idle is not None:
            self._idle.close(linger=0)
        self.ctx.destroy(linger=0)

    def _stream(self) -> _Stream:
        if self._idle is not None:
            stream, self._idle = self._idle, None
            stream.forget_past_events()
            return stream
        return _Stream(self.ctx, self.address, self.keyring)

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ping(self, timeout: float = 1.0) -> wire.Pong:
        return self.rpc.ask(wire.Ping(), wire.Pong, timeout)

    def stats(self, timeout: float = 2.0) -> wire.Stats:
        return self.rpc.ask(wire.StatsRequest(), wire.Stats, timeout)

    def ask(
        self, request: dict[str, Any], *, timeout: float = 300.0
    ) -> wire.Embeddings | wire.Tokens | wire.Error:
        """Send a request that answers with one message (an embed, tokenize or detokenize
        ``op``) and return it, or the Error it ended with."""
        with contextlib.closing(self._exchange(request, timeout, None, "")) as messages:
            for msg in messages:
                if isinstance(msg, wire.Error | wire.Embeddings | wire.Tokens):
                    return msg
        raise Unavailable("protocol_error", "the request ended without an answer")

    def stream(
        self,
        request: dict[str, Any] | msgspec.Struct,
        *,
        timeout: float = 300.0,
        request_id: str | None = None,
        traceparent: str = "",
    ) -> Generator[wire.Chunk | wire.Done | wire.Error]:
        """Send one request; yield its chunks, then one Done or Error.

        Closing the iterator early cancels the generation on the worker.
        """
        exchange = self._exchange(request, timeout, request_id, traceparent)
        with contextlib.closing(exchange) as messages:
            for msg in messages:
                if isinstance(msg, wire.Chunk | wire.Done | wire.Error):
                    yield msg

    def _exchange(
        self,
        request: dict[str, Any] | msgspec.Struct,
        timeout: float,
        request_id: str | None,
        traceparent: str,
    ) -> Generator[wire.Msg]:
        """Send one request; yield its chunks, then the message that ends it (FINAL).  Closing
        the iterator early withdraws the request (the worker stops generating)."""
        body = request if isinstance(request, dict) else msgspec.to_builtins(request)
        body = {k: v for k, v in body.items() if v is not None}
        request_id = request_id or wire.new_id()
        stream = self._stream()
        sock = stream.sock
        finished = False
        try:
            deadline = time.time() + timeout
            infer = wire.Infer(request=body, client=self.key)
            sock.send(wire.encode(infer, request_id, deadline, traceparent))
            while True:
                left = deadline + 1.0 - time.time()
                if left <= 0 or not stream.wait(int(left * 1000)):
                    raise Unavailable(
                        "gateway_timeout",
                        f"no answer from the gateway at {self.address}",
                        "is the cluster up? `haifctl status`",
                    )
                try:
                    envelope = wire.decode(sock.recv())
                except wire.BadFrame:
                    continue
                msg = envelope.msg
                if isinstance(msg, wire.Chunks):
                    for part in msg.parts:
                        if part.id == request_id:
                            yield wire.Chunk(
                                text=part.text, n_tokens=part.n_tokens, logprobs=part.logprobs
                            )
                    continue
                if envelope.id != request_id:
                    continue
                if isinstance(msg, wire.FINAL):
                    finished = True
                    yield msg
                    return
        finally:
            if not finished:
                sock.send(wire.encode(wire.Cancel(), request_id))
                # linger briefly so the cancel leaves before the socket closes
                stream.close(linger=500)
            elif self._idle is None:
                self._idle = stream  # reuse the connection for the next stream
            else:
                stream.close()
