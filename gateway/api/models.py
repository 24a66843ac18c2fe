"""GET /v1/models: every configured model, in OpenAI's list shape."""

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
    return Response(ModelList(data=entries).model_dump_json(), media_type="application/json")
