"""A blocking request-reply client over a DEALER socket (the ZeroMQ guide's "lazy pirate").

A call that times out closes its socket (dropping any late answer) and the next call opens a
fresh one, so a restarted server is picked up without ceremony.
"""

from __future__ import annotations

import time
from typing import TypeVar

import zmq

from haifctl import wire
from haifctl.errors import HaifError, Unavailable
from haifctl.security import ADMIN, Keyring

Answer = TypeVar("Answer", bound=wire.Msg)


class RpcClient:
    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        address: str,
        name: str,
        keyring: Keyring | None,
        role: str = ADMIN,
    ) -> None:
        self.ctx = ctx
        self.address = address
        self.name = name
        self.keyring = keyring
        self.role = role
        self._sock: zmq.Socket[bytes] | None = None

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES + 4096)
            if self.keyring is not None:
                self.keyring.client(sock, self.role)
            sock.connect(self.address)
            self._sock = sock
        return self._sock

    def reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def call(self, msg: wire.Msg, timeout: float = 2.0, deadline: float = 0.0) -> wire.Msg:
        sock = self._socket()
        request_id = wire.new_id()
        sock.send(wire.encode(msg, request_id, deadline))
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                break
            try:
                envelope = wire.decode(sock.recv())
            except wire.BadFrame:
                continue
            if envelope.id == request_id:
                return envelope.msg
        self.reset()
        raise Unavailable(
            f"{self.name}_unreachable",
            f"no answer from the {self.name} at {self.address} within {timeout:g}s",
            "is it running? `haifctl status` shows the cluster",
        )

    def ask(self, msg: wire.Msg, answer: type[Answer], timeout: float = 2.0) -> Answer:
        """Call, expecting an ``answer``; an error answer is raised as the HaifError it carries."""
        reply = self.call(msg, timeout)
        if isinstance(reply, wire.Error):
            raise HaifError.from_wire(reply)
        if not isinstance(reply, answer):
            raise HaifError("protocol_error", f"unexpected answer {type(reply).__name__}")
        return reply

    def close(self) -> None:
        self.reset()
