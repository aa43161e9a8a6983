"""What the API accepts and answers: response models, raw-body envelopes decoded by msgspec with the stream
schemas (the OpenAPI document embeds the same JSON Schema), and the helpers that turn bad input into 4xx."""

# No `from __future__ import annotations`: pydantic and FastAPI read these annotations at runtime.
import re
from typing import Annotated, Any

import msgspec
import numpy as np
from fastapi import HTTPException
from pydantic import BaseModel, Field

from serving.metrics import ServingMetrics
from streams.schemas import EVENT_TYPES, Click, InvalidEvent, decode_event, event_type

# Limits of the request parameters, read by the routes and by serving.fastpath (one source for both).
MAX_ID = 128  # characters of a merchant, user or item id
MAX_K, DEFAULT_K = 100, 10  # items per recommendations answer


MAX_BATCH = 1000


# ---- response models (documentation and validation of the JSON we return) ----

class Health(BaseModel):
    status: str
    model_version: str | None = None
    detail: str | None = None


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(description="Score in (0, 1): σ of the learned ranker's score, the click probability "
                                     "for versions without a two-stage recommender, or P(order | impression) when "
                                     "ranked_by is expected_purchase.")
    source: str = Field(description="What proposed the item: history, co-occurrence, transition, popular, catalog "
                                    "(or candidates / click-model for versions without a two-stage recommender).")


class Recommendations(BaseModel):
    merchant_id: str
    user_id: str
    model_version: str
    ranked_by: str = Field(description="The score that ordered the items: ranker (the two-stage recommender's), "
                                       "click (the click model's) or expected_purchase (P(click)·P(order | click), "
                                       "settings.serving.rank_by, versions with a multi-task model).")
    items: list[ScoredItem]


def recommendations_json(merchant_id: str, user_id: str, model_version: str, items: list, ranked_by: str) -> bytes:
    """A :class:`Recommendations` answer encoded straight from the ranked items (no model objects per request)."""
    return _encode({"merchant_id": merchant_id, "user_id": user_id, "model_version": model_version,
                    "ranked_by": ranked_by, "items": [{"item_id": r.item_id, "score": r.score, "source": r.source} for r in items]})


_encode = msgspec.json.Encoder().encode


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


EVENT_SCHEMA_REF = "#/components/schemas/{name}"


def event_components() -> dict[str, Any]:
    """The OpenAPI components of every declared event type (:data:`streams.schemas.EVENT_KINDS`)."""
    _, components = msgspec.json.schema_components(list(EVENT_TYPES.values()), ref_template=EVENT_SCHEMA_REF)
    return components


def event_schema_refs() -> list[str]:
    """``$ref`` of each declared event type's schema, in declaration order."""
    return [EVENT_SCHEMA_REF.format(name=struct.__name__) for struct in EVENT_TYPES.values()]


def body_schema(field: str, refs: list[str], description: str) -> dict[str, Any]:
    items = {"$ref": refs[0]} if len(refs) == 1 else {"oneOf": [{"$ref": r} for r in refs]}
    return {"requestBody": {"required": True, "description": description, "content": {"application/json": {
        "schema": {"type": "object", "additionalProperties": False, "required": [field],
                   "properties": {field: {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": items}}},
    }}}}


def decode_envelope(body: bytes, kind: type[msgspec.Struct], field: str) -> list[msgspec.Raw]:
    """The raw items of ``{field: [...]}``; each item is validated later, one by one, so a bad one is
    rejected alone. An item nested too deep for msgspec's recursive skip is cut out without recursion."""
    try:
        return getattr(msgspec.json.decode(body, type=kind), field)
    except RecursionError:
        items = split_top_level_items(body, field)
        if items is None:
            raise _invalid_body("arrays/objects nested too deep outside the event list") from None
        return items
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _invalid_body(str(exc)) from None


def _invalid_body(message: str) -> HTTPException:
    return HTTPException(422, [{"loc": ["body"], "msg": message, "type": "invalid_body"}])


_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_STEP = bytes(1 if b in b"[{" else 255 if b in b"]}" else 0 for b in range(256))  # int8: +1 / -1


def split_top_level_items(body: bytes, field: str) -> list[msgspec.Raw] | None:
    """Items of the one array in ``{"<field>": [...]}`` cut at its top-level commas, in C-level passes
    (strings masked, bracket depth by cumulative sum); None when the body is not exactly that envelope.

    >>> [bytes(r) for r in split_top_level_items(b'{"events": [{"a": [1, 2]}, "x,]", [[[]]]]}', "events")]
    [b'{"a": [1, 2]}', b'"x,]"', b'[[[]]]']
    """
    masked = _JSON_STRING.sub(lambda m: b'"' + b"_" * (len(m.group()) - 2) + b'"', body)
    head = re.match(rb'\s*\{\s*"' + re.escape(field.encode()) + rb'"\s*:\s*\[', body)  # same offsets as masked
    tail = re.search(rb"\]\s*\}\s*$", masked)
    if head is None or tail is None or tail.start() < head.end():
        return None
    depth = np.cumsum(np.frombuffer(masked.translate(_STEP), dtype=np.int8), dtype=np.int64)
    inner = depth[head.end():tail.start()]
    if len(inner) and (inner.min() < 2 or depth[tail.start()] != 1):
        return None  # the array closes early, or another key follows it
    in_array = np.frombuffer(masked, np.uint8)[head.end():tail.start()]
    commas = (head.end() + np.flatnonzero((inner == 2) & (in_array == ord(",")))).tolist()
    bounds = [head.end(), *[c + 1 for c in commas]]
    ends = [*commas, tail.start()]
    items = [body[a:b].strip() for a, b in zip(bounds, ends, strict=True)]
    return [msgspec.Raw(item) for item in items if item] or None


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
