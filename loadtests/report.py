"""Summary JSON and plot of a Locust run, from its CSV files (`--csv PREFIX --csv-full-history`).

    python -m loadtests.report --csv-prefix results/loadtest/locust --out results/loadtest

Writes OUT/summary.json (HTTP requests and failures per endpoint; percentiles of TTFT, ITL, TPOT,
E2E and per-request output tokens/s per endpoint; total output tokens and tokens/s) and
OUT/loadtest.png: latency (TTFT and E2E, median and p95 over Locust's sliding ~10 s window) and
throughput (output tokens/s over the last 5 s, HTTP requests/s) against time.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

METRICS = ("TTFT", "ITL", "TPOT", "E2E", "OUT_TOK_S")  # request types fired by loadtests/locustfile.py
PERCENTILES = ("50%", "90%", "95%", "99%")


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan  # Locust writes "N/A" for an empty window


def _value(text: str) -> float | None:
    """A number for the JSON summary: None where Locust had none."""
    number = _number(text)
    return None if math.isnan(number) else number


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summarize(stats_rows: list[dict], history_rows: list[dict]) -> dict:
    times = sorted({int(r["Timestamp"]) for r in history_rows})
    duration = times[-1] - times[0] if len(times) > 1 else 0
    requests, metrics, tokens = {}, {m: {} for m in METRICS}, 0.0
    for row in stats_rows:
        kind, name, count = row["Type"], row["Name"], int(row["Request Count"])
        if kind in METRICS:
            metrics[kind][name] = {"count": count, "mean": _value(row["Average Response Time"]),
                                   "max": _value(row["Max Response Time"]),
                                   **{f"p{p[:-1]}": _value(row[p]) for p in PERCENTILES}}
            if kind == "E2E":
                tokens += count * _number(row["Average Content Size"])
        elif name != "Aggregated":  # Locust's aggregate mixes HTTP requests with the metric samples
            requests[name] = {"method": kind, "count": count, "failures": int(row["Failure Count"]),
                              "requests_per_s": _value(row["Requests/s"])}
    return {
        "duration_s": duration, "max_users": max((int(r["User Count"]) for r in history_rows), default=0),
        "requests": requests, "failures": sum(r["failures"] for r in requests.values()),
        "output_tokens": int(tokens), "output_tokens_per_s": tokens / duration if duration else None,
        "metrics": metrics, "units": {"TTFT": "ms", "ITL": "ms", "TPOT": "ms", "E2E": "ms", "OUT_TOK_S": "tokens/s"},
    }


def throughput_series(history_rows: list[dict], window_s: int = 5) -> tuple[list[int], list[float], list[float]]:
    """(t, output tokens/s over the last `window_s`, HTTP requests/s) per history timestamp; the tokens
    come from the E2E rows' running totals (count x mean content size), so nothing is approximated."""
    t0 = min(int(r["Timestamp"]) for r in history_rows)
    cumulative: dict[int, float] = {}
    rps: dict[int, float] = {}
    for r in history_rows:
        t = int(r["Timestamp"]) - t0
        if r["Type"] == "E2E":
            count = int(r["Total Request Count"])
            cumulative[t] = cumulative.get(t, 0.0) + count * (_number(r["Total Average Content Size"]) if count else 0)
        elif r["Type"] and r["Type"] not in METRICS:
            rps[t] = rps.get(t, 0.0) + _number(r["Requests/s"])
    ts = sorted(cumulative)
    tokens_per_s = []
    for t in ts:
        start = min((s for s in ts if s >= t - window_s), default=t)
        tokens_per_s.append((cumulative[t] - cumulative[start]) / (t - start) if t > start else 0.0)
    return ts, tokens_per_s, [rps.get(t, 0.0) for t in ts]


def plot(history_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(int(r["Timestamp"]) for r in history_rows)
    fig, (lat, thr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    series: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
    for r in history_rows:
        if r["Type"] in ("TTFT", "E2E"):
            for p in ("50%", "95%"):
                value = _number(r[p])
                if value > 0:  # 0 or N/A: no sample in the window yet
                    series.setdefault((r["Type"], r["Name"]), {}).setdefault(p, []).append(
                        (int(r["Timestamp"]) - t0, value))
    colors = plt.get_cmap("tab10").colors
    for i, ((kind, name), by_percentile) in enumerate(sorted(series.items())):
        for p, points in by_percentile.items():
            lat.plot(*zip(*points, strict=True), color=colors[i % len(colors)], label=f"{kind} {name} p{p[:-1]}",
                     linestyle="-" if p == "50%" else "--")
    lat.set_ylabel("latency (ms, last ~10 s)")
    lat.set_yscale("log")
    lat.legend(fontsize=7, ncol=2)
    lat.grid(alpha=0.3)
    ts, tokens_per_s, rps = throughput_series(history_rows)
    thr.plot(ts, tokens_per_s, color="tab:green", label="output tokens/s (last 5 s)")
    thr.set_ylabel("output tokens/s")
    thr.set_xlabel("time (s)")
    thr.grid(alpha=0.3)
    requests_axis = thr.twinx()
    requests_axis.plot(ts, rps, color="tab:purple", linestyle=":", label="HTTP requests/s")
    requests_axis.set_ylabel("HTTP requests/s")
    thr.legend(handles=thr.get_lines() + requests_axis.get_lines(), fontsize=8, loc="upper left")
    fig.suptitle("SDSAT service under Locust load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(csv_prefix: str | Path, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    history = _rows(Path(f"{csv_prefix}_stats_history.csv"))
    summary = summarize(_rows(Path(f"{csv_prefix}_stats.csv")), history)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if history:
        plot(history, out / "loadtest.png")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv-prefix", required=True, help="the --csv PREFIX given to locust")
    parser.add_argument("--out", required=True, help="folder for summary.json and loadtest.png")
    args = parser.parse_args()
    summary = write_report(args.csv_prefix, args.out)
    e2e = summary["metrics"]["E2E"]
    print(f"{sum(r['count'] for r in summary['requests'].values())} requests, {summary['failures']} failures, "
          f"{summary['output_tokens']} output tokens ({summary['output_tokens_per_s'] or 0:.1f}/s); E2E p50 (ms): "
          + ", ".join(f"{name} {m['p50']:.0f}" for name, m in e2e.items()))


if __name__ == "__main__":
    main()
