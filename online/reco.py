"""Candidate generation per merchant, updated online: popular items and items co-clicked/co-bought.

Design notes: `online/README.md`, `online/reco.py`.

Example:
    >>> from streams.schemas import Click, LineItem, Order
    >>> rec = Recommender()
    >>> def click(user, item, t):
    ...     return Click(event_id=f"{user}{item}{t}", merchant_id="m1", user_id=user, item_id=item,
    ...                  session_id="s", timestamp=t, position=0, page="home", device="app")
    >>> for t, (user, item) in enumerate([("a", "i1"), ("a", "i2"), ("b", "i1"), ("b", "i2"), ("c", "i3")]):
    ...     rec.observe(click(user, item, 1000.0 + t))
    >>> rec.observe(click("d", "i1", 1010.0))
    >>> rec.candidates("m1", "d", 2)     # i2 is co-clicked with i1; then the most popular
    ['i2', 'i1']
    >>> rec.observe(Order(event_id="o", order_id="o", merchant_id="m1", user_id="d", timestamp=1011.0,
    ...                   currency="EUR", items=[LineItem(item_id="i2", quantity=1, unit_price=3.0)]))
    >>> rec.exclude("m1", "d")
    {'i2'}
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from online.candidates import top_keys
from streams.schemas import CatalogItem, Click, Event, Order


@dataclass
class _User:
    recent: deque  # item ids, newest last
    bought: deque  # (item_id, timestamp)


@dataclass
class _Merchant:
    landmark: float | None = None  # forward-decay reference time
    clock: float = 0.0  # latest event time seen
    popularity: dict[str, float] = field(default_factory=dict)
    neighbors: dict[str, dict[str, float]] = field(default_factory=dict)
    users: OrderedDict[str, _User] = field(default_factory=OrderedDict)
    catalog: set[str] = field(default_factory=set)
    hits_since_rank: int = 0
    ranked: list[str] = field(default_factory=list)


class Recommender:
    """Online candidate generator per merchant (see the module docstring). Picklable, bounded memory."""

    def __init__(self, half_life_s: float = 3 * 86_400.0, history: int = 5, max_items: int = 20_000,
                 max_neighbors: int = 50, max_users: int = 50_000, exclude_seconds: float = 86_400.0,
                 order_weight: float = 3.0, rerank_every: int = 200) -> None:
        if half_life_s <= 0 or history < 1 or max_items < 1 or max_neighbors < 1 or max_users < 1:
            raise ValueError("half_life_s must be > 0 and history, max_items, max_neighbors, max_users >= 1")
        self.half_life_s = half_life_s
        self.history = history
        self.max_items = max_items
        self.max_neighbors = max_neighbors
        self.max_users = max_users
        self.exclude_seconds = exclude_seconds
        self.order_weight = order_weight
        self.rerank_every = rerank_every
        self.merchants: dict[str, _Merchant] = {}
        self.n_observed = 0

    # -- updating -----------------------------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """Fold one event in: catalog items become candidates, clicks and orders move the statistics
        (impressions that were not clicked are not interest and are ignored)."""
        merchant = self.merchants.get(event.merchant_id) or self._merchant(event.merchant_id)
        if event.timestamp > merchant.clock:  # max(), without the call: this runs for every event
            merchant.clock = event.timestamp
        if isinstance(event, Click):  # the most frequent type first
            if event.clicked:
                self._interaction(merchant, event.user_id, event.item_id, event.timestamp, 1.0)
        elif isinstance(event, Order):
            user = self._user(merchant, event.user_id)
            for line in event.items:
                self._interaction(merchant, event.user_id, line.item_id, event.timestamp, self.order_weight)
                user.bought.append((line.item_id, event.timestamp))
        elif isinstance(event, CatalogItem):
            if len(merchant.catalog) < self.max_items:
                merchant.catalog.add(event.item_id)
            return
        self.n_observed += 1

    def _merchant(self, merchant_id: str) -> _Merchant:
        found = self.merchants.get(merchant_id)
        if found is None:
            found = self.merchants[merchant_id] = _Merchant()
        return found

    def _user(self, merchant: _Merchant, user_id: str) -> _User:
        user = merchant.users.get(user_id)
        if user is None:
            user = merchant.users[user_id] = _User(deque(maxlen=self.history), deque(maxlen=self.history))
            if len(merchant.users) > self.max_users:
                merchant.users.popitem(last=False)
        else:
            merchant.users.move_to_end(user_id)
        return user

    def _decayed(self, merchant: _Merchant, timestamp: float, weight: float) -> float:
        if merchant.landmark is None:
            merchant.landmark = timestamp
        exponent = (timestamp - merchant.landmark) * math.log(2) / self.half_life_s
        if exponent > 200:  # rescale everything to a newer landmark before exp() overflows
            shift = math.exp(-exponent)
            merchant.popularity = {i: c * shift for i, c in merchant.popularity.items()}
            merchant.neighbors = {i: {j: c * shift for j, c in row.items()} for i, row in merchant.neighbors.items()}
            merchant.landmark, exponent = timestamp, 0.0
        return weight * math.exp(exponent)

    def _interaction(self, merchant: _Merchant, user_id: str, item_id: str, timestamp: float, weight: float) -> None:
        value = self._decayed(merchant, timestamp, weight)
        merchant.popularity[item_id] = merchant.popularity.get(item_id, 0.0) + value
        user = self._user(merchant, user_id)
        for other in dict.fromkeys(user.recent):  # ordered (a set would iterate by per-process string hash)
            if other != item_id:
                self._link(merchant, other, item_id, value)
                self._link(merchant, item_id, other, value)
        if not user.recent or user.recent[-1] != item_id:
            user.recent.append(item_id)
        merchant.hits_since_rank += 1
        if len(merchant.popularity) > 2 * self.max_items:
            self._prune_items(merchant)

    def _link(self, merchant: _Merchant, a: str, b: str, value: float) -> None:
        row = merchant.neighbors.get(a)
        if row is None:
            row = merchant.neighbors[a] = {}
        row[b] = row.get(b, 0.0) + value
        if len(row) > 2 * self.max_neighbors:
            merchant.neighbors[a] = dict(heapq.nlargest(self.max_neighbors, row.items(), key=lambda kv: kv[1]))

    def _prune_items(self, merchant: _Merchant) -> None:
        keep = dict(heapq.nlargest(self.max_items, merchant.popularity.items(), key=lambda kv: kv[1]))
        merchant.popularity = keep
        merchant.neighbors = {i: row for i, row in merchant.neighbors.items() if i in keep}

    # -- reading ------------------------------------------------------------------------------------------

    def popular(self, merchant_id: str, limit: int) -> list[str]:
        """The merchant's most popular items by decayed count, then catalog items never interacted with."""
        merchant = self.merchants.get(merchant_id)
        if merchant is None:
            return []
        if merchant.hits_since_rank >= self.rerank_every or len(merchant.ranked) < min(limit, len(merchant.popularity)):
            merchant.ranked = top_keys(merchant.popularity, max(limit, 500))
            merchant.hits_since_rank = 0
        out = merchant.ranked[:limit]
        if len(out) < limit and merchant.catalog:
            seen = set(out)
            out += sorted(merchant.catalog - seen - merchant.popularity.keys())[: limit - len(out)]
        return out

    def related(self, merchant_id: str, user_id: str, limit: int) -> list[str]:
        """Items co-clicked/co-bought with the user's recent items (newer items count more)."""
        merchant = self.merchants.get(merchant_id)
        user = merchant.users.get(user_id) if merchant is not None else None
        if user is None:
            return []
        scores: dict[str, float] = {}
        for age, item in enumerate(reversed(user.recent)):
            recency = 0.5**age
            for other, value in merchant.neighbors.get(item, {}).items():
                scores[other] = scores.get(other, 0.0) + recency * value
        return [i for i, _ in heapq.nlargest(limit, scores.items(), key=lambda kv: kv[1])]

    def exclude(self, merchant_id: str, user_id: str) -> set[str]:
        """Items the user bought within ``exclude_seconds`` of the merchant's latest event."""
        merchant = self.merchants.get(merchant_id)
        user = merchant.users.get(user_id) if merchant is not None else None
        if user is None:
            return set()
        return {item for item, when in user.bought if merchant.clock - when <= self.exclude_seconds}

    def candidates(self, merchant_id: str, user_id: str, limit: int = 100) -> list[str]:
        """Up to ``limit`` distinct items: related to the user's recent items first, then popular ones,
        minus :meth:`exclude`."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        excluded = self.exclude(merchant_id, user_id)
        out: dict[str, None] = {}
        for item in self.related(merchant_id, user_id, limit):
            if item not in excluded:
                out[item] = None
        if len(out) < limit:
            for item in self.popular(merchant_id, limit + len(excluded) + len(out)):
                if item not in excluded:
                    out.setdefault(item, None)
                if len(out) >= limit:
                    break
        return list(out)[:limit]

    def recommend(self, model, featurizer, context, merchant_id: str, user_id: str, k: int = 10,
                  **options) -> list[tuple[str, float]]:
        """Top-``k`` ``(item_id, p_click)`` of this recommender's candidates ranked by ``model``."""
        return recommend(model, featurizer, context, merchant_id, user_id, k, recommender=self, **options)

    def recent_items(self, merchant_id: str, user_id: str) -> list[str]:
        merchant = self.merchants.get(merchant_id)
        user = merchant.users.get(user_id) if merchant is not None else None
        return list(user.recent) if user is not None else []

    def size(self) -> dict[str, int]:
        """Entry counts (what bounds the memory): items, co-occurrence links, users."""
        return {
            "items": sum(len(m.popularity) for m in self.merchants.values()),
            "links": sum(len(row) for m in self.merchants.values() for row in m.neighbors.values()),
            "users": sum(len(m.users) for m in self.merchants.values()),
        }


def recommend(model, featurizer, context, merchant_id: str, user_id: str, k: int = 10, *,
              recommender: Recommender, timestamp: float | None = None,
              candidate_limit: int = 200) -> list[tuple[str, float]]:
    """Top-``k`` ``(item_id, p_click)``: the recommender's candidates ranked by the click model, through the
    path serving uses (:class:`online.click_ranking.ClickRanker`, uncached: the context keeps changing)."""
    from online.click_ranking import ClickRanker

    ranker = ClickRanker(featurizer.bits, cached=False, featurizer=featurizer)  # holds nothing but the featurizer
    when = time.time() if timestamp is None else timestamp
    return [(r.item_id, r.score) for r in ranker.rank(model, context, recommender, merchant_id, user_id, k, when=when,
                                                      candidate_limit=candidate_limit)]


__all__ = ["Recommender", "recommend"]
