"""Small seeded event streams with one known change, for the drift room's tests and doctests.

The platform's traffic generator is ``streams.generator``; this one is deliberately tiny and fully
controlled (a few merchants, one change at a known event), so a test can say exactly what must fire.

* ``kind="prices"`` — at ``shift_at`` the merchant re-prices its catalog (new catalog events, prices x
  ``magnitude + 1``): feature detectors on price must fire.
* ``kind="preferences"`` — users' tastes flip: which categories they click changes, so the model's error
  rises and the clicked category shares move.

Example:
    >>> events = list(synthetic_events(n=2000, seed=1))
    >>> sum(1 for e in events if type(e).__name__ != "CatalogItem")
    2000
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

from streams.schemas import CatalogItem, Click, Event, LineItem, Order

CATEGORIES = ("shoes", "shirts", "bags", "hats", "watches", "socks")
DEVICES = ("desktop", "mobile", "tablet", "app")
PAGES = ("home", "search", "category", "product", "recommendation")


def _catalog(merchant: str, rng: np.random.Generator, items: int, ts: float, scale: float = 1.0,
             base: np.ndarray | None = None) -> tuple[list[CatalogItem], np.ndarray, np.ndarray]:
    categories = rng.integers(0, len(CATEGORIES), items) if base is None else base
    prices = np.round(rng.lognormal(3.0, 0.6, items) * scale, 2)
    events = [CatalogItem(event_id=f"{merchant}-cat-{ts:.0f}-{k}", merchant_id=merchant, item_id=f"i{k}",
                          category=CATEGORIES[categories[k]], price=float(prices[k]), title=f"item {k}", timestamp=ts)
              for k in range(items)]
    return events, categories, prices


def synthetic_events(merchants: Sequence[str] = ("m1", "m2"), n: int = 20_000, seed: int = 7, *,
                     shift_merchant: str | None = None, shift_at: int | None = None,
                     kind: Literal["prices", "preferences"] = "prices", magnitude: float = 1.0,
                     items: int = 60, users: int = 300, start_time: float = 1_700_000_000.0,
                     seconds_per_event: float = 20.0) -> Iterator[Event]:
    """Yield catalog events, then ``n`` clicks and orders in time order (``shift_at`` counts clicks+orders)."""
    rng = np.random.default_rng(seed)
    catalogs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for merchant in merchants:
        events, categories, prices = _catalog(merchant, rng, items, start_time)
        catalogs[merchant] = (categories, prices)
        yield from events
    prefs = {m: rng.normal(0, 1.5, (users, len(CATEGORIES))) for m in merchants}
    weights = np.linspace(2.0, 1.0, len(merchants))
    weights /= weights.sum()
    ts, emitted, order_no = start_time, 0, 0
    while emitted < n:
        ts += rng.exponential(seconds_per_event)
        merchant = merchants[int(rng.choice(len(merchants), p=weights))]
        if shift_at is not None and emitted == shift_at and shift_merchant is not None:
            yield from _shift(shift_merchant, kind, magnitude, rng, catalogs, prefs, items, ts)
        categories, prices = catalogs[merchant]
        user = int(rng.integers(users))
        item = int(rng.integers(items))
        position = int(rng.integers(0, 10))
        score = prefs[merchant][user, categories[item]] - 0.25 * position - 0.4 * math.log1p(prices[item] / 20) - 1.0
        clicked = bool(rng.random() < 1 / (1 + math.exp(-score)))
        yield Click(event_id=f"{merchant}-e{emitted}", merchant_id=merchant, user_id=f"u{user}", item_id=f"i{item}",
                    session_id=f"s{user}-{int(ts // 1800)}", timestamp=ts, position=position,
                    page=PAGES[int(rng.integers(len(PAGES)))], device=DEVICES[int(rng.integers(len(DEVICES)))],
                    clicked=clicked)
        emitted += 1
        if clicked and emitted < n and rng.random() < 0.15:
            ts += rng.exponential(5.0)
            order_no += 1
            yield Order(event_id=f"{merchant}-o{order_no}", order_id=f"o{order_no}", merchant_id=merchant,
                        user_id=f"u{user}", timestamp=ts, currency="EUR",
                        items=[LineItem(item_id=f"i{item}", quantity=1, unit_price=float(prices[item]))])
            emitted += 1


def _shift(merchant: str, kind: str, magnitude: float, rng: np.random.Generator,
           catalogs: dict[str, tuple[np.ndarray, np.ndarray]], prefs: dict[str, np.ndarray], items: int,
           ts: float) -> Iterator[Event]:
    categories, _ = catalogs[merchant]
    if kind == "prices":
        events, _, prices = _catalog(merchant, rng, items, ts, scale=1.0 + magnitude, base=categories)
        catalogs[merchant] = (categories, prices)
        yield from events
    elif kind == "preferences":
        prefs[merchant] = -magnitude * prefs[merchant]
    else:
        raise ValueError(f"unknown shift kind {kind!r}: use 'prices' or 'preferences'")
