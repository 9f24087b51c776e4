"""`sdsat bench --peers llama.cpp`: this engine beside llama.cpp on the same GGUF, in one run.

    sdsat bench --peers llama.cpp --dtype int4 --threads 2 --limit 6 --methods prompt-lookup,mlp --ks 1,3

A CPU user of SmolLM2 runs llama.cpp, so that is the bar. Both engines load the same
`SmolLM2-135M-Instruct.Q4_1.gguf` (ours converts its Q4_1 blocks to int4, models/weights/quant.py;
llama.cpp runs them as they are), use the same threads and decode the same prompt token ids greedily
with EOS ignored, interleaved prompt by prompt, the engine order rotating between repetitions. Times
are decode only: prefill and the first token are left out on both sides, so ms/token is the time
from the first generated token to the last over the tokens after the first.

Rows: llama.cpp plain (`Llama.generate`, greedy, as a Python user runs it), plain-raw (`llama_decode`
one token at a time with the argmax read from its logits in place: llama.cpp without the wrapper's
Python loop, close to what its own C++ tools do) and with its own prompt lookup
(`LlamaPromptLookupDecoding`); this engine's `ar` and each speculative method and k asked for.
Each row gives ms/token, tokens/s, its speed against llama.cpp's plain and plain-raw decoding, and the share of
prompts whose tokens equal this engine's `ar` (both use Q8_1 activations, but llama.cpp accumulates in
another order, so that share is reported, not required). r(w) is measured on both: the
time of a w-token forward (logits for every row) over a 1-token one, after 256 tokens of context.

llama-cpp-python is the optional `peers` extra (`make bench-peers` builds it for this host);
`peer_unavailable()` says why it cannot run here.
"""

from __future__ import annotations

import statistics
import time

import torch

from services.bench.common import encode_prompt, forward_cost_ratios

PEERS = ("llama.cpp",)
CONTEXT_FOR_R = 256


def peer_unavailable(peer: str = "llama.cpp") -> str | None:
    """Why the peer cannot run here (not installed), or None."""
    if peer not in PEERS:
        return f"unknown peer {peer!r}; known: {', '.join(PEERS)}"
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}); `make bench-peers` builds it for this host"
    return None


class LlamaCpp:
    """llama-cpp-python on one GGUF: greedy decoding, plain or with its prompt lookup, timed decode only."""

    def __init__(self, gguf: str, threads: int, n_ctx: int = 4096, lookup_tokens: int = 3):
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        common = dict(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False)
        self.plain = Llama(**common)
        self.lookup = Llama(**common, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=lookup_tokens))
        self.lookup_tokens = lookup_tokens
        import llama_cpp

        self.version = llama_cpp.__version__

    def generate(self, ids: list[int], n: int, lookup: bool = False) -> tuple[list[int], float, float]:
        """(n greedy tokens after ids, seconds to the first token, seconds from the first token to the last)."""
        llm = self.lookup if lookup else self.plain
        llm.reset()  # no KV reused from the previous prompt: both engines prefill from scratch
        tokens, t0, first = [], time.perf_counter(), 0.0
        # top_k=1 and temp=0: the sampler takes the argmax; generate() never stops at EOS on its own
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(int(token))
            if len(tokens) == 1:
                first = time.perf_counter()
            if len(tokens) == n:
                break
        return tokens, first - t0, time.perf_counter() - first

    def generate_raw(self, ids: list[int], n: int) -> tuple[list[int], float, float]:
        """As `generate` (plain), without llama-cpp-python's Python loop: `llama_decode` one token at a
        time and the argmax of its logits read in place, which is about what llama.cpp's own C++ tools do."""
        import llama_cpp
        import numpy as np

        llm = self.plain
        llm.reset()
        ctx = llm._ctx.ctx
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        vocab = llm.n_vocab()
        t0 = time.perf_counter()
        llm.eval(ids)  # prefill through the wrapper (not timed as decode)
        tokens, first = [], 0.0
        token = (llama_cpp.llama_token * 1)()
        while len(tokens) < n:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))
            tokens.append(int(logits.argmax()))
            if len(tokens) == 1:
                first = time.perf_counter()
            if len(tokens) == n:
                break
            token[0] = tokens[-1]
            if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(token, 1)) != 0:
                raise RuntimeError("llama_decode failed")
        llm.reset()
        return tokens, first - t0, time.perf_counter() - first

    def cost_ratios(self, widths: list[int], context: int = CONTEXT_FOR_R, repeats: int = 15) -> dict:
        """r(w) with logits for every row: a w-token batch after `context` tokens over a 1-token one, the
        widths timed in turns (as forward_cost_ratios)."""
        import llama_cpp
        from llama_cpp._internals import LlamaBatch

        llm = self.plain
        llm.reset()
        llm.eval([1 + i % 20 for i in range(context)])
        ctx, memory = llm._ctx.ctx, llama_cpp.llama_get_memory(llm._ctx.ctx)

        batches = {w: LlamaBatch(n_tokens=w, embd=0, n_seq_max=1) for w in [1, *widths]}
        samples: dict[int, list[float]] = {w: [] for w in batches}
        for _ in range(repeats):
            for w, batch in batches.items():
                batch.set_batch([5] * w, n_past=context, logits_all=True)
                t0 = time.perf_counter()
                if llama_cpp.llama_decode(ctx, batch.batch) != 0:
                    raise RuntimeError("llama_decode failed")
                samples[w].append(time.perf_counter() - t0)
                llama_cpp.llama_memory_seq_rm(memory, -1, context, -1)  # back to `context` tokens
        for batch in batches.values():
            batch.close()
        base = statistics.median(samples[1])
        out = {str(w): round(statistics.median(samples[w]) / base, 3) for w in widths}
        out["t1_ms"] = round(base * 1e3, 2)
        llm.reset()
        return out


def _ours(engine, ids: list[int], method: str, k: int, n: int) -> tuple[list[int], float, float]:
    """This engine, one request alone: (tokens, seconds to the first token, seconds from it to the last)."""
    from models.engine import SamplingParams

    rid = engine.add_request(ids, SamplingParams(max_new_tokens=n, ignore_eos=True, method=method, k=k))
    tokens, t0, first, done = [], time.perf_counter(), 0.0, False
    while not done:
        for out in engine.step():
            if out.request_id != rid:
                continue
            if not tokens and out.token_ids:
                first = time.perf_counter()
            tokens += out.token_ids
            done = out.finished
    return tokens, first - t0, time.perf_counter() - first


def peer_comparison(model_dir: str, prompts: list, runs: list[tuple[str, int]], dtype: str = "int4",
                    max_new_tokens: int = 128, reps: int = 1, widths: tuple[int, ...] = (2, 3, 4, 8),
                    progress: bool = True) -> dict:
    """This engine (`ar` and each (method, k) of `runs`) beside llama.cpp plain and with its prompt lookup,
    on the same GGUF, prompts and threads; see the module docstring."""
    from tqdm.auto import tqdm

    from models.engine import Engine, EngineConfig
    from models.weights.base_model import gguf_path

    why = peer_unavailable()
    if why:
        raise RuntimeError(why)
    if max_new_tokens < 2:
        raise ValueError("decode-only timing needs max_new_tokens >= 2")
    threads = torch.get_num_threads()
    engine = Engine.from_pretrained(model_dir, EngineConfig(dtype=dtype, max_batch=1, max_context=4096))
    encoded = [encode_prompt(engine.tokenizer, p) for p in prompts]
    peer = LlamaCpp(str(gguf_path()), threads)
    variants = [("llama.cpp", "plain", 0), ("llama.cpp", "plain-raw", 0),
                ("llama.cpp", "prompt-lookup", peer.lookup_tokens), ("sdsat-engine", "ar", 0)]
    variants += [("sdsat-engine", m, k) for m, k in runs if m != "ar"]

    def run(variant, ids):
        name, method, k = variant
        if name == "llama.cpp":
            if method == "plain-raw":
                return peer.generate_raw(ids, max_new_tokens)
            return peer.generate(ids, max_new_tokens, lookup=method == "prompt-lookup")
        return _ours(engine, ids, method, k, max_new_tokens)

    for v in variants:  # warm-up
        run(v, encoded[0][:32])
    decode = {v: [[] for _ in encoded] for v in variants}
    first = {v: [[] for _ in encoded] for v in variants}
    outputs: dict = {v: [None] * len(encoded) for v in variants}
    bar = tqdm(total=reps * len(encoded) * len(variants), desc="peers", disable=not progress)
    for rep in range(reps):
        for p, ids in enumerate(encoded):
            shift = (rep + p) % len(variants)
            for v in variants[shift:] + variants[:shift]:
                tokens, t_first, t_decode = run(v, ids)
                decode[v][p].append(t_decode)
                first[v][p].append(t_first)
                outputs[v][p] = tokens
                bar.update(1)
    bar.close()
    ar = outputs[("sdsat-engine", "ar", 0)]
    rows = []
    for v in variants:
        seconds = sum(statistics.median(t) for t in decode[v])
        ms = 1e3 * seconds / (len(encoded) * (max_new_tokens - 1))
        rows.append({"engine": v[0], "method": v[1], "k": v[2], "decode_ms_per_token": round(ms, 2),
                     "tokens_per_s": round(1e3 / ms, 1),
                     "first_token_ms": round(1e3 * statistics.mean(statistics.median(t) for t in first[v]), 1),
                     "identical_to_our_ar": sum(o == a for o, a in zip(outputs[v], ar, strict=True)) / len(ar)})
    plain, raw = rows[0]["tokens_per_s"], rows[1]["tokens_per_s"]
    for row in rows:
        row["vs_llama_cpp"] = round(row["tokens_per_s"] / plain, 3)
        row["vs_llama_cpp_raw"] = round(row["tokens_per_s"] / raw, 3)
    ours_r = forward_cost_ratios(engine, list(widths), context=CONTEXT_FOR_R)
    return {
        "model": model_dir, "gguf": gguf_path().name, "dtype": dtype, "threads": threads, "prompts": len(encoded),
        "max_new_tokens": max_new_tokens, "reps": reps, "llama_cpp_python": peer.version,
        "timing": "decode only: from the first generated token to the last, over max_new_tokens - 1 tokens",
        "rows": rows,
        "cost_ratio_r": {"llama.cpp": peer.cost_ratios(list(widths)),
                         "sdsat-engine": {**{str(w): round(ours_r[w], 3) for w in widths},
                                          "t1_ms": round(ours_r["t1_ms"], 2)}},
        "host": host_line(),
    }


def host_line() -> str:
    """The CPU's model name as lscpu prints it (from /proc/cpuinfo), the CPUs this process may use and the
    engine kernels' vector path (AVX-512 VNNI, AVX2, ...: hosts of one vendor differ)."""
    import os

    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        name = "unknown"
    from models.engine.kernels import vector_path

    return f"{name}, {len(os.sched_getaffinity(0))} CPUs, kernels: {vector_path()}"


def print_table(report: dict) -> None:
    print(f"{report['host']}; {report['prompts']} prompts, {report['max_new_tokens']} tokens, "
          f"{report['threads']} threads, decode only")
    for row in report["rows"]:
        k = f" k={row['k']}" if row["k"] else ""
        print(f"{row['engine']:>12} {row['method'] + k:<18} {row['decode_ms_per_token']:7.2f} ms/token "
              f"{row['tokens_per_s']:7.1f} tok/s  x{row['vs_llama_cpp']:.2f} vs llama.cpp  "
              f"same as our ar: {row['identical_to_our_ar']:.2f}")
    for name, r in report["cost_ratio_r"].items():
        print(f"{name:>12} r(w): " + ", ".join(f"{w}: {v}" for w, v in r.items()))
