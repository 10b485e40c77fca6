"""The bridge daemon: uvicorn serving the app on a socket bound before anything starts, with
the edge's HTTP protocol; graceful shutdown on SIGTERM."""

from __future__ import annotations

import math
import signal
import socket as pysocket
from pathlib import Path

from haifctl.daemon.base import Daemon, settle_heap
from haifctl.daemon.bridge.app import create_app
from haifctl.daemon.bridge.edge import EdgeLimits, edge_protocol
from haifctl.keys import KeyStore


def parse_http_bind(bind: str) -> tuple[str, int]:
    bind = bind.removeprefix("http://")
    host, _, port = bind.rpartition(":")
    return (host or "127.0.0.1").strip("[]"), int(port or 8080)


class BridgeDaemon(Daemon):
    """Runs the app on uvicorn; SIGTERM lets in-flight responses finish (graceful shutdown).
    The ready file and /metrics are the base class's, as for every daemon; the loop is
    uvicorn's."""

    name = "bridge"

    def __init__(
        self,
        gateway: str,
        bind: str,
        keys: KeyStore,
        ready_file: Path | None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        limits: EdgeLimits | None = None,
    ) -> None:
        super().__init__(ready_file)
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.gateway = gateway
        self.host, self.port = parse_http_bind(bind)
        self.keys = keys
        if limits is None:  # the bridge_* settings of the home the keys live in
            from haifctl.config import resolve

            limits = EdgeLimits.from_settings(resolve({"home": keys.path.parent}))
        self.limits = limits

    def ready(self) -> None:
        """The app has started (its lifespan's start-up ran): tell the supervisor."""
        settle_heap()
        self.announce_ready()

    def run(self) -> None:
        import uvicorn

        family = pysocket.AF_INET6 if ":" in self.host else pysocket.AF_INET
        sock = pysocket.socket(family, pysocket.SOCK_STREAM)
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(2048)
        host, port = sock.getsockname()[:2]
        self.endpoints["rpc"] = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.serve_metrics()
        app = create_app(
            self.gateway,
            self.keys,
            on_ready=self.ready,
            metrics=self.metrics,
            keyring=self.keyring,
            host=self.host,
            limits=self.limits,
        )
        # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with a
        # handler of ours in place that re-raise is a no-op and the process exits with 0.
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGINT, lambda *_: None)
        config = uvicorn.Config(
            app,
            http=edge_protocol(self.limits),
            timeout_keep_alive=max(1, math.ceil(self.limits.idle_timeout_s)),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=30,
            # X-Forwarded-For from a local client is no business of the bridge: keys and limits
            # go by the connection, and one middleware less runs for every message
            proxy_headers=False,
            lifespan="on",
        )
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            self.ctx.destroy(linger=0)
