"""`sdsat bench --identity`: is speculation lossless here, and what does invariance cost?

    sdsat bench --identity int4:invariant,int4:sdpa,float32:invariant --json infra/bench/identity.json

Each variant is an engine with one `dtype` and one `attention` (EngineConfig; `invariant` = the
width-invariant kernels of models/engine/kernels.py, `sdpa` = the library kernels). For each: the
start-up self-check's verdict on this host (models/engine/invariance.py), single-stream `ar` ms per
token (median over interleaved repetitions, the variants' order rotating), the forward cost ratios
r(w), the prefill time of long prompts, and, per speculative method, how many greedy outputs equal
that variant's greedy `ar` token for token. The speculative runs skip the self-check's fallback
(self_check false), so a library variant shows what it would serve if nothing checked it.
"""

from __future__ import annotations

import statistics
import time

import torch

from services.bench.common import cpu_model, encode_prompt, first_difference, forward_cost_ratios

METHODS = (("prompt-lookup", 3), ("sdsat", 3), ("sdsat-fused", 1), ("sdsat-fused", 2))


def prefill_seconds(engines: dict, lengths=(256, 1000, 1900), reps: int = 3) -> dict:
    """Per engine, median seconds to prefill a prompt of each length and give its first token
    (interleaved across the engines)."""
    from models.engine import SamplingParams

    room = min(engine.max_context for engine in engines.values()) - 2
    lengths = sorted({min(n, room) for n in lengths})  # what fits every engine's context
    times = {v: {n: [] for n in lengths} for v in engines}
    for n in lengths:
        for _ in range(reps):
            for v, engine in engines.items():
                prompt = [(7 * i + 3) % engine.model.config.vocab_size for i in range(n)]
                t0 = time.perf_counter()
                engine.generate(prompt, SamplingParams(max_new_tokens=1))
                times[v][n].append(time.perf_counter() - t0)
    return {v: {str(n): round(statistics.median(t), 3) for n, t in by_n.items()} for v, by_n in times.items()}


def identity_report(model_dir: str, prompts: list, variants: list[tuple[str, str]], max_new_tokens: int = 128,
                    reps: int = 2, methods=METHODS, widths=(2, 4, 8, 16), progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from models.engine import Engine, EngineConfig, SamplingParams
    from models.engine.invariance import check_invariance

    engines = {v: Engine.from_pretrained(model_dir, EngineConfig(
        method="ar", k=0, dtype=v[0], attention=v[1], max_batch=2, max_context=2048, self_check=False))
        for v in variants}
    checks = {v: check_invariance(e) for v, e in engines.items()}
    encoded = [encode_prompt(next(iter(engines.values())).tokenizer, p) for p in prompts]
    runs = [("ar", 0), *methods]
    outputs = {(v, run): [None] * len(encoded) for v in variants for run in runs}
    ar_times = {v: [[] for _ in encoded] for v in variants}
    bar = tqdm(total=len(encoded) * len(variants) * (reps + len(methods)), desc="identity", disable=not progress)
    for rep in range(reps):  # ar, timed: variants interleaved, their order rotating
        for p, ids in enumerate(encoded):
            for v in variants[rep % len(variants):] + variants[: rep % len(variants)]:
                params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, method="ar")
                t0 = time.perf_counter()
                outputs[(v, ("ar", 0))][p] = engines[v].generate(ids, params)["token_ids"]
                ar_times[v][p].append(time.perf_counter() - t0)
                bar.update(1)
    for v in variants:
        for method, k in methods:
            params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, method=method, k=k)
            for p, ids in enumerate(encoded):
                outputs[(v, (method, k))][p] = engines[v].generate(ids, params)["token_ids"]
                bar.update(1)
    bar.close()
    prefill = prefill_seconds(engines)
    rows = []
    for v, engine in engines.items():
        ms = 1e3 * sum(statistics.median(t) for t in ar_times[v]) / (len(encoded) * max_new_tokens)
        ratios = forward_cost_ratios(engine, list(widths))
        identity = {}
        for method, k in methods:
            parts = [first_difference(a, b) for a, b in zip(outputs[(v, ("ar", 0))], outputs[(v, (method, k))],
                                                            strict=True)]
            identity[f"{method} k={k}"] = {"identical": sum(p is None for p in parts), "of": len(parts),
                                           "first_differences": sorted(p for p in parts if p is not None)}
        rows.append({"dtype": v[0], "attention": v[1], "self_check": checks[v].to_dict(),
                     "ar_ms_per_token": round(ms, 2), "tokens_per_s": round(1e3 / ms, 1),
                     "cost_ratio_r": {str(w): round(ratios[w], 3) for w in widths},
                     "t_forward_1_token_ms": round(ratios["t1_ms"], 2), "prefill_s_by_prompt_tokens": prefill[v],
                     "identical_to_ar": identity})
    return {"model": model_dir, "host": cpu_model(), "threads": torch.get_num_threads(), "prompts": len(encoded),
            "max_new_tokens": max_new_tokens, "reps": reps, "variants": rows}


def print_table(report: dict) -> None:
    print(f"host: {report['host']}, {report['threads']} threads, {report['prompts']} prompts x "
          f"{report['max_new_tokens']} tokens")
    for row in report["variants"]:
        same = ", ".join(f"{m} {c['identical']}/{c['of']}" for m, c in row["identical_to_ar"].items())
        print(f"{row['dtype']:>8}:{row['attention']:<9} self-check {'ok' if row['self_check']['lossless'] else 'FAIL'}"
              f"  ar {row['ar_ms_per_token']:6.2f} ms/token  r(4)={row['cost_ratio_r'].get('4')}  "
              f"prefill {row['prefill_s_by_prompt_tokens']} s  identical: {same}")
