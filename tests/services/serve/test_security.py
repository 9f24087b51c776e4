"""Access control on a served app with API keys: 401s, tenants' separate prefix caches, per-key
request and token rate limits (429 with Retry-After), and structured logs that carry the trace id
and never the prompt."""

import json
import random
import time
from pathlib import Path

import httpx
import pytest
from helpers import wait_for
from ray import serve
from svc_helpers import app_args

from services.app import build_app
from services.serve.access import RateLimiter, RateLimitError, key_digest, keys_from_env

KEYS = {"a": "sk-tenant-a-secret", "b": "sk-tenant-b-secret", "c": "sk-tenant-c-secret"}


@pytest.fixture(scope="module")
def secure(ray_session, counting_sdsat_dir, monkeypatch_module):
    monkeypatch_module.setenv("SDSAT_API_KEYS", f"a:{KEYS['a']}")  # the environment path, hashed by build_app
    args = app_args(counting_sdsat_dir)
    args["router"].update(api_keys=[
        {"tenant": "b", "key_sha256": key_digest(KEYS["b"]), "requests_per_minute": 3},
        {"tenant": "c", "key_sha256": key_digest(KEYS["c"]), "tokens_per_minute": 200},
    ])
    serve.run(build_app(args), name="secure", route_prefix="/secure")
    yield f"http://127.0.0.1:{ray_session}/secure"
    serve.delete("secure")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def auth(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def post(url: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)


def test_env_keys_are_hashed_and_malformed_ones_refused():
    assert keys_from_env("t1:k1, t2:k2") == [{"tenant": "t1", "key_sha256": key_digest("k1")},
                                              {"tenant": "t2", "key_sha256": key_digest("k2")}]
    with pytest.raises(ValueError) as err:
        keys_from_env("just-a-key-without-tenant")
    assert "just-a-key" not in str(err.value)


def test_rate_limiter_window_slides_and_refunds_unused_tokens():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    limiter.admit("k", "r1", 100, rpm=2, tpm=150)
    with pytest.raises(RateLimitError) as err:  # 100 + 100 tokens > 150
        limiter.admit("k", "r2", 100, rpm=2, tpm=150)
    assert err.value.retry_after_s == 60
    limiter.refund("k", "r1", 80)  # r1 generated 20 of its 100
    limiter.admit("k", "r2", 100, rpm=2, tpm=150)
    now[0] = 30.0
    with pytest.raises(RateLimitError) as err:  # two requests in the last minute
        limiter.admit("k", "r3", 1, rpm=2, tpm=150)
    assert err.value.retry_after_s == 30
    limiter.admit("other", "r4", 1, rpm=2, tpm=150)  # keys do not share windows
    now[0] = 60.5
    limiter.admit("k", "r5", 150, rpm=2, tpm=150)  # both left the window


def test_keys_are_required_on_the_api_but_not_on_health(secure):
    body = {"prompt": "1 2 3", "max_tokens": 2}
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS["a"]},
                    {"Authorization": "Basic " + KEYS["a"]}):
        r = post(secure, body, headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    bad_body = httpx.post(secure + "/v1/completions", content=b"{not json", timeout=30)
    assert bad_body.status_code == 401  # refused before the body is read
    assert httpx.get(secure + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(secure + "/v1/models", headers=auth("a"), timeout=30).status_code == 200
    assert httpx.get(secure + "/health", timeout=30).status_code == 200
    assert post(secure, body, auth("a")).status_code == 200


def test_tenants_never_share_prefix_cache_entries(secure):
    rng = random.Random(time.time_ns())  # Redis outlives test runs: a prompt never seen before
    prompt = " ".join(str(rng.randrange(24)) for _ in range(80))
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0}

    def cached(tenant):
        r = post(secure, body, auth(tenant))
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"], r.json()["choices"][0]["text"]

    first_a, second_a, first_b, second_b = cached("a"), cached("a"), cached("b"), cached("b")
    assert first_a[0] == 0 and second_a[0] == 64
    assert first_b[0] == 0, "tenant b was served tenant a's cached prefix"
    assert second_b[0] == 64
    assert len({first_a[1], second_a[1], first_b[1], second_b[1]}) == 1


def test_request_rate_limit_answers_429_with_retry_after(secure):
    body = {"prompt": "4 5 6", "max_tokens": 2}
    codes = [post(secure, body, auth("b")).status_code for _ in range(5)]
    assert codes.count(200) <= 3 and codes[-1] == 429, codes  # b may have spent some in the cache test
    r = post(secure, body, auth("b"))
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert post(secure, body, auth("a")).status_code == 200  # other keys are not affected


def test_token_rate_limit_counts_prompt_and_max_tokens_and_refunds_unused(secure):
    too_big = post(secure, {"prompt": "1 2", "max_tokens": 250}, auth("c"))
    assert too_big.status_code == 429
    assert "tokens per minute" in too_big.json()["error"]["message"]
    # greedy counting stops at "6" after a few tokens: the rest of its charge comes back, so the
    # next request fits (sampled at the default temperature it might never say "6")
    short = post(secure, {"prompt": "1 2 3", "max_tokens": 120, "stop": ["6"], "temperature": 0}, auth("c"))
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] < 120
    full = post(secure, {"prompt": "1 2 3", "max_tokens": 120, "ignore_eos": True}, auth("c"))
    assert full.status_code == 200, full.text
    assert full.json()["usage"]["completion_tokens"] == 120
    over = post(secure, {"prompt": "1 2 3", "max_tokens": 80, "ignore_eos": True}, auth("c"))
    assert over.status_code == 429, over.text
    assert over.json()["error"]["code"] == "rate_limit_exceeded"


def _log_records(since: float) -> list[dict]:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    out = []
    for path in logs.glob("replica_secure_*.log"):
        if path.stat().st_mtime < since:
            continue
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
    return out


def test_logs_are_json_with_trace_id_and_without_prompts(secure):
    import ray

    start = time.time() - 1
    marker = " ".join(["17 3 11 19"] * 4)
    trace = f"{random.Random(time.time_ns()).getrandbits(128):032x}"
    r = post(secure, {"prompt": marker, "max_tokens": 3, "temperature": 0},
             {**auth("a"), "traceparent": f"00-{trace}-{'1' * 16}-01"})
    assert r.status_code == 200
    mine = []

    def logged() -> bool:
        mine[:] = [rec for rec in _log_records(start) if rec.get("sdsat", {}).get("trace_id") == trace]
        return bool(mine)

    assert wait_for(logged, 30), "no JSON log line carried the request's trace id"
    rec = mine[0]["sdsat"]
    assert rec["tenant"] == "a" and rec["status"] == 200 and rec["completion_tokens"] == 3
    assert "prompt" not in rec
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for path in logs.rglob("*"):
        if path.is_file() and path.stat().st_mtime >= start:
            text = path.read_text(errors="replace")
            assert marker not in text, f"the prompt leaked into {path.name}"
            assert all(key not in text for key in KEYS.values()), f"an API key leaked into {path.name}"
