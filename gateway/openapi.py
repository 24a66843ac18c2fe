"""The published API description: request bodies, responses and OpenAI's error envelope for
every endpoint (the route decorators call `request_body`/`responses`), and /docs and /redoc
served with Swagger UI's and ReDoc's assets from an installed package, so they work offline.

The endpoints read their bodies themselves (`parse_body`: a byte limit, then the pydantic
model), so FastAPI cannot see them: `request_body(Model)` puts the model's own JSON schema
into the operation, and `build` moves its nested definitions into `components`, where
Swagger UI and fuzzers expect them. Everything comes from the models the server validates
with, so the document follows them as they change.
"""

from __future__ import annotations

import copy
import json
from importlib.resources import files
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

COMPONENTS = "#/components/schemas/"
_INLINE = "x-distillgate-inline"  # a model's schema that `build` moves to components
ASSETS = "/docs/assets"  # fastapi-offline's static folder: Swagger UI 5 and ReDoc 2


class ErrorDetail(BaseModel):
    message: str = Field(description="What is wrong, naming the field, the limit and the value.")
    type: str = Field(
        description="invalid_request_error, rate_limit_error, internal_server_error, "
        "service_unavailable, or a remote backend's own type."
    )
    param: str | None = Field(description="The request field at fault (`messages[0].role`).")
    code: str | None = Field(
        description="invalid_value, unsupported_parameter, model_not_found, invalid_api_key, "
        "context_length_exceeded, request_too_large, rate_limit_exceeded, timeout, ..."
    )


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: every error the gateway answers has this shape."""

    error: ErrorDetail


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}}
# status -> (description, headers); 401 is answered when `auth.mode: keys` is on.
_ERRORS: dict[int, tuple[str, dict]] = {
    400: ("Invalid request: a field out of range, of the wrong type, or not supported.", {}),
    401: ("Missing, unknown, revoked or expired API key (`invalid_api_key`).", {}),
    404: ("No such model (`model_not_found`).", {}),
    413: ("The body exceeds `limits.max_body_bytes` (`request_too_large`).", {}),
    429: ("Over a rate limit, or the model's queue is full (`Retry-After`).", _RETRY_AFTER),
    500: ("The server or a model backend failed; no detail is leaked.", {}),
    503: ("Not ready, a model is unavailable, or the request timed out.", _RETRY_AFTER),
}
GENERATION_ERRORS = (400, 401, 404, 413, 429, 500, 503)


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    models: list[str] = Field(description="The configured models, all loaded and healthy.")


METRICS = {"text/plain": {"schema": {"type": "string", "description": "Prometheus text format."}}}
CHAT_EXAMPLE = {
    "model": "auto",
    "messages": [{"role": "user", "content": "Say hello in five words."}],
    "max_tokens": 16,
}
COMPLETION_EXAMPLE = {"model": "auto", "prompt": "The capital of France is", "max_tokens": 8}
# GET /v1/models -> a model's id, for the client (and a stateful fuzzer) to call it with.
MODEL_LINKS = {
    "retrieveModel": {
        "operationId": "retrieveModel",
        "parameters": {"model_id": "$response.body#/data/0/id"},
    },
    "createChatCompletion": {
        "operationId": "createChatCompletion",
        "requestBody": {"model": "$response.body#/data/0/id"},
    },
    "createCompletion": {
        "operationId": "createCompletion",
        "requestBody": {"model": "$response.body#/data/0/id"},
    },
}


def request_body(model: type[BaseModel], example: dict[str, Any] | None = None) -> dict:
    """`openapi_extra` for an endpoint that parses its JSON body with `model`."""
    media: dict[str, Any] = {"schema": _inline(model, "validation")}
    if example is not None:
        media["example"] = example
    return {"requestBody": {"required": True, "content": {"application/json": media}}}


def responses(
    ok: type[BaseModel] | None,
    *errors: int,
    stream: type[BaseModel] | None = None,
    ok_content: dict[str, Any] | None = None,
    links: dict[str, Any] | None = None,
) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the 200 body (`ok` as JSON, `ok_content` as given, and
    with `stream` the SSE events of `stream: true`, one `stream` object per event, as
    FastAPI describes its own SSE routes) and the error statuses, all in OpenAI's shape."""
    success: dict[str, Any] = {"description": "Success."}
    if ok is not None:
        success["model"] = ok
    content = dict(ok_content or {})
    if stream is not None:
        content["text/event-stream"] = {"itemSchema": _event(stream)}
    if content:
        success["content"] = content
    if links:
        success["links"] = links
    out: dict[int | str, dict[str, Any]] = {200: success}
    for status in errors:
        text, headers = _ERRORS[status]
        out[status] = {"model": ErrorResponse, "description": text}
        if headers:
            out[status]["headers"] = headers
    return out


def _inline(model: type[BaseModel], mode: Literal["validation", "serialization"]) -> dict:
    """A model's whole schema, marked for `build` to move into components."""
    return {_INLINE: model.model_json_schema(ref_template=COMPONENTS + "{model}", mode=mode)}


def _event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One SSE event of a stream, as FastAPI describes its own SSE routes: its `data` is
    a JSON chunk, an error envelope, or the closing `[DONE]`."""
    payload = {"anyOf": [_inline(chunk, "serialization"), _inline(ErrorResponse, "serialization")]}
    return {
        "type": "object",
        "description": f"`data: <{chunk.__name__}>` events, then `data: [DONE]`. An error "
        'after the stream began is one `data: {"error": {...}}` event (ErrorResponse).',
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": payload},
                    {"const": "[DONE]"},
                ]
            }
        },
    }  # fmt: skip


def install(app: FastAPI) -> None:
    """Serve `build(app)` as /openapi.json, and /docs and /redoc from packaged assets.
    The app must be created with `docs_url=None, redoc_url=None`."""
    app.openapi = lambda: _cached(app)  # type: ignore[method-assign]
    app.mount(ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), "docs")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            # no badge from the public validator: the page makes no request off this server
            swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": True},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
            with_google_fonts=False,
        )


def _cached(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        app.openapi_schema = build(app)
    return app.openapi_schema


def build(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document for `app`, with the request bodies' definitions in components."""
    doc = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    error = _hoist_marked(_inline(ErrorResponse, "serialization"), schemas)
    bad_request = {
        "description": _ERRORS[400][0],
        "content": {"application/json": {"schema": error}},
    }
    doc["paths"] = _hoist_marked(doc.get("paths", {}), schemas)
    for operations in doc["paths"].values():
        for operation in operations.values():
            # FastAPI's 422 never happens: errors.py answers a bad parameter with a 400
            if operation.get("responses", {}).pop("422", None) is not None:
                operation["responses"].setdefault("400", bad_request)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return doc


def _hoist_marked(node: Any, schemas: dict[str, Any]) -> Any:
    """`node` with every `_inline` schema in it replaced by a $ref into `schemas`."""
    if isinstance(node, dict):
        if set(node) == {_INLINE}:
            return _hoist(copy.deepcopy(node[_INLINE]), schemas)
        return {key: _hoist_marked(value, schemas) for key, value in node.items()}
    if isinstance(node, list):
        return [_hoist_marked(value, schemas) for value in node]
    return node


def _hoist(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """A model's schema -> a $ref to it in `schemas`, its `$defs` moved there too. A name
    a response model already took for a different schema gets `-Input`, as FastAPI's own
    input/output split names them."""
    name = schema.get("title", "Body")
    defs = {**schema.pop("$defs", {}), name: schema}
    clashes = [k for k, v in defs.items() if schemas.get(k, v) != v]
    if clashes:
        text = json.dumps(defs)
        for key in clashes:
            text = text.replace(f'"{COMPONENTS}{key}"', f'"{COMPONENTS}{key}-Input"')
        defs = {f"{k}-Input" if k in clashes else k: v for k, v in json.loads(text).items()}
        name = f"{name}-Input" if name in clashes else name
    for key, value in defs.items():
        schemas.setdefault(key, value)
    return {"$ref": COMPONENTS + name}
