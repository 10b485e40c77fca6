"""The registry daemon: serves the model registry (SQLite or Postgres) to the other daemons."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import zmq

from haifctl import wire
from haifctl.config import mask_url
from haifctl.daemon.base import Daemon, log
from haifctl.errors import HaifError, Kind
from haifctl.gguf_info import GGUFFacts
from haifctl.registry.service import Registry, open_registry
from haifctl.registry.usage import UsageRow
from haifctl.security import ADMIN, GATEWAY, ORCHESTRATOR

# The calls the orchestrator makes; everything else writes the registry and is the CLI's alone.
ORCHESTRATOR_OPS = frozenset({"resolve", "list", "set_status"})
# A gateway only reports the usage of the requests it saw end.
GATEWAY_OPS = frozenset({"record_usage"})
# Calls that are neither lookups nor the CLI's changes to models: not logged one by one.
QUIET_OPS = frozenset({"resolve", "list", "ensure_builtin", "record_usage", "usage"})
PRUNE_EVERY_S = 3600.0  # how often old usage rows are deleted (checked as batches arrive)
# With no call answered for this long, the loop asks the database itself (for /readyz).
DB_PROBE_S = 5.0
# A database failing this long is taken as a connection that will not come back (the backend
# does not reconnect): /healthz fails too, so a supervisor such as Kubernetes restarts us.
DB_DEAD_S = 60.0


class RegistryDaemon(Daemon):
    name = "registry"
    listens = True
    usage_retention_days = 90.0  # 0: keep usage rows forever
    next_prune = 0.0  # monotonic time of the next pruning of old usage rows

    def __init__(self, registry_url: str, bind_address: str, ready_file: Path | None = None):
        super().__init__(ready_file)
        self.registry_url = registry_url
        self.bind_address = bind_address
        self.registry: Registry | None = None
        self.db_ok = False  # the database's last answer was not a failure
        self.db_checked = 0.0  # when (monotonic)
        self.db_failing_since: float | None = None
        self.db_dead_s = DB_DEAD_S

    def start(self) -> None:
        self.registry = open_registry(self.registry_url)
        self.registry.ensure_builtin()
        self.database_answered(True)
        self.router, self.endpoints["rpc"] = self.listen(zmq.ROUTER, self.bind_address)
        self.watch(self.router, lambda: self.read_router(self.router, self.handle))

    def on_tick(self, now: float) -> None:
        if self.registry is not None and now - self.db_checked >= DB_PROBE_S:
            try:
                self.registry.backend.query("SELECT 1 AS ok")
                self.database_answered(True)
            except Exception as exc:
                self.database_answered(False, f"{type(exc).__name__}: {exc}")

    def database_answered(self, ok: bool, error: str = "") -> None:
        """Track the database's health for /readyz; log when it changes, not every time."""
        self.db_checked = time.monotonic()
        if ok:
            self.db_failing_since = None
        elif self.db_failing_since is None:
            self.db_failing_since = self.db_checked
        if ok != self.db_ok and self.started:
            if ok:
                log(self.name, "database answering again")
            else:
                error = mask_url(error, self.registry_url)
                log(self.name, "database failing", level="warning", error=error)
        self.db_ok = ok

    def alive_checks(self) -> dict[str, bool]:
        since = self.db_failing_since
        return {"database": since is None or time.monotonic() - since < self.db_dead_s}

    def ready_checks(self) -> dict[str, bool]:
        """Ready while the database answers (a call's outcome, or a probe every DB_PROBE_S)."""
        return {**super().ready_checks(), "database": self.db_ok}

    def handle(self, identity: bytes, envelope: wire.Envelope, body: bytes, role: str) -> None:
        msg = envelope.msg
        answer: wire.Msg
        if isinstance(msg, wire.Ping):
            answer = self.pong()
        elif isinstance(msg, wire.RegistryCall) and not (
            role == ADMIN
            or (role == ORCHESTRATOR and msg.op in ORCHESTRATOR_OPS)
            or (role == GATEWAY and msg.op in GATEWAY_OPS)
        ):
            answer = self.refuse_role(role, f"registry_{msg.op}")
        elif isinstance(msg, wire.RegistryCall):
            answer = self.call(msg)
        elif isinstance(msg, wire.StatsRequest):
            answer = wire.Stats(daemon=self.name, counters=dict(self.counters))
        else:
            self.counters["unexpected_messages"] += 1
            return
        self.send_to(self.router, identity, wire.reply(envelope, answer))

    def call(self, msg: wire.RegistryCall) -> wire.Msg:
        assert self.registry is not None
        reg = self.registry
        args = msg.args
        self.counters[f"calls_{msg.op}"] += 1
        ops: dict[str, Callable[[], Any]] = {
            "resolve": lambda: reg.resolve(str(args["ref"])),
            "list": reg.all,
            "ensure_builtin": reg.ensure_builtin,
            "register": lambda: reg.register(
                Path(str(args["path"])),
                name=str(args["name"]),
                version=args.get("version"),
                aliases=[str(a) for a in args.get("aliases") or []],
                params=dict(args.get("params") or {}),
                make_default=bool(args.get("make_default")),
                sha256=str(args["sha256"]),
                facts=msgspec.convert(args["facts"], GGUFFacts),
            ),
            "remove": lambda: reg.remove(
                str(args["ref"]), all_versions=bool(args.get("all_versions"))
            ),
            "set_alias": lambda: reg.set_alias(str(args["alias"]), str(args["ref"])),
            "remove_alias": lambda: reg.remove_alias(str(args["alias"])),
            "set_default": lambda: reg.set_default(str(args["ref"])),
            "set_status": lambda: reg.set_status(str(args["ref"]), str(args["status"])),
            "set_params": lambda: reg.set_params(
                str(args["ref"]),
                dict(args.get("params") or {}),
                [str(k) for k in args.get("unset") or []],
            ),
            "record_usage": lambda: self.record_usage(reg, args["rows"]),
            "usage": lambda: reg.usage(args.get("since_s"), args.get("by")),
        }
        op = ops.get(msg.op)
        if op is None:
            return wire.Error(
                kind=Kind.invalid, code="unknown_op", message=f"unknown registry op {msg.op!r}"
            )
        started = time.monotonic()
        try:
            result = op()
            self.database_answered(True)
            self.metrics.requests.labels(self.name, msg.op, "ok").inc()
            self.metrics.request_duration.labels(self.name, msg.op).observe(
                time.monotonic() - started
            )
            if msg.op not in QUIET_OPS:
                log(
                    self.name,
                    "registry write",
                    op=msg.op,
                    args={k: v for k, v in args.items() if k != "facts"},
                )
        except HaifError as exc:
            self.metrics.requests.labels(self.name, msg.op, exc.code).inc()
            return exc.to_wire()
        except (KeyError, TypeError, ValueError, msgspec.ValidationError) as exc:
            return wire.Error(
                kind=Kind.invalid,
                code="invalid_request",
                message=f"bad arguments for {msg.op}: {exc}",
            )
        except Exception as exc:
            # answer, always: a caller left without one waits out its whole timeout
            self.metrics.requests.labels(self.name, msg.op, "internal_error").inc()
            error = mask_url(f"{type(exc).__name__}: {exc}", self.registry_url)
            log(self.name, "registry call failed", level="error", op=msg.op, error=error)
            self.database_answered(False, error)
            return wire.Error(
                kind=Kind.internal,
                code="registry_error",
                message=f"the registry failed on {msg.op}: {error}",
            )
        return wire.RegistryReply(result=msgspec.to_builtins(result))

    def record_usage(self, reg: Registry, rows: object) -> int:
        """Store a gateway's batch of usage rows, and prune rows past their retention once an
        hour: the rows that arrive are what makes old ones due, so an idle registry has nothing
        to do."""
        stored = reg.record_usage(msgspec.convert(rows, list[UsageRow]))
        now = time.monotonic()
        if self.usage_retention_days > 0 and now >= self.next_prune:
            self.next_prune = now + PRUNE_EVERY_S
            pruned = reg.prune_usage(self.usage_retention_days * 86400)
            if pruned:
                log(self.name, "pruned usage", rows=pruned, days=self.usage_retention_days)
        return stored

    def stop(self) -> None:
        if self.registry is not None:
            self.registry.close()
        log(self.name, "closing registry")
        super().stop()
