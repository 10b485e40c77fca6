"""The registry daemon: serves the model registry (SQLite or Postgres) to the other daemons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import zmq

from haifctl import wire
from haifctl.daemon.base import LOOP_TICK_MS, Daemon, bind, log, socket, split_router
from haifctl.errors import HaifError
from haifctl.registry.service import Registry, open_registry


class RegistryDaemon(Daemon):
    name = "registry"

    def __init__(self, registry_url: str, bind_address: str, ready_file: Path | None = None):
        super().__init__(ready_file)
        self.registry_url = registry_url
        self.bind_address = bind_address
        self.registry: Registry | None = None

    def start(self) -> None:
        self.registry = open_registry(self.registry_url)
        self.registry.ensure_builtin()
        self.router = socket(self.ctx, zmq.ROUTER)
        self.endpoints["rpc"] = bind(self.router, self.bind_address)

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        while not self.should_exit:
            if not dict(poller.poll(LOOP_TICK_MS)):
                continue
            while True:
                try:
                    frames = self.router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.handle(frames)

    def handle(self, frames: list[bytes]) -> None:
        parts = split_router(frames)
        if parts is None:
            self.counters["malformed_frames"] += 1
            return
        identity, body = parts
        envelope = self.decode(body)
        if envelope is None:
            return
        msg = envelope.msg
        answer: wire.Msg
        if isinstance(msg, wire.Ping):
            answer = self.pong()
        elif isinstance(msg, wire.RegistryCall):
            answer = self.call(msg)
        elif isinstance(msg, wire.StatsRequest):
            answer = wire.Stats(daemon=self.name, counters=dict(self.counters))
        else:
            self.counters["unexpected_messages"] += 1
            return
        self.router.send_multipart([identity, wire.reply(envelope, answer)])

    def call(self, msg: wire.RegistryCall) -> wire.Msg:
        assert self.registry is not None
        self.counters[f"calls_{msg.op}"] += 1
        try:
            result: Any
            if msg.op == "resolve":
                result = msgspec.to_builtins(self.registry.resolve(str(msg.args.get("ref", ""))))
            elif msg.op == "list":
                result = [msgspec.to_builtins(r) for r in self.registry.all()]
            elif msg.op == "set_status":
                record = self.registry.set_status(str(msg.args["ref"]), str(msg.args["status"]))
                result = msgspec.to_builtins(record)
            else:
                return wire.Error(code="unknown_op", message=f"unknown registry op {msg.op!r}")
        except HaifError as exc:
            return wire.Error(code=exc.code, message=exc.message, hint=exc.hint)
        except (KeyError, TypeError) as exc:
            return wire.Error(code="invalid_request", message=f"bad arguments for {msg.op}: {exc}")
        return wire.RegistryReply(result=result)

    def stop(self) -> None:
        if self.registry is not None:
            self.registry.close()
        log(self.name, "closing registry")
        super().stop()
