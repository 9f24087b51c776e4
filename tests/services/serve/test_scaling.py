"""Autoscaling and backpressure of the decoder deployment (real Ray Serve, short test delays)."""

import asyncio
import threading

import httpx
from helpers import wait_for
from ray import serve
from svc_helpers import app_args

from services.app import build_app


def _replicas(app: str) -> int:
    status = serve.status().applications[app].deployments["Decoder"]
    return sum(n for state, n in status.replica_states.items() if str(state).endswith("RUNNING"))


def test_autoscaling_up_under_load_and_back_down(ray_session, counting_sdsat_dir):
    args = app_args(counting_sdsat_dir, min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                    upscale_delay_s=1, downscale_delay_s=4, metrics_interval_s=0.5)
    serve.run(build_app(args), name="autoscale", route_prefix="/autoscale")
    url = f"http://127.0.0.1:{ray_session}/autoscale/v1/completions"
    assert _replicas("autoscale") == 1
    stop = threading.Event()

    def load():  # 4 clients issuing long requests back to back
        async def client():
            async with httpx.AsyncClient(timeout=120) as http:
                while not stop.is_set():
                    await http.post(url, json={"prompt": "1 2 3", "max_tokens": 400, "temperature": 0,
                                               "speculation": {"method": "ar"}})

        async def main():
            await asyncio.gather(*(client() for _ in range(4)))

        asyncio.run(main())

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: _replicas("autoscale") == 2, timeout=150), "did not scale up to 2 replicas"
    finally:
        stop.set()
        thread.join(timeout=120)
    assert wait_for(lambda: _replicas("autoscale") == 1, timeout=120), "did not scale back down to 1"
    serve.delete("autoscale")


def test_backpressure_returns_429_with_retry_after(ray_session, counting_sdsat_dir):
    args = app_args(counting_sdsat_dir, max_ongoing_requests=1, max_queued_requests=1)
    args["router"]["retry_after_s"] = 2
    serve.run(build_app(args), name="backpressure", route_prefix="/bp")
    url = f"http://127.0.0.1:{ray_session}/bp/v1/completions"

    async def burst():
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"prompt": "1 2 3", "max_tokens": 300, "temperature": 0, "speculation": {"method": "ar"}}
            return await asyncio.gather(*(http.post(url, json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 1 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "2"
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    serve.delete("backpressure")
