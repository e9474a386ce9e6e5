"""OpenTelemetry end to end: a client's W3C traceparent -> the gateway -> `pagoda serve`, both
exporting OTLP/HTTP to a collector run by the test, which decodes the protobuf it receives.

One trace must hold the gateway's SERVER span (child of the client's span), the server's SERVER
span (child of a gateway span, through the injected traceparent) and the server's `llm_request`
span with vLLM's attributes matching the response's usage."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.gateway.gateway_harness import GatewayServer, auth, make_config
from tests.server.server_process import free_port, serving

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Collector:
    """An OTLP/HTTP trace receiver: every span received, with its service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["content-length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    service = next(a.value.string_value
                                   for a in resource_spans.resource.attributes
                                   if a.key == "service.name")
                    for scope in resource_spans.scope_spans:
                        collector.spans += [(service, s) for s in scope.spans]
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(b"")

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def in_trace(self, trace_id: str) -> list[tuple[str, object]]:
        return [(svc, s) for svc, s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def traced():
    collector = Collector()
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # export within 0.1 s (default 5 s)
    try:
        # the spans are the HTTP front's: the engine runs in its thread (one process to start)
        with serving("--engine-thread", "--otlp-traces-endpoint", collector.url,
                     "--served-model-name", "small", api_key=None) as proc:
            config = dataclasses.replace(make_config({"small": [proc.url]}),
                                         otlp_traces_endpoint=collector.url)
            with GatewayServer(config) as gateway:
                yield collector, proc, gateway
    finally:
        os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
        collector.server.shutdown()


def wait_for_spans(collector: Collector, trace_id: str, want: set[tuple[str, str]]) -> dict:
    """{span name: (service, span)} once every wanted (service, span name) pair has arrived:
    each process exports on its own schedule, so the gateway's span may come last."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        trace = collector.in_trace(trace_id)
        if want <= {(svc, s.name) for svc, s in trace}:
            return {s.name: (svc, s) for svc, s in trace}
        time.sleep(0.1)
    seen = sorted((svc, s.name) for svc, s in collector.in_trace(trace_id))
    raise AssertionError(f"spans of trace {trace_id}: {seen}; wanted {sorted(want)}")


def test_one_trace_from_client_through_gateway_to_engine(traced):
    collector, _, gateway = traced
    r = httpx.post(gateway.url + "/v1/chat/completions", timeout=60, headers={
        **auth(), "traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"}, json={
        "model": "small", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hi"}]})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    http = "POST /v1/chat/completions"
    spans = wait_for_spans(collector, TRACE_ID, {("pagoda-gateway", http), ("pagoda-server", http),
                                                 ("pagoda-server", "llm_request")})
    trace = collector.in_trace(TRACE_ID)
    gateway_spans = {s.span_id: s for svc, s in trace if svc == "pagoda-gateway"}
    server_http = [s for svc, s in trace if svc == "pagoda-server"
                   and s.name == "POST /v1/chat/completions" and s.kind == s.SPAN_KIND_SERVER]
    gateway_http = [s for s in gateway_spans.values()
                    if s.name == "POST /v1/chat/completions" and s.kind == s.SPAN_KIND_SERVER]
    assert len(gateway_http) == 1 and gateway_http[0].parent_span_id.hex() == CLIENT_SPAN
    assert len(server_http) == 1 and server_http[0].parent_span_id in gateway_spans
    service, llm = spans["llm_request"]
    assert service == "pagoda-server" and llm.parent_span_id == server_http[0].span_id
    attrs = {a.key: a.value for a in llm.attributes}
    assert attrs["gen_ai.usage.prompt_tokens"].int_value == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.completion_tokens"].int_value == usage["completion_tokens"]
    assert attrs["gen_ai.request.max_tokens"].int_value == 8
    assert attrs["gen_ai.response.model"].string_value
    assert [v.string_value for v in attrs["gen_ai.response.finish_reasons"].array_value.values] \
        == [r.json()["choices"][0]["finish_reason"]]
    queue = attrs["gen_ai.latency.time_in_queue"].double_value
    ttft = attrs["gen_ai.latency.time_to_first_token"].double_value
    e2e = attrs["gen_ai.latency.e2e"].double_value
    assert 0 <= queue <= ttft <= e2e
    assert abs(attrs["gen_ai.latency.time_in_model_decode"].double_value - (e2e - ttft)) < 1e-3
    assert llm.end_time_unix_nano - llm.start_time_unix_nano == pytest.approx(e2e * 1e9, rel=0.01)


def test_a_direct_request_starts_its_own_trace_and_probes_are_not_traced(traced):
    collector, proc, _ = traced
    before = len(collector.spans)
    assert httpx.get(proc.url + "/health").status_code == 200
    assert httpx.get(proc.url + "/metrics").status_code == 200
    r = httpx.post(proc.url + "/v1/completions", timeout=60,
                   json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(
            s.name == "llm_request" for _, s in collector.spans[before:]):
        time.sleep(0.1)
    new = collector.spans[before:]
    llm = [s for _, s in new if s.name == "llm_request"]
    assert len(llm) == 1 and llm[0].trace_id.hex() != TRACE_ID
    assert not [s for _, s in new if "health" in s.name or "metrics" in s.name]
