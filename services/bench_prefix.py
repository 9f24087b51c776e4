"""`sdsat bench-prefix`: time to first token with the prompt-prefix KV cache, cold and warm.

    sdsat bench-prefix --json prefix.json

A prompt is a ~1,000-token shared prefix (held-out standard-library code behind a fresh nonce line,
so every repetition starts cold) plus a short per-request suffix. Three cases, in order, per
repetition:
- cold: nothing cached; the whole prompt is prefilled (its full blocks are then written back);
- warm-local: the same prefix with another suffix, on the same replica (in-replica LRU hits);
- warm-redis: the same prefix on a fresh replica, whose only source is Redis.

Measured inside the engine (one `Engine`; a second `PrefixCache` plays the fresh replica) and end
to end through the service (two Serve apps on one Ray: app A takes cold and warm-local, app B is
the fresh replica; TTFT = first streamed text chunk of a `max_tokens=1` completion). Reported:
median TTFT per case, its ratio to cold, the share of prompt tokens served from cache, and the
bytes per token a cached block costs in Redis.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import uuid

CASES = ("cold", "warm-local", "warm-redis")


def shared_prefix(tokenizer, n_tokens: int) -> str:
    """About `n_tokens` tokens of held-out stdlib code behind a fresh nonce (so the prefix is unseen)."""
    from services.bench import stdlib_snippets

    ids: list[int] = []
    for snippet in stdlib_snippets(32, chars=4000):
        ids += tokenizer(snippet, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    return f"# shared context {uuid.uuid4().hex}\n" + tokenizer.decode(ids[:n_tokens])


def suffixes(rep: int) -> dict[str, str]:
    return {case: f"\n\ndef task_{rep}_{i}(items):\n    " for i, case in enumerate(CASES)}


def _summary(samples: dict[str, list[dict]]) -> list[dict]:
    cold = statistics.median(s["ttft_s"] for s in samples["cold"])
    rows = []
    for case in CASES:
        ttft = statistics.median(s["ttft_s"] for s in samples[case])
        cached = sum(s["cached_tokens"] for s in samples[case])
        prompt = sum(s["prompt_tokens"] for s in samples[case])
        rows.append({"case": case, "median_ttft_s": ttft, "vs_cold": ttft / cold,
                     "hit_rate": cached / prompt if prompt else math.nan,
                     "prompt_tokens": prompt // len(samples[case]), "samples": [s["ttft_s"] for s in samples[case]]})
    return rows


def _cache(decoder_cfg, engine):
    from services.decoder import prefix_cache_from_config

    return prefix_cache_from_config(decoder_cfg, engine)


def bytes_per_token(cache) -> dict:
    import torch

    from infra.prefix_cache import encode_block

    value = encode_block(b"k" * 32, torch.zeros(cache.block_shape, dtype=cache.dtype), b"h" * 32)
    return {"block_size": cache.block_size, "value_bytes": len(value), "bytes_per_token": len(value) / cache.block_size}


def engine_bench(decoder_cfg, prefix_tokens: int, reps: int, progress=None) -> dict:
    """TTFT inside one engine: cold / warm-local / warm from Redis (a fresh PrefixCache)."""
    from models.engine import SamplingParams
    from services.decoder import engine_from_config

    engine = engine_from_config(decoder_cfg)
    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    first = _cache(decoder_cfg, engine)
    if not first.redis_reachable():
        raise RuntimeError("bench-prefix needs Redis (set REDIS_URL or start redis-server on 127.0.0.1:6379)")
    engine.prefix_store = first
    engine.generate(engine.tokenizer("def warm_up():\n")["input_ids"], params)  # first-call overheads
    samples: dict[str, list[dict]] = {case: [] for case in CASES}
    for rep in range(reps):
        prefix = shared_prefix(engine.tokenizer, prefix_tokens)
        fresh = _cache(decoder_cfg, engine)  # a new replica's empty in-replica cache
        for case, suffix in suffixes(rep).items():
            engine.prefix_store = fresh if case == "warm-redis" else first
            if case == "warm-redis":
                first.flush()  # the write-back is asynchronous; let it land before the fresh replica asks
            ids = engine.tokenizer(prefix + suffix)["input_ids"]
            t0 = time.perf_counter()
            out = engine.generate(ids, params)
            samples[case].append({"ttft_s": time.perf_counter() - t0, "cached_tokens": out["cached_tokens"],
                                  "prompt_tokens": len(ids)})
        if progress is not None:
            progress.update(1)
    return {"rows": _summary(samples), "value": bytes_per_token(first), "counters": first.counters.as_dict()}


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


def service_bench(decoder_cfg, prefix_tokens: int, reps: int, write_back_wait_s: float, progress=None) -> dict:
    """TTFT end to end: two one-replica apps on one Ray; app B is the fresh replica."""
    import socket

    import ray
    from ray import serve

    from models.checkpoint import load_tokenizer
    from services.app import build_app
    from services.config import AppConfig, RouterConfig

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
        tokenizer = load_tokenizer(decoder_cfg.model_dir)
        urls = {"a": f"http://127.0.0.1:{port}/a/v1/completions", "b": f"http://127.0.0.1:{port}/b/v1/completions"}
        for url in urls.values():
            _stream_ttft(url, "def warm_up():\n")
        samples: dict[str, list[dict]] = {case: [] for case in CASES}
        for rep in range(reps):
            prefix = shared_prefix(tokenizer, prefix_tokens)
            for case, suffix in suffixes(rep).items():
                if case == "warm-redis":
                    time.sleep(write_back_wait_s)  # replica A writes back asynchronously
                samples[case].append(_stream_ttft(urls["b" if case == "warm-redis" else "a"], prefix + suffix))
            if progress is not None:
                progress.update(1)
        return {"rows": _summary(samples)}
    finally:
        serve.shutdown()
        ray.shutdown()


def run_bench_prefix(model_dir: str, prefix_tokens: int, reps: int, modes: list[str], threads: int,
                     write_back_wait_s: float = 1.0, progress: bool = True) -> dict:
    import platform

    import torch
    from tqdm.auto import tqdm

    from services.config import DecoderConfig

    decoder_cfg = DecoderConfig(model_dir=model_dir, cpu_threads=threads, device="cpu", affinity_routing=False)
    report = {"model": model_dir, "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
              "prefix_tokens": prefix_tokens, "reps": reps, "block_size": decoder_cfg.prefix_block_size}
    bar = tqdm(total=reps * len(modes), desc="bench-prefix", unit="rep", disable=not progress)
    if "engine" in modes:
        report["engine"] = engine_bench(decoder_cfg, prefix_tokens, reps, bar)
    if "service" in modes:
        report["service"] = service_bench(decoder_cfg, prefix_tokens, reps, write_back_wait_s, bar)
    bar.close()
    return report
