"""The HTTP API: recommendations, click predictions, event ingestion, model versions, drift, health, metrics.

Build it with :func:`create_app` (``fedstream serve`` runs it under uvicorn). It serves the registry's
``models:/NAME@champion`` (NAME = ``settings.serving.model_name``) and hot-swaps it when the alias
moves (:mod:`serving.holder`). Event payloads are validated with the platform's own msgspec schemas
(:mod:`streams.schemas`), whose JSON Schema is also what the OpenAPI document shows, so the docs, the
API and the Kafka consumers agree on what a valid click is.

Auth: every ``/v1`` route needs an ``X-API-Key`` header (:mod:`serving.keys`). A merchant key reads and
writes only its own merchant's data; an admin key may do everything, including promote/rollback.
Errors are JSON ``{"detail": ...}`` with 4xx codes; per-event problems list the event index and the
machine-readable reason from :data:`streams.schemas.REASONS`. Ingestion is never all-or-nothing on
content: invalid events go to the dead-letter topic with their original bytes and reason (as with
``fedstream ingest``) while the valid ones are produced, and the answer accounts for each.
"""

# No `from __future__ import annotations` here: FastAPI must see the closures' Depends(...) objects, not strings.
import contextlib
import threading
import time
from typing import Annotated, Any

import msgspec
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from fedstream.logs import get_logger
from fedstream.settings import Settings
from serving.holder import ModelHolder, ServedModel
from serving.keys import KeyStore, Principal
from serving.metrics import MetricsMiddleware, ServingMetrics
from streams.schemas import CatalogItem, Click, InvalidEvent, Order, decode_event, event_type

log = get_logger("serving.app")

MAX_BATCH = 1000
DRIFT_WINDOW = 10_000  # newest drift events kept per read, all merchants
MAX_BODY_BYTES = 8 * 1024 * 1024
MerchantId = Annotated[str, Path(min_length=1, max_length=128, description="Merchant id.")]
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Merchant or admin API key.")


# ---- response models (documentation and validation of the JSON we return) ----

class Health(BaseModel):
    status: str
    model_version: str | None = None
    detail: str | None = None


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(description="Ranking score in (0, 1), higher first: σ of the learned ranker's score, or "
                                     "the click probability for versions without a two-stage recommender.")
    source: str = Field(description="What proposed the item: history, co-occurrence, transition, popular, catalog "
                                    "(or candidates / click-model for versions without a two-stage recommender).")


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

class _Batch(msgspec.Struct, forbid_unknown_fields=True):
    events: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


class _ClickBatch(msgspec.Struct, forbid_unknown_fields=True):
    clicks: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


def _event_components() -> dict[str, Any]:
    _, components = msgspec.json.schema_components([Click, Order, CatalogItem],
                                                   ref_template="#/components/schemas/{name}")
    return components


def _body_schema(field: str, refs: list[str], description: str) -> dict[str, Any]:
    items = {"$ref": refs[0]} if len(refs) == 1 else {"oneOf": [{"$ref": r} for r in refs]}
    return {"requestBody": {"required": True, "description": description, "content": {"application/json": {
        "schema": {"type": "object", "additionalProperties": False, "required": [field],
                   "properties": {field: {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": items}}},
    }}}}


async def _read_body(request: Request) -> bytes:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise HTTPException(413, f"body of {len(body)} bytes is over {MAX_BODY_BYTES}")
    return body


def _decode_envelope(body: bytes, kind: type[msgspec.Struct], field: str) -> list[msgspec.Raw]:
    try:
        return getattr(msgspec.json.decode(body, type=kind), field)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise HTTPException(422, [{"loc": ["body"], "msg": str(exc), "type": "invalid_body"}]) from None


def _decode_clicks(raws: list[msgspec.Raw], metrics: ServingMetrics, merchant_id: str | None) -> list:
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
            problems.append(_merchant_mismatch(metrics, "clicks", index, event.merchant_id, merchant_id))
            continue
        clicks.append(event)
    if problems:
        raise HTTPException(422, problems)
    return clicks


def _merchant_mismatch(metrics: ServingMetrics, field: str, index: int, sent: str, allowed: str) -> dict[str, Any]:
    """The problem of an event of merchant ``sent`` where only merchant ``allowed`` may be (counted)."""
    metrics.rejected.labels("merchant_mismatch").inc()
    where = "with a key of" if field == "events" else "for"  # ingestion checks the key, prediction the path
    return {"loc": ["body", field, index, "merchant_id"], "type": "merchant_mismatch",
            "msg": f"event of merchant {sent!r} sent {where} merchant {allowed!r}"}


# ---- the app ----

class _Producer:
    """The streams room's :class:`~streams.producer.EventProducer` (routing by type, keyed by merchant,
    murmur2 partitions, acks=all, delivery accounting), created on first use so the API also runs without
    a broker for reads; one request's batch at a time, as the producer keeps per-batch state."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer = None
        self._lock = threading.Lock()

    def send_all(self, events: list, invalid: list[tuple[bytes, InvalidEvent]] = ()) -> None:
        """Send the valid events and dead-letter the invalid ones (original bytes, reason), then wait for
        every acknowledgement; raises BrokerUnavailable or DeliveryFailed."""
        from streams.producer import EventProducer

        with self._lock:
            if self._producer is None:
                self._producer = EventProducer(self.settings, source="serving-api")
            for event in events:
                self._producer.send_event(event)
            for raw, bad in invalid:
                self._producer.dead_letter(raw, bad.reason, bad.detail)
            self._producer.flush()

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                with contextlib.suppress(Exception):  # closing a client to a dead broker
                    self._producer.close(timeout_s=5)
                self._producer = None


class _TtlCache:
    """Drift reads hit Kafka; cache answers a few seconds so a dashboard cannot hammer the broker."""

    def __init__(self, ttl_seconds: float) -> None:
        self.ttl = ttl_seconds
        self._data: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get_or_compute(self, key: Any, compute) -> Any:
        now = time.monotonic()
        with self._lock:
            found = self._data.get(key)
        if found is not None and now - found[0] < self.ttl:
            return found[1]
        value = compute()
        with self._lock:
            self._data[key] = (now, value)
        return value


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
    holder = ModelHolder(settings, name, metrics)
    keys = key_store or KeyStore.for_settings(settings)
    producer = _Producer(settings)
    drift_cache = _TtlCache(drift_cache_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        holder.refresh()
        if poll:
            holder.start()
        try:
            yield
        finally:
            holder.stop()
            producer.close()

    app = FastAPI(
        title="fedstream serving API",
        version="1",
        description=(__doc__ or "").split("\n\n", 1)[0],
        lifespan=lifespan,
    )
    app.state.settings, app.state.holder, app.state.keys, app.state.metrics = settings, holder, keys, metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    components = _event_components()

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = custom_openapi  # type: ignore[method-assign]

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return JSONResponse({"detail": "internal error"}, status_code=500)

    # ---- dependencies (async: trivial and non-blocking, so no threadpool hop per request) ----

    async def principal(key: Annotated[str | None, Security(api_key_header)]) -> Principal:
        found = keys.verify(key)
        if found is None:
            raise HTTPException(401, "missing or invalid API key (send it in the X-API-Key header)",
                                headers={"WWW-Authenticate": "ApiKey"})
        return found

    async def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if not who.is_admin:
            raise HTTPException(403, "this operation needs an admin key")
        return who

    async def merchant_reader(merchant_id: MerchantId, who: Annotated[Principal, Depends(principal)]) -> Principal:
        if not who.may_read(merchant_id):
            raise HTTPException(403, f"this key may only access merchant {who.merchant_id!r}")
        return who

    async def served() -> ServedModel:
        current = holder.current
        if current is None:
            raise HTTPException(503, f"no model to serve yet: {name}@champion is not set")
        return current

    # ---- health and metrics ----

    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["ops"], responses={503: {"model": Health}})
    async def readyz():
        """Readiness: a model is loaded and requests can be served."""
        current = holder.current
        if current is None:
            body = Health(status="not ready", detail=holder.last_error or f"waiting for {name}@champion")
            return JSONResponse(body.model_dump(), status_code=503)
        return Health(status="ready", model_version=current.version)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus metrics: request counts and latencies, served model version, swaps, events."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- merchant routes ----

    @app.get("/v1/merchants/{merchant_id}/recommendations", tags=["merchant"], response_model=None,
             responses={200: {"model": Recommendations}, 404: {"description": "merchant unknown to the model"}})
    async def recommendations(
        merchant_id: MerchantId,
        who: Annotated[Principal, Depends(merchant_reader)],
        model: Annotated[ServedModel, Depends(served)],
        user_id: Annotated[str, Query(min_length=1, max_length=128, description="User to recommend for.")],
        k: Annotated[int, Query(ge=1, le=100, description="How many items.")] = 10,
        item_id: Annotated[str | None, Query(min_length=1, max_length=128,
                                             description="Product page: items bought together with this one.")] = None,
    ) -> Response:
        """Top-k items for a user (on a product page with ``item_id``), each with the source that proposed it."""
        if merchant_id not in model.bundle.context.merchants and model.bundle.recommender is None:
            raise HTTPException(404, f"merchant {merchant_id!r} has no catalog in model version {model.version}")
        items = model.bundle.recommend_items(merchant_id, user_id, k, item_id=item_id)
        body = {"merchant_id": merchant_id, "user_id": user_id, "model_version": model.version,
                "items": [{"item_id": r.item_id, "score": r.score, "source": r.source} for r in items]}
        return Response(msgspec.json.encode(body), media_type="application/json")

    @app.post("/v1/merchants/{merchant_id}/predictions", tags=["merchant"], response_model=Predictions,
              openapi_extra=_body_schema("clicks", ["#/components/schemas/Click"],
                                         f"1..{MAX_BATCH} click events of this merchant (stream schema)."))
    def predictions(
        merchant_id: MerchantId,
        who: Annotated[Principal, Depends(merchant_reader)],
        model: Annotated[ServedModel, Depends(served)],
        body: Annotated[bytes, Depends(_read_body)],
    ) -> Predictions:
        """Click probability of each impression, featurized like the online learners do."""
        raws = _decode_envelope(body, _ClickBatch, "clicks")
        clicks = _decode_clicks(raws, metrics, merchant_id)
        return Predictions(model_version=model.version, probabilities=model.bundle.predict(clicks).tolist())

    @app.get("/v1/merchants/{merchant_id}/model", tags=["merchant"], response_model=ServedModelInfo)
    def merchant_model(
        merchant_id: MerchantId,
        who: Annotated[Principal, Depends(merchant_reader)],
        model: Annotated[ServedModel, Depends(served)],
    ) -> ServedModelInfo:
        """The model version currently serving this merchant."""
        return ServedModelInfo(**model.info())

    @app.get("/v1/merchants/{merchant_id}/drift", tags=["merchant"], response_model=DriftStatus)
    def merchant_drift(
        merchant_id: MerchantId,
        who: Annotated[Principal, Depends(merchant_reader)],
        limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    ) -> DriftStatus:
        """The latest drift events detected on this merchant's stream (oldest first)."""
        return _drift(merchant_id, limit)

    @app.post("/v1/events", tags=["merchant"], status_code=202, response_model=EventsAccepted,
              openapi_extra=_body_schema("events", [f"#/components/schemas/{n}" for n in ("Click", "Order", "CatalogItem")],
                                         f"1..{MAX_BATCH} events; a merchant key may only send its own merchant's."))
    def ingest(
        who: Annotated[Principal, Depends(principal)],
        body: Annotated[bytes, Depends(_read_body)],
    ) -> EventsAccepted:
        """Validate events and produce them to Kafka via the streams EventProducer (keyed by merchant, acks=all).

        Invalid events are dead-lettered with their reason and listed in ``rejected`` (202: the valid ones
        are in). A merchant key sending another merchant's event is refused whole (403, nothing sent).
        """
        raws = _decode_envelope(body, _Batch, "events")
        events, invalid = _split_events(raws, None if who.is_admin else who.merchant_id)
        by_type = _produce(events, invalid)
        reasons: dict[str, int] = {}
        for _, _, bad in invalid:
            reasons[bad.reason] = reasons.get(bad.reason, 0) + 1
        rejected = [RejectedEvent(index=index, reason=bad.reason, msg=bad.detail) for index, _, bad in invalid]
        return EventsAccepted(accepted=len(events), by_type=by_type, dead_lettered=len(invalid), reasons=reasons,
                              rejected=rejected)

    def _split_events(raws: list[msgspec.Raw], merchant_id: str | None) -> tuple[list, list]:
        events, invalid = [], []
        for index, raw in enumerate(raws):
            payload = bytes(raw)
            try:
                event = decode_event(payload)
            except InvalidEvent as bad:
                invalid.append((index, payload, bad))
                continue
            if merchant_id is not None and event.merchant_id != merchant_id:
                raise HTTPException(403, [_merchant_mismatch(metrics, "events", index, event.merchant_id, merchant_id)])
            events.append(event)
        return events, invalid

    def _produce(events: list, invalid: list = ()) -> dict[str, int]:
        from streams.kafka import BrokerUnavailable
        from streams.producer import DeliveryFailed

        try:
            producer.send_all(events, [(payload, bad) for _, payload, bad in invalid])
        except BrokerUnavailable as exc:
            raise HTTPException(503, f"event broker unavailable: {exc}") from None
        except DeliveryFailed as exc:
            raise HTTPException(503, f"events not acknowledged by the broker: {exc}") from None
        except Exception as exc:  # other Kafka client errors: the events were not durably accepted
            log.warning("produce failed", extra={"error": str(exc)[:300]})
            raise HTTPException(503, f"events not accepted by the broker: {type(exc).__name__}") from None
        for _, _, bad in invalid:
            metrics.rejected.labels(bad.reason).inc()
        counts: dict[str, int] = {}
        for event in events:
            kind = event_type(event)
            counts[kind] = counts.get(kind, 0) + 1
            metrics.events.labels(kind).inc()
        return counts

    # ---- admin routes ----

    @app.get("/v1/models", tags=["admin"], response_model=ModelVersions)
    def model_versions(who: Annotated[Principal, Depends(admin)]) -> ModelVersions:
        """The served model and every registered version of it (aliases, metrics, lineage)."""
        from registry.models import RegistryError, list_versions

        try:
            versions = list_versions(settings, name)
        except RegistryError:
            versions = []
        current = holder.current
        return ModelVersions(served=ServedModelInfo(**current.info()) if current else None, swaps=holder.swaps,
                             last_error=holder.last_error, versions=versions)

    @app.post("/v1/models/promote", tags=["admin"], response_model=AliasMoveOut)
    def promote_model(who: Annotated[Principal, Depends(admin)], request: PromoteRequest | None = None) -> AliasMoveOut:
        """Move `champion` to a version (default: the challenger) if the promotion policy agrees (or force)."""
        from registry.models import RegistryError, promote

        request = request or PromoteRequest()
        try:
            move = promote(settings, name, request.version, force=request.force)
        except RegistryError as exc:
            raise HTTPException(404, str(exc)) from None
        return _after_move(move)

    @app.post("/v1/models/rollback", tags=["admin"], response_model=AliasMoveOut)
    def rollback_model(who: Annotated[Principal, Depends(admin)]) -> AliasMoveOut:
        """Move `champion` back to the previous champion."""
        from registry.models import RegistryError, rollback

        try:
            move = rollback(settings, name)
        except RegistryError as exc:
            raise HTTPException(409, str(exc)) from None
        return _after_move(move)

    def _after_move(move) -> AliasMoveOut:
        if move.moved:
            holder.refresh()  # swap now rather than at the next poll
        current = holder.current
        return AliasMoveOut(**move.as_dict(), served_version=current.version if current else None)

    @app.get("/v1/drift", tags=["admin"], response_model=DriftStatus)
    def drift_status(
        who: Annotated[Principal, Depends(admin)],
        merchant_id: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> DriftStatus:
        """The latest drift events of all merchants (or one), oldest first."""
        return _drift(merchant_id, limit)

    def _drift(merchant_id: str | None, limit: int) -> DriftStatus:
        events = drift_cache.get_or_compute("recent", _read_recent_drift)
        if merchant_id is not None:
            events = [e for e in events if e.get("merchant_id") == merchant_id]
        events = events[-limit:]
        return DriftStatus(merchant_id=merchant_id, count=len(events), events=events)

    def _read_recent_drift() -> list[dict]:
        """One read of the newest drift events of all merchants, shared by every drift request for a few seconds."""
        try:
            from drift.monitor import latest_drift
        except ImportError as exc:
            raise HTTPException(503, f"drift detection is not installed: {exc}") from None
        from streams.kafka import BrokerUnavailable

        try:
            return latest_drift(settings, None, DRIFT_WINDOW, source=drift_source, poll_timeout_s=0.3, max_wait_s=3.0)
        except BrokerUnavailable as exc:
            raise HTTPException(503, f"drift topic unavailable: {exc}") from None
        except Exception as exc:  # Kafka timeouts and the like: a dependency problem, not a bug here
            log.warning("drift read failed", extra={"error": str(exc)[:300]})
            raise HTTPException(503, f"drift events unavailable: {type(exc).__name__}") from None

    return app


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
