"""GET /v1/models and GET /v1/models/{id}: every configured model, then `auto` and one
`auto:<class>` per SLO class of the routing policy, in OpenAI's shapes."""

from __future__ import annotations

from fastapi import APIRouter, Response

from gateway.errors import ModelNotFound
from gateway.openapi import MODEL_LINKS, responses
from gateway.protocol_out import ModelEntry, ModelList
from gateway.state import Gateway, GatewayDep

router = APIRouter()


@router.get(
    "/v1/models",
    response_model=None,
    operation_id="listModels",
    summary="List the models, then `auto` and one `auto:<class>` per SLO class",
    responses=responses(ModelList, 401, links=MODEL_LINKS),
)
async def list_models(gw: GatewayDep) -> Response:
    return Response(ModelList(data=_entries(gw)).model_dump_json(), media_type="application/json")


@router.get(
    "/v1/models/{model_id:path}",
    response_model=None,
    operation_id="retrieveModel",
    summary="Retrieve a model",
    responses=responses(ModelEntry, 401, 404),
)
async def retrieve_model(model_id: str, gw: GatewayDep) -> Response:
    entries = _entries(gw)
    for entry in entries:
        if entry.id == model_id:
            return Response(entry.model_dump_json(), media_type="application/json")
    available = ", ".join(e.id for e in entries)
    raise ModelNotFound(
        f"The model '{model_id}' does not exist. Available models: {available}.", param="model"
    )


def _entries(gw: Gateway) -> list[ModelEntry]:
    entries = []
    for model in gw.config.models:
        backend = gw.backends.get(model.name)
        card = backend.card() if backend is not None and gw.ready else None
        entries.append(
            ModelEntry(
                id=model.name,
                created=card.created if card else gw.started,
                root=model.name,
                parent=card.parent if card else None,
                max_model_len=card.context_length if card else None,
                role=model.role,
                backend=model.backend,
            )
        )
    if gw.router is not None:  # the router's entries: `auto` and `auto:<class>` for each class
        policy = gw.router.policy
        for name in ("auto", *(f"auto:{c}" for c in policy.classes)):
            entries.append(ModelEntry(id=name, created=gw.started, role="router",
                                      backend="routing"))  # fmt: skip
    return entries
