"""`sdsat bench-prefix` inside the engine, on the embedded model (served settings: int4, bf16 KV) and the real
Redis at 127.0.0.1:6379: the warm cases must actually be served from the in-replica cache and from Redis."""

import json

from services.cli import main


def test_bench_prefix_engine_hits_local_then_redis(tmp_path):
    out = tmp_path / "prefix.json"
    assert main(["bench-prefix", "--modes", "engine", "--prefix-tokens", "160", "--reps", "2",
                 "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    rows = {row["case"]: row for row in report["engine"]["rows"]}
    assert rows["cold"]["hit_rate"] == 0.0
    for case in ("warm-local", "warm-redis"):  # every full block the prompts share came from the cache
        assert rows[case]["block_hit_rate"] == 1.0, rows[case]
    fresh = report["engine"]["fresh_replica_counters"]
    assert fresh["hit_blocks_redis"] > 0 and fresh["bytes_read"] > 0 and fresh["timeouts"] == 0
    writer = report["engine"]["writer_counters"]
    assert writer["hit_blocks_local"] > 0 and writer["corrupt"] == 0 and writer["dropped_writes"] == 0
    value = report["engine"]["value"]
    assert value["kv_dtype"] == "bfloat16" and value["bytes_per_token"] > 0
