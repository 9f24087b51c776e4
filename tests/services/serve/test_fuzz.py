"""Property-based fuzzing of the HTTP API (hypothesis) against the real served app: whatever the body
(well-formed or not, in range or not, streamed or not), the answer is a 2xx or a 4xx with an
OpenAI-style JSON error, never a 5xx, and it comes within the timeout (no hang). Bounded budget."""

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TIMEOUT_S = 60
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

anything = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                    max_size=3), max_leaves=6)
small = st.integers(-3, 24)
huge = st.integers(-(2**70), 2**70)
num = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 5) | huge
prompt_text = st.text(max_size=200) | st.lists(st.integers(0, 23).map(str), max_size=60).map(" ".join)

COMMON = {
    "model": st.sampled_from(["counting", "other", ""]) | anything,
    "max_tokens": small | huge | anything,
    "temperature": num | anything,
    "top_p": num,
    "top_k": small | huge,
    "n": small | huge,
    "stop": st.text(max_size=300) | st.lists(st.text(max_size=300), max_size=6) | anything,
    "seed": huge | anything,
    "stream": st.booleans() | anything,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | anything,
    "speculation": st.fixed_dictionaries({}, optional={
        "method": st.sampled_from(["ar", "sdsat", "sdsat-fused", "prompt-lookup", "mlp", "x"]),
        "k": small | huge}) | anything,
    "ignore_eos": st.booleans(),
    "user": st.text(max_size=300),
    "frequency_penalty": num,
    "logit_bias": anything,
}
COMPLETION = st.fixed_dictionaries({"prompt": prompt_text | st.lists(prompt_text, max_size=3) | anything}, optional={
    **COMMON, "suffix": st.text(max_size=40) | anything, "logprobs": small | anything, "echo": st.booleans(),
    "best_of": small})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                                 "content": prompt_text | anything})
CHAT = st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=3) | anything}, optional={
    **COMMON, "logprobs": st.booleans() | anything, "top_logprobs": small})
EXTRA = st.dictionaries(st.text(min_size=1, max_size=12), anything, max_size=2)


def _bounded(body: dict) -> dict:
    """Keep generation short: the budget is for inputs, not for decoding long outputs."""
    tokens = body.get("max_tokens")
    if isinstance(tokens, int) and 0 < tokens <= 2048:
        body["max_tokens"] = min(tokens, 24)
    return body


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
    else:
        assert response.json()["usage"]["completion_tokens"] >= 0


def send(url: str, body) -> httpx.Response:
    raw = json.dumps(body, allow_nan=True).encode()  # NaN/Infinity as Python's json writes them
    return httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def http(service):
    return service


@FUZZ
@given(body=COMPLETION, extra=EXTRA)
def test_fuzz_completions(http, body, extra):
    check(send(http + "/v1/completions", _bounded({**extra, **body})))


@FUZZ
@given(body=CHAT, extra=EXTRA)
def test_fuzz_chat(http, body, extra):
    check(send(http + "/v1/chat/completions", _bounded({**extra, **body})))


@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/nope"]),
       content_type=st.sampled_from(["application/json", "text/plain", "multipart/form-data", ""]))
def test_fuzz_raw_bodies(http, raw, path, content_type):
    check(httpx.post(http + path, content=raw, headers={"content-type": content_type}, timeout=TIMEOUT_S))


def test_non_finite_numbers_are_400(http):
    for value in (math.nan, math.inf, -math.inf):
        r = send(http + "/v1/completions", {"prompt": "1 2", "max_tokens": 2, "temperature": value})
        assert r.status_code == 400, r.text
