"""One exception tree, rendered everywhere as OpenAI's error envelope.

    GatewayError                       500 server_error
    ├── ClientError                    400 invalid_request_error
    │   ├── InvalidRequest             400 (param names the field)
    │   ├── ContextLengthExceeded      400 code=context_length_exceeded
    │   ├── ModelNotFound              404 code=model_not_found
    │   ├── BodyTooLarge               413 code=request_too_large
    │   └── RateLimited                429 code=rate_limit_exceeded, Retry-After
    └── ServerError                    500 internal_server_error (no detail leaked)
        ├── UpstreamFailure            status of the remote server, its type/param/code
        └── ServiceUnavailable         503 code=service_unavailable, Retry-After

`to_gateway_error` maps the backends' exceptions (models.backends.base) into this tree;
`error_body`/`error_response` render any of them as
`{"error": {"message", "type", "param", "code"}}`; `install_handlers` registers the
handlers in one place so FastAPI's default `{"detail": ...}` never reaches a client.
"""

from __future__ import annotations

import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.backends.base import (
    BackendError,
    Overloaded,
    PromptTooLong,
    Unavailable,
    UpstreamError,
)

log = logging.getLogger("distillgate")


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.counted = False  # already in the per-model error metric


class ClientError(GatewayError):
    status = 400
    type = "invalid_request_error"


class InvalidRequest(ClientError):
    code = "invalid_value"


class ContextLengthExceeded(ClientError):
    code = "context_length_exceeded"


class ModelNotFound(ClientError):
    status = 404
    code = "model_not_found"


class BodyTooLarge(ClientError):
    status = 413
    code = "request_too_large"


class RateLimited(ClientError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServerError(GatewayError):
    type = "internal_server_error"


class ServiceUnavailable(ServerError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class UpstreamFailure(ServerError):
    """A remote backend's own error, passed through with its status and fields."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(str(error), param=error.param)
        self.status = error.status
        self.type = error.type
        self.code = error.code


def to_gateway_error(exc: BaseException, param: str | None = None) -> GatewayError:
    """Any exception -> a GatewayError; unknown ones become an opaque 500 (and are logged)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, PromptTooLong):
        return ContextLengthExceeded(str(exc), param=param)
    if isinstance(exc, Overloaded):
        return RateLimited(str(exc), retry_after=exc.retry_after)
    if isinstance(exc, Unavailable):
        return ServiceUnavailable(str(exc), retry_after=exc.retry_after or 5)
    if isinstance(exc, UpstreamError):
        return UpstreamFailure(exc)
    if isinstance(exc, BackendError):
        log.error("backend error: %s", exc)
        return ServerError("The model backend failed while serving this request.")
    log.exception("unhandled error", exc_info=exc)
    return ServerError("The server had an error while processing your request.")


def error_body(exc: GatewayError) -> dict[str, dict[str, object]]:
    return {
        "error": {
            "message": exc.message,
            "type": exc.type,
            "param": exc.param,
            "code": exc.code,
        }
    }


def error_response(exc: BaseException) -> JSONResponse:
    err = to_gateway_error(exc)
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    return JSONResponse(error_body(err), status_code=err.status, headers=headers)


def sse_error(exc: BaseException) -> bytes:
    """An error after a stream has started: one SSE event carrying the envelope."""
    return b"data: " + json.dumps(error_body(to_gateway_error(exc))).encode() + b"\n\n"


def validation_error(errors: list[dict]) -> InvalidRequest:
    """Pydantic errors -> one 400 naming the first offending field (all listed in the text)."""
    parts, first = [], None
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body",)]
        where = ".".join(loc) or None
        first = first or where
        received = f" (received {e['input']!r})" if _short(e.get("input")) else ""
        parts.append(f"{where or 'body'}: {e.get('msg', 'invalid')}{received}")
    return InvalidRequest("; ".join(parts) or "invalid request", param=first)


def _short(value: object) -> bool:
    return isinstance(value, str | int | float | bool) and len(repr(value)) <= 80


def install_handlers(app: FastAPI) -> None:
    def respond(request: Request, err: GatewayError) -> JSONResponse:
        gateway = getattr(request.app.state, "gateway", None)
        if gateway is not None and not err.counted:
            gateway.metrics.errors.labels("", err.type).inc()
        return error_response(err)

    async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
        return respond(request, to_gateway_error(exc))

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return respond(request, validation_error(list(exc.errors())))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        err = ClientError(str(exc.detail))
        err.status = exc.status_code
        err.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return respond(request, err)

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(BackendError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_gateway_error)
