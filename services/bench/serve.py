"""`sdsat bench-serve`: latency and throughput of a running service, SDSAT against plain decoding.

    sdsat serve &                      # or any deployment
    sdsat bench-serve --json serve.json

For each run (3 by default, interleaved), each method (`--methods`: by default the service's own default,
then plain `ar`, each through the per-request `speculation` extension) and each concurrency c, c clients
issue streaming completions (or, with `--no-stream`, answers in one piece) back to back (HumanEval prompts,
greedy, fixed `max_tokens` with EOS ignored so every request produces the same number of tokens): chat
completions with the prompt in the code-task chat form (models/weights/chat.py) with `--chat`, as users
send code tasks to an instruct model, else raw completions. Per run: median and p99 end-to-end latency,
median time to first token, aggregate output tokens/s; the report gives the median over runs, and each method's
ratios to `ar` (`vs_plain`).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time


async def _one(http, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    if not body["stream"]:
        r = await http.post(url, json=body)
        if r.status_code != 200:
            return {"error": r.status_code}
        return {"latency": time.perf_counter() - t0, "ttft": None, "tokens": r.json()["usage"]["completion_tokens"]}
    ttft, tokens = None, 0
    async with http.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            if (choice.get("text") or choice.get("delta", {}).get("content")) and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}


async def _load(url: str, prompts: list, concurrency: int, per_client: int, max_tokens: int,
                speculation: dict | None, stream: bool = True) -> dict:
    import httpx

    async def client(i: int) -> list[dict]:
        out = []
        async with httpx.AsyncClient(timeout=600) as http:
            for j in range(per_client):
                prompt = prompts[(i * per_client + j) % len(prompts)]
                body = {"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt}
                body.update(max_tokens=max_tokens, temperature=0, stream=stream, ignore_eos=True)
                if stream:
                    body["stream_options"] = {"include_usage": True}
                if speculation:
                    body["speculation"] = speculation
                out.append(await _one(http, url, body))
        return out

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client(i) for i in range(concurrency))) for r in rs]
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok)
    return {
        "requests": len(results), "errors": len(results) - len(ok),
        "median_latency_s": statistics.median(lat) if lat else None,
        "p99_latency_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "median_ttft_s": statistics.median(ttfts) if (ttfts := [r["ttft"] for r in ok if r["ttft"] is not None])
        else None,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
    }


def run_bench_serve(base_url: str, prompts: list, concurrencies: list[int], runs: int, per_client: int,
                    max_tokens: int, methods: dict[str, dict | None], stream: bool = True) -> dict:
    """prompts: texts (POST /v1/completions) or message lists (POST /v1/chat/completions); stream False:
    answers in one piece (no time to first token)."""
    chat = not isinstance(prompts[0], str)
    url = base_url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    asyncio.run(_load(url, prompts, 1, 1, 8, None))  # warm-up
    samples: dict[tuple[str, int], list[dict]] = {}
    for _ in range(runs):
        for name, speculation in methods.items():
            for c in concurrencies:
                samples.setdefault((name, c), []).append(asyncio.run(
                    _load(url, prompts, c, per_client, max_tokens, speculation, stream)))
    rows = []
    for (name, c), runs_ in samples.items():
        row = {"method": name, "concurrency": c, "runs": len(runs_), "errors": sum(r["errors"] for r in runs_)}
        for key in ("median_latency_s", "p99_latency_s", "median_ttft_s", "tokens_per_s"):
            values = [r[key] for r in runs_ if r[key] is not None]
            row[key] = statistics.median(values) if values else None
        rows.append(row)
    by = {(r["method"], r["concurrency"]): r for r in rows}
    plain = "ar" if "ar" in methods else list(methods)[-1]
    ratios = {}  # every other method against plain decoding, per concurrency
    for name in methods:
        for c in concurrencies:
            s, p = by[(name, c)], by[(plain, c)]
            if name != plain and s["median_latency_s"] and p["median_latency_s"] and p["tokens_per_s"]:
                ratios.setdefault(name, {})[str(c)] = {
                    "latency_ratio": s["median_latency_s"] / p["median_latency_s"],
                    "throughput_ratio": s["tokens_per_s"] / p["tokens_per_s"]}
    return {"url": base_url, "route": url.rsplit("/v1", 1)[1], "stream": stream, "max_tokens": max_tokens,
            "per_client": per_client,
            "plain": plain, "results": rows, "vs_plain": ratios}


def parse_methods(text: str) -> dict[str, dict | None]:
    """'default,ar,auto,prompt-lookup:1' -> the request's `speculation` field per name: `default` sends none
    (the service's own default), `method[:k]` sends that method (and k)."""
    methods: dict[str, dict | None] = {}
    for name in (item.strip() for item in text.split(",") if item.strip()):
        if name == "default":
            methods[name] = None
            continue
        method, _, k = name.partition(":")
        methods[name] = {"method": method, **({"k": int(k)} if k else {})}
    if not methods:
        raise ValueError("--methods names no method")
    return methods
