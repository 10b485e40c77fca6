"""Prometheus metrics for the daemons: one registry per daemon (no process-wide state), names
with the ``haif_`` prefix and base units, buckets that suit LLM latencies."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

# A health route answers (ok, body): 200 when ok, else 503, with the body as JSON.
Probe = Callable[[], tuple[bool, dict[str, Any]]]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]

# End-to-end request latency: from milliseconds (tiny models) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Time to first token: sub-millisecond on loopback up to seconds of prompt processing or queueing.
TTFT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Time per output token: 0.1 ms (tiny model) to 250 ms (a large model on a CPU).
TPOT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class Metrics:
    """Every metric haifctl exports; each daemon fills in the ones that concern it."""

    def __init__(self, daemon: str) -> None:
        self.daemon = daemon
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "haif_requests",
            "Requests handled, by route and outcome.",
            ["daemon", "route", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            "haif_request_duration_seconds",
            "End-to-end request duration.",
            ["daemon", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "haif_time_to_first_token_seconds",
            "Time to the first token.",
            ["daemon", "model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "haif_time_per_output_token_seconds",
            "Decode time per generated token after the first.",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "haif_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            "haif_generated_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.queue_depth = Gauge(
            "haif_queue_depth", "Requests waiting, per model.", ["model"], registry=r
        )
        self.queue_wait = Histogram(
            "haif_queue_wait_seconds",
            "Time spent queued, per model.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.workers = Gauge(
            "haif_workers", "Workers known to the orchestrator, by state.", ["state"], registry=r
        )
        self.slots = Gauge(
            "haif_worker_slots", "Worker slots, busy and total.", ["worker", "kind"], registry=r
        )
        self.rejected = Counter(
            "haif_rejected_requests",
            "Requests refused, by reason.",
            ["daemon", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "haif_retries", "Requests sent to another worker after a refusal.", registry=r
        )
        self.failovers = Counter(
            "haif_failovers", "Unstarted requests moved off a worker that died.", registry=r
        )
        self.streams_lost = Counter(
            "haif_streams_lost", "Streams cut short by a worker that died.", registry=r
        )
        self.malformed = Counter(
            "haif_malformed_frames", "Malformed frames dropped.", ["daemon"], registry=r
        )
        self.registry_stale = Counter(
            "haif_registry_stale_answers",
            "Model lookups answered from the last good registry answer while the registry was "
            "unreachable.",
            registry=r,
        )
        self.orchestrator_losses = Counter(
            "haif_orchestrator_losses",
            "Times the gateway found its orchestrator dead or restarted.",
            registry=r,
        )
        self.auth_refused = Counter(
            "haif_auth_refused",
            "ZeroMQ peers or messages refused: an unknown key, or a role not allowed here.",
            ["daemon", "reason"],
            registry=r,
        )
        self.limits_shared = Gauge(
            "haif_limits_shared",
            "1 while the gateway shares rate limits, concurrency caps and revocations through "
            "Redis; 0 while it keeps them in-process (no Redis configured, or Redis away).",
            registry=r,
        )
        self.limits_fallbacks = Counter(
            "haif_limits_fallbacks",
            "Times the gateway lost Redis and fell back to its local limits.",
            registry=r,
        )
        self.usage_dropped = Counter(
            "haif_usage_dropped_rows",
            "Usage rows dropped because the registry did not take them before the buffer filled.",
            registry=r,
        )
        self.usage_recorded = Counter(
            "haif_usage_recorded_rows",
            "Usage rows the registry confirmed it stored.",
            registry=r,
        )
        self.model_load = Gauge(
            "haif_model_load_seconds", "Time the loaded model took to load.", ["model"], registry=r
        )

        self.server: WSGIServer | None = None

    def serve(
        self, port: int, host: str = "127.0.0.1", probes: dict[str, Probe] | None = None
    ) -> int:
        """Serve /metrics, and each of ``probes`` (``/healthz``, ``/readyz``) at its path, in a
        thread of the server's own; port 0 picks a free one.  Returns the port."""
        app = MetricsApp(make_wsgi_app(self.registry), probes or {})
        server_class: type[WSGIServer] = type(
            "Server", (_Server,), {"address_family": _family(host)}
        )
        server = self.server = make_server(host, port, app, server_class, _QuietHandler)
        # A short poll interval: close() waits for the serving loop to notice, at a daemon's stop.
        threading.Thread(
            target=lambda: server.serve_forever(poll_interval=0.1), name="metrics", daemon=True
        ).start()
        return int(server.server_port)

    def close(self) -> None:
        """Stop serving (a probe then fails to connect: the daemon is gone)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class MetricsApp:
    """/metrics as prometheus_client renders it; the probes at their own paths, answered from
    the daemon's state at request time (in this server's thread, never the daemon's loop)."""

    def __init__(self, metrics: Callable[..., Iterable[bytes]], probes: dict[str, Probe]) -> None:
        self.metrics = metrics
        self.probes = probes

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        probe = self.probes.get(environ.get("PATH_INFO", ""))
        if probe is None:
            return self.metrics(environ, start_response)
        try:
            ok, body = probe()
        except Exception as exc:  # a probe that fails is a failed probe, not a dead server
            ok, body = False, {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
        data = json.dumps(body, default=str).encode()
        status = "200 OK" if ok else "503 Service Unavailable"
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ]
        start_response(status, headers)
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else data]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds the process open


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: probes and scrapes come every few seconds."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _family(host: str) -> socket.AddressFamily:
    """IPv6 for an IPv6 host (``::``), else IPv4."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return infos[0][0] if infos else socket.AF_INET
