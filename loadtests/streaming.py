"""Per-request latency metrics of LLM responses, independent of Locust (so tests need no load).

A streamed response is timed chunk by chunk: time to first token (TTFT), the gaps between content
chunks (inter-token latency, ITL; with speculative decoding a chunk may carry several tokens),
time per output token after the first (TPOT), end-to-end latency (E2E) and output tokens/s. Token
counts come from the response's `usage` (streams ask for it with `stream_options.include_usage`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    e2e_s: float
    completion_tokens: int
    ttft_s: float | None = None  # streaming only
    itl_s: list[float] = field(default_factory=list)  # streaming only: gaps between content chunks

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (streaming, at least two tokens)."""
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.e2e_s if self.e2e_s > 0 else 0.0


def choice_text(choice: dict) -> str:
    """New text of a completions choice (`text`) or a chat choice (`delta.content` or `message.content`)."""
    if "text" in choice:
        return choice["text"] or ""
    return (choice.get("delta") or choice.get("message") or {}).get("content") or ""


@dataclass
class StreamTimer:
    """Feed it every SSE line of one response with its arrival time (seconds, any clock that t0 uses)."""

    t0: float
    first_at: float | None = None
    last_at: float | None = None
    gaps: list[float] = field(default_factory=list)
    completion_tokens: int | None = None
    text: str = ""
    done: bool = False  # saw `data: [DONE]`
    error: str | None = None

    def feed(self, line: str, now: float) -> None:
        if not line.startswith("data: "):
            return
        payload = line[len("data: "):]
        if payload == "[DONE]":
            self.done = True
            return
        chunk = json.loads(payload)
        if "error" in chunk:
            self.error = chunk["error"].get("message", "error")
            return
        if chunk.get("usage"):
            self.completion_tokens = chunk["usage"]["completion_tokens"]
        text = "".join(choice_text(c) for c in chunk.get("choices") or [])
        if not text:
            return
        if self.first_at is None:
            self.first_at = now
        else:
            self.gaps.append(now - self.last_at)
        self.last_at, self.text = now, self.text + text

    def problem(self) -> str | None:
        """Why the stream is not a valid complete response, or None."""
        if self.error:
            return f"error in stream: {self.error}"
        if not self.done:
            return "stream ended without [DONE]"
        if self.completion_tokens is None:
            return "no usage chunk in the stream"
        return None

    def metrics(self, end: float) -> RequestMetrics:
        ttft = self.first_at - self.t0 if self.first_at is not None else None
        return RequestMetrics(end - self.t0, self.completion_tokens or 0, ttft, list(self.gaps))
