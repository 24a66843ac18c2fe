"""`create_app(config)`: the FastAPI app. Its lifespan builds the gateway state, starts the
model backends in the background (so /health answers at once and /ready says when the
models are in) and stops them on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from gateway.admission import Admission
from gateway.api import chat, completions, health, models, responses
from gateway.auth import Guard
from gateway.config import GatewayConfig
from gateway.errors import install_handlers
from gateway.openapi import install as install_docs
from gateway.state import Factory, Gateway
from models.store import ModelStore

log = logging.getLogger("distillgate")


def create_app(
    config: GatewayConfig,
    store: ModelStore | None = None,
    on_failure: Callable[[str], None] | None = None,
    factory: Factory | None = None,
) -> FastAPI:
    """`on_failure(reason)` is called if the models cannot be loaded (the CLI exits);
    `factory(model_config) -> Backend` replaces the built-in backends (see README)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = Gateway(config, store or ModelStore(config.store), factory)
        app.state.gateway = gw
        await guard.start(gw)  # API keys and rate limits (gateway/auth.py)
        loader = asyncio.create_task(_load(gw, on_failure))
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            await gw.stop()
            await guard.stop()

    # The gateway's metrics are its own Prometheus registry; FastAPI's built-in
    # OpenTelemetry hooks would cost every request without a provider to report to.
    app = FastAPI(
        title="distillgate",
        version="0.1.0",
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},
        docs_url=None,  # /docs and /redoc come from gateway/openapi.py, with local assets
        redoc_url=None,
    )
    install_handlers(app)
    for module in (chat, completions, responses, models, health):
        app.include_router(module.router)
    install_docs(app)
    guard = Guard(config)
    guard.install(app)  # API keys, x-ratelimit-* headers; inside the overload check below
    # last, so outermost: a 429 for overload before any other work (gateway/admission.py)
    app.add_middleware(Admission)
    return app


async def _load(gw: Gateway, on_failure: Callable[[str], None] | None) -> None:
    """Start the models; a failure is logged here, once, with its whole traceback (every
    model's, when several failed), and /health and /ready report it from then on."""
    try:
        await gw.start()
    except Exception as exc:
        gw.failure = gw.failure or f"could not start: {exc}"
        log.exception("start-up failed: %s", gw.failure)
        if on_failure is not None:
            on_failure(gw.failure)
        return
    await gw.refresh_routing()
