"""The decoder deployment: one engine per replica (one GPU each where there are GPUs, CPU otherwise).

A thin shim over `models.engine.Engine` (driven by `EngineRunner`): `generate` streams a request's
output chunks as plain dicts; engine errors come back as an `{"error": ...}` item carrying the
HTTP status, so the router turns them into OpenAI-style responses in one place. The replica is
ready (and Serve routes to it) only after the model is loaded and warmed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator

from ray import serve

from models.errors import SdsatError
from services.config import DecoderConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def engine_from_config(cfg: DecoderConfig):
    import torch

    from models.config import build_config
    from models.engine import Engine, EngineConfig

    on_gpu = cfg.device == "cuda" and torch.cuda.is_available()
    if not on_gpu and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    overrides = {"dtype": "bfloat16" if on_gpu else "float32", **cfg.engine, "device": "cuda" if on_gpu else "cpu"}
    return Engine.from_pretrained(cfg.model_dir, build_config(EngineConfig, overrides=overrides))


def output_item(out) -> dict:
    return {"text": out.text, "token_ids": out.token_ids, "finished": out.finished,
            "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens, "speculation": out.stats, "logprobs": out.logprobs}


def error_item(err: SdsatError) -> dict:
    return {"error": {"status": err.status, "code": err.code, "message": err.message}}


@serve.deployment
class Decoder:
    def __init__(self, config: dict):
        from models.engine import SamplingParams
        from services.engine_runner import EngineRunner

        self.config = DecoderConfig(**config)
        self.engine = engine_from_config(self.config)
        self.engine.generate([1, 2, 3], SamplingParams(max_new_tokens=4))  # warm-up before taking traffic
        self.engine.batch_sizes.clear()
        self.runner = EngineRunner(self.engine)

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        from models.engine import SamplingParams

        try:
            params = SamplingParams(**request["params"])
            async for out in self.runner.generate(request["request_id"], request["prompt_ids"], params):
                yield output_item(out)
        except SdsatError as err:
            yield error_item(err)

    def ready(self) -> dict:
        return {"ready": True, "model": self.config.model_name, "max_context": self.engine.max_context,
                "sat": dataclasses.asdict(self.engine.sat) if self.engine.sat else None}

    def stats(self) -> dict:
        """Engine counters for tests and debugging: decode batch sizes, load."""
        return {"batch_sizes": list(self.engine.batch_sizes), "steps": self.runner.steps,
                "cancelled": self.engine.cancelled, **self.runner.load(),
                "replica": serve.get_replica_context().replica_id.unique_id}

    def __del__(self):
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.stop()
