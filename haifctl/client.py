"""A client of a haifctl cluster's gateway: ping, stats, and streamed inference."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator
from typing import Any

import msgspec
import zmq

from haifctl import wire
from haifctl.errors import Unavailable
from haifctl.rpc import RpcClient
from haifctl.security import ADMIN, Keyring


class ClusterClient:
    def __init__(self, address: str, keyring: Keyring, key: str = "") -> None:
        self.address = address
        self.key = key
        self.keyring = keyring
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.rpc = RpcClient(self.ctx, address, "gateway", keyring)
        self._idle: zmq.Socket[bytes] | None = None  # kept connected between streams

    def close(self) -> None:
        self.rpc.close()
        if self._idle is not None:
            self._idle.close(linger=0)
        self.ctx.destroy(linger=0)

    def _stream_socket(self) -> zmq.Socket[bytes]:
        if self._idle is not None:
            sock, self._idle = self._idle, None
            return sock
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        self.keyring.client(sock, ADMIN)
        sock.connect(self.address)
        return sock

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
        sock = self._stream_socket()
        finished = False
        try:
            deadline = time.time() + timeout
            infer = wire.Infer(request=body, client=self.key)
            sock.send(wire.encode(infer, request_id, deadline, traceparent))
            while True:
                left = deadline + 1.0 - time.time()
                if left <= 0 or not sock.poll(int(left * 1000), zmq.POLLIN):
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
                sock.close(linger=500)
            elif self._idle is None:
                self._idle = sock  # reuse the connection for the next stream
            else:
                sock.close(linger=0)
