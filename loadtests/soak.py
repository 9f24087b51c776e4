"""Soak test: a long Locust run at moderate load while every Serve replica's resident memory is sampled.

    python -m loadtests.soak --duration 10m --users 4 --warmup-s 180 --out infra/bench/soak   # = make soak
    python -m loadtests.soak --url http://127.0.0.1:8000 --ray-address auto --duration 60s

Without --url it starts the service as `sdsat serve` does (a local Ray with a capped object store, the
Serve config's app, by default the embedded model), waits for GET /ready and stops the service at the
end, also after an error; with --url it samples the replicas of the Ray cluster at --ray-address. The
RSS of every alive Serve replica on this node (router and decoders) is sampled every --interval-s.

OUT receives Locust's CSVs, JSON stats and HTML report, the report's summary.json and loadtest.png,
rss.csv (every sample), rss.png and soak.json: requests, failures, E2E and TTFT percentiles (all
endpoints together and per endpoint), each replica's RSS at the end of its warm-up (the first
--warmup-s of the run or of its life), at the end and at most, and the checks: no failed request, E2E
p99 within --max-p99-s, and no replica's RSS after its warm-up more than --max-rss-growth-pct above its
value at the end of the warm-up. The exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from loadtests.report import write_report

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seconds(timespan: str) -> int:
    """Locust's run-time syntax: 300, 300s, 5m, 1h30m."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", timespan.strip())
    if not match or not timespan.strip():
        raise ValueError(f"not a duration: {timespan!r}")
    h, m, s = (int(g or 0) for g in match.groups())
    return 3600 * h + 60 * m + s


def percentile(histogram: dict[int, int], q: float) -> int:
    """Locust's percentile of a {response time: count} histogram (`locust.stats`' algorithm, not imported:
    importing locust monkey-patches the process with gevent)."""
    count, target, seen = sum(histogram.values()), int(sum(histogram.values()) * q), 0
    for value in sorted(histogram, reverse=True):
        seen += histogram[value]
        if count - seen <= target:
            return value
    return 0


def wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:  # 503 until a decoder has warmed up, or not listening yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/ready did not answer 200 within {timeout_s:.0f} s")
        time.sleep(1)


def replica_processes() -> dict[str, tuple[str, int]]:
    """{actor name: (deployment, pid)} of the alive Serve replicas on this node. Read from the GCS actor
    table: `ray.util.state.list_actors` asks the dashboard's HTTP server, which `sdsat serve` leaves off."""
    import ray
    from ray._private import state

    node = ray.get_runtime_context().get_node_id()
    return {(info["Name"] or info["ActorID"]).removeprefix("SERVE_REPLICA::"):
            (info["ActorClassName"].split(":")[-1], info["Pid"])
            for info in state.actors(actor_state_name="ALIVE").values()
            if info["ActorClassName"].startswith("ServeReplica:") and info["Address"]["NodeID"] == node
            and info["Pid"]}


class RssSampler(threading.Thread):
    """Samples the replicas' RSS every `interval_s` (and once more when stopped) into `rows`."""

    def __init__(self, interval_s: float):
        super().__init__(daemon=True)
        self.interval_s, self.rows, self.errors = interval_s, [], 0
        self._stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        self.sample()
        while not self._stop_event.wait(self.interval_s):
            self.sample()
        self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def sample(self) -> None:
        t = round(time.monotonic() - self.t0, 1)
        try:
            replicas = replica_processes()
        except Exception:  # a slow or busy GCS costs a sample, not the run
            self.errors += 1
            return
        for name, (deployment, pid) in sorted(replicas.items()):
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.Error:  # the replica stopped since the listing
                continue
            self.rows.append({"t_s": t, "replica": name, "deployment": deployment, "pid": pid, "rss_bytes": rss})


def rss_summary(rows: list[dict], warmup_s: float) -> dict[str, dict]:
    """Per replica: RSS (MiB) at the end of its warm-up (its first sample `warmup_s` after it was first
    seen), at the end and at most; growth after the warm-up, at the end and at most, in %. Replicas
    that did not outlive their warm-up have no growth."""
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(row["replica"], []).append(row)
    out = {}
    for name, samples in sorted(series.items()):
        samples.sort(key=lambda r: r["t_s"])
        after = [r["rss_bytes"] for r in samples if r["t_s"] >= samples[0]["t_s"] + warmup_s]
        warm = after[0] if after else None
        out[name] = {
            "deployment": samples[0]["deployment"], "pid": samples[0]["pid"], "samples": len(samples),
            "first_seen_s": samples[0]["t_s"], "last_seen_s": samples[-1]["t_s"],
            "rss_start_mb": round(samples[0]["rss_bytes"] / MB, 1),
            "rss_warm_mb": round(warm / MB, 1) if warm else None,
            "rss_end_mb": round(samples[-1]["rss_bytes"] / MB, 1),
            "rss_max_mb": round(max(r["rss_bytes"] for r in samples) / MB, 1),
            "growth_pct": round(100 * (after[-1] - warm) / warm, 2) if warm else None,
            "max_growth_pct": round(100 * (max(after) - warm) / warm, 2) if warm else None,
        }
    return out


def percentiles(entries: list[dict], kind: str, name: str | None = None) -> dict:
    """Count, p50, p99 and max of one metric type, of one endpoint or all together, from Locust's
    --json-file stats (their response-time histograms, bucketed as Locust buckets them)."""
    entries = [e for e in entries if e["method"] == kind and name in (None, e["name"]) and e["num_requests"]]
    histogram: dict[int, int] = {}
    for e in entries:
        for value, count in e["response_times"].items():
            histogram[round(float(value))] = histogram.get(round(float(value)), 0) + count
    if not histogram:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    return {"count": sum(histogram.values()), "p50": percentile(histogram, 0.5), "p99": percentile(histogram, 0.99),
            "max": round(max(e["max_response_time"] for e in entries))}


def checks(failures: int, requests: int, e2e_p99_ms: float | None, rss: dict[str, dict], max_p99_s: float,
           max_rss_growth_pct: float) -> dict[str, dict]:
    """The soak's pass/fail checks, each with its measured value and bound."""
    growth = {name: r["max_growth_pct"] for name, r in rss.items() if r["max_growth_pct"] is not None}
    return {
        "no_failures": {"passed": requests > 0 and failures == 0, "requests": requests, "failures": failures},
        "e2e_p99": {"passed": e2e_p99_ms is not None and e2e_p99_ms <= max_p99_s * 1e3, "p99_ms": e2e_p99_ms,
                    "bound_ms": max_p99_s * 1e3},
        "rss_flat": {"passed": bool(growth) and max(growth.values()) <= max_rss_growth_pct,
                     "max_growth_pct": growth, "bound_pct": max_rss_growth_pct},
    }


def run_locust(args: argparse.Namespace, url: str, out: Path) -> int:
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
           "--host", url, "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.duration,
           "--stop-timeout", str(args.stop_timeout_s), "--max-tokens", str(args.max_tokens),
           "--csv", str(out / "locust"), "--csv-full-history", "--json-file", str(out / "locust"),
           "--html", str(out / "report.html"), "--only-summary"]
    if args.prompts_file:
        cmd += ["--prompts-file", args.prompts_file]
    with open(out / "locust.log", "w") as log, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log) as proc:
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()


def plot_rss(rows: list[dict], rss: dict[str, dict], warmup_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for name, summary in rss.items():
        points = [(r["t_s"], r["rss_bytes"] / MB) for r in rows if r["replica"] == name]
        ax.plot(*zip(*points, strict=True), marker=".", label=f"{summary['deployment']} ({name.split('#')[-1]})")
    ax.axvline(warmup_s, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Serve replicas' resident memory under Locust load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(args: argparse.Namespace, out: Path, url: str, sampler: RssSampler, warmup_s: float,
              locust_status: int, load: dict) -> dict:
    report = write_report(out / "locust", out)  # summary.json and loadtest.png, from the CSVs
    entries = json.loads((out / "locust.json").read_text())  # the final stats (the CSVs lag up to a second)
    http = {e["name"]: e for e in entries if e["method"] not in report["units"]}
    requests, failures = sum(e["num_requests"] for e in http.values()), sum(e["num_failures"] for e in http.values())
    e2e, ttft = percentiles(entries, "E2E"), percentiles(entries, "TTFT")
    tokens = sum(e["total_content_length"] for e in entries if e["method"] == "E2E")
    duration = report["duration_s"]
    rss = rss_summary(sampler.rows, warmup_s)
    with open(out / "rss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["t_s", "replica", "deployment", "pid", "rss_bytes"])
        writer.writeheader()
        writer.writerows(sampler.rows)
    if sampler.rows:
        plot_rss(sampler.rows, rss, warmup_s, out / "rss.png")
    result = {
        "command": " ".join(["python -m loadtests.soak", *sys.argv[1:]]),
        "url": url, "started_service": args.url is None, "config": args.config if args.url is None else None,
        "duration_s": duration, "users": args.users, "spawn_rate": args.spawn_rate,
        "max_tokens": args.max_tokens, "warmup_s": warmup_s, "sample_interval_s": args.interval_s,
        "requests": requests, "failures": failures, "locust_exit_code": locust_status,
        "requests_per_s": round(requests / duration, 2) if duration else None,
        "output_tokens_per_s": round(tokens / duration, 1) if duration else None,
        "latency_ms": {"E2E": e2e, "TTFT": ttft},
        "per_endpoint": {name: {"requests": e["num_requests"], "failures": e["num_failures"],
                                "E2E_ms": percentiles(entries, "E2E", name),
                                **({"TTFT_ms": percentiles(entries, "TTFT", name)} if name.endswith("stream") else {})}
                         for name, e in sorted(http.items())},
        "rss": rss, "rss_sample_errors": sampler.errors,
        "host": {"cpus": os.cpu_count(), **load, "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
        "checks": checks(failures, requests, e2e["p99"], rss, args.max_p99_s, args.max_rss_growth_pct),
    }
    result["passed"] = all(c["passed"] for c in result["checks"].values())
    return result


def prefix_cache_counters(url: str, settle_s: float = 6.0) -> dict:
    """The prefix cache's counters summed over the decoder replicas, from the service's own Prometheus
    endpoint (the replicas export them after each request; `settle_s` lets the last export land)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    time.sleep(settle_s)
    counters: dict[str, float] = {}
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError as e:
        return {"error": str(e)}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_sdsat_prefix_cache_") and sample.name.endswith("_total"):
                name = sample.name.removeprefix("ray_sdsat_prefix_cache_").removesuffix("_total")
                counters[name] = counters.get(name, 0) + sample.value
    return counters


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` that stops the service


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="soak a running service (default: start one, as `sdsat serve` does)")
    parser.add_argument("--ray-address", default="auto",
                        help="with --url: the Ray cluster whose replicas are sampled (default: %(default)s)")
    parser.add_argument("--config", default="infra/serve_config.yaml", help="Serve config of the started service")
    parser.add_argument("--port", type=int, default=0, help="HTTP port of the started service (default: a free one)")
    parser.add_argument("--object-store-mb", type=int, default=512, help="object store cap of the started Ray")
    parser.add_argument("--duration", default="5m", help="Locust run time: 300, 300s, 5m, 1h (default: %(default)s)")
    parser.add_argument("--users", type=int, default=4, help="concurrent Locust users (default: %(default)s)")
    parser.add_argument("--spawn-rate", type=float, default=1, help="users started per second (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default: %(default)s)")
    parser.add_argument("--prompts-file", default="", help="JSONL prompts (default: HumanEval's)")
    parser.add_argument("--stop-timeout-s", type=int, default=30, help="time given to requests in flight at the end")
    parser.add_argument("--warmup-s", type=float, default=None,
                        help="RSS warm-up per replica (default: 20%% of the duration, at most 60 s)")
    parser.add_argument("--interval-s", type=float, default=5.0, help="RSS sampling period (default: %(default)s)")
    parser.add_argument("--max-p99-s", type=float, default=30.0, help="E2E p99 bound (default: %(default)s)")
    parser.add_argument("--max-rss-growth-pct", type=float, default=10.0,
                        help="bound on each replica's RSS growth after its warm-up (default: %(default)s)")
    parser.add_argument("--ready-timeout-s", type=float, default=600, help="wait for GET /ready (default: %(default)s)")
    parser.add_argument("--out", default="results/soak", help="results folder (default: %(default)s)")
    parser.add_argument("--json", help="soak summary path (default: OUT/soak.json)")
    args = parser.parse_args(argv)

    import ray

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warmup_s = args.warmup_s if args.warmup_s is not None else min(60.0, 0.2 * seconds(args.duration))
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.url is None:
            from services.cli import start_service

            url = start_service(args.config, "127.0.0.1", args.port or free_port(), address="local",
                                object_store_mb=args.object_store_mb)
        else:
            url = args.url.rstrip("/")
            ray.init(address=args.ray_address, log_to_driver=False)
        wait_ready(url, args.ready_timeout_s)
        print(f"soaking {url}: {args.users} users for {args.duration}, results in {out}", flush=True)
        load = {"load_avg_start": [round(x, 2) for x in os.getloadavg()]}
        sampler = RssSampler(args.interval_s)
        sampler.start()
        try:
            status = run_locust(args, url, out)
        finally:
            sampler.stop()
        result = summarize(args, out, url, sampler, warmup_s, status, load)
        result["prefix_cache"] = prefix_cache_counters(url)  # dropped_writes: blocks never written to Redis
    finally:
        if args.url is None and ray.is_initialized():
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        else:
            ray.shutdown()
    path = Path(args.json) if args.json else out / "soak.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    e2e, ttft = result["latency_ms"]["E2E"], result["latency_ms"]["TTFT"]
    print(f"{result['requests']} requests, {result['failures']} failures in {result['duration_s']} s; "
          f"E2E p50/p99 {e2e['p50']}/{e2e['p99']} ms, TTFT p50/p99 {ttft['p50']}/{ttft['p99']} ms; RSS growth after "
          f"warm-up (max, %): {result['checks']['rss_flat']['max_growth_pct']}")
    cache = result["prefix_cache"]
    print(f"prefix cache: {cache.get('hit_blocks_local', 0):.0f} local and {cache.get('hit_blocks_redis', 0):.0f} "
          f"Redis block hits, {cache.get('dropped_writes', 0):.0f} dropped writes, {cache.get('timeouts', 0):.0f} "
          f"timeouts")
    for name, check in result["checks"].items():
        print(f"{'PASS' if check['passed'] else 'FAIL'} {name}")
    print(f"summary: {path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
