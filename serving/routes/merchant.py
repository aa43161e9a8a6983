"""Merchant routes: what a merchant key (or an admin key) reads about its own merchant."""

# No `from __future__ import annotations` here: FastAPI must see the Depends(...) objects, not strings.
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response

from serving.deps import MerchantId, body, context, merchant_reader, served
from serving.holder import ServedModel
from serving.keys import Principal
from serving.schemas import (
    DEFAULT_K, MAX_BATCH, MAX_ID, MAX_K, ClickBatch, DriftStatus, Predictions, Recommendations, ServedModelInfo,
    body_schema, decode_clicks, decode_envelope, recommendations_json,
)

router = APIRouter(prefix="/v1/merchants/{merchant_id}", tags=["merchant"])


@router.get("/recommendations", response_model=None,
            responses={200: {"model": Recommendations}, 404: {"description": "merchant unknown to the model"}})
async def recommendations(
    request: Request,
    merchant_id: MerchantId,
    who: Annotated[Principal, Depends(merchant_reader)],
    model: Annotated[ServedModel, Depends(served)],
    user_id: Annotated[str, Query(min_length=1, max_length=MAX_ID, description="User to recommend for.")],
    k: Annotated[int, Query(ge=1, le=MAX_K, description="How many items.")] = DEFAULT_K,
    item_id: Annotated[str | None, Query(min_length=1, max_length=MAX_ID,
                                         description="Product page: items bought together with this one.")] = None,
) -> Response:
    """Top-k items for a user (on a product page with ``item_id``), each with the source that proposed it."""
    # Valid, authorized requests within their rate limit are answered before FastAPI solves any of the above,
    # by serving.fastpath.RecommendationsFastPath (same answer); this route documents them and answers the rest.
    if merchant_id not in model.bundle.context.merchants and model.bundle.recommender is None:
        raise HTTPException(404, f"merchant {merchant_id!r} has no catalog in model version {model.version}")
    ranking = context(request).settings.serving
    items = await model.recommend_items(merchant_id, user_id, k, item_id, ranking)  # off the loop unless measured cheap
    return Response(recommendations_json(merchant_id, user_id, model.version, items,
                                         model.bundle.ranked_by(ranking.rank_by)), media_type="application/json")


@router.post("/predictions", response_model=Predictions,
             openapi_extra=body_schema("clicks", ["#/components/schemas/Click"],
                                       f"1..{MAX_BATCH} click events of this merchant (stream schema)."))
def predictions(
    request: Request,
    merchant_id: MerchantId,
    who: Annotated[Principal, Depends(merchant_reader)],
    model: Annotated[ServedModel, Depends(served)],
    raw: Annotated[bytes, Depends(body)],
) -> Predictions:
    """Click probability of each impression, featurized like the online learners do."""
    clicks = decode_clicks(decode_envelope(raw, ClickBatch, "clicks"), context(request).metrics, merchant_id)
    return Predictions(model_version=model.version, probabilities=model.bundle.predict(clicks).tolist())


@router.get("/model", response_model=ServedModelInfo)
def merchant_model(
    merchant_id: MerchantId,
    who: Annotated[Principal, Depends(merchant_reader)],
    model: Annotated[ServedModel, Depends(served)],
) -> ServedModelInfo:
    """The model version currently serving this merchant."""
    return ServedModelInfo(**model.info())


@router.get("/drift", response_model=DriftStatus)
def merchant_drift(
    request: Request,
    merchant_id: MerchantId,
    who: Annotated[Principal, Depends(merchant_reader)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> DriftStatus:
    """The latest drift events detected on this merchant's stream (oldest first)."""
    return DriftStatus(**context(request).drift(merchant_id, limit))
