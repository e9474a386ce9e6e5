"""Prometheus metrics with vLLM's names under a `pagoda:` prefix, in a per-app registry.

Request latencies are observed by the server as requests finish. Engine-side gauges and counters
(running/waiting requests, KV usage, token and preemption counts, prefix-cache counters) are read
from the engine at scrape time by `EngineCollector`, so the engine thread never touches Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagoda.engine.async_llm import AsyncLLM
from pagoda.engine.outputs import RequestMetrics

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 10.0)


class EngineCollector(Collector):
    """Reads `AsyncLLM.stats()` (counters as of the engine's last iteration, in whichever thread
    or process it runs) when Prometheus scrapes."""

    def __init__(self, get_llm: Callable[[], AsyncLLM | None], model_name: Callable[[], str]):
        self.get_llm = get_llm
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        llm = self.get_llm()
        if llm is None:
            return
        stats = llm.stats()
        labels = [self.model_name()]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"pagoda:{name}", doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"pagoda:{name}", doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).",
                    stats.kv_cache_usage)
        yield counter("prompt_tokens", "Prefill tokens admitted.", stats.num_prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", stats.num_generation_tokens)
        yield counter("num_preemptions", "Requests preempted.", stats.num_preemptions)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      stats.prefix_cache_hits)
        yield counter("spec_decode_num_drafts", "Verify passes that carried draft tokens.",
                      stats.spec_num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Draft tokens proposed and verified.",
                      stats.spec_num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                      stats.spec_num_accepted_tokens)
        yield counter("embedding_inputs", "Inputs embedded (embedding models).",
                      stats.num_embedded_inputs)
        per_pos = CounterMetricFamily("pagoda:spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted, by position in the draft.",
                                      labels=["model_name", "position"])
        for pos, value in enumerate(stats.spec_accepted_per_pos):
            per_pos.add_metric([*labels, str(pos)], value)
        yield per_pos


class ServerMetrics:
    def __init__(self, get_llm: Callable[[], AsyncLLM | None], model_name: Callable[[], str],
                 layout: dict[str, str] | None = None):
        """`layout`: the engine's shape (parallel sizes, threads, weights), exported as
        `pagoda:engine_config_info` so a benchmark run can record what it measured."""
        self.registry = CollectorRegistry(auto_describe=True)
        if layout:
            Info("pagoda:engine_config", "How the engine is laid out (constant).",
                 registry=self.registry).info(layout)
        self.model_name = model_name
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"pagoda:{name}", doc, labels, buckets=buckets,
                             registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.",
                              LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between streamed outputs, "
                             "per token.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.",
                             LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduling.",
                               LATENCY_BUCKETS)
        self.embedding_latency = histogram("embedding_request_latency_seconds",
                                           "Embedding requests, arrival to answer.",
                                           LATENCY_BUCKETS)
        self.success = Counter("pagoda:request_success", "Finished requests by reason.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self.registry.register(EngineCollector(get_llm, model_name))
        self._itl_children: dict[str, Any] = {}  # model name -> the itl histogram's child

    def observe_itl(self, seconds: float, num_tokens: int) -> None:
        """Once per streamed output: the labelled child is looked up once per model name
        (`labels()` takes a lock and validates the labels: ~70 us of the server's CPU per
        token, taken from the engine on a 2-core machine; docs/benchmarks.md, "Twenty-fourth
        session")."""
        if num_tokens > 0:
            per_token = seconds / num_tokens
            name = self.model_name()
            child = self._itl_children.get(name)
            if child is None:
                child = self._itl_children[name] = self.itl.labels(name)
            for _ in range(num_tokens):
                child.observe(per_token)

    def observe_first_output(self, metrics: RequestMetrics | None) -> None:
        if metrics is None:
            return
        name = self.model_name()
        if metrics.first_token_time is not None:
            self.ttft.labels(name).observe(metrics.first_token_time - metrics.arrival_time)
        if metrics.first_scheduled_time is not None:
            self.queue.labels(name).observe(metrics.first_scheduled_time - metrics.arrival_time)

    def observe_finished(self, metrics: RequestMetrics | None, reasons: list[str]) -> None:
        name = self.model_name()
        for reason in reasons:
            self.success.labels(name, reason).inc()
        if metrics is not None and metrics.finished_time is not None:
            self.e2e.labels(name).observe(metrics.finished_time - metrics.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
