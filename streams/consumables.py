"""Consumable categories for the synthetic generator: items people buy again, each user on their own cycle.

Design notes: `streams/README.md`, `streams/consumables.py`.

Example:
    >>> from streams.generator import GeneratorConfig, generate
    >>> events, truth = with_consumables(generate(GeneratorConfig(merchants=2, events=3000, seed=1)), seed=1)
    >>> events = list(events)
    >>> sum(row["rebuys"] for row in truth) == sum(e.event_id.startswith("rebuy-") for e in events) > 0
    True
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from streams.schemas import CatalogItem, Event, LineItem, Order


@dataclass(frozen=True)
class ConsumableSpec:
    """Which categories are consumable and how users re-buy them (see the module docstring)."""

    share: float = 0.3
    cycle_days: tuple[float, float] = (2.0, 10.0)
    jitter: float = 0.1
    loyalty: float = 0.9

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1 or not 0 < self.cycle_days[0] <= self.cycle_days[1]:
            raise ValueError("share must be in (0, 1] and 0 < cycle_days[0] <= cycle_days[1]")
        if self.jitter < 0 or not 0 <= self.loyalty <= 1:
            raise ValueError("jitter must be >= 0 and loyalty in [0, 1]")


def with_consumables(events: Iterable[Event], spec: ConsumableSpec | None = None,
                     seed: int = 0) -> tuple[Iterator[Event], list[dict]]:
    """The events with re-buy orders merged in, and the ground-truth list (filled as the iterator runs)."""
    truth: list[dict] = []
    return _merge(iter(events), spec or ConsumableSpec(), np.random.default_rng([seed, 5150]), truth), truth


def _merge(events: Iterator[Event], spec: ConsumableSpec, rng: np.random.Generator, truth: list[dict]) -> Iterator[Event]:
    categories: dict[str, dict[str, str]] = {}  # merchant -> item -> category
    consumable: dict[str, set[str]] = {}
    cycles: dict[tuple[str, str, str], float] = {}  # (merchant, user, category) -> cycle seconds
    started: dict[tuple[str, str, str], dict] = {}  # (merchant, user, item) -> its truth row
    pending: list[tuple[float, int, tuple[str, str, str], float, str]] = []
    counter = 0
    last_time = -math.inf
    for event in events:
        while pending and pending[0][0] <= event.timestamp:
            counter, rebuy = _fire(pending, spec, rng, started, counter)
            yield rebuy
        last_time = max(last_time, event.timestamp)
        if isinstance(event, CatalogItem):
            categories.setdefault(event.merchant_id, {})[event.item_id] = event.category
        elif isinstance(event, Order):
            if event.merchant_id not in consumable:
                consumable[event.merchant_id] = _pick(sorted(set(categories.get(event.merchant_id, {}).values())), spec, rng)
            for line in event.items:
                key = (event.merchant_id, event.user_id, line.item_id)
                category = categories.get(event.merchant_id, {}).get(line.item_id)
                if category not in consumable[event.merchant_id] or key in started:
                    continue
                cycle = cycles.setdefault((event.merchant_id, event.user_id, category), _cycle(spec, rng))
                started[key] = {"merchant_id": event.merchant_id, "user_id": event.user_id, "item_id": line.item_id,
                                "category": category, "cycle_s": cycle, "rebuys": 0, "price": line.unit_price,
                                "currency": event.currency}
                counter += 1
                heapq.heappush(pending, (event.timestamp + _gap(cycle, spec, rng), counter, key, cycle, event.currency))
        yield event
    while pending and pending[0][0] <= last_time:
        counter, rebuy = _fire(pending, spec, rng, started, counter)
        yield rebuy
    truth.extend({k: v for k, v in row.items() if k not in ("price", "currency")} for row in started.values())


def _pick(names: list[str], spec: ConsumableSpec, rng: np.random.Generator) -> set[str]:
    if not names:
        return set()
    count = max(1, round(spec.share * len(names)))
    return {names[i] for i in rng.choice(len(names), size=count, replace=False).tolist()}


def _cycle(spec: ConsumableSpec, rng: np.random.Generator) -> float:
    lo, hi = (math.log(d * 86_400.0) for d in spec.cycle_days)
    return float(math.exp(rng.uniform(lo, hi)))


def _gap(cycle: float, spec: ConsumableSpec, rng: np.random.Generator) -> float:
    return max(cycle * (1.0 + spec.jitter * float(rng.standard_normal())), 0.1 * cycle)


def _fire(pending: list, spec: ConsumableSpec, rng: np.random.Generator, started: dict, counter: int) -> tuple[int, Order]:
    when, number, key, cycle, currency = heapq.heappop(pending)
    row = started[key]
    row["rebuys"] += 1
    merchant_id, user_id, item_id = key
    order = Order(event_id=f"rebuy-{number}-{row['rebuys']}", order_id=f"{merchant_id}-rebuy-{number}-{row['rebuys']}",
                  merchant_id=merchant_id, user_id=user_id, timestamp=when, currency=currency,
                  items=[LineItem(item_id=item_id, quantity=1, unit_price=row["price"])])
    if rng.random() < spec.loyalty:
        counter += 1
        heapq.heappush(pending, (when + _gap(cycle, spec, rng), number, key, cycle, currency))
    return counter, order
