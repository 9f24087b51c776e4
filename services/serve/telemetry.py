"""Tracing and metrics for the router and the decoder replicas.

Tracing (OpenTelemetry): one trace per request. The router starts a server span (continuing an
incoming `traceparent`), with `tokenize` and `route` children, and hands the W3C trace context to the
decoder inside the request dict; the decoder adds `generate` with `queue`, `prefix_cache.lookup`,
`prefill` and `decode` children, timed by the engine. Spans go over OTLP/HTTP when an endpoint is
configured (`telemetry.otlp_endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`); without one no provider,
processor or exporter thread exists and the request path creates no span objects.

Metrics: `ray.util.metrics` families (Ray's per-node metrics agent exports them in Prometheus format,
prefixed `ray_`). `GET /metrics` on the API gathers the `ray_sdsat_*` families from every alive node's
export port and serves them merged, so one scrape covers every replica.
"""

from __future__ import annotations

import os
import threading
from contextlib import suppress

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
ROUTER_STATE: dict = {}  # this process's router metrics and model name, for the HTTP middleware


def traces_url(endpoint: str) -> str:
    """OTLP/HTTP traces URL from a collector base URL (as OTEL_EXPORTER_OTLP_ENDPOINT gives it)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class Tracing:
    """A tracer when an OTLP endpoint is configured, else nothing at all (`start` returns None)."""

    def __init__(self, service_name: str, endpoint: str | None = None):
        endpoint = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        self.tracer, self.provider, self.spans_started = None, None, 0
        if not endpoint:
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint)), schedule_delay_millis=1000))
        self.tracer = self.provider.get_tracer("sdsat-serving")

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def start(self, name: str, parent=None, kind=trace.SpanKind.INTERNAL, attributes: dict | None = None,
              start_time: int | None = None):
        """A started span (child of `parent`, a span or a context), or None when tracing is off."""
        if self.tracer is None:
            return None
        if isinstance(parent, trace.Span):
            parent = trace.set_span_in_context(parent)
        self.spans_started += 1
        return self.tracer.start_span(name, context=parent, kind=kind, attributes=attributes, start_time=start_time)

    def extract(self, carrier: dict | None):
        """The remote parent context in a `traceparent` carrier (None when tracing is off or absent)."""
        if self.tracer is None or not carrier:
            return None
        return PROPAGATOR.extract(carrier)

    @staticmethod
    def inject(span) -> dict:
        carrier: dict = {}
        if span is not None:
            PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return carrier

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def end_span(span, attributes: dict | None = None, end_time: int | None = None, error: str | None = None) -> None:
    if span is None:
        return
    if attributes:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
    if error:
        span.set_status(trace.Status(trace.StatusCode.ERROR, error))
    span.end(end_time=end_time)


def speculation_attributes(stats: dict | None, k: int | None = None) -> dict:
    stats = stats or {}
    return {"sdsat.k": k, "sdsat.iterations": stats.get("iterations"), "sdsat.drafted": stats.get("drafted"),
            "sdsat.accepted": stats.get("accepted")}


def telemetry_threads() -> list[str]:
    """Names of the OpenTelemetry SDK's worker threads alive in this process."""
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("Otel"))


# ---- metrics ------------------------------------------------------------------------------------
class RouterMetrics:
    def __init__(self):
        from ray.util.metrics import Counter, Histogram

        self.requests = Counter("sdsat_requests", "HTTP requests by route and status",
                                tag_keys=("model", "route", "status"))
        self.latency = Histogram("sdsat_request_latency_seconds", "end-to-end request latency",
                                 LATENCY_BUCKETS, tag_keys=("model", "route"))
        self.ttft = Histogram("sdsat_time_to_first_token_seconds", "time to the first output token",
                              LATENCY_BUCKETS, tag_keys=("model", "route"))
        self.itl = Histogram("sdsat_inter_token_latency_seconds", "time between output tokens (a message's gap "
                             "divided by its tokens, one sample per token)", ITL_BUCKETS, tag_keys=("model", "route"))
        self.input_tokens = Counter("sdsat_input_tokens", "prompt tokens", tag_keys=("model",))
        self.output_tokens = Counter("sdsat_output_tokens", "generated tokens", tag_keys=("model",))


class DecoderMetrics:
    def __init__(self, model: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"model": model}
        self.drafts = Counter("sdsat_spec_drafts", "draft blocks proposed (speculative iterations)",
                              tag_keys=("model",))
        self.drafted = Counter("sdsat_spec_drafted_tokens", "draft tokens proposed", tag_keys=("model",))
        self.accepted = Counter("sdsat_spec_accepted_tokens", "draft tokens accepted", tag_keys=("model",))
        self.by_position = Counter("sdsat_spec_accepted_by_position", "accepted drafts by position in the block "
                                   "(1 = first draft)", tag_keys=("model", "position"))
        self.mean_accepted = Gauge("sdsat_spec_mean_accepted_length", "accepted drafts per iteration since the "
                                   "replica started", tag_keys=("model",))
        self.batch = Histogram("sdsat_batch_size", "sequences per engine step", BATCH_BUCKETS, tag_keys=("model",))
        self.queue = Gauge("sdsat_queue_depth", "requests waiting for a batch slot", tag_keys=("model",))
        self.running = Gauge("sdsat_running_requests", "requests in the running batch", tag_keys=("model",))
        self.cache = {name: Counter(f"sdsat_prefix_cache_{name}", help_, tag_keys=("model",)) for name, help_ in (
            ("hit_blocks_local", "prefix blocks served from the in-replica cache"),
            ("hit_blocks_redis", "prefix blocks served from Redis"),
            ("miss_blocks", "prefix blocks not found"),
            ("errors", "Redis errors (each one a miss)"),
            ("corrupt", "bad entries found in Redis (deleted)"),
            ("timeouts", "Redis calls past their byte-sized deadline (each one a miss or an unwritten chunk)"),
            ("dropped_writes", "prefix blocks never written to Redis (the write queue's oldest under overload)"),
            ("coalesced_writes", "prefix blocks not written again (this replica wrote the same chunk recently)"))}
        self.lossless = Gauge("sdsat_speculation_lossless", "1: the start-up self-check found verify rows equal to "
                              "the 1-token forward (speculation is lossless); 0: speculative methods serve ar",
                              tag_keys=("model", "dtype"))
        self._cache_seen: dict[str, int] = {}
        self._self_check: tuple[float, dict] | None = None
        self._iterations = self._accepted = 0
        self._lock = threading.Lock()

    def request_finished(self, stats: dict) -> None:
        iterations, accepted = stats.get("iterations", 0), stats.get("accepted", 0)
        if not stats.get("drafted"):  # plain decoding: no draft blocks
            return
        if iterations:
            self.drafts.inc(iterations, self.tags)
        if stats.get("drafted"):
            self.drafted.inc(stats["drafted"], self.tags)
        if accepted:
            self.accepted.inc(accepted, self.tags)
        for position, n in enumerate(stats.get("accepted_per_position") or [], start=1):
            if n:
                self.by_position.inc(n, {**self.tags, "position": str(position)})
        with self._lock:
            self._iterations += iterations
            self._accepted += accepted
            if self._iterations:
                self.mean_accepted.set(self._accepted / self._iterations, self.tags)

    def self_check(self, lossless: bool, dtype: str) -> None:
        """The start-up self-check's verdict; set again at every engine step (a gauge set only while the
        replica starts can be missed by Ray's metrics export)."""
        self._self_check = (1.0 if lossless else 0.0, {**self.tags, "dtype": dtype})
        self.lossless.set(*self._self_check)

    def engine_step(self, batch: int, waiting: int) -> None:
        if self._self_check is not None:
            self.lossless.set(*self._self_check)
        if batch:
            self.batch.observe(batch, self.tags)
        self.running.set(batch, self.tags)
        self.queue.set(waiting, self.tags)

    def cache_counters(self, counters: dict) -> None:
        """Export the growth of the prefix cache's cumulative counters since the previous call."""
        with self._lock:
            for name, counter in self.cache.items():
                delta = counters.get(name, 0) - self._cache_seen.get(name, 0)
                if delta > 0:
                    counter.inc(delta, self.tags)
                    self._cache_seen[name] = counters.get(name, 0)


async def gather_metrics(prefix: str = "ray_sdsat_") -> str:
    """The `prefix` families from every alive node's Ray metrics export, merged, in Prometheus text."""
    import asyncio

    import httpx
    import ray
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    nodes = await asyncio.to_thread(ray.nodes)
    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in nodes
            if n.get("Alive") and n.get("MetricsExportPort")]
    families: dict[str, object] = {}
    async with httpx.AsyncClient(timeout=5) as client:
        for response in await asyncio.gather(*(client.get(u) for u in urls), return_exceptions=True):
            if isinstance(response, BaseException) or response.status_code != 200:
                continue  # a node going away must not fail the scrape
            for family in text_string_to_metric_families(response.text):
                if not family.name.startswith(prefix):
                    continue
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family

    class _Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    with suppress(ValueError):
        registry.register(_Merged())
    return generate_latest(registry).decode()
