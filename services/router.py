"""The router (ingress) deployment: OpenAI-compatible HTTP API over the decoder replicas.

It validates requests (pydantic), tokenizes (the model's own HF tokenizer), sends the work to the
decoder deployment through a streaming handle and formats responses, streamed as SSE ending in
`data: [DONE]` or whole. Errors become OpenAI-style JSON in one place (`services.errors`). A client
that disconnects mid-stream cancels its generation, which frees its batch slot in the engine.
"""


import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from infra.affinity_router import affinity_key
from models.errors import InvalidRequestError, SdsatError
from services import formatting as fmt
from services.api import ChatRequest, CompletionRequest, new_id
from services.config import AppConfig
from services.errors import (
    BackpressureRetry,
    BodyLimitMiddleware,
    ModelNotFoundError,
    backpressure_response,
    error_from_item,
    error_response,
    install_error_handlers,
)


def _sse_data(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


app = FastAPI(title="SDSAT serving", description="OpenAI-compatible completions with SDSAT speculative decoding")
install_error_handlers(app)
app.add_middleware(BodyLimitMiddleware)


@serve.deployment
@serve.ingress(app)
class Router:
    def __init__(self, decoder: DeploymentHandle, config: dict):
        from models.checkpoint import load_tokenizer

        self.config = AppConfig(**config)
        self.decoder = decoder
        self.tokenizer = load_tokenizer(self.config.decoder.model_dir)
        self.model_name = self.config.decoder.model_name
        BodyLimitMiddleware.max_bytes = self.config.router.max_body_bytes
        BackpressureRetry.after_s = self.config.router.retry_after_s

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
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "sdsat-serving"}]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        from models.fim import fim_prompt
        from models.tokenizer import encode_text

        self._check_model(body.model)
        if body.suffix is not None:
            try:
                prompt_ids = fim_prompt(body.prompt, body.suffix, self.tokenizer)
            except SdsatError:
                raise InvalidRequestError("suffix (fill-in-the-middle) needs a model with FIM tokens") from None
        else:
            prompt_ids = encode_text(self.tokenizer, body.prompt)
        return await self._respond(body, prompt_ids, fmt.CompletionFormatter(self.tokenizer, body.logprobs))

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest):
        from models.tokenizer import encode_text

        self._check_model(body.model)
        prompt_ids = encode_text(self.tokenizer, fmt.chat_prompt(body.messages))
        top = body.top_logprobs if body.logprobs else None
        return await self._respond(body, prompt_ids, fmt.ChatFormatter(self.tokenizer, top))

    # ---- shared request path ---------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise ModelNotFoundError(f"model {model!r} does not exist; this server serves {self.model_name!r}")

    def _decoder_request(self, body, prompt_ids: list[int], logprobs: int | None) -> dict:
        max_tokens = body.max_tokens or body.max_completion_tokens or self.config.router.max_tokens_limit
        if max_tokens > self.config.router.max_tokens_limit:
            raise InvalidRequestError(f"max_tokens must be <= {self.config.router.max_tokens_limit}")
        spec = body.speculation
        params = {"max_new_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                  "top_k": body.top_k, "seed": body.seed, "stop": tuple(body.stop or ()), "logprobs": logprobs,
                  "method": spec.method if spec else None, "k": spec.k if spec else None,
                  "ignore_eos": body.ignore_eos}
        return {"request_id": new_id("req"), "prompt_ids": prompt_ids, "params": params, "tenant": "default",
                "affinity_key": affinity_key(prompt_ids)}

    async def _respond(self, body, prompt_ids: list[int], formatter):
        request = self._decoder_request(body, prompt_ids, formatter.logprobs)
        stream = self.decoder.options(stream=True).generate.remote(request)
        deadline = asyncio.get_running_loop().time() + self.config.router.request_timeout_s
        try:  # the first item decides the status: errors and backpressure are not 200s
            async with asyncio.timeout_at(deadline):
                first = await anext(stream)
                if "error" in first:
                    raise error_from_item(first)
                if body.stream:
                    sse = self._sse(first, stream, formatter, body.include_usage, deadline)
                    return StreamingResponse(sse, media_type="text/event-stream")
                items = [first] + [item async for item in stream]
        except TimeoutError:
            stream.cancel()
            return error_response(504, "the request timed out", "timeout")
        except BackPressureError:  # every decoder replica is full and so is the queue
            return backpressure_response()
        for item in items:
            if "error" in item:
                raise error_from_item(item)
        return JSONResponse(formatter.whole(items, self.model_name))

    async def _sse(self, first: dict, stream, formatter, include_usage: bool, deadline: float) -> AsyncIterator[str]:
        response_id, last = new_id("cmpl"), None

        async def items():
            yield first
            async for item in stream:
                yield item

        try:
            async with asyncio.timeout_at(deadline):
                async for item in items():
                    if "error" in item:
                        yield _sse_data({"error": item["error"]})
                        break
                    for chunk in formatter.chunks(item, response_id, self.model_name):
                        yield _sse_data(chunk)
                    last = item
        except TimeoutError:
            yield _sse_data({"error": {"message": "the request timed out", "type": "timeout", "code": 504}})
        finally:
            stream.cancel()  # a no-op when finished; on client disconnect it frees the engine slot
        if include_usage and last is not None:
            yield _sse_data(formatter.usage_chunk(last, response_id, self.model_name))
        yield "data: [DONE]\n\n"
