"""One request is one trace: spans from bridge, gateway, orchestrator and worker, exported over
OTLP to a receiver in this test, parented correctly across the processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.cluster import Cluster

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver(ThreadingHTTPServer):
    """A minimal OTLP/HTTP trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict[str, str]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.server.spans.append(
                            {
                                "service": service,
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                            }
                        )
        payload = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_one_request_is_one_trace_across_every_daemon(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.server_port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s
    cluster = Cluster(tmp_path, workers=1, bridge_env={})
    try:
        response = httpx.post(
            f"{cluster.bridge}/v1/completions",
            json={"prompt": "Once upon a time", "max_tokens": 8},
            headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"},
            timeout=30,
        )
        assert response.status_code == 200
        wanted = {
            "POST /v1/completions",
            "gateway infer",
            "orchestrator request",
            "queue wait",
            "worker generate",
            "prompt processing",
            "generation",
        }
        end = time.monotonic() + 30
        while True:  # probe the receiver until every hop has exported
            with receiver.lock:
                spans = [s for s in receiver.spans if s["trace_id"] == TRACE_ID]
            if wanted <= {s["name"] for s in spans}:
                break
            assert time.monotonic() < end, spans
            time.sleep(0.05)
    finally:
        cluster.stop()
    by_name = {s["name"]: s for s in spans}
    assert by_name["POST /v1/completions"]["parent"] == CLIENT_SPAN
    chain = [
        ("gateway infer", "POST /v1/completions"),
        ("orchestrator request", "gateway infer"),
        ("queue wait", "orchestrator request"),
        ("worker generate", "orchestrator request"),
        ("prompt processing", "worker generate"),
        ("generation", "worker generate"),
    ]
    for child, parent in chain:
        assert by_name[child]["parent"] == by_name[parent]["span_id"], (child, parent)
    services = {s["name"]: s["service"] for s in spans}
    assert services["POST /v1/completions"] == "haifctl-bridge"
    assert services["gateway infer"] == "haifctl-gateway"
    assert services["orchestrator request"] == "haifctl-orchestrator"
    assert services["worker generate"] == "haifctl-worker"


def test_no_exporter_means_no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    from haifctl import tracing

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing.setup("gateway") is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.setup("gateway") is None
