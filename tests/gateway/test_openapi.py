"""The published API document (gateway/openapi.py) against the app itself: every endpoint's
request body, responses and errors, generated from the models the server validates with;
the errors the server really sends fit the documented envelope; /docs and /redoc load
their assets from this server alone."""

from __future__ import annotations

import re
from typing import Any, Literal

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from gateway.openapi import COMPONENTS, ErrorResponse, _hoist
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from tests.gateway.scripted import ScriptedBackend, scripted_app, wait_ready

ERRORS = {"400", "401", "404", "413", "429", "500", "503"}


@pytest.fixture(scope="module")
def http():
    with scripted_app({"tiny": ScriptedBackend("tiny")}, max_body_bytes=4096) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def doc(http: TestClient) -> dict[str, Any]:
    response = http.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def _resolve(doc: dict, ref: str) -> dict:
    assert ref.startswith(COMPONENTS), ref
    return doc["components"]["schemas"][ref.removeprefix(COMPONENTS)]


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        return {node["$ref"]} if "$ref" in node else set().union(*map(_refs, node.values()))
    if isinstance(node, list):
        return set().union(*map(_refs, node)) if node else set()
    return set()


@pytest.mark.parametrize(
    ("path", "operation_id", "request_model", "body", "chunk"),
    [
        ("/v1/chat/completions", "createChatCompletion", ChatCompletionRequest,
         "ChatCompletion", "ChatCompletionChunk"),
        ("/v1/completions", "createCompletion", CompletionRequest, "Completion", "Completion"),
    ],
)  # fmt: skip
def test_generation_endpoints_are_documented(
    doc: dict, path: str, operation_id: str, request_model: type[BaseModel], body: str, chunk: str
) -> None:
    op = doc["paths"][path]["post"]
    assert op["operationId"] == operation_id  # OpenAI's own ids: generated clients match
    media = op["requestBody"]["content"]["application/json"]
    assert op["requestBody"]["required"] is True
    schema = _resolve(doc, media["schema"]["$ref"])
    # every field the server parses, from the model itself (others' new fields follow)
    assert set(schema["properties"]) == set(request_model.model_fields)
    assert schema.get("additionalProperties") is not False  # unknown fields are ignored
    request_model.model_validate(media["example"])  # the /docs "Try it out" body is valid
    ok = op["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": COMPONENTS + body}
    data = ok["text/event-stream"]["itemSchema"]["properties"]["data"]
    assert {"const": "[DONE]"} in data["anyOf"]
    assert {COMPONENTS + chunk, COMPONENTS + "ErrorResponse"} <= _refs(data)
    assert set(op["responses"]) == {"200", *ERRORS}
    for status in ERRORS:
        error = op["responses"][status]["content"]["application/json"]["schema"]
        assert error == {"$ref": COMPONENTS + "ErrorResponse"}, status
    assert "Retry-After" in op["responses"]["429"]["headers"]


def test_models_and_health_are_documented(doc: dict) -> None:
    listed = doc["paths"]["/v1/models"]["get"]["responses"]["200"]
    assert listed["content"]["application/json"]["schema"] == {"$ref": COMPONENTS + "ModelList"}
    # links: from the listing to the operations that take a model (a stateful fuzzer's path)
    assert set(listed["links"]) == {"retrieveModel", "createChatCompletion", "createCompletion"}
    one = doc["paths"]["/v1/models/{model_id}"]["get"]
    assert one["operationId"] == "retrieveModel"
    # FastAPI's 422 for a bad parameter, as this server answers it: a 400
    assert set(one["responses"]) == {"200", "400", "401", "404"}
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    for path in ("/health", "/ready"):
        assert set(doc["paths"][path]["get"]["responses"]) == {"200", "503"}


def test_document_is_self_contained_and_never_says_422(doc: dict) -> None:
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.removeprefix(COMPONENTS) in schemas, ref
    assert "$defs" not in str(doc["paths"])  # every nested model hoisted to components
    assert "x-distillgate-inline" not in str(doc)
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            # validation errors are 400s in OpenAI's shape here, never FastAPI's 422 {"detail"}
            assert "422" not in op["responses"], (method, path)
    assert "HTTPValidationError" not in schemas


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "tiny"}, 400),  # no messages
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}, 413),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": "2"}, 400),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "store": 0}, 400),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": 2**63}, 400),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": {}}]}]}, 400),
    ],
)
def test_errors_fit_the_documented_envelope(http: TestClient, body: dict, status: int) -> None:
    """Among them what the fuzzer found: lax types the schema forbids were accepted
    ("n": "2", "store": 0), a seed past int64 was a 500, so was a content part whose
    type is not a string."""
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    ErrorResponse.model_validate_json(response.content, strict=True)


def test_docs_load_their_assets_from_this_server(http: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        html = http.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*["']([^"']+)""", html.text)
        assert urls, html.text
        for url in urls:
            assert url.startswith("/"), f"{page} loads {url} from elsewhere: blank offline"
            asset = http.get(url)
            assert asset.status_code == 200 and len(asset.content) > 100, url
    bundle = http.get("/docs/assets/swagger-ui-bundle.js").text
    # Swagger UI 4 cannot render OpenAPI 3.1 (what FastAPI writes); 5 can
    assert re.search(r'PACKAGE_VERSION:"5\.', bundle)
    assert '"validatorUrl": null' in http.get("/docs").text  # no badge from validator.swagger.io


class _Part(BaseModel):
    kind: Literal["a"]


class _Other(BaseModel):
    kind: Literal["b"]


def test_hoist_renames_a_request_model_that_clashes_with_a_response_model() -> None:
    schemas = {"_Part": _Other.model_json_schema()}

    class Body(BaseModel):
        part: _Part

    schema = Body.model_json_schema(ref_template=COMPONENTS + "{model}")
    ref = _hoist(schema, schemas)
    assert ref == {"$ref": COMPONENTS + "Body"}
    assert schemas["Body"]["properties"]["part"] == {"$ref": COMPONENTS + "_Part-Input"}
    assert schemas["_Part-Input"]["properties"]["kind"]["const"] == "a"
    assert schemas["_Part"]["properties"]["kind"]["const"] == "b"  # untouched
