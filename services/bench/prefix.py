"""`sdsat bench-prefix`: time to first token with the prompt-prefix KV cache, cold and warm.

    sdsat bench-prefix --json prefix.json

A prompt is a shared prefix of about `--prefix-tokens` tokens (held-out standard-library code behind a
fresh nonce line, so every repetition starts cold) plus a short per-request suffix. Three cases, in
order, per repetition:
- cold: nothing cached; the whole prompt is prefilled (its full blocks are then written back);
- warm-local: the same prefix with another suffix, on the same replica (in-replica LRU hits);
- warm-redis: the same prefix on a fresh replica, whose only source is Redis.

The engine runs the served settings (`infra/serve_config.yaml`'s `decoder.engine`: int4 weights, so
bf16 KV, on this CPU; `run_bench_prefix(..., dtype="float32")` swaps the dtype), with `max_context`
raised for the bench alone when the prompt needs it (and `max_batch` lowered so the preallocated KV
stays the served size). Measured inside the engine (one
`Engine`; a second `PrefixCache` per repetition plays the fresh replica) and end to end through the
service (two one-replica Serve apps on one Ray, no prefix affinity: app A takes cold and warm-local,
app B is the fresh replica; TTFT = first streamed text chunk of a `max_tokens=1` completion). Before
the warm-redis case the bench waits until replica A reports its write-back drained (at most
`--write-back-wait` seconds; the time it took is reported). Reported: median TTFT per case and its
ratio to cold, the share of prompt tokens served from cache, the block hit rate (blocks served from
cache / full blocks the prompt shares with the cold one), the fresh replica's Redis counters (hits,
bytes read, timeouts) and the writer's (bytes written, dropped writes), and the bytes a block costs.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import uuid
from pathlib import Path

CASES = ("cold", "warm-local", "warm-redis")
SERVE_CONFIG = Path(__file__).resolve().parents[2] / "infra" / "serve_config.yaml"
SUFFIX_ROOM = 64  # tokens of suffix and output the raised max_context leaves after the prefix


def shared_prefix(tokenizer, n_tokens: int) -> str:
    """About `n_tokens` tokens of held-out stdlib code behind a fresh nonce (so the prefix is unseen)."""
    from services.bench.common import stdlib_snippets

    ids: list[int] = []
    for snippet in stdlib_snippets(32, chars=4000):
        ids += tokenizer(snippet, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    return f"# shared context {uuid.uuid4().hex}\n" + tokenizer.decode(ids[:n_tokens])


def suffixes(rep: int) -> dict[str, str]:
    return {case: f"\n\ndef task_{rep}_{i}(items):\n    " for i, case in enumerate(CASES)}


def shared_blocks(cold_ids: list[int], ids: list[int], block_size: int) -> int:
    """Full blocks of `ids` the cache could serve after the cold prompt: those inside the common prefix,
    short of the last token (the engine always prefills one)."""
    common = next((i for i, (a, b) in enumerate(zip(cold_ids, ids, strict=False)) if a != b),
                  min(len(cold_ids), len(ids)))
    return min(common, len(ids) - 1) // block_size


def _summary(samples: dict[str, list[dict]], block_size: int) -> list[dict]:
    cold = statistics.median(s["ttft_s"] for s in samples["cold"])
    rows = []
    for case in CASES:
        ttft = statistics.median(s["ttft_s"] for s in samples[case])
        cached = sum(s["cached_tokens"] for s in samples[case])
        prompt = sum(s["prompt_tokens"] for s in samples[case])
        shareable = sum(s["shared_blocks"] for s in samples[case])
        rows.append({"case": case, "median_ttft_s": ttft, "vs_cold": ttft / cold,
                     "hit_rate": cached / prompt if prompt else math.nan,
                     "block_hit_rate": cached // block_size / shareable if shareable else None,
                     "prompt_tokens": prompt // len(samples[case]), "samples": [s["ttft_s"] for s in samples[case]]})
    return rows


def served_engine(prefix_tokens: int, dtype: str | None = None) -> dict:
    """The served engine settings (`dtype` replaces the served one), with room for the bench's prompt (KV
    kept at the served size)."""
    import yaml

    engine = dict(yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]["decoder"]["engine"])
    engine["dtype"] = dtype or engine.get("dtype", "float32")
    need = prefix_tokens + SUFFIX_ROOM
    if need > engine.get("max_context", 0):
        slots_x_context = engine.get("max_batch", 1) * engine.get("max_context", need)
        engine.update(max_context=need, max_batch=max(1, slots_x_context // need))
    return engine


def _cache(decoder_cfg, engine):
    from services.serve.decoder import prefix_cache_from_config

    return prefix_cache_from_config(decoder_cfg, engine)


def value_size(cache) -> dict:
    from infra.prefix_cache import chunk_value_bytes

    chunk = chunk_value_bytes(cache.chunk_blocks, cache.block_shape, cache.dtype)
    return {"kv_dtype": str(cache.dtype).replace("torch.", ""), "block_size": cache.block_size,
            "chunk_blocks": cache.chunk_blocks, "chunk_value_bytes": chunk,
            "bytes_per_token": chunk / (cache.chunk_blocks * cache.block_size),
            "round_trip_timeout_s": cache.round_trip_timeout_s}


def _sum(counters: list[dict]) -> dict:
    return {k: sum(c[k] for c in counters) for k in counters[0]} if counters else {}


def engine_bench(decoder_cfg, prefix_tokens: int, reps: int, progress=None) -> dict:
    """TTFT inside one engine: cold / warm-local / warm from Redis (a fresh PrefixCache per repetition)."""
    from models.engine import SamplingParams
    from services.serve.decoder import engine_from_config

    engine = engine_from_config(decoder_cfg)
    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    first = _cache(decoder_cfg, engine)
    if not first.redis_reachable():
        raise RuntimeError("bench-prefix needs Redis (set REDIS_URL or start redis-server on 127.0.0.1:6379)")
    engine.prefix_store = first
    engine.generate(engine.tokenizer("def warm_up():\n")["input_ids"], params)  # first-call overheads
    samples: dict[str, list[dict]] = {case: [] for case in CASES}
    fresh_counters, flush_s, size = [], [], first.block_size
    for rep in range(reps):
        prefix = shared_prefix(engine.tokenizer, prefix_tokens)
        fresh = _cache(decoder_cfg, engine)  # a new replica's empty in-replica cache
        cold_ids: list[int] = []
        for case, suffix in suffixes(rep).items():
            engine.prefix_store = fresh if case == "warm-redis" else first
            if case == "warm-redis":  # the write-back is asynchronous: let it land before the fresh replica asks
                t0 = time.perf_counter()
                first.flush(timeout=120)
                flush_s.append(time.perf_counter() - t0)
            ids = engine.tokenizer(prefix + suffix)["input_ids"]
            cold_ids = cold_ids or ids
            t0 = time.perf_counter()
            out = engine.generate(ids, params)
            samples[case].append({"ttft_s": time.perf_counter() - t0, "cached_tokens": out["cached_tokens"],
                                  "prompt_tokens": len(ids), "shared_blocks": shared_blocks(cold_ids, ids, size)
                                  if case != "cold" else 0})
        fresh_counters.append(fresh.counters.as_dict())
        if progress is not None:
            progress.update(1)
    return {"rows": _summary(samples, first.block_size), "value": value_size(first),
            "write_back_drain_s": flush_s, "writer_counters": first.counters.as_dict(),
            "fresh_replica_counters": _sum(fresh_counters)}


def _stream_ttft(url: str, prompt: str) -> dict:
    import json

    import httpx

    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, ttft, usage = time.perf_counter(), None, None
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    return {"ttft_s": ttft, "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            "prompt_tokens": usage["prompt_tokens"]}


def _prefix_counters(handle) -> dict:
    return handle.stats.remote().result(timeout_s=60)["prefix_cache"]


def _drain(handle, limit_s: float) -> float | None:
    """Seconds until the replica's write-back queue was empty (None: not within `limit_s`)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        if _prefix_counters(handle)["write_backlog_blocks"] == 0:
            return time.perf_counter() - t0
        time.sleep(0.02)
    return None


def service_bench(decoder_cfg, prefix_tokens: int, reps: int, write_back_wait_s: float, progress=None) -> dict:
    """TTFT end to end: two one-replica apps on one Ray; app B is the fresh replica."""
    import socket

    import ray
    from ray import serve

    from models.weights.checkpoint import load_tokenizer
    from models.weights.tokenizer import encode_text
    from services.app import build_app
    from services.serve.config import AppConfig, RouterConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=4, object_store_memory=128 * 2**20, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                       **{k: v for k, v in os.environ.items() if k in ("REDIS_URL",
                                                                                       "SDSAT_CACHE_SECRET")}}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = AppConfig(decoder=decoder_cfg.model_copy(update={"min_replicas": 1, "max_replicas": 1}),
                        router=RouterConfig(num_cpus=0.1))
        for name in ("a", "b"):
            serve.run(build_app(cfg), name=f"prefix-{name}", route_prefix=f"/{name}")
        handles = {name: serve.get_deployment_handle("Decoder", f"prefix-{name}") for name in ("a", "b")}
        tokenizer = load_tokenizer(decoder_cfg.model_dir)
        urls = {"a": f"http://127.0.0.1:{port}/a/v1/completions", "b": f"http://127.0.0.1:{port}/b/v1/completions"}
        for url in urls.values():
            _stream_ttft(url, "def warm_up():\n")
        start = {name: _prefix_counters(h) for name, h in handles.items()}
        samples: dict[str, list[dict]] = {case: [] for case in CASES}
        drain_s = []
        for rep in range(reps):
            prefix = shared_prefix(tokenizer, prefix_tokens)
            cold_ids = encode_text(tokenizer, prefix + suffixes(rep)["cold"])
            for case, suffix in suffixes(rep).items():
                if case == "warm-redis":  # replica A writes back asynchronously
                    drain_s.append(_drain(handles["a"], write_back_wait_s))
                sample = _stream_ttft(urls["b" if case == "warm-redis" else "a"], prefix + suffix)
                ids = encode_text(tokenizer, prefix + suffix)
                samples[case].append({**sample, "shared_blocks": shared_blocks(
                    cold_ids, ids, decoder_cfg.prefix_block_size) if case != "cold" else 0})
            if progress is not None:
                progress.update(1)
        end = {name: _prefix_counters(h) for name, h in handles.items()}
        delta = {name: {k: end[name][k] - start[name][k] for k in end[name]} for name in end}
        return {"rows": _summary(samples, decoder_cfg.prefix_block_size), "write_back_drain_s": drain_s,
                "writer_counters": delta["a"], "fresh_replica_counters": delta["b"]}
    finally:
        serve.shutdown()
        ray.shutdown()


def run_bench_prefix(model_dir: str, prefix_tokens: int, reps: int, modes: list[str], threads: int,
                     write_back_wait_s: float = 1.0, progress: bool = True, dtype: str | None = None) -> dict:

    from tqdm.auto import tqdm

    from services.bench.common import machine
    from services.serve.config import DecoderConfig

    engine = served_engine(prefix_tokens, dtype)
    decoder_cfg = DecoderConfig(model_dir=model_dir, cpu_threads=threads, device="cpu", affinity_routing=False,
                                engine=engine)
    report = {"model": model_dir, "machine": machine(),
              "prefix_tokens": prefix_tokens, "reps": reps, "engine_config": engine,
              "block_size": decoder_cfg.prefix_block_size,
              "redis": {"latency_s": decoder_cfg.redis_latency_s, "min_mb_s": decoder_cfg.redis_min_mb_s,
                        "chunk_mb": decoder_cfg.prefix_chunk_mb}}
    bar = tqdm(total=reps * len(modes), desc="bench-prefix", unit="rep", disable=not progress)
    if "engine" in modes:
        report["engine"] = engine_bench(decoder_cfg, prefix_tokens, reps, bar)
    if "service" in modes:
        report["service"] = service_bench(decoder_cfg, prefix_tokens, reps, write_back_wait_s, bar)
    bar.close()
    return report
