"""Tracing and metrics on real Ray Serve: an OTLP/HTTP receiver run by the test collects the spans, and
`GET /metrics` is parsed with prometheus_client's own parser."""

import http.server
import threading
import time
import uuid

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families
from svc_helpers import app_args, free_port

PROMPT = "3 4 5 6"
MODEL = f"obs-{uuid.uuid4().hex[:8]}"  # a model label no other test's traffic carries


class OtlpReceiver(http.server.ThreadingHTTPServer):
    """Collects exported spans as (service name, span) pairs."""

    def __init__(self, port: int):
        self.spans: list[tuple[str, object]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for rs in request.resource_spans:
                    service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                    for ss in rs.scope_spans:
                        receiver.spans.extend((service, span) for span in ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", port), Handler)


@pytest.fixture(scope="module")
def otlp():
    server = OtlpReceiver(free_port())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def obs_url(ray_session, counting_sdsat_dir, otlp):
    from ray import serve

    from services.app import build_app

    args = app_args(counting_sdsat_dir, model_name=MODEL, prefix_cache=False)
    args["telemetry"] = {"otlp_endpoint": f"http://127.0.0.1:{otlp.server_address[1]}"}
    serve.run(build_app(args), name="obs", route_prefix="/obs")
    yield f"http://127.0.0.1:{ray_session}/obs"
    serve.delete("obs")


def attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value if v.HasField("int_value") else (
            v.double_value if v.HasField("double_value") else None)
    return out


def test_one_trace_spans_router_and_decoder(obs_url, otlp):
    trace_id = uuid.uuid4().hex
    parent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    r = httpx.post(f"{obs_url}/v1/completions", headers={"traceparent": parent}, timeout=60,
                   json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spans = [(svc, s) for svc, s in otlp.spans if s.trace_id.hex() == trace_id]
        names = {s.name for _, s in spans}
        if {"POST /v1/completions", "generate", "decode"} <= names:
            break
        time.sleep(0.5)
    by_name = {s.name: (svc, s) for svc, s in spans}
    assert {"POST /v1/completions", "tokenize", "route", "generate", "queue", "prefill", "decode"} <= set(by_name)
    assert by_name["POST /v1/completions"][0] == "sdsat-router" and by_name["generate"][0] == "sdsat-decoder"
    server = attrs(by_name["POST /v1/completions"][1])
    assert server["gen_ai.operation.name"] == "text_completion" and server["gen_ai.request.model"] == MODEL
    assert server["gen_ai.request.max_tokens"] == 6 and server["gen_ai.request.temperature"] == 0.0
    assert server["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert server["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert server["sdsat.accepted"] == usage["speculation"]["accepted"]
    assert server["sdsat.iterations"] == usage["speculation"]["iterations"]
    generate = attrs(by_name["generate"][1])
    assert generate["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    # the incoming traceparent is the router span's parent; the decoder's span is the router span's child
    assert by_name["POST /v1/completions"][1].parent_span_id.hex() == parent.split("-")[2]
    assert by_name["generate"][1].parent_span_id == by_name["POST /v1/completions"][1].span_id
    assert by_name["decode"][1].parent_span_id == by_name["generate"][1].span_id


def scrape(url: str) -> dict[tuple, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") == MODEL:
                key = (s.name, *sorted((k, v) for k, v in s.labels.items()
                                       if k in ("route", "status", "position")))
                out[key] = out.get(key, 0.0) + s.value
    return out


def settled(url: str) -> dict:
    """A scrape that no longer changes (the export runs every second in the test Ray)."""
    previous = scrape(url)
    for _ in range(20):
        time.sleep(1.5)
        current = scrape(url)
        if current == previous:
            return current
        previous = current
    return previous


def test_metrics_move_by_what_responses_report(obs_url):
    bodies = [{"prompt": PROMPT, "max_tokens": 5, "temperature": 0},
              {"prompt": PROMPT, "max_tokens": 9, "temperature": 0},
              {"prompt": PROMPT, "max_tokens": 7, "temperature": 0, "speculation": {"k": 2}}]
    before = settled(obs_url)  # the other tests' traffic, once exported
    usages = []
    for body in bodies:
        r = httpx.post(f"{obs_url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    assert httpx.post(f"{obs_url}/v1/completions", json={"prompt": "x", "max_tokens": -1}).status_code == 400
    expected = {
        ("ray_sdsat_requests_total", ("route", "/v1/completions"), ("status", "200")): len(bodies),
        ("ray_sdsat_requests_total", ("route", "/v1/completions"), ("status", "400")): 1,
        ("ray_sdsat_output_tokens_total",): sum(u["completion_tokens"] for u in usages),
        ("ray_sdsat_input_tokens_total",): sum(u["prompt_tokens"] for u in usages),
        ("ray_sdsat_spec_accepted_tokens_total",): sum(u["speculation"]["accepted"] for u in usages),
        ("ray_sdsat_spec_drafted_tokens_total",): sum(u["speculation"]["drafted"] for u in usages),
    }
    assert expected[("ray_sdsat_spec_accepted_tokens_total",)] > 0  # the counting model drafts well
    expected = {k: v + before.get(k, 0) for k, v in expected.items()}
    deadline, seen = time.monotonic() + 40, {}
    while time.monotonic() < deadline:  # Ray's metrics agent exports on an interval
        seen = scrape(obs_url)
        if all(seen.get(k) == v for k, v in expected.items()):
            break
        time.sleep(1)
    assert {k: seen.get(k) for k in expected} == expected
    by_position = sum(v for k, v in seen.items() if k[0] == "ray_sdsat_spec_accepted_by_position_total")
    assert by_position == expected[("ray_sdsat_spec_accepted_tokens_total",)]
    key = ("ray_sdsat_request_latency_seconds_count", ("route", "/v1/completions"))
    assert seen[key] - before.get(key, 0) == len(bodies)
    key = ("ray_sdsat_time_to_first_token_seconds_count", ("route", "/v1/completions"))
    assert seen[key] - before.get(key, 0) == len(bodies)
    assert seen[("ray_sdsat_batch_size_count",)] > 0 and ("ray_sdsat_queue_depth",) in seen
    lossless = [s.value for f in text_string_to_metric_families(httpx.get(f"{obs_url}/metrics", timeout=10).text)
                for s in f.samples if s.name == "ray_sdsat_speculation_lossless" and s.labels.get("model") == MODEL]
    assert lossless and set(lossless) == {1.0}  # every decoder's start-up self-check passed


def test_tracing_off_means_no_exporter_and_no_spans(service):
    from ray import serve

    httpx.post(f"{service}/v1/completions", json={"prompt": "3 4 5", "max_tokens": 3}, timeout=60)
    stats = serve.get_deployment_handle("Decoder", "main").stats.remote().result()
    assert stats["telemetry"] == {"tracing": False, "spans_started": 0, "threads": []}
