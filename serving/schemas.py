"""What the API accepts and answers: response models, raw-body envelopes decoded by msgspec with the stream
schemas (the OpenAPI document embeds the same JSON Schema), and the helpers that turn bad input into 4xx."""

# No `from __future__ import annotations`: pydantic and FastAPI read these annotations at runtime.
from typing import Annotated, Any

import msgspec
from fastapi import HTTPException
from pydantic import BaseModel, Field

from serving.metrics import ServingMetrics
from streams.schemas import CatalogItem, Click, InvalidEvent, Order, decode_event, event_type

MAX_BATCH = 1000


# ---- response models (documentation and validation of the JSON we return) ----

class Health(BaseModel):
    status: str
    model_version: str | None = None
    detail: str | None = None


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(description="Predicted click probability of showing the item to the user.")


class Recommendations(BaseModel):
    merchant_id: str
    user_id: str
    model_version: str
    items: list[ScoredItem]


class Predictions(BaseModel):
    model_version: str
    probabilities: list[float]


class RejectedEvent(BaseModel):
    index: int = Field(description="Position of the event in the request's list.")
    reason: str = Field(description="Machine-readable reason (streams.schemas.REASONS).")
    msg: str


class EventsAccepted(BaseModel):
    """Every event of the request is accounted for: accepted (produced) or dead-lettered with its reason."""

    accepted: int
    by_type: dict[str, int]
    dead_lettered: int = 0
    reasons: dict[str, int] = Field(default_factory=dict)
    rejected: list[RejectedEvent] = Field(default_factory=list)


class ServedModelInfo(BaseModel):
    name: str
    version: str
    kind: str
    description: str
    loaded_at: float
    feature_bits: int
    merchants: int


class ModelVersions(BaseModel):
    served: ServedModelInfo | None
    swaps: int
    last_error: str | None
    versions: list[dict[str, Any]]


class PromoteRequest(BaseModel):
    version: str | None = Field(default=None, pattern=r"^[1-9][0-9]{0,8}$", description="Default: the challenger.")
    force: bool = Field(default=False, description="Promote even if the promotion policy says no.")


class AliasMoveOut(BaseModel):
    name: str
    moved: bool
    version: str
    previous: str | None
    reason: str
    served_version: str | None


class DriftStatus(BaseModel):
    merchant_id: str | None
    count: int
    events: list[dict[str, Any]]


# ---- request bodies: raw bytes validated by msgspec with the stream schemas ----

class EventBatch(msgspec.Struct, forbid_unknown_fields=True):
    events: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


class ClickBatch(msgspec.Struct, forbid_unknown_fields=True):
    clicks: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


def event_components() -> dict[str, Any]:
    _, components = msgspec.json.schema_components([Click, Order, CatalogItem],
                                                   ref_template="#/components/schemas/{name}")
    return components


def body_schema(field: str, refs: list[str], description: str) -> dict[str, Any]:
    items = {"$ref": refs[0]} if len(refs) == 1 else {"oneOf": [{"$ref": r} for r in refs]}
    return {"requestBody": {"required": True, "description": description, "content": {"application/json": {
        "schema": {"type": "object", "additionalProperties": False, "required": [field],
                   "properties": {field: {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": items}}},
    }}}}


def decode_envelope(body: bytes, kind: type[msgspec.Struct], field: str) -> list[msgspec.Raw]:
    try:
        return getattr(msgspec.json.decode(body, type=kind), field)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise HTTPException(422, [{"loc": ["body"], "msg": str(exc), "type": "invalid_body"}]) from None


def decode_clicks(raws: list[msgspec.Raw], metrics: ServingMetrics, merchant_id: str | None) -> list:
    """Decode each click with the stream schema; 422 listing every bad one (index and reason)."""
    clicks, problems = [], []
    for index, raw in enumerate(raws):
        try:
            event = decode_event(bytes(raw))
            if not isinstance(event, Click):
                raise InvalidEvent("unknown_event_type", f"expected a click, got a {event_type(event)} event")
        except InvalidEvent as bad:
            metrics.rejected.labels(bad.reason).inc()
            problems.append({"loc": ["body", "clicks", index], "msg": bad.detail, "type": bad.reason})
            continue
        if merchant_id is not None and event.merchant_id != merchant_id:
            problems.append(merchant_mismatch(metrics, "clicks", index, event.merchant_id, merchant_id))
            continue
        clicks.append(event)
    if problems:
        raise HTTPException(422, problems)
    return clicks


def merchant_mismatch(metrics: ServingMetrics, field: str, index: int, sent: str, allowed: str) -> dict[str, Any]:
    """The problem of an event of merchant ``sent`` where only merchant ``allowed`` may be (counted)."""
    metrics.rejected.labels("merchant_mismatch").inc()
    where = "with a key of" if field == "events" else "for"  # ingestion checks the key, prediction the path
    return {"loc": ["body", field, index, "merchant_id"], "type": "merchant_mismatch",
            "msg": f"event of merchant {sent!r} sent {where} merchant {allowed!r}"}


def parse_promote(body: bytes) -> PromoteRequest:
    """The promote request of a raw body (empty: the defaults); 422 listing the problems otherwise."""
    from pydantic import ValidationError

    if not body.strip():
        return PromoteRequest()
    try:
        return PromoteRequest.model_validate_json(body)
    except ValidationError as exc:
        raise HTTPException(422, [{"loc": ["body", *e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
                                  for e in exc.errors()]) from None


def promote_body_schema() -> dict[str, Any]:
    """OpenAPI of the optional promote body (the route reads raw bytes, after checking the admin key)."""
    return {"requestBody": {"required": False, "content": {"application/json": {
        "schema": PromoteRequest.model_json_schema()}}}}
