"""One exception tree, rendered everywhere as OpenAI's error envelope.

    GatewayError                       500 server_error
    ├── ClientError                    400 invalid_request_error
    │   ├── InvalidRequest             400 (param names the field)
    │   │   └── Unsupported            400 code=unsupported_parameter (an OpenAI field
    │   │                                  or value distillgate does not implement)
    │   ├── ContextLengthExceeded      400 code=context_length_exceeded
    │   ├── ModelNotFound              404 code=model_not_found
    │   ├── BodyTooLarge               413 code=request_too_large
    │   ├── AuthenticationError        401 code=invalid_api_key (gateway/auth.py)
    │   └── RateLimited                429 code=rate_limit_exceeded, Retry-After
    └── ServerError                    500 internal_server_error (no detail leaked)
        ├── UpstreamFailure            status of the remote server, its type/param/code
        └── ServiceUnavailable         503 code=service_unavailable, Retry-After
            └── TimedOut               503 code=timeout (a request or stream timeout)

`to_gateway_error` maps any exception (the backends' ones from models.backends.base, or
an unexpected one, logged and hidden) into this tree; `error_response`/`sse_error` render a
GatewayError as `{"error": {"message", "type", "param", "code"}}`, as JSON or as an SSE
event. Each error is counted once, where it happens: a request that reached a model is
counted by its Tracker (gateway/api/tracking.py) and answered by the endpoint
(gateway/api/generation.py), so it never reaches the handlers that `install_handlers`
registers here; they answer and count everything else (bad bodies, unknown models,
unknown routes) under the model label "".
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
    InvalidParams,
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


class ClientError(GatewayError):
    status = 400
    type = "invalid_request_error"


class InvalidRequest(ClientError):
    code = "invalid_value"


class Unsupported(InvalidRequest):
    code = "unsupported_parameter"


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


class AuthenticationError(ClientError):
    """A missing, wrong, revoked or expired API key (the SDK raises AuthenticationError)."""

    status = 401
    code = "invalid_api_key"


class RouteError(ClientError):
    """Starlette's own 404/405 for a path or method we do not serve."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.code = {404: "not_found", 405: "method_not_allowed"}.get(status)


class ServerError(GatewayError):
    type = "internal_server_error"


class ServiceUnavailable(ServerError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class TimedOut(ServiceUnavailable):
    code = "timeout"


class UpstreamFailure(ServerError):
    """A remote backend's own error, passed through with its status and fields."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(str(error), param=error.param)
        self.status = error.status
        self.type = error.type
        self.code = error.code


def to_gateway_error(exc: BaseException, param: str | None = None) -> GatewayError:
    """Any exception -> a GatewayError; unknown ones become an opaque 500 (and are logged).
    `param` is the field a prompt that is too long is blamed on."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, PromptTooLong):
        return ContextLengthExceeded(str(exc), param=param)
    if isinstance(exc, InvalidParams):
        return InvalidRequest(str(exc), param=exc.param)
    if isinstance(exc, Overloaded):
        return RateLimited(str(exc), retry_after=exc.retry_after)
    if isinstance(exc, Unavailable):
        return ServiceUnavailable(str(exc), retry_after=exc.retry_after or 5)
    if isinstance(exc, UpstreamError):
        return UpstreamFailure(exc)
    if isinstance(exc, BackendError):
        log.error("backend error: %s", exc)
        return ServerError("The model backend failed while serving this request.")
    log.error("unhandled error", exc_info=exc)
    return ServerError("The server had an error while processing your request.")


def error_body(err: GatewayError) -> dict[str, dict[str, object]]:
    return {
        "error": {
            "message": err.message,
            "type": err.type,
            "param": err.param,
            "code": err.code,
        }
    }


def error_response(err: GatewayError, headers: dict[str, str] | None = None) -> JSONResponse:
    out = dict(headers or {})
    if err.retry_after is not None:
        out["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    return JSONResponse(error_body(err), status_code=err.status, headers=out)


def sse_error(err: GatewayError) -> bytes:
    """An error after a stream has started: one SSE event carrying the envelope."""
    return b"data: " + json.dumps(error_body(err)).encode() + b"\n\n"


def validation_error(errors: list[dict]) -> InvalidRequest:
    """Pydantic errors -> one 400 naming the first offending field the way OpenAI writes
    it (`messages[0].role`); every error is listed in the message with the value received."""
    parts, first = [], None
    for e in errors:
        where = param_path(e.get("loc", ())) or None
        first = first or where
        received = f" (received {e['input']!r})" if _short(e.get("input")) else ""
        parts.append(f"{where or 'body'}: {e.get('msg', 'invalid')}{received}")
    return InvalidRequest("; ".join(dict.fromkeys(parts)) or "invalid request", param=first)


def param_path(loc: tuple | list) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role". Pydantic puts the member
    type of a union in the path (`stop.list[str]`); those are not fields and are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "body" and not _is_type_tag(part):
            out += f".{part}" if out else part
    return out


def _is_type_tag(part: str) -> bool:
    return any(c in part for c in "[-") or part in {"str", "int", "float", "bool", "list", "dict"}


def _short(value: object) -> bool:
    return isinstance(value, str | int | float | bool) and len(repr(value)) <= 80


def install_handlers(app: FastAPI) -> None:
    """Answer (and count) every error that escapes an endpoint. Errors of requests that
    reached a model never get here: their Tracker counted them and the endpoint answered."""

    def respond(request: Request, err: GatewayError) -> JSONResponse:
        gateway = getattr(request.app.state, "gateway", None)
        if gateway is not None:
            gateway.metrics.errors.labels("", err.type).inc()
        return error_response(err)

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return respond(request, to_gateway_error(exc))

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return respond(request, validation_error(list(exc.errors())))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        response = respond(request, RouteError(str(exc.detail), exc.status_code))
        response.headers.update(exc.headers or {})  # a 405 carries Allow (RFC 9110)
        return response

    app.add_exception_handler(GatewayError, on_error)
    app.add_exception_handler(BackendError, on_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    # Anything else: Starlette answers it from its outermost middleware, then re-raises it
    # for the server to log; to_gateway_error has logged it already.
    app.add_exception_handler(Exception, on_error)
