"""The router (ingress) deployment: OpenAI-compatible HTTP API over the decoder replicas.

It validates requests (pydantic), tokenizes (the model's own HF tokenizer), sends the work to the
decoder deployment through a streaming handle and formats responses, streamed as SSE ending in
`data: [DONE]` or whole. Errors become OpenAI-style JSON in one place (`services.serve.errors`). A client
that disconnects mid-stream cancels its generation, which frees its batch slot in the engine.
"""


import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from opentelemetry.trace import SpanKind
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from infra.affinity_router import affinity_key
from models.errors import InvalidRequestError, SdsatError
from services.serve import formatting as fmt
from services.serve.access import ApiKeys, AuthenticationError, KeyEntry, RateLimiter
from services.serve.api import ChatRequest, CompletionRequest, new_id
from services.serve.config import AppConfig
from services.serve.errors import (
    BackpressureRetry,
    BodyLimitMiddleware,
    ModelNotFoundError,
    backpressure_response,
    error_from_item,
    error_response,
    install_error_handlers,
)
from services.serve.telemetry import RouterMetrics, Tracing, end_span, speculation_attributes


def trace_id(span, headers: dict) -> str:
    """The request's trace id for log lines: its span's, else an incoming W3C traceparent's, else a new one."""
    if span is not None:
        return format(span.get_span_context().trace_id, "032x")
    parts = headers.get("traceparent", "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        try:
            int(parts[1], 16)
            return parts[1].lower()
        except ValueError:
            pass
    return uuid.uuid4().hex


REPLICA_DIED = "the decoder replica serving this request failed; retry the request"


def _sse_data(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class RequestTimer:
    """One request's latency metrics: TTFT at its first tokens, inter-token gaps per chunk, the total at the end."""

    def __init__(self, route: str, model: str, metrics):
        self.t0 = self.last = time.perf_counter()
        self.tags, self.metrics, self.first = {"model": model, "route": route}, metrics, None

    def item(self, item: dict) -> None:
        n = len(item.get("token_ids") or ())
        if not n:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.t0, self.tags)
        else:  # a message may carry several steps' tokens (merged streams): one sample per token, as before
            gap = (now - self.last) / n
            for _ in range(n):
                self.metrics.itl.observe(gap, self.tags)
        self.last = now

    def done(self, last: dict, span, k: int | None) -> None:
        self.metrics.latency.observe(time.perf_counter() - self.t0, self.tags)
        model = {"model": self.tags["model"]}
        self.metrics.input_tokens.inc(last["prompt_tokens"], model)
        if last["completion_tokens"]:
            self.metrics.output_tokens.inc(last["completion_tokens"], model)
        end_span(span, {"gen_ai.usage.input_tokens": last["prompt_tokens"],
                        "gen_ai.usage.output_tokens": last["completion_tokens"],
                        "gen_ai.response.finish_reasons": [last.get("finish_reason") or "stop"],
                        **speculation_attributes(last.get("speculation"), k)})


app = FastAPI(title="SDSAT serving", description="OpenAI-compatible completions with SDSAT speculative decoding")
install_error_handlers(app)
app.add_middleware(BodyLimitMiddleware)


@app.middleware("http")
async def authenticate(request: Request, call_next):
    """With API keys on, every /v1/ request needs one, checked before its body is even read."""
    from services.serve.telemetry import ROUTER_STATE

    keys = ROUTER_STATE.get("keys")
    path, root = request.url.path, request.scope.get("root_path", "")  # root_path: the app's route prefix
    path = path[len(root):] if root and path.startswith(root) else path
    if keys is not None and keys.enabled and path.startswith("/v1/"):
        try:
            request.state.api_key = keys.authenticate(request.headers.get("authorization"))
        except AuthenticationError as err:
            return error_response(401, err.message, "invalid_request_error", err.code)
    return await call_next(request)


@app.middleware("http")
async def count_requests(request: Request, call_next):
    """Requests by route template (never the raw path: bounded label values) and status."""
    from services.serve.telemetry import ROUTER_STATE  # set by Router.__init__ (Serve runs a copy of `app`)

    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        if "metrics" in ROUTER_STATE:
            route = getattr(request.scope.get("route"), "path", "unmatched")
            ROUTER_STATE["metrics"].requests.inc(1, {"model": ROUTER_STATE["model"], "route": route,
                                                      "status": str(status)})


@serve.deployment
@serve.ingress(app)
class Router:
    def __init__(self, decoder: DeploymentHandle, config: dict):
        from models.weights.checkpoint import load_tokenizer

        self.config = AppConfig(**config)
        self.decoder = decoder
        self.tokenizer = load_tokenizer(self.config.decoder.model_dir)
        self.model_name = self.config.decoder.model_name
        # aliases: the same weights under other names (an SDSAT adapter never changes the base's output)
        self.model_names = [self.model_name, *self.config.decoder.model_aliases]
        self.tracing = Tracing("sdsat-router", self.config.telemetry.otlp_endpoint)
        self.metrics = RouterMetrics()
        import services.serve.telemetry

        BodyLimitMiddleware.max_bytes = self.config.router.max_body_bytes
        BackpressureRetry.after_s = self.config.router.retry_after_s
        rc = self.config.router

        def per_replica(limit: int | None) -> int | None:  # each router replica enforces its share
            return None if limit is None else max(1, limit // rc.replicas)

        self.keys = ApiKeys([KeyEntry(k.tenant, bytes.fromhex(k.key_sha256),
                                      per_replica(k.requests_per_minute or rc.requests_per_minute),
                                      per_replica(k.tokens_per_minute or rc.tokens_per_minute))
                             for k in rc.api_keys])
        self.limiter = RateLimiter()
        services.serve.telemetry.ROUTER_STATE.update(metrics=self.metrics, model=self.model_name, keys=self.keys)
        self.log = logging.getLogger("ray.serve")

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self):
        try:
            info = await asyncio.wait_for(self.decoder.ready.remote(), timeout=5)
        except Exception as err:  # no replica up yet, or it is still loading
            return error_response(503, f"not ready: {type(err).__name__}", "service_unavailable")
        return {"status": "ready", **info}

    @app.get("/v1/models")
    async def models(self) -> dict:
        """OpenAI's list, each model with the decoding methods its replicas accept (`speculation.method`) once a
        replica is up (OpenAI clients ignore the extra field)."""
        try:
            methods = (await asyncio.wait_for(self.decoder.ready.remote(), timeout=5))["methods"]
        except Exception:  # no replica up yet: the list alone
            methods = None
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "sdsat-serving",
                                            **({"methods": methods} if methods else {})}
                                           for name in self.model_names]}

    @app.get("/metrics")
    async def metrics(self):
        """Prometheus text: the sdsat families of every replica on every alive node (see services.serve.telemetry)."""
        from services.serve.telemetry import gather_metrics

        return PlainTextResponse(await gather_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        from models.training.data.fim import fim_prompt
        from models.weights.tokenizer import encode_text

        def tokenize() -> list[int]:
            if body.suffix is None:
                return encode_text(self.tokenizer, body.prompt)
            try:
                return fim_prompt(body.prompt, body.suffix, self.tokenizer)
            except SdsatError:
                raise InvalidRequestError("suffix (fill-in-the-middle) needs a model with FIM tokens") from None

        formatter = fmt.CompletionFormatter(self.tokenizer, body.logprobs)
        return await self._handle(request, "/v1/completions", "text_completion", body, tokenize, formatter)

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        top = body.top_logprobs if body.logprobs else None
        formatter = fmt.ChatFormatter(self.tokenizer, top)
        return await self._handle(request, "/v1/chat/completions", "chat", body,
                                  lambda: fmt.chat_prompt_ids(self.tokenizer, body.messages), formatter)

    # ---- shared request path ---------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model and model not in self.model_names:
            raise ModelNotFoundError(f"model {model!r} does not exist; this server serves "
                                     f"{', '.join(map(repr, self.model_names))}")

    def _decoder_request(self, body, prompt_ids: list[int], logprobs: int | None, tenant: str) -> dict:
        max_tokens = body.max_tokens or body.max_completion_tokens or self.config.router.max_tokens_limit
        if max_tokens > self.config.router.max_tokens_limit:
            raise InvalidRequestError(f"max_tokens must be <= {self.config.router.max_tokens_limit}")
        spec = body.speculation
        params = {"max_new_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                  "top_k": body.top_k, "seed": body.seed, "stop": tuple(body.stop or ()), "logprobs": logprobs,
                  "method": spec.method if spec else None, "k": spec.k if spec else None,
                  "ignore_eos": body.ignore_eos}
        return {"request_id": new_id("req"), "prompt_ids": prompt_ids, "params": params, "tenant": tenant,
                "stream": bool(body.stream),
                "affinity_key": affinity_key(prompt_ids)}

    async def _handle(self, request: Request, route: str, operation: str, body, tokenize, formatter):
        """Authenticate, trace, tokenize, rate-limit, generate, format; every exit ends the request's span,
        records its metrics and writes one structured log line."""
        headers = dict(request.headers)
        span = self.tracing.start(f"POST {route}", self.tracing.extract(headers), SpanKind.SERVER, {
            "gen_ai.operation.name": operation, "gen_ai.request.model": self.model_name,
            "gen_ai.request.max_tokens": body.max_tokens or getattr(body, "max_completion_tokens", None),
            "gen_ai.request.temperature": body.temperature}) if self.tracing.enabled else None
        record = {"route": route, "trace_id": trace_id(span, headers), "tenant": None}
        timer = RequestTimer(route, self.model_name, self.metrics)
        try:
            key = getattr(request.state, "api_key", None)
            record["tenant"] = key.tenant if key else "default"
            self._check_model(body.model)
            tok = self.tracing.start("tokenize", span)
            prompt_ids = tokenize()
            end_span(tok, {"gen_ai.usage.input_tokens": len(prompt_ids)})
            if self.config.router.log_prompts:
                record["prompt"] = getattr(body, "prompt", None) or [m.content for m in body.messages]
            request_body = self._decoder_request(body, prompt_ids, formatter.logprobs, record["tenant"])
            record.update(request_id=request_body["request_id"], prompt_tokens=len(prompt_ids))
            if key is not None:  # limits are per key (a tenant may hold several keys)
                max_new, name = request_body["params"]["max_new_tokens"], key.digest.hex()[:16]
                self.limiter.admit(name, request_body["request_id"], len(prompt_ids) + max_new,
                                   key.requests_per_minute, key.tokens_per_minute)
                record["charge"] = (name, max_new)
            return await self._respond(body, request_body, formatter, span, timer, record)
        except BaseException as err:
            end_span(span, error=type(err).__name__)
            self._finish(record, getattr(err, "status", 500), None)
            raise

    def _finish(self, record: dict, status: int, last: dict | None) -> None:
        """The request's log line (JSON under Serve's logging config), and the refund of tokens it did not use."""
        if record.pop("done", False):
            return
        record["done"] = True
        charge = record.pop("charge", None)
        if charge is not None:
            used = last["completion_tokens"] if last else 0
            self.limiter.refund(charge[0], record["request_id"], charge[1] - used)
        if last is not None:
            record.update(completion_tokens=last["completion_tokens"], finish_reason=last.get("finish_reason"),
                          replica=last.get("replica"))
        extra = {k: v for k, v in record.items() if k != "done"}
        self.log.info("request %s %s", record["route"], status, extra={"sdsat": dict(extra, status=status)})

    async def _respond(self, body, request: dict, formatter, span, timer: RequestTimer, record: dict):
        request["trace"] = self.tracing.inject(span)
        route = self.tracing.start("route", span)
        stream = self.decoder.options(stream=True).generate.remote(request)
        deadline = asyncio.get_running_loop().time() + self.config.router.request_timeout_s
        try:  # the first item decides the status: errors and backpressure are not 200s
            async with asyncio.timeout_at(deadline):
                first = await anext(stream)
                end_span(route, {"sdsat.replica": first.get("replica")})
                if "error" in first:
                    raise error_from_item(first)
                timer.item(first)
                if body.stream:
                    sse = self._sse(first, stream, formatter, body.include_usage, deadline, span, timer, record)
                    return StreamingResponse(sse, media_type="text/event-stream")
                items = [first]
                async for item in stream:
                    timer.item(item)
                    items.append(item)
        except TimeoutError:
            stream.cancel()
            end_span(span, error="timeout")
            self._finish(record, 504, None)
            return error_response(504, "the request timed out", "timeout")
        except BackPressureError:  # every decoder replica is full and so is the queue
            end_span(span, error="backpressure")
            self._finish(record, 429, None)
            return backpressure_response()
        except RayActorError:  # the decoder replica died mid-request; Serve replaces it, the client may retry
            end_span(span, error="replica_died")
            self._finish(record, 503, None)
            return error_response(503, REPLICA_DIED, "service_unavailable")
        for item in items:
            if "error" in item:
                raise error_from_item(item)
        timer.done(items[-1], span, request["params"]["k"])
        self._finish(record, 200, items[-1])
        return JSONResponse(formatter.whole(items, self.model_name))

    async def _sse(self, first: dict, stream, formatter, include_usage: bool, deadline: float, span,
                   timer: RequestTimer, record: dict) -> AsyncIterator[str]:
        response_id, last, error = new_id("cmpl"), None, None

        async def items():
            yield first
            async for item in stream:
                timer.item(item)
                yield item

        try:
            async with asyncio.timeout_at(deadline):
                async for item in items():
                    if "error" in item:
                        error = item["error"].get("message", "error")
                        yield _sse_data({"error": item["error"]})
                        break
                    for chunk in formatter.chunks(item, response_id, self.model_name):
                        yield _sse_data(chunk)
                    last = item
        except TimeoutError:
            error = "timeout"
            yield _sse_data({"error": {"message": "the request timed out", "type": "timeout", "code": 504}})
        except RayActorError:
            error = "replica_died"
            yield _sse_data({"error": {"message": REPLICA_DIED, "type": "service_unavailable", "code": 503}})
        finally:
            stream.cancel()  # a no-op when finished; on client disconnect it frees the engine slot
            if error is None and last is not None and last.get("finished"):
                timer.done(last, span, None)
            else:
                end_span(span, error=error or "cancelled")
            record["stream_error"] = error
            self._finish(record, 200, last)
        if include_usage and last is not None:
            yield _sse_data(formatter.usage_chunk(last, response_id, self.model_name))
        yield "data: [DONE]\n\n"

