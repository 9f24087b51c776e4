"""`sdsat bench-prefix` inside the engine, on the embedded model and the real Redis at 127.0.0.1:6379:
the warm cases must actually be served from the in-replica cache and from Redis."""

import json

from services.cli import main


def test_bench_prefix_engine_hits_local_then_redis(tmp_path):
    out = tmp_path / "prefix.json"
    assert main(["bench-prefix", "--modes", "engine", "--prefix-tokens", "160", "--reps", "2",
                 "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    rows = {row["case"]: row for row in report["engine"]["rows"]}
    assert rows["cold"]["hit_rate"] == 0.0
    full_blocks = (rows["cold"]["prompt_tokens"] - 1) // 16 * 16
    for case in ("warm-local", "warm-redis"):  # every full block of the shared prefix came from the cache
        assert rows[case]["hit_rate"] >= 0.9 * full_blocks / rows[case]["prompt_tokens"], rows[case]
    counters = report["engine"]["counters"]
    assert counters["hit_blocks_local"] > 0 and counters["corrupt"] == 0
    assert report["engine"]["value"]["bytes_per_token"] > 0
