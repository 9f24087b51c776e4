"""The Grafana dashboard only queries metric families the service exports."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_dashboard_queries_exported_families():
    source = (ROOT / "services" / "serve" / "telemetry.py").read_text()
    defined = set(re.findall(r'"(sdsat_[a-z_]+)"', source))
    defined |= {f"sdsat_prefix_cache_{name}" for name in re.findall(r'\("([a-z_]+)", "', source)}
    dashboard = json.loads((ROOT / "infra" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(total|bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"ray_(sdsat_[a-z_]+)", e)}
    assert used and used <= defined, sorted(used - defined)
