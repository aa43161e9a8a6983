"""Bounded, online candidate sources per merchant, and the raw statistics the ranker's features read.

Design notes: `online/README.md`, `online/candidates.py`.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from sys import intern
from typing import TYPE_CHECKING

import numpy as np

from online.inline_fields import InlineFields
from online.link_rows import ItemCodes, LinkRows, prune_rows
from streams.schemas import CatalogItem, Click, Event, Order

if TYPE_CHECKING:  # the encoder's module (scipy, tokenizers) is imported only where text is on
    from streams.text import ItemTextEmbeddings

HISTORY, COOCCUR, TRANSITION, POPULAR, CATALOG = 1, 2, 4, 8, 16
LOG2 = math.log(2)
SOURCE_NAMES = {HISTORY: "history", COOCCUR: "co-occurrence", TRANSITION: "transition", POPULAR: "popular",
                CATALOG: "catalog"}


def source_name(mask: int) -> str:
    """The first source (in the order history, co-occurrence, transition, popular, catalog) of a mask."""
    for bit, name in SOURCE_NAMES.items():
        if mask & bit:
            return name
    return "none"


@dataclass
class Shopper(InlineFields):
    """One user of one merchant: chosen items ``{item: [count, orders, last_time]}`` and recent steps."""

    items: dict[str, list] = field(default_factory=dict)  # in recency order, newest last
    recent: deque = field(default_factory=deque)  # item ids, newest last (maxlen set by the state)
    last_step: tuple[str, ...] = ()
    last_time: float = -math.inf
    last_session: str | None = None
    categories: dict[str, int] = field(default_factory=dict)
    total: int = 0


@dataclass
class ItemStats(InlineFields):
    """Choices of an item, how many were repeats by the same user, and the log-gaps of those repeats."""

    count: float = 0.0
    repeats: float = 0.0
    gap_sum: float = 0.0
    gap_sq: float = 0.0


@dataclass
class Shop(InlineFields):
    """A merchant's candidate statistics (see the module docstring)."""

    clock: float = -math.inf
    landmark: float | None = None
    popularity: dict[str, float] = field(default_factory=dict)  # forward-decayed
    stats: dict[str, ItemStats] = field(default_factory=dict)
    codes: ItemCodes = field(default_factory=ItemCodes, compare=False)  # item codes of the link rows (how, not what)
    co: LinkRows | None = None  # co-occurrence links (over codes; made by CandidateState.shop)
    trans: LinkRows | None = None  # transition links: previous step's items -> this step's
    users: OrderedDict = field(default_factory=OrderedDict)
    catalog: dict[str, str] = field(default_factory=dict)  # item -> category
    unchosen: dict[str, None] = field(default_factory=dict)  # catalog items nobody chose yet (cold start)
    totals: ItemStats = field(default_factory=ItemStats)  # merchant-wide repeat statistics
    ranked: list[str] = field(default_factory=list)
    since_rank: int = 0
    text: ItemTextEmbeddings | None = None  # catalog items' text embeddings (``CandidateState(text=True)``)
    text_open: bytearray = field(default_factory=bytearray)  # per text row: 1 while the item is unchosen
    text_items: list[str] = field(default_factory=list)  # item of each text row
    pending: dict[str, str] = field(default_factory=dict)  # catalog texts not embedded yet

    def repeat_rate(self, item: str, prior: float = 5.0) -> float:
        """Share of an item's choices that were repeats, shrunk towards the merchant's share."""
        return item_repeat_rate(self.stats.get(item), merchant_priors(self.totals)[0], prior)

    def gap_model(self, item: str, prior: float = 3.0) -> tuple[float, float]:
        """Mean and standard deviation of log seconds between an item's repeats (shrunk to the merchant's)."""
        _, mean0, var0 = merchant_priors(self.totals)
        return item_gap_model(self.stats.get(item), mean0, var0, prior)


def merchant_priors(totals: ItemStats) -> tuple[float, float, float]:
    """A merchant's repeat share, and mean and variance of log seconds between repeats (the items' priors)."""
    base = (totals.repeats + 0.1) / (totals.count + 1.0)
    if not totals.repeats:
        return base, math.log(7 * 86_400.0), 4.0
    mean0 = totals.gap_sum / totals.repeats
    return base, mean0, max(totals.gap_sq / totals.repeats - mean0 * mean0, 0.25)


def item_repeat_rate(stats: ItemStats | None, base: float, prior: float = 5.0) -> float:
    """:meth:`Shop.repeat_rate` from the item's statistics and the merchant's share ``base``."""
    return base if stats is None else (stats.repeats + prior * base) / (stats.count + prior)


def item_gap_model(stats: ItemStats | None, mean0: float, var0: float, prior: float = 3.0) -> tuple[float, float]:
    """:meth:`Shop.gap_model` from the item's statistics and the merchant's priors."""
    n = stats.repeats if stats is not None else 0.0
    if not n:
        return mean0, math.sqrt(var0)
    mean = (stats.gap_sum + prior * mean0) / (n + prior)
    var = (stats.gap_sq + prior * (var0 + mean0 * mean0)) / (n + prior) - mean * mean
    return mean, math.sqrt(max(var, 0.25))


def top_keys(counts: dict[str, float], depth: int) -> list[str]:
    """The ``depth`` keys with the largest counts, largest first, ties in insertion order: exactly
    ``heapq.nlargest(depth, counts.items(), key=value)`` (which sorts when ``depth`` covers them all), and past
    ``depth`` keys with numpy: a merchant's popularity table holds up to ``2 * max_items`` entries and is
    re-ranked every ``rerank_every`` choices (``nlargest`` 3.6x slower at 400 keys, 2.7x at 5,000, 1.15x at 40,000).

    >>> top_keys({"a": 1.0, "b": 3.0, "c": 3.0, "d": 2.0}, 3)
    ['b', 'c', 'd']
    """
    if len(counts) <= depth:
        return sorted(counts, key=counts.get, reverse=True)
    keys = list(counts)
    values = np.fromiter(counts.values(), dtype=np.float64, count=len(keys))
    kth = np.partition(values, len(keys) - depth)[len(keys) - depth]  # the depth-th largest count
    above = np.flatnonzero(values > kth)
    top = np.concatenate([above, np.flatnonzero(values == kth)[: depth - len(above)]])
    top = top[np.argsort(-values[top], kind="stable")]
    return [keys[i] for i in top.tolist()]


class CandidateState:
    """Candidate sources of every merchant (see the module docstring). Picklable; memory is bounded.

    Item and user ids are kept interned (``sys.intern`` where an event's ids come in: :meth:`step_of`,
    :meth:`fold`, ``ShopRecommender.observe_block``): one object per id, so a lookup matches a stored key at
    its first compare instead of reading that key's hash and characters, another object in a large heap (a
    decoded event's ids are new strings; ``online/README.md``, session 10)."""

    def __init__(self, half_life_s: float = 7 * 86_400.0, history: int = 10, max_items: int = 20_000,
                 max_neighbors: int = 50, max_users: int = 50_000, max_user_items: int = 100,
                 session_gap_s: float = 3600.0, rerank_every: int = 200, text: bool = False,
                 text_batch: int = 256) -> None:
        if half_life_s <= 0 or min(history, max_items, max_neighbors, max_users, max_user_items) < 1:
            raise ValueError("half_life_s must be > 0 and history, max_items, max_neighbors, max_users, "
                             "max_user_items >= 1")
        self.half_life_s = half_life_s
        self.history = history
        self.max_items = max_items
        self.max_neighbors = max_neighbors
        self.max_users = max_users
        self.max_user_items = max_user_items
        self.session_gap_s = session_gap_s
        self.rerank_every = rerank_every
        self.text = text
        self.text_batch = max(1, text_batch)
        self.encoder = None  # loaded on the first catalog text to embed; not pickled
        self.shops: dict[str, Shop] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "encoder": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"text": False, "text_batch": 256, **state})
        self._intern_ids()
        for shop in self.shops.values():
            if not isinstance(shop.co, LinkRows):  # pickled before the link rows: rows held as dicts
                self._link_rows_from_dicts(shop)

    def _link_rows_from_dicts(self, shop: Shop) -> None:
        shop.codes = ItemCodes()
        for name, both in (("co", True), ("trans", False)):
            rows = getattr(shop, name)
            shop.__dict__.pop(f"totals_{name}", None)  # the rows' sums (older pickles did not keep them)
            setattr(shop, name, LinkRows.from_dicts(shop.codes, self.max_neighbors, both, rows))

    def _intern_ids(self) -> None:
        """Intern the ids of an unpickled state, as the ids that come in are (see the class docstring).

        Pickling keeps one object per id (its memo), so interning the key objects of each shop's item and
        user tables makes every reference to them the interned object, in place (no table rebuilt, no order
        changed). An id already interned as another object (a state loaded mid-run) keeps its own object:
        lookups still match it, by value."""
        for merchant_id, shop in self.shops.items():
            intern(merchant_id)
            for table in (shop.catalog, shop.stats, shop.popularity, shop.users):
                deque(map(intern, table), maxlen=0)

    # -- updating -----------------------------------------------------------------------------------------

    def shop(self, merchant_id: str) -> Shop:
        found = self.shops.get(merchant_id)
        if found is None:
            found = self.shops[merchant_id] = Shop()
            found.co = LinkRows(found.codes, self.max_neighbors, both=True)
            found.trans = LinkRows(found.codes, self.max_neighbors, both=False)
        return found

    def user(self, shop: Shop, user_id: str, create: bool = False) -> Shopper | None:
        found = shop.users.get(user_id)
        if found is not None:
            shop.users.move_to_end(user_id)
        elif create:
            found = shop.users[user_id] = Shopper(recent=deque(maxlen=self.history))
            if len(shop.users) > self.max_users:
                shop.users.popitem(last=False)
        return found

    @staticmethod
    def step_of(event: Event) -> tuple[tuple[str, ...], bool] | None:
        """The items an event chose (ids interned) and whether it is an order (None when it chose nothing)."""
        if type(event) is Click:
            return ((intern(event.item_id),), False) if event.clicked else None
        if type(event) is Order:
            return tuple(dict.fromkeys(intern(line.item_id) for line in event.items)), True
        return None

    def observe(self, event: Event) -> None:
        """Fold one event in (catalog items, clicked impressions and orders; unclicked impressions are ignored)."""
        self.fold(event, self.step_of(event))

    def fold(self, event: Event, step: tuple[tuple[str, ...], bool] | None) -> None:
        """:meth:`observe` with the event's :meth:`step_of` already known (the recommender computes it first)."""
        shop = self.shop(event.merchant_id)
        if event.timestamp > shop.clock:
            shop.clock = event.timestamp
        if type(event) is CatalogItem:
            item = intern(event.item_id)
            if item in shop.catalog or len(shop.catalog) < self.max_items:
                shop.catalog[item] = event.category
                if item not in shop.stats:
                    shop.unchosen[item] = None
                if self.text:
                    from streams.text import item_text

                    shop.pending[item] = item_text(event.title, event.category, event.brand or "")
                    if len(shop.pending) >= self.text_batch:
                        self.embed_pending(shop)
            return
        if step is not None:
            self.choose(shop, intern(event.user_id), step[0], event.timestamp, step[1],
                        getattr(event, "session_id", None))

    def choose(self, shop: Shop, user_id: str, items: tuple[str, ...], when: float, is_order: bool,
               session: str | None) -> None:
        """One step of a user: ``items`` chosen together at ``when``."""
        if len(items) == 1:
            self.choose_one(shop, user_id, items, when, is_order, session)
            return
        user = self.user(shop, user_id, create=True)
        value = self._decayed(shop, when)
        same_session = (session is not None and session == user.last_session) or when - user.last_time <= self.session_gap_s
        popularity, unchosen, chosen_before = shop.popularity, shop.unchosen, user.items
        pool = dict.fromkeys((*user.recent, *items))  # earlier items, and the same basket
        for item in items:
            if item in unchosen:
                del unchosen[item]
                if shop.text is not None and item in shop.text.index:
                    shop.text_open[shop.text.index[item]] = 0
            popularity[item] = popularity.get(item, 0.0) + value
            self._repeat_stats(shop, chosen_before.get(item), item, when)
            shop.co.queue(item, [other for other in pool if other != item and (other not in items or other < item)])
            if same_session:
                shop.trans.queue(item, [p for p in user.last_step if p != item])
        self._remember(shop, user, items, when, is_order)
        user.last_step, user.last_time, user.last_session = items, when, session
        shop.since_rank += len(items)
        if len(shop.stats) > 2 * self.max_items:
            self._prune_items(shop)

    def choose_one(self, shop: Shop, user_id: str, items: tuple[str], when: float, is_order: bool,
                   session: str | None) -> None:
        """:meth:`choose` of a one-item step (every click: most steps), its helpers inlined: the same state."""
        item, users = items[0], shop.users
        user = users.get(user_id)
        if user is not None:
            users.move_to_end(user_id)
        else:
            user = self.user(shop, user_id, create=True)
        landmark = shop.landmark
        exponent = (when - landmark) * LOG2 / self.half_life_s if landmark is not None else math.inf
        value = math.exp(exponent) if exponent <= 200 else self._decayed(shop, when)
        same_session = ((session is not None and session == user.last_session)
                        or when - user.last_time <= self.session_gap_s)
        unchosen = shop.unchosen
        if item in unchosen:
            del unchosen[item]
            text = shop.text
            if text is not None and item in text.index:
                shop.text_open[text.index[item]] = 0
        popularity = shop.popularity
        popularity[item] = popularity.get(item, 0.0) + value
        chosen = user.items
        entry = chosen.get(item)
        stats = shop.stats.get(item)
        if stats is None:
            stats = shop.stats[item] = ItemStats()
        totals = shop.totals
        stats.count += 1
        totals.count += 1
        if entry is not None:
            gap = math.log(max(when - entry[2], 1.0))
            stats.repeats += 1
            stats.gap_sum += gap
            stats.gap_sq += gap * gap
            totals.repeats += 1
            totals.gap_sum += gap
            totals.gap_sq += gap * gap
            del chosen[item]  # re-inserted: the dict stays in recency order, newest last
        else:
            entry = [0, 0, when]
        recent = user.recent
        if recent:
            others = dict.fromkeys(recent)
            others.pop(item, None)
            shop.co.queue(item, others)
        last = user.last_step
        if same_session and last:
            shop.trans.queue(item, last if item not in last else [p for p in last if p != item])
        chosen[item] = entry
        entry[0] += 1
        entry[1] += is_order
        entry[2] = when
        category = shop.catalog.get(item)
        if category is not None:
            categories = user.categories
            categories[category] = categories.get(category, 0) + 1
        if not recent or recent[-1] != item:
            recent.append(item)
        user.total += 1
        if len(chosen) > 2 * self.max_user_items:
            user.items = dict(list(chosen.items())[-self.max_user_items:])
        user.last_step, user.last_time, user.last_session = items, when, session
        shop.since_rank += 1
        if len(shop.stats) > 2 * self.max_items:
            self._prune_items(shop)

    def _remember(self, shop: Shop, user: Shopper, items: tuple[str, ...], when: float, is_order: bool) -> None:
        """The user's side of a step: per-item count, orders and last time (recency order), categories, recent."""
        chosen, catalog, categories, recent = user.items, shop.catalog, user.categories, user.recent
        for item in items:
            entry = chosen.pop(item, None)  # re-inserted: the dict stays in recency order, newest last
            if entry is None:
                entry = [0, 0, when]
            chosen[item] = entry
            entry[0] += 1
            entry[1] += is_order
            entry[2] = when
            category = catalog.get(item)
            if category is not None:
                categories[category] = categories.get(category, 0) + 1
            if not recent or recent[-1] != item:
                recent.append(item)
        user.total += len(items)
        if len(chosen) > 2 * self.max_user_items:
            user.items = dict(list(chosen.items())[-self.max_user_items:])

    def embed_pending(self, shop: Shop | None = None) -> int:
        """Embed the catalog texts that arrived since the last call (one shop, or all), in batches; returns
        how many items were embedded. Never called while proposing."""
        done = 0
        for one in [shop] if shop is not None else list(self.shops.values()):
            if not one.pending:
                continue
            from streams.text import ItemTextEmbeddings, TextEncoder

            if self.encoder is None:
                self.encoder = TextEncoder.load()
            one.text = one.text or ItemTextEmbeddings()
            one.text.encoder = self.encoder
            done += one.text.update(one.pending, batch_size=64)
            rows = len(one.text.index)
            one.text_items.extend(itertools.islice(one.text.index, len(one.text_items), None))  # rows in insertion order
            one.text_open.extend(bytes(rows - len(one.text_open)))
            for item in one.pending:
                one.text_open[one.text.index[item]] = item in one.unchosen
            one.pending.clear()
        return done

    @staticmethod
    def _repeat_stats(shop: Shop, entry: list | None, item: str, when: float) -> None:
        """Count a choice of ``item``; ``entry`` is the user's earlier ``[count, orders, last_time]`` of it, if any."""
        stats = shop.stats.get(item)
        if stats is None:
            stats = shop.stats[item] = ItemStats()
        stats.count += 1
        totals = shop.totals
        totals.count += 1
        if entry is not None:
            gap = math.log(max(when - entry[2], 1.0))
            for target in (stats, totals):
                target.repeats += 1
                target.gap_sum += gap
                target.gap_sq += gap * gap

    def _decayed(self, shop: Shop, when: float) -> float:
        if shop.landmark is None:
            shop.landmark = when
        exponent = (when - shop.landmark) * LOG2 / self.half_life_s
        if exponent > 200:  # rescale to a newer landmark before exp() overflows
            shift = math.exp(-exponent)
            shop.popularity = {i: c * shift for i, c in shop.popularity.items()}
            shop.landmark, exponent = when, 0.0
        return math.exp(exponent)

    def _prune_items(self, shop: Shop) -> None:
        keep = dict(heapq.nlargest(self.max_items, shop.popularity.items(), key=lambda kv: kv[1]))
        shop.popularity = keep
        shop.stats = {i: s for i, s in shop.stats.items() if i in keep}
        shop.codes = prune_rows(shop.codes, [shop.co, shop.trans], keep)
        shop.ranked = []

    # -- reading ------------------------------------------------------------------------------------------

    def popular(self, shop: Shop, limit: int) -> list[str]:
        """Most popular items by decayed count (re-ranked every ``rerank_every`` choices)."""
        if shop.since_rank >= self.rerank_every or len(shop.ranked) < min(limit, len(shop.popularity)):
            shop.ranked = top_keys(shop.popularity, max(limit, 200))
            shop.since_rank = 0
        return shop.ranked[:limit]

    def related(self, shop: Shop, table: LinkRows, sources: list[tuple[str, float]], limit: int) -> dict[str, float]:
        """Items linked from weighted source items: Σ weight · link / (the source row's total)
        (:meth:`LinkRows.related`)."""
        return table.related(sources, limit)

    def propose(self, merchant_id: str, user_id: str, limit: int = 150, item_id: str | None = None,
                ) -> tuple[dict[str, int], dict[str, float], dict[str, float]]:
        """Candidates ``{item: source mask}`` plus their co-occurrence and transition scores.

        ``item_id`` (a product page) adds that item as the most recent context item.
        """
        shop = self.shops.get(merchant_id)
        if shop is None:
            return {}, {}, {}
        user = shop.users.get(user_id)
        context = [(item, 0.8**age) for age, item in enumerate(reversed(user.recent))] if user is not None else []
        last = [(item, 1.0) for item in user.last_step] if user is not None else []
        if item_id is not None:
            context = [(item_id, 2.0)] + context
            last = [(item_id, 1.0)]
        per_source = max(limit // 3, 10)
        co = self.related(shop, shop.co, context[:self.history], per_source)
        trans = self.related(shop, shop.trans, last, per_source)
        out: dict[str, int] = {}
        if user is not None:  # the newest per_source, oldest first
            for item in reversed(list(itertools.islice(reversed(user.items), per_source))):
                out[item] = HISTORY
        for table, bit in ((co, COOCCUR), (trans, TRANSITION)):
            for item in table:
                out[item] = out.get(item, 0) | bit
        for item in self.popular(shop, per_source):
            out[item] = out.get(item, 0) | POPULAR
        if len(out) < limit:
            for item in self.cold_start(shop, user, limit - len(out)):  # unchosen: in no other source
                if item not in out:
                    out[item] = CATALOG
                    if len(out) >= limit:
                        break
        return out, co, trans

    def may_propose(self, shop: Shop, user: Shopper | None, items: tuple[str, ...], limit: int) -> bool:
        """False when :meth:`propose` (no product page) provably proposes none of ``items``: none is among the
        user's newest ``per_source`` items, in a co-occurrence row of their recent items or a transition row of
        their last step, among the popular, or among the first ``limit`` unchosen catalog items (any unchosen
        one when catalog texts are on: they reorder the cold start). Re-ranks the popular items as
        :meth:`propose` would."""
        per_source = max(limit // 3, 10)
        top = self.popular(shop, per_source)
        text, unchosen = shop.text, shop.unchosen
        for item in items:
            if item in top or (text is not None and (item in text.index or item in unchosen)):
                return True
            if item in unchosen and item in itertools.islice(unchosen, limit):  # cold start: catalog order
                return True
            if user is None:
                continue
            if item in user.items and item in itertools.islice(reversed(user.items), per_source):
                return True
            if shop.co.links_any(user.recent, item) or shop.trans.links_any(user.last_step, item):
                return True
        return False

    def cold_start(self, shop: Shop, user: Shopper | None, limit: int) -> list[str]:
        """Up to ``limit`` unchosen catalog items: by text similarity to the user's recent items when their
        texts are embedded (closest first, then the rest in catalog order), else in catalog order."""
        text = shop.text  # None also for shops pickled before text candidates existed
        recent = [text.index[i] for i in user.recent if i in text.index] if text is not None and user else []
        is_open = np.frombuffer(shop.text_open, dtype=bool) if recent else None  # a view, no copy
        if is_open is None or not is_open.any():
            return list(itertools.islice(shop.unchosen, limit))
        matrix = text.matrix[:len(is_open)]
        taste = matrix[recent].mean(axis=0)
        # einsum, not BLAS: a matrix-vector product this size gains nothing from BLAS threads, which on
        # a busy host spin (10-20 ms instead of 2 ms per request, measured at load 10 on 2 cores)
        scores = np.where(is_open, np.einsum("ij,j->i", matrix, taste), -np.inf)
        k = min(limit, int(is_open.sum()))
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        chosen = [shop.text_items[r] for r in best.tolist()]
        if len(chosen) < limit:
            taken = set(chosen)
            chosen += list(itertools.islice((i for i in shop.unchosen if i not in taken), limit - len(chosen)))
        return chosen

    def size(self) -> dict[str, int]:
        """Entry counts (what bounds the memory): items, links, users, user items."""
        shops = self.shops.values()
        return {"items": sum(len(s.stats) for s in shops),
                "links": sum(len(s.co) + len(s.trans) for s in shops),
                "users": sum(len(s.users) for s in shops),
                "user_items": sum(len(u.items) for s in shops for u in s.users.values())}


__all__ = ["CandidateState", "Shop", "Shopper", "ItemStats", "source_name", "merchant_priors", "item_repeat_rate",
           "item_gap_model", "top_keys", "HISTORY", "COOCCUR", "TRANSITION",
           "POPULAR", "CATALOG"]
