"""Ops routes, open to anyone: liveness, readiness, Prometheus metrics. Nothing internal is echoed here
(load errors and broker addresses go to the log and to admins through ``GET /v1/models``)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.deps import context
from serving.schemas import Health

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(request: Request):
    """Readiness: a model is loaded and requests can be served."""
    ctx = context(request)
    current = ctx.holder.current
    if current is None:
        why = "the last load failed (details: server log, GET /v1/models)" if ctx.holder.last_error else "waiting"
        body = Health(status="not ready", detail=f"no model loaded for {ctx.name}@champion: {why}")
        return JSONResponse(body.model_dump(), status_code=503)
    return Health(status="ready", model_version=current.version)


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus metrics: request counts and latencies, served model version, swaps, events."""
    return Response(generate_latest(context(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
