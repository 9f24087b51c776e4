"""`sdsat bench --engine-compare`: the engine's own speed, variant by variant, in one run.

    sdsat bench --engine-compare float32:transformers,float32:lean,int4:transformers,int4:lean --json e.json
    sdsat bench --engine-compare float32:lean,float32:sdpa,float32:compiled --json compiled.json

Each variant is an engine built with one `dtype` and one forward (EngineConfig): `lean` (the engine's
forward, the CPU's invariant kernels), `transformers` (the model's own), `sdpa` (lean with PyTorch's
ops and SDPA) or `compiled` (that one through torch.compile, models/engine/compiled.py, one class per
width timed; its compile seconds are reported: cold on a first run, from the cache after). For each, on the
same prompts, single stream, plain `ar` decoding with EOS ignored: ms per token (median over
interleaved repetitions: variant order rotates, the machine is shared), the memory floor for the
bytes that variant reads per token (its weights at its dtype, over the measured read bandwidth) and
the fraction of it reached, the forward cost ratios r(w), and how close its greedy tokens come to the
first variant's (the reference: fp32 is the GGUF's dequantized weights): the share of identical
outputs and where the others part.
"""

from __future__ import annotations

import statistics
import time

import torch

from services.bench.common import encode_prompt, first_difference, forward_cost_ratios, memory_floor, read_bandwidth_gbs

# a variant's forward -> its EngineConfig fields
FORWARDS = {"lean": {"forward": "lean"}, "transformers": {"forward": "transformers"},
            "sdpa": {"forward": "lean", "attention": "sdpa"},
            "compiled": {"forward": "lean", "attention": "sdpa", "compile": True}}


def engine_comparison(model_dir: str, prompts: list, variants: list[tuple[str, str]], max_new_tokens: int = 128,
                      reps: int = 2, widths: tuple[int, ...] = (4, 8), progress: bool = True,
                      context: int = 4096) -> dict:
    from tqdm.auto import tqdm

    from models.engine import Engine, EngineConfig, SamplingParams

    def build(dtype: str, forward: str):
        options = FORWARDS[forward] | ({"compile_widths": (1, *widths), "compile_batches": (1,)}
                                       if forward == "compiled" else {})
        t0 = time.perf_counter()
        engine = Engine.from_pretrained(model_dir, EngineConfig(method="ar", k=0, max_batch=1, max_k=8, max_context=
                                                                context, dtype=dtype, self_check=False, **options))
        if engine.compiled is not None:
            engine.compiled.wait()
        return engine, time.perf_counter() - t0

    built = {v: build(*v) for v in variants}
    engines = {v: engine for v, (engine, _) in built.items()}
    first = engines[variants[0]]
    encoded = [encode_prompt(first.tokenizer, p) for p in prompts]
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, method="ar")
    for engine in engines.values():  # warm-up
        engine.generate(encoded[0][:32], SamplingParams(max_new_tokens=8, ignore_eos=True))
    times = {v: [[] for _ in encoded] for v in variants}
    outputs: dict[tuple, list[list[int]]] = {v: [None] * len(encoded) for v in variants}
    bar = tqdm(total=reps * len(encoded) * len(variants), desc="engine compare", disable=not progress)
    for rep in range(reps):
        for p, ids in enumerate(encoded):
            for v in variants[rep % len(variants):] + variants[: rep % len(variants)]:
                t0 = time.perf_counter()
                out = engines[v].generate(ids, params)
                times[v][p].append(time.perf_counter() - t0)
                outputs[v][p] = out["token_ids"]
                bar.update(1)
    bar.close()
    bandwidth = read_bandwidth_gbs()
    rows = []
    for v, engine in engines.items():
        ms = 1e3 * sum(statistics.median(t) for t in times[v]) / (len(encoded) * max_new_tokens)
        floor = memory_floor(engine, 1e3 / ms, bandwidth)
        parts = [first_difference(a, b) for a, b in zip(outputs[variants[0]], outputs[v], strict=True)]
        ratios = forward_cost_ratios(engine, list(widths))
        rows.append({
            "dtype": v[0], "forward": v[1], "ar_ms_per_token": round(ms, 2), "tokens_per_s": round(1e3 / ms, 1),
            "decode_bytes": floor["weight_bytes"], "floor_ms_per_token": floor["floor_ms_per_token"],
            "fraction_of_floor": floor["ar_fraction_of_floor"],
            "fraction_of_fp32_floor": floor["ar_fraction_of_fp32_floor"],
            "cost_ratio_r": {str(w): round(ratios[w], 3) for w in widths},
            "t_forward_1_token_ms": round(ratios["t1_ms"], 2),
            "identical_to_reference": sum(p is None for p in parts) / len(parts),
            "first_difference_positions": sorted(p for p in parts if p is not None),
            "quantization": engine.quantization, "load_seconds": round(built[v][1], 1),
            "compile": engine.compiled.report() if engine.compiled is not None else None,
        })
    base = rows[0]["ar_ms_per_token"]
    for row in rows:
        row["speedup_vs_first"] = round(base / row["ar_ms_per_token"], 3)
    return {"model": model_dir, "prompts": len(encoded), "max_new_tokens": max_new_tokens, "reps": reps,
            "threads": torch.get_num_threads(), "read_bandwidth_gbs": round(bandwidth, 2),
            "reference": f"{variants[0][0]}:{variants[0][1]}", "variants": rows}

