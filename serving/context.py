"""Everything one serving app shares between its routes: settings, the served model, keys, limits, the
event producer and the drift cache (``app.state.ctx``, read by :mod:`serving.deps`)."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fedstream.logs import get_logger
from fedstream.settings import Settings
from serving.holder import ModelHolder
from serving.keys import KeyStore
from serving.limits import RateLimiter
from serving.metrics import ServingMetrics
from streams.schemas import InvalidEvent

log = get_logger("serving.context")

DRIFT_WINDOW = 10_000  # newest drift events kept per read, all merchants


@dataclass
class ServingContext:
    """The state behind one app (built by :func:`serving.app.create_app`)."""

    settings: Settings
    name: str
    metrics: ServingMetrics
    holder: ModelHolder
    keys: KeyStore
    producer: "Producer"
    drift_cache: "TtlCache"
    drift_source: str | None
    limiter: RateLimiter
    catalog: "CatalogBudget" = field(init=False)

    def __post_init__(self) -> None:
        serving = self.settings.serving
        self.catalog = CatalogBudget(serving.max_catalog_items, serving.max_categories)

    def drift(self, merchant_id: str | None, limit: int) -> dict[str, Any]:
        """The latest ``limit`` drift events of one merchant (or all), oldest first."""
        events = self.drift_cache.get_or_compute("recent", self._read_recent_drift)
        if merchant_id is not None:
            events = [e for e in events if e.get("merchant_id") == merchant_id]
        events = events[-limit:]
        return {"merchant_id": merchant_id, "count": len(events), "events": events}

    def _read_recent_drift(self) -> list[dict]:
        """One read of the newest drift events of all merchants, shared by every drift request for a few seconds."""
        from fastapi import HTTPException

        try:
            from drift.monitor import latest_drift
        except ImportError as exc:
            log.warning("drift detection is not installed", extra={"error": str(exc)[:300]})
            raise HTTPException(503, "drift detection is not installed on this server") from None
        try:
            return latest_drift(self.settings, None, DRIFT_WINDOW, source=self.drift_source, poll_timeout_s=0.3,
                                max_wait_s=3.0)
        except Exception as exc:  # broker down, Kafka timeouts: a dependency problem, not a bug here
            log.warning("drift read failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
            raise HTTPException(503, "drift events unavailable (the drift source did not answer)") from None


class CatalogBudget:
    """Bounds what the API lets into a merchant's catalog: items and distinct categories, counting those of
    the served model plus those accepted since (so the sets it keeps stay within the limits too)."""

    def __init__(self, max_items: int, max_categories: int) -> None:
        self.max_items, self.max_categories = max_items, max_categories
        self._items: dict[str, set[str]] = {}
        self._categories: dict[str, set[str]] = {}
        self._seeded: dict[str, int] = {}  # merchant -> id of the bundle whose catalog is in the sets
        self._lock = threading.Lock()

    def admit(self, bundle, catalog_events: list) -> str | None:
        """Take the batch's catalog events into the budget, or return why not (nothing taken then)."""
        new_items: dict[str, set[str]] = {}
        new_categories: dict[str, set[str]] = {}
        with self._lock:
            for event in catalog_events:
                items, categories = self._known(event.merchant_id, bundle)
                fresh_items = new_items.setdefault(event.merchant_id, set())
                fresh_categories = new_categories.setdefault(event.merchant_id, set())
                if event.item_id not in items:
                    fresh_items.add(event.item_id)
                if event.category not in categories:
                    fresh_categories.add(event.category)
                if len(items) + len(fresh_items) > self.max_items:
                    return f"merchant {event.merchant_id!r} would have over {self.max_items} catalog items"
                if len(categories) + len(fresh_categories) > self.max_categories:
                    return f"merchant {event.merchant_id!r} would have over {self.max_categories} categories"
            for merchant, fresh in new_items.items():
                self._items[merchant] |= fresh
                self._categories[merchant] |= new_categories[merchant]
        return None

    def _known(self, merchant_id: str, bundle) -> tuple[set[str], set[str]]:
        items = self._items.setdefault(merchant_id, set())
        categories = self._categories.setdefault(merchant_id, set())
        if bundle is not None and self._seeded.get(merchant_id) != id(bundle):
            known = bundle.context.merchants.get(merchant_id)
            if known is not None:
                items.update(known.catalog)
                categories.update(info.category for info in known.catalog.values())
            self._seeded[merchant_id] = id(bundle)
        return items, categories


class Producer:
    """The streams room's :class:`~streams.producer.EventProducer` (routing by type, keyed by merchant,
    murmur2 partitions, acks=all, delivery accounting), created on first use so the API also runs without
    a broker for reads; one request's batch at a time, as the producer keeps per-batch state."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer = None
        self._lock = threading.Lock()

    def send_all(self, events: list, invalid: list[tuple[bytes, InvalidEvent]] = (), *, key_id: str | None = None) -> None:
        """Send the valid events and dead-letter the invalid ones (original bytes, reason, and the id of the
        API key that sent them: never its secret), then wait for every acknowledgement; raises
        BrokerUnavailable or DeliveryFailed."""
        from streams.producer import EventProducer

        with self._lock:
            if self._producer is None:
                self._producer = EventProducer(self.settings, source="serving-api")
            for event in events:
                self._producer.send_event(event)
            for raw, bad in invalid:
                self._producer.dead_letter(raw, bad.reason, bad.detail, **({"api_key_id": key_id} if key_id else {}))
            self._producer.flush()

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                with contextlib.suppress(Exception):  # closing a client to a dead broker
                    self._producer.close(timeout_s=5)
                self._producer = None


class TtlCache:
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
