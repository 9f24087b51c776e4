"""The typed app builder: router + autoscaled decoder, shaped by an `AppConfig`.

    serve run infra/serve_config.yaml          # import_path: services.app:build_app
    sdsat serve --config infra/serve_config.yaml

Decoder placement is resolved here, at deploy time: with `device: auto` a replica asks for one
GPU when the cluster has GPUs and a fraction of a CPU otherwise, so one config serves both.
"""

from __future__ import annotations

import ray
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from services.serve.config import ApiKeyConfig, AppConfig, DecoderConfig
from services.serve.decoder import Decoder
from services.serve.router import Router


def cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def decoder_options(cfg: DecoderConfig, use_gpu: bool, retry_after_s: int) -> dict:
    routing = {"request_router_config": RequestRouterConfig(
        request_router_class="infra.affinity_router:PrefixAffinityRouter")} if cfg.affinity_routing else {}
    return {
        **routing,
        "ray_actor_options": {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": cfg.num_cpus},
        "autoscaling_config": {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "initial_replicas": cfg.initial_replicas if cfg.initial_replicas is not None else cfg.min_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s,
            "metrics_interval_s": cfg.metrics_interval_s, "look_back_period_s": max(2 * cfg.metrics_interval_s, 2.0),
        },
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=retry_after_s),
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 5.0,
    }


def build_app(args: dict | AppConfig | None = None):
    from services.serve.access import keys_from_env

    cfg = args if isinstance(args, AppConfig) else AppConfig(**(args or {}))
    env_keys = keys_from_env()  # raw keys from the environment become digests here, before any deployment sees them
    if env_keys:
        cfg = cfg.model_copy(update={"router": cfg.router.model_copy(
            update={"api_keys": [*cfg.router.api_keys, *(ApiKeyConfig(**k) for k in env_keys)]})})
    logging_config = {"encoding": cfg.router.log_encoding}
    use_gpu = cfg.decoder.device == "cuda" or (cfg.decoder.device == "auto" and cluster_has_gpus())
    decoder_cfg = cfg.decoder.model_copy(update={"device": "cuda" if use_gpu else "cpu"})
    options = decoder_options(decoder_cfg, use_gpu, cfg.router.retry_after_s)
    decoder = Decoder.options(**options, logging_config=logging_config).bind(
        decoder_cfg.model_dump(), cfg.telemetry.model_dump())
    router = Router.options(
        num_replicas=cfg.router.replicas,
        ray_actor_options={"num_cpus": cfg.router.num_cpus},
        max_ongoing_requests=cfg.router.max_ongoing_requests,
        max_queued_requests=cfg.router.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=cfg.router.retry_after_s),
        logging_config=logging_config,
    )
    return router.bind(decoder, cfg.model_dump())
