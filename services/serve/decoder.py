"""The decoder deployment: one engine per replica (one GPU each where there are GPUs, CPU otherwise).

A thin shim over `models.engine.Engine` (driven by `EngineRunner`): `generate` streams a request's
output chunks as plain dicts; engine errors come back as an `{"error": ...}` item carrying the
HTTP status, so the router turns them into OpenAI-style responses in one place. The replica is
ready (and Serve routes to it) only after the model is loaded and warmed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator

from ray import serve

from models.errors import SdsatError
from services.serve.config import DecoderConfig
from services.serve.telemetry import end_span, speculation_attributes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("ray.serve")


def engine_from_config(cfg: DecoderConfig):
    import torch

    from models.config import build_config
    from models.engine import Engine, EngineConfig

    on_gpu = cfg.device == "cuda" and torch.cuda.is_available()
    if not on_gpu and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    # GPU replicas compile their forward with CUDA graphs (models/engine/compiled.py; the replica is ready once
    # its classes are compiled and checked: minutes the first time, seconds from the compile cache)
    overrides = {"dtype": "bfloat16" if on_gpu else "float32", "compile": on_gpu, **cfg.engine,
                 "device": "cuda" if on_gpu else "cpu"}
    if on_gpu and overrides["dtype"] == "int4":  # PyTorch's int4 kernel here is the CPU one
        log.warning("dtype int4 is a CPU option: this GPU replica serves bfloat16")
        overrides["dtype"] = "bfloat16"
    engine = Engine.from_pretrained(cfg.model_dir, build_config(EngineConfig, overrides=overrides))
    from models.engine.drafters import drafter_for

    report = engine.invariance
    if report is not None and not report.lossless:  # the engine serves ar for speculative methods: say so
        log.warning("speculation self-check failed: %s; failures: %s", report.summary(), report.failures[:4])
    elif report is not None:
        log.info("speculation self-check: %s", report.summary())
    why = drafter_for(engine.config.method).unavailable(engine) if engine.config.method != "auto" else None
    if why:  # e.g. the configured sdsat method on a base without an adapter: serve it plainly, and say so
        log.warning("default method %r is unavailable for %s (%s): the default is 'ar'", engine.config.method,
                    cfg.model_dir, why)
        engine.config = dataclasses.replace(engine.config, method="ar")
    return engine


def prefix_cache_from_config(cfg: DecoderConfig, engine):
    """The replica's prefix KV cache: an in-replica LRU, plus Redis when reachable (says which at start)."""
    from infra.prefix_cache import PrefixCache, model_fingerprint
    from models.engine.prefix import block_shape, kv_dtype

    url = cfg.redis_url or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    secret = os.environ.get("SDSAT_CACHE_SECRET")
    if not secret:
        log.warning("SDSAT_CACHE_SECRET is not set: prefix-cache keys and signatures use a development secret")
        secret = "sdsat-development-secret"
    variant = "int4" if engine.weights_dtype == "int4" else ""
    if not (engine.invariant_kernels and engine.config.invariant_prefill):  # other bits: never shared with them
        variant += "+library-prefill"
    cache = PrefixCache(model_fingerprint(cfg.model_dir, variant), secret.encode(),
                        block_shape(engine.model.config, cfg.prefix_block_size), kv_dtype(engine.cache),
                        block_size=cfg.prefix_block_size, redis_url=url, ttl_s=cfg.prefix_ttl_s,
                        latency_s=cfg.redis_latency_s, min_bytes_per_s=cfg.redis_min_mb_s * 1e6,
                        chunk_bytes=int(cfg.prefix_chunk_mb * 2**20), local_bytes=cfg.prefix_local_mb * 2**20,
                        write_queue_bytes=cfg.prefix_write_queue_mb * 2**20)
    if cache.redis_reachable():
        log.info("prefix cache: in-replica LRU + Redis at %s", url.split("@")[-1])
    else:
        log.warning("prefix cache: Redis at %s unreachable; using the in-replica cache alone", url.split("@")[-1])
    return cache


def output_item(out) -> dict:
    return {"text": out.text, "token_ids": out.token_ids, "finished": out.finished,
            "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens, "cached_tokens": out.cached_tokens,
            "speculation": out.stats, "logprobs": out.logprobs}


def error_item(err: SdsatError) -> dict:
    return {"error": {"status": err.status, "code": err.code, "message": err.message}}


def trace_phases(tracing, parent, timings: dict[str, int]) -> None:
    """Child spans of `generate` for the engine's phases, timed by the engine itself."""
    marks = [("queue", "queued", "admitted"), ("prefix_cache.lookup", "admitted", "prefix_lookup"),
             ("prefill", "prefix_lookup" if "prefix_lookup" in timings else "admitted", "prefill"),
             ("decode", "prefill", "finished")]
    for name, start, end in marks:
        if start in timings and end in timings:
            end_span(tracing.start(name, parent, start_time=timings[start]), end_time=timings[end])


@serve.deployment
class Decoder:
    def __init__(self, config: dict, telemetry: dict | None = None):
        from models.engine import SamplingParams
        from services.serve.config import TelemetryConfig
        from services.serve.engine_runner import EngineRunner
        from services.serve.telemetry import DecoderMetrics, Tracing

        self.config = DecoderConfig(**config)
        self.prefix_cache = None
        self.metrics = DecoderMetrics(self.config.model_name)

        def build():  # on the runner's thread, which then runs the engine (EngineRunner's doc says why)
            engine = engine_from_config(self.config)
            self.prefix_cache = prefix_cache_from_config(self.config, engine) if self.config.prefix_cache else None
            engine.prefix_store = self.prefix_cache
            engine.generate([1, 2, 3], SamplingParams(max_new_tokens=4))  # warm-up before taking traffic
            engine.batch_sizes.clear()
            engine.planner.forget()  # `auto` learns acceptance from real requests, not from the warm-up's
            return engine

        self.runner = EngineRunner(build, lambda e: self.metrics.engine_step(len(e.running), len(e.waiting)))
        self.engine = self.runner.engine
        self.tracing = Tracing("sdsat-decoder", TelemetryConfig(**(telemetry or {})).otlp_endpoint)
        self.metrics.self_check(self.engine.speculation_lossless, self.engine.weights_dtype)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        from models.engine import SamplingParams

        span = self.tracing.start("generate", self.tracing.extract(request.get("trace")),
                                  attributes={"sdsat.replica": self.replica_id})
        error = None
        try:
            params = SamplingParams(**request["params"])
            tenant = request.get("tenant", "default")
            # a streamed answer: a message per engine step (or per stream_interval_ms); else the first and the rest
            interval = self.config.stream_interval_ms / 1000 if request.get("stream", True) else None
            async for out in self.runner.generate(request["request_id"], request["prompt_ids"], params, tenant,
                                                  interval):
                if out.finished:
                    self._finished(out, span)
                yield {**output_item(out), "replica": self.replica_id}
        except SdsatError as err:
            error = err.message
            yield error_item(err)
        finally:
            end_span(span, error=error)

    def _finished(self, out, span) -> None:
        self.metrics.request_finished(out.stats)
        if self.prefix_cache is not None:
            self.metrics.cache_counters(self.prefix_cache.counters.as_dict())
        if span is not None:
            trace_phases(self.tracing, span, out.timings or {})
            span.set_attributes({"gen_ai.usage.input_tokens": out.prompt_tokens,
                                 "gen_ai.usage.output_tokens": out.completion_tokens,
                                 "sdsat.cached_tokens": out.cached_tokens, **{
                                     k: v for k, v in speculation_attributes(out.stats).items() if v is not None}})

    def ready(self) -> dict:
        from models.engine.config import METHODS
        from models.engine.drafters import drafter_for

        report = self.engine.invariance
        unavailable = {m: why for m in METHODS if m != "auto" and (why := drafter_for(m).unavailable(self.engine))}
        return {"ready": True, "model": self.config.model_name, "max_context": self.engine.max_context,
                "sat": dataclasses.asdict(self.engine.sat) if self.engine.sat else None,
                "methods": {"default": self.engine.config.method,
                            "available": [m for m in METHODS if m not in unavailable], "unavailable": unavailable},
                "auto": self.engine.planner.report(),
                "compiled": self.engine.compiled.report() if self.engine.compiled is not None else None,
                "speculation": {"lossless": self.engine.speculation_lossless,
                                "self_check": report.to_dict() if report is not None else None,
                                "summary": report.summary() if report is not None else "not checked"}}

    def stats(self) -> dict:
        """Engine counters for tests and debugging: decode batch sizes, load."""
        from services.serve.telemetry import telemetry_threads

        return {"batch_sizes": list(self.engine.batch_sizes), "steps": self.runner.steps,
                "cancelled": self.engine.cancelled, **self.runner.load(), "replica": self.replica_id,
                "prefix_cache": self.prefix_cache.counters.as_dict() if self.prefix_cache else None,
                "telemetry": {"tracing": self.tracing.enabled, "spans_started": self.tracing.spans_started,
                              "threads": telemetry_threads()}}

    def __del__(self):
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.stop()
        tracing = getattr(self, "tracing", None)
        if tracing is not None:
            tracing.shutdown()
