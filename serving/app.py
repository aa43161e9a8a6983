"""The HTTP API: recommendations, click predictions, event ingestion, model versions, drift, health, metrics.

Design notes: `serving/README.md`, `serving/app.py`.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from fedstream.logs import get_logger
from fedstream.settings import Settings
from serving import fastpath
from serving.context import Producer, ServingContext, TtlCache
from serving.holder import ModelHolder
from serving.keys import KeyStore
from serving.limits import BodyLimitMiddleware, RateLimiter
from serving.metrics import MetricsMiddleware, ServingMetrics
from serving.routes import admin, ingest, merchant, ops
from serving.schemas import event_components

log = get_logger("serving.app")


def create_app(settings: Settings, *, model_name: str | None = None, poll: bool = True,
               key_store: KeyStore | None = None, drift_cache_seconds: float = 5.0,
               drift_source: str | None = None) -> FastAPI:
    """The FastAPI app serving ``model_name@champion`` (default ``settings.serving.model_name``).

    ``poll=False`` skips the background alias poller (the model is still loaded at startup and on
    promote/rollback through the API). ``drift_source`` is ``"kafka"`` (the drift topic), ``"file"``
    (this host's drift log) or None (Kafka when a broker is configured, else the file).
    """
    name = model_name or settings.serving.model_name
    metrics = ServingMetrics()
    ctx = ServingContext(
        settings=settings, name=name, metrics=metrics, holder=ModelHolder(settings, name, metrics),
        keys=key_store or KeyStore.for_settings(settings), producer=Producer(settings),
        drift_cache=TtlCache(drift_cache_seconds), drift_source=drift_source,
        limiter=RateLimiter(settings.serving.rate_limit_per_second, settings.serving.rate_limit_burst),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.holder.refresh()
        if poll:
            ctx.holder.start()
        try:
            yield
        finally:
            ctx.holder.stop()
            ctx.producer.close()

    app = FastAPI(title="fedstream serving API", version="1", description=(__doc__ or "").split("\n\n", 1)[0],
                  lifespan=lifespan)
    app.state.ctx = ctx
    app.state.settings, app.state.holder, app.state.keys, app.state.metrics = settings, ctx.holder, ctx.keys, metrics
    for router in (ops.router, merchant.router, ingest.router, admin.router):
        app.include_router(router)
    recommendations = next(r for r in merchant.router.routes if r.path == fastpath.TEMPLATE)
    app.add_middleware(fastpath.RecommendationsFastPath, ctx=ctx, route=recommendations)  # innermost
    app.add_middleware(BodyLimitMiddleware, limit=settings.serving.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
    _document_event_schemas(app)
    return app


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"path": request.url.path})
    return JSONResponse({"detail": "internal error"}, status_code=500)


def _document_event_schemas(app: FastAPI) -> None:
    """The OpenAPI document embeds the stream schemas' JSON Schema (what the raw-body routes validate)."""
    components = event_components()

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = custom_openapi  # type: ignore[method-assign]


def create_app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` worker processes: settings from FEDSTREAM_* / FEDSTREAM_CONFIG."""
    import os

    from fedstream.settings import load_settings

    prefer_requests_over_background_work()
    return create_app(load_settings(), poll=os.environ.get("FEDSTREAM_SERVING_NO_POLL") != "1")


def prefer_requests_over_background_work(interval_s: float = 0.001) -> None:
    """Hand the GIL back every millisecond (default 5 ms) so the event loop is not starved while the poller
    thread loads and warms a new model: request tails stay short during hot swaps. Process-wide: call it
    in a server process only."""
    import sys

    sys.setswitchinterval(interval_s)
