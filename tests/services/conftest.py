"""One Ray instance and one Serve app (the tiny counting SDSAT model on CPU) for the service tests, and
the default instruct model's tokenizer for the chat-form tests."""

from __future__ import annotations

import pytest
from svc_helpers import app_args, free_port


@pytest.fixture(scope="session")
def ray_session():
    import os

    import ray

    # Serve's controller marks a proxy unhealthy after 3 health checks of 10 s (ready check: 5 s); on 2 busy cores
    # a new proxy process can take longer than that to start, and was killed before it ran. The Ray processes
    # started below inherit these.
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(name, "60")
    ray.init(num_cpus=4, object_store_memory=128 * 2**20, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}},
             _system_config={"metrics_report_interval_ms": 1000})  # metrics tests wait on the export
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def service(ray_session, counting_sdsat_dir):
    """Base URL of the main test app."""
    from ray import serve

    from services.app import build_app

    serve.run(build_app(app_args(counting_sdsat_dir)), name="main", route_prefix="/")
    return f"http://127.0.0.1:{ray_session}"


@pytest.fixture(scope="session")
def chat_tokenizer_dir():
    """The default model's folder (SmolLM2-135M-Instruct: a ChatML template, EOS <|im_end|>). Tests load
    only its tokenizer, which takes a second; the model itself is never loaded here."""
    from models.weights.base_model import ensure_base_model

    return ensure_base_model()  # converted by `make setup`; converts here (about 25 s) when missing


@pytest.fixture(scope="session")
def chat_tokenizer(chat_tokenizer_dir):
    from models.weights.checkpoint import load_tokenizer

    return load_tokenizer(chat_tokenizer_dir)
