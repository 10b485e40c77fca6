"""OpenTelemetry traces: one request is one trace across bridge, gateway, orchestrator and worker.

The W3C ``traceparent`` travels inside every RPC envelope.  Spans are exported over OTLP
(HTTP/protobuf) only when the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set; otherwise :func:`setup` returns ``None`` and the
daemons create no spans at all, so tracing costs nothing when it is off.
"""

from __future__ import annotations

import os

from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()

__all__ = ["Span", "SpanKind", "Tracer", "Tracing", "child_traceparent", "parent_context", "setup"]


def enabled() -> bool:
    return (
        bool(
            os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )
        and os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true"
    )


class Tracing:
    """A daemon's tracer and the provider that exports its spans."""

    def __init__(self, service: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create(
            {"service.name": f"haifctl-{service}", "service.namespace": "haifctl"}
        )
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer: Tracer = self.provider.get_tracer("haifctl")

    def shutdown(self) -> None:
        """Flush what is buffered before the process exits."""
        self.provider.shutdown()


def setup(service: str) -> Tracing | None:
    """Tracing for this daemon, exporting over OTLP; None when no exporter is configured."""
    return Tracing(service) if enabled() else None


def parent_context(traceparent: str) -> Context | None:
    """The context a ``traceparent`` names (None when it is empty or malformed)."""
    if not traceparent:
        return None
    return _propagator.extract({"traceparent": traceparent})


def child_traceparent(span: Span) -> str:
    """The ``traceparent`` that makes the next hop's spans children of ``span``."""
    from opentelemetry import trace

    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")
