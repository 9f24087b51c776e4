"""The OpenAI-compatible API on a real Ray Serve app (CPU, the tiny counting SDSAT model)."""

import asyncio
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from ray import serve

ROOT = Path(__file__).resolve().parents[3]
PROMPT = "3 4 5"


@pytest.fixture(scope="module")
def client(service):
    from openai import OpenAI

    return OpenAI(base_url=service + "/v1", api_key="unused", max_retries=0, timeout=60)


@functools.cache
def _engine_text(model_dir, prompt: str, n: int) -> str:
    """What `sdsat generate` prints for the prompt (greedy, plain decoding)."""
    proc = subprocess.run([sys.executable, "-m", "services.cli", "generate", "--model", str(model_dir), "--prompt",
                           prompt, "--method", "ar", "--max-new-tokens", str(n), "--dtype", "float32", "--json", "-"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)["text"]


def test_completion_matches_engine_greedy(client, counting_sdsat_dir):
    out = client.completions.create(model="counting", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == _engine_text(counting_sdsat_dir, PROMPT, 12)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == 3
    spec = out.usage.model_extra["speculation"]
    assert spec["emitted"] == 12 and spec["accepted"] > 0 and spec["forwards"] < 12


def test_streaming_completion_with_usage(client, counting_sdsat_dir):
    chunks = list(client.completions.create(model="counting", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _engine_text(counting_sdsat_dir, PROMPT, 12)
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_whole_and_streamed(client):
    messages = [{"role": "user", "content": "count"}]
    whole = client.chat.completions.create(model="counting", messages=messages, max_tokens=6, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 6
    streamed = client.chat.completions.create(model="counting", messages=messages, max_tokens=6, temperature=0,
                                              stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content


def test_models_health_ready(service):
    assert httpx.get(service + "/health").json() == {"status": "ok"}
    ready = httpx.get(service + "/ready", timeout=30)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    speculation = ready.json()["speculation"]  # the decoder's start-up self-check, on this host
    assert speculation["lossless"] is True and speculation["self_check"]["kernels"] == "invariant"
    assert speculation["self_check"]["failures"] == [] and speculation["self_check"]["widths"] == [2, 4, 8, 16]
    methods = ready.json()["methods"]  # the counting test model has SAT tokens but no speculator beside it
    assert set(methods["available"]) == {"ar", "sdsat", "sdsat-fused", "prompt-lookup", "auto"}
    assert "speculator" in methods["unavailable"]["mlp"]
    models = httpx.get(service + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["counting"] and models["data"][0]["methods"] == methods


def test_speculation_extension_and_seeded_sampling(service):
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0.8, "seed": 3, "speculation": {"method": "ar"}}
    a = httpx.post(service + "/v1/completions", json=body, timeout=60).json()
    b = httpx.post(service + "/v1/completions", json={**body, "speculation": {"method": "sdsat", "k": 3}},
                   timeout=60).json()
    c = httpx.post(service + "/v1/completions", json={**body, "speculation": {"method": "sdsat", "k": 3}},
                   timeout=60).json()
    assert a["usage"]["speculation"]["drafted"] == 0 and b["usage"]["speculation"]["drafted"] > 0
    assert b["choices"][0]["text"] == c["choices"][0]["text"]  # seeded: reproducible


def test_auto_answers_like_ar_and_reports_the_method_it_chose(service):
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    ar = httpx.post(service + "/v1/completions", json={**body, "speculation": {"method": "ar"}}, timeout=60).json()
    auto = httpx.post(service + "/v1/completions", json={**body, "speculation": {"method": "auto"}}, timeout=60).json()
    assert auto["choices"][0]["text"] == ar["choices"][0]["text"]
    assert ar["usage"]["speculation"]["method"] == "ar"
    assert auto["usage"]["speculation"]["method"] in {"ar", "sdsat", "sdsat-fused", "prompt-lookup"}
    plan = httpx.get(service + "/ready", timeout=30).json()["auto"]  # the costs it measured, what it would pick
    assert plan["calibrated"] and plan["plans"]["1"]["choice"]["method"] in {"ar", "sdsat", "sdsat-fused",
                                                                               "prompt-lookup"}
    # one sequence at a time: the lone request's steps were timed for its (method, k)
    assert plan["trials"]["iterations_each"] > 0 and plan["trials"]["one_sequence"]


def test_logprobs(service):
    out = httpx.post(service + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                                        "logprobs": 2}, timeout=60).json()
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 4 and len(lp["token_logprobs"]) == 4
    assert all(len(t) == 2 for t in lp["top_logprobs"]) and all(v <= 0 for v in lp["token_logprobs"])
    assert "".join(lp["tokens"]).replace(" ", "") == out["choices"][0]["text"].replace(" ", "")


@pytest.mark.parametrize("body, status, fragment", [
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ({"prompt": PROMPT, "n": 2}, 400, "n"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": PROMPT, "frequency_penalty": 1.0}, 400, "frequency_penalty"),
    ({"prompt": PROMPT, "speculation": {"k": -1}}, 400, "speculation"),
    ({"prompt": PROMPT, "speculation": {"method": "beam"}}, 400, "speculation"),
    ({"prompt": PROMPT, "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": PROMPT, "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": " ".join(["3"] * 1100), "max_tokens": 4}, 400, "context"),
    ({"prompt": PROMPT, "suffix": "9"}, 400, "fill-in-the-middle"),
    ({"prompt": PROMPT, "unknown_field": 1}, 400, "unknown_field"),
])
def test_invalid_requests_get_openai_errors(service, body, status, fragment):
    r = httpx.post(service + "/v1/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in json.dumps(error) and error["type"]


def test_malformed_json_and_oversized_body(service):
    r = httpx.post(service + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(service + "/v1/completions", json={"prompt": "3 " * 600_000}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(service + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_concurrent_requests_are_batched(service):
    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            bodies = [{"prompt": f"{i} {i + 1} {i + 2}", "max_tokens": 30, "temperature": 0} for i in range(8)]
            return await asyncio.gather(*(http.post(service + "/v1/completions", json=b) for b in bodies))

    responses = asyncio.run(run())
    for i, r in enumerate(responses):
        assert r.status_code == 200
        first = int(r.json()["choices"][0]["text"].split()[0])
        assert first == (i + 3) % 24  # each got its own continuation
    stats = serve.get_deployment_handle("Decoder", "main").stats.remote().result()
    assert max(stats["batch_sizes"]) >= 4  # several sequences shared forwards


def test_client_disconnect_cancels_generation(service):
    handle = serve.get_deployment_handle("Decoder", "main")
    cancelled_before = handle.stats.remote().result()["cancelled"]
    body = {"prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "stream": True, "speculation": {"method": "ar"}}
    with httpx.stream("POST", service + "/v1/completions", timeout=60, json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # read one chunk, then hang up
    import time

    deadline = time.time() + 20
    while time.time() < deadline:
        load = handle.stats.remote().result()
        if load["running"] == 0 and load["waiting"] == 0:
            break
        time.sleep(0.2)
    assert load["running"] == 0 and load["waiting"] == 0
    assert load["cancelled"] == cancelled_before + 1  # stopped by the disconnect, not by finishing
