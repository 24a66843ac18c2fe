"""GET /v1/models: every configured model, then `auto` and one `auto:<class>` per SLO
class of the routing policy, in OpenAI's list shape."""

from __future__ import annotations

from fastapi import APIRouter, Response

from gateway.protocol import ModelEntry, ModelList
from gateway.state import GatewayDep

router = APIRouter()


@router.get("/v1/models", response_model=None)
async def list_models(gw: GatewayDep) -> Response:
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
    return Response(ModelList(data=entries).model_dump_json(), media_type="application/json")
