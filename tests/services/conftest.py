"""One Ray instance and one Serve app (the tiny counting SDSAT model on CPU) for the service tests."""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=4, object_store_memory=128 * 2**20, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


def app_args(model_dir, **decoder) -> dict:
    base = {"model_dir": str(model_dir), "model_name": "counting", "num_cpus": 0.5, "cpu_threads": 1,
            "min_replicas": 1, "max_replicas": 1, "engine": {"method": "sdsat", "k": 4, "max_context": 1024}}
    base.update(decoder)
    return {"decoder": base, "router": {"num_cpus": 0.1, "request_timeout_s": 60}}


@pytest.fixture(scope="session")
def service(ray_session, counting_sdsat_dir):
    """Base URL of the main test app."""
    from ray import serve

    from services.app import build_app

    serve.run(build_app(app_args(counting_sdsat_dir)), name="main", route_prefix="/")
    return f"http://127.0.0.1:{ray_session}"
