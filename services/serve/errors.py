"""The one place where errors become HTTP: OpenAI-style JSON bodies with the right status.

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": null}}

400 invalid request (including pydantic validation), 401 unauthorized, 404 unknown model or route,
413 body too large, 429 backpressure (with Retry-After), 503 not ready, 504 timeout; anything
unexpected is a 500 whose body names no internals.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import SdsatError
from services.serve.api import error_body

log = logging.getLogger(__name__)


class ModelNotFoundError(SdsatError):
    status = 404
    code = "model_not_found"


class BodyTooLargeError(SdsatError):
    status = 413
    code = "request_too_large"


class BackpressureRetry:
    after_s = 1  # set from RouterConfig.retry_after_s


def error_response(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status, headers=headers)


def error_from_item(item: dict) -> SdsatError:
    """The decoder's `{"error": {...}}` item as an exception carrying its status."""
    err = SdsatError(item["error"]["message"])
    err.status, err.code = item["error"]["status"], item["error"]["code"]
    return err


def backpressure_response() -> JSONResponse:
    # Serve installs its own (plain-text) handler for BackPressureError on ingress apps, so the
    # router catches it at the call site and answers with this body instead.
    return error_response(429, "the server is overloaded; retry later", "rate_limit_error", "overloaded",
                          headers={"Retry-After": str(BackpressureRetry.after_s)})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SdsatError)
    async def _sdsat(_: Request, err: SdsatError):
        if err.status == 429:  # rate limits: OpenAI's type, and when to come back
            return error_response(429, err.message, "rate_limit_error", err.code,
                                  headers={"Retry-After": str(getattr(err, "retry_after_s", 1))})
        kind = "invalid_request_error" if 400 <= err.status < 500 else err.code
        return error_response(err.status, err.message, kind, err.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(map(str, e.get('loc', ())[1:]))}: {e.get('msg')}" for e in err.errors())
        return error_response(400, message or "invalid request", "invalid_request_error", None, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(err.status_code, str(err.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal server error", "internal_error")


class BodyLimitMiddleware:
    """ASGI middleware: 413 for request bodies over `max_bytes` (declared or streamed)."""

    max_bytes = 1_000_000  # set from RouterConfig.max_body_bytes

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLargeError(f"request body exceeds {self.max_bytes} bytes")
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLargeError:
            await self._reject(send)

    async def _reject(self, send):
        response = error_response(413, f"request body exceeds {self.max_bytes} bytes", "invalid_request_error",
                                  "request_too_large")
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})
