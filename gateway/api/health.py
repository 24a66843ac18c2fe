"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.errors import ServiceUnavailable, error_response
from gateway.openapi import METRICS, Health, Ready, responses
from gateway.state import GatewayDep

router = APIRouter()


@router.get("/health", operation_id="health", responses=responses(Health, 503))
async def health(gw: GatewayDep) -> Response:
    """Liveness: the process serves HTTP and no model failed to load."""
    if gw.failure:
        return error_response(ServiceUnavailable(gw.failure))
    return JSONResponse({"status": "ok"})


@router.get("/ready", operation_id="ready", responses=responses(Ready, 503))
async def ready(gw: GatewayDep) -> Response:
    """Readiness: every model loaded and its backend healthy, and not shutting down."""
    if gw.draining:  # SIGTERM: load balancers stop sending while in-flight requests end
        return error_response(
            ServiceUnavailable("Not ready: shutting down.", retry_after=5), {"connection": "close"}
        )
    if not gw.ready:
        reason = gw.failure or "models are still loading"
        return error_response(ServiceUnavailable(f"Not ready: {reason}.", retry_after=5))
    names = list(gw.backends)
    healthy = await asyncio.gather(*(gw.backends[n].health() for n in names))
    sick = [n for n, ok in zip(names, healthy, strict=True) if not ok]
    if sick:
        return error_response(
            ServiceUnavailable(f"Not ready: unhealthy model(s): {', '.join(sick)}.", retry_after=5)
        )
    return JSONResponse({"status": "ready", "models": names})


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=PlainTextResponse,
    responses=responses(None, ok_content=METRICS),
)
async def metrics(gw: GatewayDep) -> Response:
    await gw.metrics.check_models(gw.backends, loaded=gw.ready)
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)
