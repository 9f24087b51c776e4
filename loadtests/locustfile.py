"""Locust users for the OpenAI-compatible service: completions and chat, streamed and whole.

    make loadtest URL=http://127.0.0.1:8000 USERS=8 SPAWN_RATE=2 DURATION=60s
    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 -u 4 -r 2 -t 30s \
        --prompts-file prompts.jsonl --max-tokens 64 --csv results/locust --csv-full-history

Prompts come from --prompts-file (JSONL, a "prompt" per line; env LOADTEST_PROMPTS_FILE) or else
HumanEval. Locust times a streamed request only up to its first bytes, so each response also
fires its own metrics as request events, one row each in Locust's statistics, named by endpoint:

    TTFT       time to first token, ms (streams)
    ITL        gap between content chunks, ms, one sample per gap (streams)
    TPOT       time per output token after the first, ms (streams)
    E2E        request start to the last byte, ms; its "content size" is the output token count
    OUT_TOK_S  output tokens/s of the request: the "response time" column holds tokens/s, not ms

The HTTP rows (POST) count requests and failures. `python -m loadtests.report` turns the CSVs into
a summary JSON and a plot.
"""

from __future__ import annotations

import functools
import random
import sys
import time
from pathlib import Path

from locust import HttpUser, between, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `locust -f` adds only this file's folder

from loadtests.prompts import load_prompts  # noqa: E402
from loadtests.streaming import RequestMetrics, StreamTimer  # noqa: E402


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    group = parser.add_argument_group("SDSAT load test")
    group.add_argument("--prompts-file", default="", env_var="LOADTEST_PROMPTS_FILE",
                       help="JSONL file with a \"prompt\" per line (default: the HumanEval prompts)")
    group.add_argument("--max-tokens", type=int, default=64, env_var="LOADTEST_MAX_TOKENS",
                       help="max_tokens of every request")
    group.add_argument("--temperature", type=float, default=0.0, env_var="LOADTEST_TEMPERATURE",
                       help="sampling temperature (0 = greedy)")
    group.add_argument("--model", default="", env_var="LOADTEST_MODEL",
                       help="the `model` field sent (default: none, the served model)")
    group.add_argument("--ignore-eos", action="store_true", env_var="LOADTEST_IGNORE_EOS",
                       help="generate max_tokens every time (equal lengths, for throughput comparisons)")


@functools.cache
def _prompts(path: str) -> list[str]:
    return load_prompts(path or None)


def fire_metrics(request_event, name: str, m: RequestMetrics) -> None:
    """One request event per metric sample (see the module docstring for units)."""

    def fire(kind: str, value: float, length: int = 0) -> None:
        request_event.fire(request_type=kind, name=name, response_time=value, response_length=length,
                           exception=None, context={})

    if m.ttft_s is not None:
        fire("TTFT", m.ttft_s * 1e3)
    for gap in m.itl_s:
        fire("ITL", gap * 1e3)
    if m.tpot_s is not None:
        fire("TPOT", m.tpot_s * 1e3)
    fire("E2E", m.e2e_s * 1e3, m.completion_tokens)
    fire("OUT_TOK_S", m.tokens_per_s)


class _LLMUser(HttpUser):
    abstract = True
    wait_time = between(0.1, 0.5)
    path = ""  # the endpoint
    label = ""  # the metric name prefix

    def body(self, prompt: str) -> dict:
        raise NotImplementedError

    def generate(self, stream: bool) -> None:
        opts = self.environment.parsed_options
        body = {**self.body(random.choice(_prompts(opts.prompts_file))), "max_tokens": opts.max_tokens,
                "temperature": opts.temperature, "stream": stream, "ignore_eos": opts.ignore_eos}
        if opts.model:
            body["model"] = opts.model
        if stream:
            body["stream_options"] = {"include_usage": True}
        name = self.label + ("/stream" if stream else "")
        t0 = time.perf_counter()
        with self.client.post(self.path, json=body, stream=stream, catch_response=True, name=name) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            metrics, problem = self._read(resp, t0) if stream else self._whole(resp, t0)
            if problem:
                resp.failure(problem)
                return
            resp.success()
        fire_metrics(self.environment.events.request, name, metrics)

    @staticmethod
    def _read(resp, t0: float) -> tuple[RequestMetrics, str | None]:
        timer = StreamTimer(t0)
        for line in resp.iter_lines(decode_unicode=True):
            timer.feed(line, time.perf_counter())
        return timer.metrics(time.perf_counter()), timer.problem()

    @staticmethod
    def _whole(resp, t0: float) -> tuple[RequestMetrics, str | None]:
        data = resp.json()
        end = time.perf_counter()
        if "usage" not in data or not data.get("choices"):
            return RequestMetrics(end - t0, 0), "response without usage or choices"
        return RequestMetrics(end - t0, data["usage"]["completion_tokens"]), None


class CompletionsUser(_LLMUser):
    """POST /v1/completions, streamed three times out of four."""

    path, label = "/v1/completions", "completions"

    def body(self, prompt: str) -> dict:
        return {"prompt": prompt}

    @task(3)
    def streamed(self) -> None:
        self.generate(stream=True)

    @task(1)
    def whole(self) -> None:
        self.generate(stream=False)


class ChatUser(_LLMUser):
    """POST /v1/chat/completions, the prompt as the user turn, streamed three times out of four."""

    path, label = "/v1/chat/completions", "chat"

    def body(self, prompt: str) -> dict:
        return {"messages": [{"role": "user", "content": prompt}]}

    @task(3)
    def streamed(self) -> None:
        self.generate(stream=True)

    @task(1)
    def whole(self) -> None:
        self.generate(stream=False)
