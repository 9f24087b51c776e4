"""The soak script against a real Serve app (the tiny counting model), and its checks."""

import json
import subprocess
import sys
from pathlib import Path

from loadtests.soak import checks, rss_summary

ROOT = Path(__file__).resolve().parents[3]
MB = 2**20


def test_rss_summary_measures_growth_after_each_replicas_warm_up():
    rows = [{"t_s": t, "replica": "r1", "deployment": "Decoder", "pid": 1, "rss_bytes": rss * MB}
            for t, rss in [(0, 100), (5, 200), (10, 200), (15, 230), (20, 210)]]
    rows += [{"t_s": t, "replica": "r2", "deployment": "Decoder", "pid": 2, "rss_bytes": 300 * MB} for t in (12, 16)]
    rss = rss_summary(rows, warmup_s=10)
    assert rss["r1"]["rss_warm_mb"] == 200 and rss["r1"]["rss_end_mb"] == 210 and rss["r1"]["rss_max_mb"] == 230
    assert rss["r1"]["growth_pct"] == 5 and rss["r1"]["max_growth_pct"] == 15
    assert rss["r2"]["growth_pct"] is None  # did not outlive its own warm-up (from t=12)
    result = checks(failures=0, requests=10, e2e_p99_ms=900, rss=rss, max_p99_s=1, max_rss_growth_pct=10)
    assert result["no_failures"]["passed"] and result["e2e_p99"]["passed"]
    assert not result["rss_flat"]["passed"] and result["rss_flat"]["max_growth_pct"] == {"r1": 15}
    assert checks(0, 10, 900, rss, 1, max_rss_growth_pct=20)["rss_flat"]["passed"]
    assert not checks(0, 10, 1100, rss, 1, 20)["e2e_p99"]["passed"]
    assert not checks(0, 0, 900, rss, 1, 20)["no_failures"]["passed"]  # no requests is no soak


def test_soak_against_a_running_service(service, tmp_path):
    import ray

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["1 2 3", "5 7 9", "20 21 22"]))
    out = tmp_path / "soak"
    proc = subprocess.run([sys.executable, "-m", "loadtests.soak", "--url", service,
                           "--ray-address", ray.get_runtime_context().gcs_address, "--duration", "15s",
                           "--users", "2", "--spawn-rate", "2", "--max-tokens", "12", "--prompts-file", str(prompts),
                           "--warmup-s", "5", "--interval-s", "1", "--max-p99-s", "30", "--max-rss-growth-pct", "50",
                           "--out", str(out)], capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((out / "soak.json").read_text())
    assert result["passed"] and result["failures"] == 0 and result["requests"] > 0 and not result["started_service"]
    endpoints = result["per_endpoint"]
    assert set(endpoints) == {"completions", "completions/stream", "chat", "chat/stream"}
    assert result["requests"] == sum(e["requests"] for e in endpoints.values())
    assert all(e["requests"] == e["E2E_ms"]["count"] for e in endpoints.values())
    e2e, ttft = result["latency_ms"]["E2E"], result["latency_ms"]["TTFT"]
    assert e2e["count"] == result["requests"] and 0 < e2e["p50"] <= e2e["p99"]  # Locust-bucketed, vs an exact max
    assert 0 < ttft["count"] < e2e["count"] and ttft["p50"] <= e2e["p99"]
    deployments = {r["deployment"] for r in result["rss"].values()}
    assert {"Router", "Decoder"} <= deployments
    for replica in result["rss"].values():
        assert replica["samples"] >= 10 and replica["rss_end_mb"] > 50 and replica["growth_pct"] is not None
    assert (out / "rss.csv").is_file() and (out / "rss.png").is_file() and (out / "summary.json").is_file()
