"""OpenAI-compatible request and response schemas (pydantic), plus this service's extensions.

Extensions: a per-request `speculation` object (`method`, `k`) and the engine's stats schema under
`usage.speculation`. OpenAI parameters this server does not implement are accepted only at their
neutral values (e.g. `frequency_penalty: 0`); other values get a 400 naming the parameter.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.engine.config import METHODS


class Speculation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal[METHODS] | None = Field(
        None, description="ar, sdsat, sdsat-fused, mlp, prompt-lookup, or auto (the engine picks by this host's "
                          "measured forward costs and acceptance)")
    k: int | None = Field(None, ge=0, le=16, description="draft tokens per iteration (0 = plain decoding)")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    max_completion_tokens: int | None = Field(None, ge=1, description="chat: alias of max_tokens")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension: top-k sampling, 0 = off")
    n: int = Field(1, ge=1, le=1, description="completions per prompt: only 1 is supported")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculation: Speculation | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past EOS (benchmarks)")
    user: str | None = Field(None, max_length=256)
    # accepted at their neutral values only
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop sequences must be 1..256 characters")
        return stops

    @model_validator(mode="after")
    def _neutral_only(self):
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) != 0.0:
                raise ValueError(f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(..., description="the prompt (a list of one string is accepted)")
    suffix: str | None = Field(None, description="fill-in-the-middle: text after the completion")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5, description="top log-probabilities per token")
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request is supported")
            value = value[0]
        if not value:
            raise ValueError("prompt must not be empty")
        return value

    @model_validator(mode="after")
    def _no_echo(self):
        if self.echo:
            raise ValueError("echo is not supported")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, speculation: dict | None) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if speculation is not None:
        out["speculation"] = speculation
    return out


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
