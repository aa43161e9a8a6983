"""FastAPI dependencies shared by the routers: who is calling (key, then rate limit), what they may reach,
the served model, and the request body (read only after the key was checked, never past the limit).

Async on purpose: each is trivial and non-blocking, so no threadpool hop per request.
"""

# No `from __future__ import annotations` here: FastAPI must see the Depends(...) objects, not strings.
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, Security
from fastapi.security import APIKeyHeader

from serving.context import ServingContext
from serving.holder import ServedModel
from serving.keys import Principal
from serving.limits import BodyTooLarge, declared_length
from serving.schemas import MAX_ID

MerchantId = Annotated[str, Path(min_length=1, max_length=MAX_ID, description="Merchant id.")]
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Merchant or admin API key.")


def context(request: Request) -> ServingContext:
    return request.app.state.ctx


async def principal(request: Request, key: Annotated[str | None, Security(api_key_header)]) -> Principal:
    """The caller's key (401 without a valid one), within its rate limit (429 with Retry-After past it)."""
    ctx = context(request)
    found = ctx.keys.verify(key)
    if found is None:
        raise HTTPException(401, "missing or invalid API key (send it in the X-API-Key header)",
                            headers={"WWW-Authenticate": "ApiKey"})
    ctx.limiter.check(found.key_id)
    return found


async def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
    if not who.is_admin:
        raise HTTPException(403, "this operation needs an admin key")
    return who


async def merchant_reader(merchant_id: MerchantId, who: Annotated[Principal, Depends(principal)]) -> Principal:
    if not who.may_read(merchant_id):
        raise HTTPException(403, f"this key may only access merchant {who.merchant_id!r}")
    return who


async def served(request: Request) -> ServedModel:
    ctx = context(request)
    current = ctx.holder.current
    if current is None:
        raise HTTPException(503, f"no model to serve yet: {ctx.name}@champion is not set")
    return current


async def body(request: Request, who: Annotated[Principal, Depends(principal)]) -> bytes:
    """The raw body of an authenticated request: 413 up front for a declared length over the limit,
    else read chunk by chunk and stopped at the limit (:class:`serving.limits.BodyLimitMiddleware`)."""
    limit = context(request).settings.serving.max_body_bytes
    declared = declared_length(request.scope)
    if declared is not None and declared > limit:
        raise BodyTooLarge(limit)
    return await request.body()
