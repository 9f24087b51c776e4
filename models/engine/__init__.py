"""The SDSAT decoding engine: draft-then-verify with a shared slot KV cache and continuous batching."""

from models.engine.config import METHODS, EngineConfig, SamplingParams, SpecStats
from models.engine.engine import Engine
from models.engine.sequence import RequestOutput

__all__ = ["METHODS", "Engine", "EngineConfig", "RequestOutput", "SamplingParams", "SpecStats"]
