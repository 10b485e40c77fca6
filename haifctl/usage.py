"""The gateway's side of per-request usage: a bounded buffer of finished requests, sent to the
registry daemon in batches, off the hot path.

A request that ends costs the gateway one tuple appended to a deque (its final frame, the one
it already decodes, holds the tokens, the model and the worker); the loop's tick sends what has
gathered, at most one batch in flight, and sends it again when no answer comes (rows carry ids,
so the registry stores a batch sent twice once).  While the registry is slow or away the buffer
holds ``max_rows`` rows (at 300 requests/s, five minutes and a half); past that, new rows are
dropped and counted (``haif_usage_dropped_rows``) rather than grow the gateway's memory.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from typing import Any

import zmq

from haifctl import wire
from haifctl.daemon.base import log
from haifctl.errors import Kind
from haifctl.telemetry import Metrics

MAX_ROWS = 100_000
BATCH_ROWS = 500
FLUSH_S = 1.0  # a partial batch waits at most this long
ACK_TIMEOUT_S = 10.0  # no answer by then: the batch goes again
RETRY_S = 2.0  # after the registry failed to store a batch


class UsageRecorder:
    """Rows for the ``request_usage`` table (see :class:`haifctl.registry.usage.UsageRow`),
    sent over ``sock`` (a DEALER connected to the registry daemon, which the gateway watches
    and hands to :meth:`read`)."""

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        metrics: Metrics,
        *,
        max_rows: int = MAX_ROWS,
        batch_rows: int = BATCH_ROWS,
        flush_s: float = FLUSH_S,
        ack_timeout_s: float = ACK_TIMEOUT_S,
    ) -> None:
        self.sock = sock
        self.metrics = metrics
        self.max_rows = max_rows
        self.batch_rows = batch_rows
        self.flush_s = flush_s
        self.ack_timeout_s = ack_timeout_s
        self.instance = uuid.uuid4().hex[:12]  # row ids: unique across gateways and restarts
        self.seq = 0
        self.rows: deque[list[Any]] = deque()
        self.batch: list[list[Any]] = []  # sent, not yet confirmed
        self.batch_id = ""
        self.resend_at = 0.0
        self.next_flush = 0.0
        self.recorded = 0
        self.dropped = 0

    def add(
        self,
        request_id: str,
        key_id: str,
        model: str,
        worker: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_ms: float | None,
        duration_ms: float,
        outcome: str,
    ) -> None:
        if len(self.rows) >= self.max_rows:
            self.dropped += 1
            self.metrics.usage_dropped.inc()
            return
        self.seq += 1
        self.rows.append(
            [
                f"{self.instance}-{self.seq}",
                time.time(),
                request_id,
                key_id,
                model,
                worker,
                prompt_tokens,
                completion_tokens,
                ttft_ms,
                duration_ms,
                outcome,
            ]
        )

    @property
    def pending(self) -> int:
        return len(self.rows) + len(self.batch)

    def tick(self, now: float) -> None:
        """Send a batch when one is due (full, or the oldest row waited ``flush_s``), or the
        unconfirmed batch again once its answer is overdue."""
        if self.batch:
            if now >= self.resend_at:
                self.send(now)
            return
        if not self.rows or (len(self.rows) < self.batch_rows and now < self.next_flush):
            return
        n = min(self.batch_rows, len(self.rows))
        self.batch = [self.rows.popleft() for _ in range(n)]
        self.seq += 1
        self.batch_id = f"usage-{self.instance}-{self.seq}"
        self.send(now)

    def send(self, now: float) -> None:
        self.resend_at = now + self.ack_timeout_s
        call = wire.RegistryCall(op="record_usage", args={"rows": self.batch})
        try:
            self.sock.send(wire.encode(call, self.batch_id), zmq.NOBLOCK)
        except zmq.ZMQError:  # no registry connected (IMMEDIATE): try again shortly
            self.resend_at = now + RETRY_S

    def read(self, decode: Any) -> None:
        """Every answer waiting on the socket; ``decode`` is the daemon's counting decoder."""
        while True:
            try:
                body = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            envelope = decode(body)
            if envelope is None or envelope.id != self.batch_id or not self.batch:
                continue  # malformed (counted by decode), or the answer to a batch sent twice
            msg = envelope.msg
            now = time.monotonic()
            if isinstance(msg, wire.RegistryReply):
                self.recorded += len(self.batch)
                self.metrics.usage_recorded.inc(len(self.batch))
                self.done(now)
            elif isinstance(msg, wire.Error) and msg.kind in (Kind.invalid, Kind.forbidden):
                # never storable: sending it again would only fail again
                log(
                    "gateway",
                    "usage batch refused",
                    level="error",
                    code=msg.code,
                    rows=len(self.batch),
                )
                self.dropped += len(self.batch)
                self.metrics.usage_dropped.inc(len(self.batch))
                self.done(now)
            else:  # the database failed: the same batch again, a little later
                self.resend_at = now + RETRY_S

    def done(self, now: float) -> None:
        self.batch = []
        self.batch_id = ""
        self.next_flush = now + self.flush_s
