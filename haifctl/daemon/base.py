"""What every daemon shares: lifecycle flags, signal handling, sockets, JSON logs, counters.

Shaped like uvicorn's ``Server``: ``start()`` binds, ``serve()`` loops until ``should_exit``,
``stop()`` closes; signal handlers only set flags.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket as pysocket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import zmq

from haifctl import __version__, security, tracing, wire
from haifctl.errors import HaifError, Kind
from haifctl.security import Keyring
from haifctl.telemetry import Metrics

LOOP_TICK_MS = 50
DRAIN_POLL_MS = 100  # a draining loop looks at least this often whether it is done
# A loop that has not turned for this long is stuck (its poll wakes at least every tick):
# /healthz then fails, and an orchestrator such as Kubernetes restarts the process.
STALL_S = 30.0
# A loop that did not turn for this much longer than it meant to was paused (SIGSTOP, a starved
# CPU, a long collection): its peers' silence meanwhile says nothing about them.
PAUSE_S = 0.5
PAUSES_KEPT = 64
HWM = 100_000
# pyzmq's flags are enums whose arithmetic runs in Python: a few microseconds a message in
# recv_multipart and send_multipart.  The loops pass plain ints and receive frame by frame.
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
RCVMORE = int(zmq.RCVMORE)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)


def incoming_with_role(sock: zmq.Socket[bytes]) -> Iterator[tuple[str, list[bytes]]]:
    """Like :func:`incoming`, with the sender's role: the ZAP handler names each connection's
    User-Id after its key's role, and every message carries it (read from the first frame)."""
    while cast(int, sock.getsockopt(EVENTS)) & POLLIN:
        first = sock.recv(NOBLOCK, copy=False)
        role = security.role_of_frame(first)
        frames = [first.bytes]
        while sock.getsockopt(RCVMORE):
            frames.append(sock.recv(NOBLOCK))
        yield role, frames


def incoming(sock: zmq.Socket[bytes]) -> Iterator[list[bytes]]:
    """Every whole message waiting on ``sock``, without blocking.  ZMQ_EVENTS says whether one
    is there, rather than a raised ``zmq.Again`` ending each read (12% of the gateway's samples
    in a profile at 270 short requests/s)."""
    while cast(int, sock.getsockopt(EVENTS)) & POLLIN:
        frames = [sock.recv(NOBLOCK)]
        while sock.getsockopt(RCVMORE):
            frames.append(sock.recv(NOBLOCK))
        yield frames


def settle_heap() -> None:
    """Once a daemon is ready: what start-up made (modules, classes, schemas, a worker's model
    objects) lives as long as the process, so it goes out of the collector's way, and a full
    collection walks only what is in flight instead of stopping the loop for tens of
    milliseconds every few thousand requests.  (Only in a daemon's own process: frozen objects
    that later become cyclic garbage are never collected.)"""
    gc.collect()
    gc.freeze()


def log(daemon: str, message: str, level: str = "info", **fields: Any) -> None:
    """One JSON object per line on stdout: what log shippers (Promtail, Loki) expect; a readable
    line instead when stdout is a terminal."""
    now = time.time()
    if sys.stdout.isatty():
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        sys.stdout.write(f"{stamp} {level:<7} {daemon:<12} {message}  {extra}".rstrip() + "\n")
    else:
        record = {"time": round(now, 3), "level": level, "daemon": daemon, "msg": message}
        record.update(fields)
        sys.stdout.write(json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


def trace_id(traceparent: str) -> str:
    """The trace id of a W3C traceparent (``00-<trace id>-<span id>-<flags>``), or ''."""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def bind(sock: zmq.Socket[bytes], address: str) -> str:
    """Bind and return the real endpoint (``tcp://127.0.0.1:0`` picks a free port)."""
    if address.startswith("tcp://") and address.endswith(":0"):
        address = address[:-2] + ":*"
    sock.bind(address)
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(endpoint, bytes)
    return endpoint.decode()


def socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    # Refuse oversized messages in libzmq itself, before Python ever sees them.
    sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES + 4096)
    # ZeroMQ's default high-water mark (1000 messages) makes a ROUTER drop replies silently to a
    # peer that reads slowly; a burst of refusals must still reach its client.  Messages are
    # small and bounded in size, so a deeper pipe stays a bounded amount of memory.
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    return sock


class Daemon:
    """Base class: subclasses implement ``start`` (bind, connect, :meth:`watch` their sockets)
    and the hooks :meth:`in_flight`, :meth:`on_tick` and :meth:`on_drain`; :meth:`serve` owns
    the one loop every daemon runs.

    "Drain" means one thing: graceful shutdown.  After SIGTERM the daemon stops accepting new
    work and keeps serving what it has until ``in_flight()`` is 0, ``drain_grace_s`` has
    passed, or a second signal asks to stop now.
    """

    name = "daemon"
    listens = False  # a CURVE server: runs a ZAP authenticator for its own domain
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port
    metrics_host = "127.0.0.1"
    tick_s = LOOP_TICK_MS / 1000  # how often on_tick runs (at most; the loop sleeps until then)
    drain_grace_s = 30.0
    stall_s = STALL_S

    def __init__(self, ready_file: Path | None = None) -> None:
        self.should_exit = False
        self.force_exit = False
        self.draining_until: float | None = None
        self.started = False
        self.started_at = time.time()
        self.loop_at: float | None = None  # when the loop last turned (monotonic); None before
        # the loop's latest pauses, (when it woke, seconds it lost): not counted in a peer's
        # silence (:meth:`heard_since`)
        self.pauses: deque[tuple[float, float]] = deque(maxlen=PAUSES_KEPT)
        self.counters: Counter[str] = Counter()
        self.ready_file = ready_file
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.endpoints: dict[str, str] = {}
        self.metrics = Metrics(self.name)
        self.tracing: tracing.Tracing | None = None
        # Export the counter from the start, at 0: rate() then shows "none" rather than no data.
        self.metrics.malformed.labels(self.name)
        self._poller = zmq.Poller()
        self._readers: dict[zmq.Socket[bytes] | int, Callable[[], None]] = {}
        self._wakeup: tuple[pysocket.socket, pysocket.socket] | None = None
        # The cluster's keys; None only for daemons driven in-process by unit tests, which
        # never open a network socket.
        self.keyring: Keyring | None = None
        self.authenticator: security.Authenticator | None = None

    # lifecycle -------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """The handlers set flags; the signal also wakes the loop, through a socket pair it
        polls.  Without that the loop would notice only at its next message or tick: a
        worker told to heartbeat every few seconds, generating (its frames go out from the
        engine thread), would begin draining, and tell the orchestrator, that much later."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        wake, woken = self._wakeup = pysocket.socketpair()
        wake.setblocking(False)
        woken.setblocking(False)
        signal.set_wakeup_fd(woken.fileno(), warn_on_full_buffer=False)
        self._readers[wake.fileno()] = self._woken
        self._poller.register(wake.fileno(), zmq.POLLIN)

    def _woken(self) -> None:
        assert self._wakeup is not None
        try:
            while self._wakeup[0].recv(64):
                pass
        except BlockingIOError:
            pass

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.should_exit:
            self.force_exit = True  # a second signal: stop draining
        self.should_exit = True

    def announce_ready(self) -> None:
        """Tell whoever started us (the supervisor, a test) where we listen."""
        self.started = True
        info = {"daemon": self.name, "pid": os.getpid(), "endpoints": self.endpoints}
        log(self.name, "ready", pid=info["pid"], endpoints=self.endpoints)
        if self.ready_file is not None:
            tmp = self.ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(info))
            tmp.replace(self.ready_file)

    def run(self) -> None:
        self.install_signal_handlers()
        self.tracing = tracing.setup(self.name)
        try:
            self.start_auth()
            # Probes answer while start() runs (a worker loading its model): alive, not ready.
            self.serve_metrics()
            self.start()
            settle_heap()  # before saying ready: a collection then is a stall nobody waits on
            self.announce_ready()
            self.serve()
        finally:
            self.stop()

    def start(self) -> None:
        raise NotImplementedError

    # security --------------------------------------------------------------------------------
    def start_auth(self) -> None:
        """Answer ZAP requests for our domain before any socket is bound: without a handler,
        libzmq would let any CURVE client in."""
        if self.keyring is None or not self.listens:
            return
        self.authenticator = security.Authenticator(self.ctx, self.keyring, self.auth_refused)
        self.authenticator.start_for([self.name])

    def auth_refused(self, reason: str, role: str | None, key: bytes) -> None:
        """A connection or message refused for who sent it (called from the ZAP thread too)."""
        self.counters[f"auth_refused_{reason}"] += 1
        self.metrics.auth_refused.labels(self.name, reason).inc()
        log(
            self.name,
            "refused a ZeroMQ peer",
            level="warning",
            reason=reason,
            role=role,
            key=key.decode(errors="replace")[:12],
        )

    def refuse_role(self, role: str, what: str) -> wire.Error:
        """A message its sender's role may not send here: counted; the answer, for a sender
        that waits for one."""
        self.counters[f"forbidden_{what}"[:48]] += 1
        self.metrics.auth_refused.labels(self.name, "role_not_allowed").inc()
        return wire.Error(
            kind=Kind.forbidden,
            code="forbidden",
            message=f"a {role or 'unauthenticated'} peer may not send {what} to the {self.name}",
        )

    def listen(self, kind: int, address: str) -> tuple[zmq.Socket[bytes], str]:
        """A socket of ours that peers connect to: a CURVE server when we have keys."""
        sock = socket(self.ctx, kind)
        if self.keyring is not None:
            self.keyring.server(sock, self.name)
            # A peer that fails the handshake itself (no CURVE, the wrong server key, noise)
            # never reaches the ZAP handler: counted from the socket's monitor.
            monitor = sock.get_monitor_socket(int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL))
            self.watch(monitor, lambda: self.read_monitor(monitor))
        return sock, bind(sock, address)

    def read_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        for frames in incoming(monitor):
            if len(frames) == 2 and len(frames[0]) >= 2:
                self.counters["auth_refused_handshake"] += 1
                self.metrics.auth_refused.labels(self.name, "handshake").inc()

    def dial(self, kind: int, address: str, role: str) -> zmq.Socket[bytes]:
        """A socket of ours connected to another daemon, speaking as ``role``."""
        sock = socket(self.ctx, kind)
        if self.keyring is not None:
            self.keyring.client(sock, role)
        return sock

    def serve_metrics(self) -> None:
        """Serve /metrics, /healthz and /readyz (when a port is set) and record the address
        for the ready file."""
        if self.metrics_port is None:
            return
        probes = {"/healthz": self.healthz, "/readyz": self.readyz}
        try:
            port = self.metrics.serve(self.metrics_port, self.metrics_host, probes)
        except OSError as exc:
            raise HaifError(
                "metrics_port_unavailable",
                f"cannot serve /metrics on {self.metrics_host}:{self.metrics_port}: {exc.strerror}",
                "pick another with --metrics-port or OTEL_PROMETHEUS_PORT (0: any free)",
            ) from None
        self.endpoints["metrics"] = f"http://{self.metrics_host}:{port}/metrics"

    # health (called from the metrics server's thread: reads the loop's state, never waits) ---
    def healthz(self) -> tuple[bool, dict[str, Any]]:
        """Liveness: the process should go on (a failure asks for a restart).  Alive while
        starting and while draining; dead when the loop has stalled or :meth:`alive_checks`
        says something it needs is gone."""
        checks = self.alive_checks()
        if self.loop_at is not None:
            stalled = time.monotonic() - self.loop_at
            checks["loop"] = stalled < self.stall_s
        alive = all(checks.values())
        body = {"status": "ok" if alive else "failing", "daemon": self.name, "checks": checks}
        return alive, body

    def readyz(self) -> tuple[bool, dict[str, Any]]:
        """Readiness: the daemon can do its job now (a failure takes it out of service, without
        a restart).  Each daemon names what that takes in :meth:`ready_checks`."""
        checks = self.ready_checks()
        ready = all(checks.values())
        body: dict[str, Any] = {
            "status": "ready" if ready else "unavailable",
            "daemon": self.name,
            "checks": checks,
        }
        if not ready:
            body["reason"] = ", ".join(f"not {name}" for name, ok in checks.items() if not ok)
        body.update(self.health_detail())
        return ready, body

    def alive_checks(self) -> dict[str, bool]:
        """What the process cannot recover from by waiting (beyond a stalled loop)."""
        return {}

    def ready_checks(self) -> dict[str, bool]:
        """Named conditions, all true when ready: started (bound, announced) and not
        draining, plus each daemon's own links."""
        return {"started": self.started, "accepting": self.accepting}

    def health_detail(self) -> dict[str, Any]:
        """Facts shown with readiness that do not decide it."""
        return {}

    @property
    def accepting(self) -> bool:
        """False once draining: new work is refused, work in flight goes on."""
        return self.draining_until is None

    def watch(self, sock: zmq.Socket[bytes], reader: Callable[[], None]) -> None:
        """Call ``reader`` whenever ``sock`` has messages (it reads them all, without blocking)."""
        if sock in self._readers:
            self._poller.unregister(sock)
        self._readers[sock] = reader
        self._poller.register(sock, zmq.POLLIN)

    def unwatch(self, sock: zmq.Socket[bytes]) -> None:
        if self._readers.pop(sock, None) is not None:
            self._poller.unregister(sock)

    def serve(self) -> None:
        """The loop: wait for messages or the next tick, handle them, tick; drain on exit."""
        next_tick = 0.0
        read_at = time.monotonic()  # when the last turn's messages were read
        while True:
            now = self.loop_at = time.monotonic()
            if self.should_exit and self.draining_until is None:
                self.draining_until = now + self.drain_grace_s
                log(self.name, "draining", in_flight=self.in_flight())
                self.on_drain()
            if self.draining_until is not None and (
                self.in_flight() == 0 or self.force_exit or now > self.draining_until
            ):
                return
            # Messages first, then the tick: after a stall (SIGSTOP, a starved CPU) the peers'
            # heartbeats waiting in our sockets are read before anyone is judged silent.
            timeout = max(0, int((next_tick - now) * 1000) + 1)
            if self.draining_until is not None:  # what drains may end by time alone
                timeout = min(timeout, DRAIN_POLL_MS)
            # Each stretch (the last tick, the poll, the readers) is timed: one far longer than
            # it should be was a pause (see PAUSE_S).
            polled_at = time.monotonic()
            ready = self._poller.poll(timeout)
            now = time.monotonic()
            # the last tick, and the poll past its timeout; then the readers, before this tick
            lost = polled_at - read_at + max(0.0, now - polled_at - timeout / 1000)
            if lost > PAUSE_S:
                self.paused(now, lost)
            for sock, _ in ready:
                self.safely(self._readers[sock])
            read_at = time.monotonic()
            if read_at - now > PAUSE_S:
                self.paused(read_at, read_at - now)
            if read_at >= next_tick:
                self.safely(self.on_tick, read_at)
                next_tick = read_at + self.tick_s

    def paused(self, now: float, lost: float) -> None:
        """The loop, awake again at ``now``, was not listening for ``lost`` seconds."""
        self.pauses.append((now, lost))
        self.counters["loop_pauses"] += 1
        log(self.name, "the loop was paused", level="warning", seconds=round(lost, 3))

    def heard_since(self, last_heard: float) -> float:
        """When a peer last heard from at ``last_heard`` counts as last heard, for judging its
        silence: later by the loop's pauses since then, since what the peer sent meanwhile may
        still be on its way in (after SIGCONT, the sockets' I/O thread and this loop start at
        once).  Silence is counted only while we listened: a loop that keeps pausing still
        finds a peer that is gone, later."""
        return last_heard + sum(lost for woke, lost in self.pauses if woke > last_heard)

    def in_flight(self) -> int:
        """Work that a graceful shutdown waits for."""
        return 0

    def on_tick(self, now: float) -> None:
        """Periodic bookkeeping (deadlines, heartbeats); must not grow with the cluster."""

    def on_drain(self) -> None:
        """Draining has begun (tell peers now rather than at the next tick)."""

    def stop(self) -> None:
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for end in self._wakeup:
                end.close()
            self._wakeup = None
        self.metrics.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.ctx.destroy(linger=0)
        if self.tracing is not None:
            self.tracing.shutdown()
        log(self.name, "stopped")

    # helpers ---------------------------------------------------------------------------------
    def count_malformed(self) -> None:
        self.counters["malformed_frames"] += 1
        self.metrics.malformed.labels(self.name).inc()

    def decode(self, frame: bytes) -> wire.Envelope | None:
        """Decode a body frame, counting and dropping anything malformed."""
        try:
            return wire.decode(frame)
        except wire.BadFrame as exc:
            self.count_malformed()
            log(self.name, "dropped malformed frame", level="warning", error=str(exc)[:200])
            return None

    def read_router(
        self,
        sock: zmq.Socket[bytes],
        handler: Callable[[bytes, wire.Envelope, bytes, str], None],
        relay: Callable[[list[bytes], str], None] | None = None,
    ) -> None:
        """Handle every message waiting on a ROUTER, with its sender's role.  A message from a
        DEALER peer is [identity, body]; [identity, route..., body(, note)] is a stream frame
        for ``relay`` (its body forwarded as bytes, never decoded); anything else is malformed
        and dropped."""
        for role, frames in incoming_with_role(sock):
            if len(frames) == 2:
                envelope = self.decode(frames[1])
                if envelope is not None:
                    self.safely(handler, frames[0], envelope, frames[1], role)
            elif (
                relay is not None and 2 + wire.ROUTE_FRAMES <= len(frames) <= 3 + wire.ROUTE_FRAMES
            ):
                self.safely(relay, frames, role)
            else:
                self.count_malformed()

    def send_to(self, sock: zmq.Socket[bytes], identity: bytes, body: bytes) -> None:
        """Send without blocking; a peer that is gone is counted, and its requests are cleaned
        up by the sender's own bookkeeping."""
        try:
            sock.send(identity, NOBLOCK | SNDMORE)
            sock.send(body, NOBLOCK)
        except zmq.ZMQError:
            self.counters["undeliverable"] += 1

    def safely(self, handler: Callable[..., None], *args: Any) -> None:
        """Run one message's handler; a bug triggered by one message must not stop the daemon."""
        try:
            handler(*args)
        except Exception as exc:
            self.counters["handler_errors"] += 1
            log(
                self.name,
                "message handler failed",
                level="error",
                error=f"{type(exc).__name__}: {exc}",
            )

    def pong(self) -> wire.Pong:
        return wire.Pong(daemon=self.name, pid=os.getpid(), version=__version__, ready=self.started)
