"""Locust users against a real Serve app (the tiny counting model), and the metrics they compute."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.report import write_report
from loadtests.streaming import StreamTimer

ROOT = Path(__file__).resolve().parents[3]


def _sse(payload) -> str:
    return "data: " + (payload if isinstance(payload, str) else json.dumps(payload))


def test_stream_timer_measures_first_token_gaps_and_tokens():
    timer = StreamTimer(t0=10.0)
    timer.feed(_sse({"choices": [{"text": ""}]}), 10.1)  # empty first chunk: not a token
    timer.feed(_sse({"choices": [{"text": "1 2"}]}), 10.5)
    timer.feed("", 10.55)
    timer.feed(_sse({"choices": [{"delta": {"content": " 3 4 5"}}]}), 10.7)
    timer.feed(_sse({"choices": [{"text": " 6"}]}), 11.0)
    timer.feed(_sse({"choices": [], "usage": {"completion_tokens": 6}}), 11.0)
    assert timer.problem() == "stream ended without [DONE]"
    timer.feed(_sse("[DONE]"), 11.0)
    m = timer.metrics(end=11.5)
    assert timer.problem() is None and timer.text == "1 2 3 4 5 6"
    assert m.ttft_s == pytest.approx(0.5) and m.e2e_s == pytest.approx(1.5)
    assert m.itl_s == pytest.approx([0.2, 0.3]) and m.tpot_s == pytest.approx(1.0 / 5)
    assert m.tokens_per_s == pytest.approx(4.0)


def test_stream_timer_reports_errors_in_the_stream():
    timer = StreamTimer(t0=0.0)
    timer.feed(_sse({"error": {"message": "the request timed out"}}), 1.0)
    timer.feed(_sse("[DONE]"), 1.0)
    assert "timed out" in timer.problem()


def test_headless_locust_run(service, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["1 2 3", "5 7 9", "20 21 22", "4 6"]))
    prefix = tmp_path / "locust"
    locust = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py")]
    proc = subprocess.run([*locust, "--headless", "-u", "4", "-r", "4", "-t", "10s", "--host", service,
                           "--prompts-file", str(prompts), "--max-tokens", "12", "--ignore-eos",
                           "--csv", str(prefix), "--csv-full-history", "--html", str(tmp_path / "report.html"),
                           "--only-summary"], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = write_report(prefix, tmp_path)
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "loadtest.png").stat().st_size > 10_000
    assert (tmp_path / "report.html").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["failures"] == 0
    requests = summary["requests"]
    assert summary["failures"] == 0 and set(requests) == {"completions", "completions/stream", "chat", "chat/stream"}
    metrics = summary["metrics"]
    for stream in ("completions/stream", "chat/stream"):
        ttft, e2e, itl = metrics["TTFT"][stream], metrics["E2E"][stream], metrics["ITL"][stream]
        assert ttft["count"] == e2e["count"] == requests[stream]["count"] > 0
        assert 0 < ttft["p50"] <= e2e["p50"] and ttft["max"] <= e2e["max"]
        assert 0 < itl["p50"] <= e2e["max"] and metrics["TPOT"][stream]["count"] == e2e["count"]
    for name in requests:
        assert metrics["E2E"][name]["count"] == requests[name]["count"]
        assert metrics["OUT_TOK_S"][name]["mean"] > 0
    # every request generated exactly max_tokens (EOS ignored): the E2E rows carry the token counts
    assert summary["output_tokens"] == 12 * sum(r["count"] for r in requests.values())
    assert summary["output_tokens_per_s"] > 0
