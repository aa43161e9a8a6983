"""Ingest route: events in, validated with the stream schemas, produced to Kafka (invalid ones dead-lettered
with their reason and the id of the key that sent them)."""

# No `from __future__ import annotations` here: FastAPI must see the Depends(...) objects, not strings.
from typing import Annotated

import msgspec
from fastapi import APIRouter, Depends, HTTPException, Request

from fedstream.logs import get_logger
from serving.context import ServingContext
from serving.deps import body, context, principal
from serving.keys import Principal
from serving.schemas import (
    MAX_BATCH, EventBatch, EventsAccepted, RejectedEvent, body_schema, decode_envelope, event_schema_refs, merchant_mismatch,
)
from streams.schemas import CatalogItem, InvalidEvent, decode_event, event_type

log = get_logger("serving.ingest")
router = APIRouter(tags=["ingest"])


@router.post("/v1/events", status_code=202, response_model=EventsAccepted,
             openapi_extra=body_schema("events", event_schema_refs(),
                                       f"1..{MAX_BATCH} events; a merchant key may only send its own merchant's."))
def ingest(
    request: Request,
    who: Annotated[Principal, Depends(principal)],
    raw: Annotated[bytes, Depends(body)],
) -> EventsAccepted:
    """Validate events and produce them to Kafka via the streams EventProducer (keyed by merchant, acks=all).

    Invalid events are dead-lettered with their reason and listed in ``rejected`` (202: the valid ones
    are in). A merchant key sending another merchant's event is refused whole (403, nothing sent); so is
    a batch that would grow a merchant's catalog past the server's item or category limit (422).
    """
    ctx = context(request)
    events, invalid = split_events(ctx, decode_envelope(raw, EventBatch, "events"),
                                   None if who.is_admin else who.merchant_id)
    current = ctx.holder.current
    refused = ctx.catalog.admit(current.bundle if current else None, [e for e in events if isinstance(e, CatalogItem)])
    if refused is not None:
        ctx.metrics.rejected.labels("catalog_limit").inc()
        raise HTTPException(422, [{"loc": ["body", "events"], "msg": refused, "type": "catalog_limit"}])
    by_type = produce(ctx, events, invalid, who.key_id)
    reasons: dict[str, int] = {}
    for _, _, bad in invalid:
        reasons[bad.reason] = reasons.get(bad.reason, 0) + 1
    rejected = [RejectedEvent(index=index, reason=bad.reason, msg=bad.detail) for index, _, bad in invalid]
    return EventsAccepted(accepted=len(events), by_type=by_type, dead_lettered=len(invalid), reasons=reasons,
                          rejected=rejected)


def split_events(ctx: ServingContext, raws: list[msgspec.Raw], merchant_id: str | None) -> tuple[list, list]:
    """Valid events and ``(index, payload, InvalidEvent)`` of the others; 403 for another merchant's event."""
    events, invalid = [], []
    for index, raw in enumerate(raws):
        payload = bytes(raw)
        try:
            event = decode_event(payload)
        except InvalidEvent as bad:
            invalid.append((index, payload, bad))
            continue
        if merchant_id is not None and event.merchant_id != merchant_id:
            raise HTTPException(403, [merchant_mismatch(ctx.metrics, "events", index, event.merchant_id, merchant_id)])
        events.append(event)
    return events, invalid


def produce(ctx: ServingContext, events: list, invalid: list, key_id: str) -> dict[str, int]:
    """Send through the producer; 503 (details logged, not echoed) when the broker does not take them."""
    try:
        ctx.producer.send_all(events, [(payload, bad) for _, payload, bad in invalid], key_id=key_id)
    except Exception as exc:  # broker unreachable, not acknowledged, other client errors: not durably accepted
        log.warning("produce failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300], "key_id": key_id})
        raise HTTPException(503, "event broker unavailable: the events were not accepted, retry later") from None
    for _, _, bad in invalid:
        ctx.metrics.rejected.labels(bad.reason).inc()
    counts: dict[str, int] = {}
    for event in events:
        kind = event_type(event)
        counts[kind] = counts.get(kind, 0) + 1
        ctx.metrics.events.labels(kind).inc()
    return counts
