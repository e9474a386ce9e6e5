"""OpenTelemetry tracing for the server and the gateway (`--otlp-traces-endpoint`, as vLLM).

Off unless an endpoint is given: then each app gets its own `TracerProvider` (passed explicitly,
never installed as the process-wide one) exporting OTLP over HTTP in batches. FastAPI's
instrumentation opens one SERVER span per HTTP request and continues the caller's W3C
`traceparent`; the gateway injects its current span into every upstream request, so a request's
spans in the gateway and the server share one trace. The server adds an `llm_request` span
with vLLM's attribute names (queue time, time to first token, prefill and decode time, tokens).

`/health*` and `/metrics` are not traced: probes and scrapes would drown the requests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Tracer

UNTRACED_URLS = "/health,/health/live,/health/ready,/metrics"


def tracer_provider(service_name: str, endpoint: str) -> TracerProvider:
    """A provider exporting OTLP/HTTP (protobuf) to `endpoint` (e.g.
    http://collector:4318/v1/traces); batching knobs follow the OTEL_BSP_* variables."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def instrument(app: Any, provider: TracerProvider) -> None:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider,
                                       excluded_urls=UNTRACED_URLS)


def inject_context(headers: Mapping[str, str] | None) -> dict[str, str]:
    """`headers` plus the current span's `traceparent` (nothing when no span is recording)."""
    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def wall_ns(monotonic: float) -> int:
    """A `time.monotonic()` instant as wall-clock nanoseconds (what spans carry)."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


def record_llm_request(tracer: Tracer, attributes: dict[str, Any], arrival: float,
                       finished: float) -> None:
    """One finished generation as a span, child of the current (HTTP) span, from its arrival to
    its end."""
    span = tracer.start_span("llm_request", start_time=wall_ns(arrival),
                             attributes={k: v for k, v in attributes.items() if v is not None})
    span.end(end_time=wall_ns(finished))
