"""Admin routes (admin keys only): model versions, promote and rollback (swap now), drift of all merchants."""

# No `from __future__ import annotations` here: FastAPI must see the Depends(...) objects, not strings.
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from fedstream.logs import get_logger
from serving.context import ServingContext
from serving.deps import admin, body, context
from serving.keys import Principal
from serving.schemas import (
    MAX_ID, AliasMoveOut, DriftStatus, ModelVersions, ServedModelInfo, parse_promote, promote_body_schema,
)

log = get_logger("serving.admin")
router = APIRouter(tags=["admin"])


@router.get("/v1/models", response_model=ModelVersions)
def model_versions(request: Request, who: Annotated[Principal, Depends(admin)]) -> ModelVersions:
    """The served model and every registered version of it (aliases, metrics, lineage)."""
    from registry.models import RegistryError, list_versions

    ctx = context(request)
    try:
        versions = list_versions(ctx.settings, ctx.name)
    except RegistryError:
        versions = []
    except Exception as exc:  # store unreachable or broken: a dependency problem (details in the log)
        log.warning("registry read failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
        raise HTTPException(503, "model registry unavailable") from None
    current = ctx.holder.current
    return ModelVersions(served=ServedModelInfo(**current.info()) if current else None, swaps=ctx.holder.swaps,
                         last_error=ctx.holder.last_error, versions=versions)


@router.post("/v1/models/promote", response_model=AliasMoveOut, openapi_extra=promote_body_schema())
def promote_model(
    request: Request,
    who: Annotated[Principal, Depends(admin)],
    raw: Annotated[bytes, Depends(body)],
) -> AliasMoveOut:
    """Move `champion` to a version (default: the challenger) if the promotion policy agrees (or force).

    Body (optional): ``{"version"?, "force"?}``; read and parsed only once the admin key was checked."""
    from registry.models import RegistryError, promote

    ctx, wanted = context(request), parse_promote(raw)
    try:
        move = promote(ctx.settings, ctx.name, wanted.version, force=wanted.force)
    except RegistryError as exc:
        raise HTTPException(404, str(exc)) from None
    return after_move(ctx, move)


@router.post("/v1/models/rollback", response_model=AliasMoveOut)
def rollback_model(request: Request, who: Annotated[Principal, Depends(admin)]) -> AliasMoveOut:
    """Move `champion` back to the previous champion."""
    from registry.models import RegistryError, rollback

    ctx = context(request)
    try:
        move = rollback(ctx.settings, ctx.name)
    except RegistryError as exc:
        raise HTTPException(409, str(exc)) from None
    return after_move(ctx, move)


def after_move(ctx: ServingContext, move) -> AliasMoveOut:
    if move.moved:
        ctx.holder.refresh()  # swap now rather than at the next poll
    current = ctx.holder.current
    return AliasMoveOut(**move.as_dict(), served_version=current.version if current else None)


@router.get("/v1/drift", response_model=DriftStatus)
def drift_status(
    request: Request,
    who: Annotated[Principal, Depends(admin)],
    merchant_id: Annotated[str | None, Query(min_length=1, max_length=MAX_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> DriftStatus:
    """The latest drift events of all merchants (or one), oldest first."""
    return DriftStatus(**context(request).drift(merchant_id, limit))
