"""Prequential ("predict, then learn") runs over an event stream, feeding a :class:`DriftMonitor`.

Each click is first scored by an online model, then learned from, so the probability ``p`` is an honest
out-of-sample prediction: its error stream is what the error detectors watch. The model is the online
room's FTRL-Proximal learner (``online.learners``), in mini-batches, over the same hashed features
(``streams.features``); River's own LogisticRegression costs ~0.5 ms per click here because its dot
product walks the whole weight dict.

Events come from a JSONL file (as written by ``fedstream generate --out``) or the Kafka topics.

Example:
    >>> from streams.schemas import CatalogItem, Click
    >>> catalog = CatalogItem(event_id="c", merchant_id="m1", item_id="i1", category="shoes", price=9.0,
    ...                       title="t", timestamp=1.7e9)
    >>> clicks = [Click(event_id=f"e{k}", merchant_id="m1", user_id="u", item_id="i1", session_id="s",
    ...                 timestamp=1.7e9 + k, position=0, page="home", device="app", clicked=k % 2 == 0)
    ...           for k in range(4)]
    >>> [p if p is None else round(p, 2) for _, p in prequential([catalog, *clicks], bits=12)][:2]
    [None, 0.5]
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedstream.errors import ExpectedFailure
from fedstream.settings import Settings
from streams.features import FeatureContext, Featurizer, as_dict
from streams.schemas import CatalogItem, Click, Event, InvalidEvent, Order, decode_event



class EmptyStream(ExpectedFailure, ValueError):
    """No usable events where some were expected (empty file, empty topics, nothing after --since)."""


def make_learner(bits: int = 16):
    """The online room's FTRL-Proximal learner: the same model family the learner workers run."""
    from online.learners import FTRLProximalClassifier

    return FTRLProximalClassifier(bits=bits)


def learner_name(model) -> str:
    return f"{type(model).__module__}.{type(model).__name__}"


def prequential(events: Iterable[Event], bits: int = 16, model=None, batch: int = 64
                ) -> Iterator[tuple[Event, float | None]]:
    """Yield ``(event, p)`` in order: ``p`` is P(click) predicted before learning the click; None otherwise.

    Clicks are scored and learned in mini-batches of ``batch`` (test-then-train per batch): every click is
    still predicted by a model that has not seen it, and the vectorized learners run ~10x faster than
    row by row. Features are read per event, before the event enters the context.
    """
    featurizer, context = Featurizer(bits), FeatureContext()
    model = make_learner(bits) if model is None else model
    vectorized = hasattr(model, "predict_proba_many") and hasattr(model, "learn_many")
    pending: list[Event] = []
    rows: list[tuple[np.ndarray, np.ndarray, bool]] = []
    for event in events:
        if isinstance(event, Click):
            indices, values = featurizer.transform(event, context)
            rows.append((indices, values, event.clicked))
        pending.append(event)
        context.observe(event)
        if len(rows) >= (batch if vectorized else 1):
            yield from _score_and_learn(model, pending, rows, vectorized)
            pending, rows = [], []
    yield from _score_and_learn(model, pending, rows, vectorized)


def _score_and_learn(model, pending: list[Event], rows: list, vectorized: bool) -> Iterator[tuple[Event, float | None]]:
    if rows and vectorized:
        indices = np.stack([r[0] for r in rows])
        values = np.stack([r[1] for r in rows])
        labels = np.array([r[2] for r in rows])
        scores = iter(np.asarray(model.predict_proba_many(indices, values), dtype=float).tolist())
        model.learn_many(indices, values, labels)
    elif rows:
        x = as_dict(rows[0][0], rows[0][1])
        scores = iter([float(model.predict_proba_one(x).get(True, 0.0))])
        model.learn_one(x, rows[0][2])
    else:
        scores = iter(())
    for event in pending:
        yield event, (next(scores) if isinstance(event, Click) else None)


def read_events_file(path: str | Path) -> Iterator[Event]:
    """Decode a JSONL events file; a bad line raises ``ValueError`` naming the line and the reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"events file not found: {path}")
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield decode_event(line.rstrip(b"\n"), now=time.time() + 10 * 365 * 86400)
            except InvalidEvent as bad:
                raise ValueError(f"{path}:{number}: invalid event ({bad.reason}): {bad.detail}") from None


def read_events_kafka(settings: Settings, poll_timeout_s: float = 3.0, max_wait_s: float = 300.0) -> list[Event]:
    """All events on the event topics, read to their end in event order (:func:`streams.reading.read_events`;
    ``poll_timeout_s``: the longest wait for a record before the end counts as reached)."""
    from streams.reading import read_events

    return read_events(settings, idle_timeout_s=poll_timeout_s, max_wait_s=max_wait_s)


@dataclass
class MerchantTrace:
    """What the report plots for one merchant: per-click predictions, labels and feature values."""

    merchant_id: str
    click_times: list[float] = field(default_factory=list)
    click_index: list[int] = field(default_factory=list)
    y: list[bool] = field(default_factory=list)
    p: list[float] = field(default_factory=list)
    events: int = 0
    clicks: int = 0
    clicked: int = 0
    orders: int = 0
    features: dict[str, list[tuple[float, object]]] = field(default_factory=dict)

    def add_feature(self, name: str, timestamp: float, value: object) -> None:
        self.features.setdefault(name, []).append((timestamp, value))


def run_monitor(events: Iterable[Event], monitor, *, bits: int = 16, model=None,
                trace: bool = True) -> dict[str, MerchantTrace]:
    """Prequential run feeding ``monitor`` (a :class:`~drift.monitor.DriftMonitor`); returns per-merchant traces."""
    traces: dict[str, MerchantTrace] = {}
    seen = 0
    for event, p in prequential(events, bits=bits, model=model):
        monitor.observe(event, p)
        if isinstance(event, CatalogItem):
            continue
        seen += 1
        if not trace:
            continue
        t = traces.get(event.merchant_id) or traces.setdefault(event.merchant_id, MerchantTrace(event.merchant_id))
        t.events += 1
        ts = event.timestamp
        t.add_feature("hour", ts, time.gmtime(ts).tm_hour)  # per event: what the hour plot shows
        if isinstance(event, Click):
            t.clicks += 1
            t.clicked += int(event.clicked)
            t.click_times.append(ts)
            t.click_index.append(monitor.merchant_index[event.merchant_id] - 1)
            t.y.append(event.clicked)
            t.p.append(p)
            info = monitor.context.item(event.merchant_id, event.item_id)
            if info is not None:
                t.add_feature("price", ts, info.price)
                if event.clicked:
                    t.add_feature("category", ts, info.category)
        elif isinstance(event, Order):
            t.orders += 1
            for line in event.items:
                info = monitor.context.item(event.merchant_id, line.item_id)
                if info is not None:
                    t.add_feature("category", ts, info.category)
    if seen == 0:
        raise EmptyStream("no click or order events to run over")
    return traces
