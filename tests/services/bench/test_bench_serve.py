"""`sdsat bench-serve` against the shared test service (the tiny counting model on Ray Serve)."""

import pytest

from services.bench.serve import parse_methods, run_bench_serve


def test_methods_name_what_each_request_asks_for():
    assert parse_methods("default, ar,auto,prompt-lookup:1") == {
        "default": None, "ar": {"method": "ar"}, "auto": {"method": "auto"},
        "prompt-lookup:1": {"method": "prompt-lookup", "k": 1}}
    with pytest.raises(ValueError):
        parse_methods(" , ")


def test_bench_serve_compares_every_method_with_ar(service):
    methods = parse_methods("auto,prompt-lookup:2,ar")
    report = run_bench_serve(service, ["1 2 3", "7 8 9 10"], [1, 2], runs=1, per_client=1, max_tokens=12,
                             methods=methods)
    assert report["plain"] == "ar" and report["route"] == "/completions"
    rows = {(r["method"], r["concurrency"]): r for r in report["results"]}
    assert set(rows) == {(m, c) for m in methods for c in (1, 2)}
    assert all(r["errors"] == 0 and r["tokens_per_s"] > 0 and r["median_latency_s"] > 0 for r in rows.values())
    assert set(report["vs_plain"]) == {"auto", "prompt-lookup:2"}
    for name, by_c in report["vs_plain"].items():
        assert by_c["1"]["throughput_ratio"] == pytest.approx(
            rows[(name, 1)]["tokens_per_s"] / rows[("ar", 1)]["tokens_per_s"])


def test_bench_serve_without_streaming_counts_whole_answers(service):
    report = run_bench_serve(service, ["1 2 3"], [1], runs=1, per_client=2, max_tokens=12,
                             methods=parse_methods("default,ar"), stream=False)
    assert report["stream"] is False
    for row in report["results"]:
        assert row["errors"] == 0 and row["median_ttft_s"] is None and row["median_latency_s"] > 0
        # 24 tokens over a wall time of at least the two requests' latencies (the median of two is their mean)
        assert 0 < row["tokens_per_s"] * 2 * row["median_latency_s"] <= 24 * 1.001
