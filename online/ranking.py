"""The two-stage recommender: bounded candidate sources, then a small online pairwise ranker.

Design notes: `online/README.md`, `online/ranking.py`.
"""

from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass
from itertools import chain, compress, repeat
from sys import intern

import numpy as np

from online.candidates import (SOURCE_NAMES, CandidateState, ItemStats, Shop, Shopper, item_gap_model,
                               item_repeat_rate, merchant_priors, source_name)
from streams.schemas import Click, Event

FEATURES = ("bias", "user_count", "user_has", "user_orders", "hours_since", "recent_day", "cycle_match",
            "repeat_rate", "has×repeat_rate", "has×merchant_repeat", "co", "co_max", "trans", "trans_max",
            "popularity", "count", "category_affinity", "src_history", "src_co", "src_trans", "src_popular",
            "src_catalog")
SOURCE_FLAGS = [tuple(float(bool(mask & bit)) for bit in SOURCE_NAMES)  # the src_* features of each source mask
                for mask in range(2 ** len(SOURCE_NAMES))]
SOURCE_OF_MASK = tuple(source_name(mask) for mask in range(2 ** len(SOURCE_NAMES)))  # source_name, looked up
PRIOR = {"co": 1.0, "trans": 1.0, "popularity": 0.5, "co_max": 0.5, "trans_max": 0.5}


@dataclass
class Recommended:
    """One recommendation: item, ranking score in (0, 1) (σ of the ranker's score) and the source that proposed it."""

    item_id: str
    score: float
    source: str


_NO_STATS = ItemStats(math.nan, math.nan, math.nan, math.nan)  # an item nobody chose (yet, or any more)
_native = None  # online.rank_kernels once imported (see native_kernels)


def native_kernels():
    """:mod:`online.rank_kernels` (numba: its kernel compiled, or loaded from the disk cache, on import). A
    recommender imports it when it is built or unpickled, so neither a request nor a worker's block pays it,
    and importing this module stays light (the API imports it before any model is loaded)."""
    global _native
    if _native is None:
        from online import rank_kernels

        _native = rank_kernels
    return _native


def features(shop: Shop, user: Shopper | None, items: list[str], masks: list[int], co: dict[str, float],
             trans: dict[str, float], when: float) -> np.ndarray:
    """Feature matrix ``float64[len(items), len(FEATURES)]`` (see :data:`FEATURES`): the values of
    :func:`features_reference`, computed natively (:func:`online.rank_kernels.feature_rows`) from the
    candidates' values gathered at C speed (:func:`gather`)."""
    if not items:
        return np.zeros((0, len(FEATURES)))
    kernels = _native or native_kernels()
    gathered, hits = gather(shop, user, items, masks, co, trans)
    merchant_repeat, mean0, var0 = merchant_priors(shop.totals)
    pop_max = max((shop.popularity.get(shop.ranked[0], 0.0) if shop.ranked else 0.0), 1e-300)
    params = np.array([max(co.values(), default=0.0) or 1.0, max(trans.values(), default=0.0) or 1.0, pop_max,
                       merchant_repeat, mean0, var0, when, user.total if user is not None else 0], dtype=np.float64)
    return kernels.feature_rows(gathered, len(items), hits, params)


def gather(shop: Shop, user: Shopper | None, items: list[str], masks: list[int], co: dict[str, float],
           trans: dict[str, float]) -> tuple[np.ndarray, int]:
    """The values :func:`online.rank_kernels.feature_rows` reads (its layout) and how many of the candidates
    the user chose before: per candidate through C-level ``map`` over the dicts, no Python loop per item."""
    n = len(items)
    stats = list(map(shop.stats.get, items, repeat(_NO_STATS)))
    categories = (map(user.categories.get, map(shop.catalog.get, items), repeat(0)) if user is not None and user.total
                  else repeat(0.0, n))
    values = [[s.count for s in stats], [s.repeats for s in stats], map(co.get, items, repeat(0.0)),
              map(trans.get, items, repeat(0.0)), map(shop.popularity.get, items, repeat(0.0)), categories, masks]
    chosen = user.items if user is not None else None
    hits = 0
    if chosen:
        flags = list(map(chosen.__contains__, items))
        rows = list(compress(range(n), flags))
        hits, chose = len(rows), list(compress(stats, flags))
        values += [rows, chain.from_iterable(map(chosen.__getitem__, compress(items, flags))),
                   [s.gap_sum for s in chose], [s.gap_sq for s in chose]]
    kernels = _native or native_kernels()
    total = kernels.PER_ITEM * n + kernels.PER_HIT * hits  # the kernel's layout
    gathered = np.empty(total)  # struct packs Python floats and ints as doubles (float(), exactly), 3x np.fromiter
    struct.pack_into(f"{total}d", gathered, 0, *chain.from_iterable(values))
    return gathered, hits


def features_reference(shop: Shop, user: Shopper | None, items: list[str], masks: list[int], co: dict[str, float],
                       trans: dict[str, float], when: float) -> np.ndarray:
    """:func:`features` row by row in Python (the reference the native path is tested against)."""
    if not items:
        return np.zeros((0, len(FEATURES)))
    co_max = max(co.values(), default=0.0) or 1.0
    trans_max = max(trans.values(), default=0.0) or 1.0
    popularity = shop.popularity
    pop_max = max((popularity.get(shop.ranked[0], 0.0) if shop.ranked else 0.0), 1e-300)
    merchant_repeat, mean0, var0 = merchant_priors(shop.totals)
    user_items = user.items if user is not None else {}
    user_total = user.total if user is not None else 0
    categories = user.categories if user_total else None
    stats_of, catalog, co_of, trans_of = shop.stats.get, shop.catalog, co.get, trans.get
    log, log1p, exp = math.log, math.log1p, math.exp
    rows = []
    for item, mask in zip(items, masks):  # rows as Python floats, one array at the end: the same float64 values
        stats = stats_of(item)
        repeat = item_repeat_rate(stats, merchant_repeat)
        entry = user_items.get(item)
        if entry is not None:
            gap = max(when - entry[2], 1.0)
            mean, sd = item_gap_model(stats, mean0, var0)
            z = (log(gap) - mean) / sd
            history = (log1p(entry[0]), 1.0, log1p(entry[1]), log1p(gap / 3600.0) / 5.0, exp(-gap / 86_400.0),
                       exp(-0.5 * z * z), repeat, repeat, merchant_repeat)
        else:
            history = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, repeat, 0.0, 0.0)
        c, t = co_of(item, 0.0), trans_of(item, 0.0)
        category = catalog.get(item)
        rows.append((1.0, *history, log1p(10.0 * c), c / co_max, log1p(10.0 * t), t / trans_max,
                     log(popularity.get(item, 0.0) / pop_max + 1e-4) / 9.2 + 1.0,
                     log1p(stats.count) / 10.0 if stats is not None else 0.0,
                     categories.get(category, 0) / user_total if category is not None and user_total else 0.0,
                     *SOURCE_FLAGS[mask]))
    return np.array(rows, dtype=np.float64)


class PairwiseRanker:
    """Linear scores ``(w_global + w_merchant) · x`` learned online by AdaGrad on pairwise logistic loss."""

    def __init__(self, learning_rate: float = 0.1, merchant_rate: float = 0.2, l2: float = 1e-5) -> None:
        self.learning_rate = learning_rate
        self.merchant_rate = merchant_rate
        self.l2 = l2
        self.weights = np.array([PRIOR.get(name, 0.0) for name in FEATURES])
        self.squares = np.full(len(FEATURES), 1e-6)
        self.merchants: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.updates = 0

    def merchant_weights(self, merchant_id: str) -> np.ndarray:
        found = self.merchants.get(merchant_id)
        return self.weights + found[0] if found is not None else self.weights

    def scores(self, merchant_id: str, x: np.ndarray) -> np.ndarray:
        return x @ self.merchant_weights(merchant_id)

    def learn(self, merchant_id: str, positives: np.ndarray, negatives: np.ndarray) -> None:
        """One step per (positive, negative) pair: push ``score(positive)`` above ``score(negative)``."""
        if not len(positives) or not len(negatives):
            return
        own = self.merchants.get(merchant_id)
        if own is None:
            own = self.merchants[merchant_id] = (np.zeros(len(FEATURES)), np.full(len(FEATURES), 1e-6))
        from online.kernels import pairwise_adagrad  # numba: loaded by the learner, never by serving

        pairwise_adagrad(np.ascontiguousarray(positives), np.ascontiguousarray(negatives), self.weights,
                         self.squares, own[0], own[1], self.learning_rate, self.merchant_rate, self.l2)
        self.updates += 1


class ShopRecommender:
    """Two-stage online recommender for every merchant (see the module docstring). Picklable, bounded."""

    feature_matrix = staticmethod(features)  # the ranker's features (native; features_reference is the reference)

    def __init__(self, candidates: CandidateState | None = None, ranker: PairwiseRanker | None = None,
                 negatives: int = 8, train_candidates: int = 60, candidate_limit: int = 150,
                 warm_up_steps: int = 100, train_every: int = 16, seed: int = 0) -> None:
        if min(negatives, train_candidates, candidate_limit, train_every) < 1 or warm_up_steps < 0:
            raise ValueError("negatives, train_candidates, candidate_limit, train_every must be >= 1, warm_up_steps >= 0")
        self.state = candidates or CandidateState()
        self.ranker = ranker or PairwiseRanker()
        self.warm_up_steps = warm_up_steps
        self.train_every = train_every
        self.merchant_steps: dict[str, int] = {}
        self.negatives = negatives
        self.train_candidates = train_candidates
        self.candidate_limit = candidate_limit
        self.rng = random.Random(seed)
        self.n_observed = 0
        self.steps = 0
        native_kernels()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        native_kernels()  # a published or checkpointed recommender loads its kernel with it, not on its first rank

    def observe(self, event: Event) -> None:
        """Test-then-train on one event: learn to rank what the user chose, then fold it into the sources."""
        step = CandidateState.step_of(event)
        if step is not None:
            self._learn_step(event, step[0])
        self.state.fold(event, step)

    def observe_block(self, events: list[Event]) -> None:
        """:meth:`observe` each event in order (the worker's batch path): the same state, without the calls
        per event that an unclicked impression (most events) does not need; a clicked impression goes
        straight to :meth:`CandidateState.choose_one`, its item and user ids interned as ``step_of`` and
        ``fold`` intern them."""
        state, shops, fold, train = self.state, self.state.shops, self.state.fold, self._train
        choose_one, merchant_steps = state.choose_one, self.merchant_steps
        warm_up, every = self.warm_up_steps, self.train_every
        steps = 0
        try:
            for event in events:
                if type(event) is Click:
                    merchant, when = event.merchant_id, event.timestamp
                    if event.clicked:  # a step: count it (and train) before it is folded in, as _learn_step
                        steps += 1
                        seen = merchant_steps[merchant] = merchant_steps.get(merchant, 0) + 1
                        items, user_id = (intern(event.item_id),), intern(event.user_id)
                        if seen <= warm_up or seen % every == 0:
                            train(merchant, user_id, items, when)
                        shop = shops.get(merchant) or state.shop(merchant)  # then fold it, as CandidateState.fold
                        if when > shop.clock:
                            shop.clock = when
                        choose_one(shop, user_id, items, when, False, event.session_id)
                        continue
                    shop = shops.get(merchant) or state.shop(merchant)  # only moves its merchant's clock
                    if when > shop.clock:
                        shop.clock = when
                    continue
                step = CandidateState.step_of(event)
                if step is not None:
                    self._learn_step(event, step[0])
                fold(event, step)
        finally:
            self.steps += steps
            self.n_observed += steps

    def _learn_step(self, event: Event, chosen: tuple[str, ...]) -> None:
        """Count a step and, at a training step of its merchant, learn from it before it is folded in."""
        self.steps += 1
        seen = self.merchant_steps[event.merchant_id] = self.merchant_steps.get(event.merchant_id, 0) + 1
        if seen <= self.warm_up_steps or seen % self.train_every == 0:
            self._train(event.merchant_id, event.user_id, chosen, event.timestamp)
        self.n_observed += 1

    def _train(self, merchant_id: str, user_id: str, chosen: tuple[str, ...], when: float) -> None:
        shop = self.state.shops.get(merchant_id)
        if shop is None or not shop.popularity:
            return
        user = shop.users.get(user_id)
        if not self.state.may_propose(shop, user, chosen, self.train_candidates):
            return  # no chosen item among the candidates: no pair to learn, no draw from the generator
        proposed, co, trans = self.state.propose(merchant_id, user_id, self.train_candidates)
        if len(chosen) == 1:  # a click: the proposal minus its item (a C-level copy and remove)
            positives = [chosen[0]] if chosen[0] in proposed else []
            others = list(proposed)
            if positives:
                others.remove(chosen[0])
        else:
            positives = [item for item in chosen if item in proposed]
            others = [item for item in proposed if item not in chosen]
        if not positives or not others:
            return
        sampled = self.rng.sample(others, min(self.negatives, len(others)))
        items = positives + sampled
        x = self.feature_matrix(shop, user, items, [proposed[i] for i in items], co, trans, when)
        self.ranker.learn(merchant_id, x[: len(positives)], x[len(positives):])

    def rank(self, merchant_id: str, user_id: str, k: int = 10, *, timestamp: float | None = None,
             item_id: str | None = None) -> list[Recommended]:
        """Top-``k`` candidates by the learned score, each with the source that proposed it."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        shop = self.state.shops.get(merchant_id)
        if shop is None:
            return []
        proposed, co, trans = self.state.propose(merchant_id, user_id, max(self.candidate_limit, k), item_id=item_id)
        if item_id is not None:
            proposed.pop(item_id, None)
        if not proposed:
            return []
        items, masks, scores, best = self._best(shop, merchant_id, user_id, proposed, co, trans, k, timestamp)
        shown = 1.0 / (1.0 + np.exp(-np.clip(scores[best], -35.0, 35.0)))  # in (0, 1), same order
        return [Recommended(items[i], p, SOURCE_OF_MASK[masks[i]]) for i, p in zip(best.tolist(), shown.tolist())]

    def ranked_ids(self, merchant_id: str, user_id: str, actual: str, k: int = 10, *,
                   timestamp: float | None = None) -> list[str]:
        """The items :meth:`rank` shows (no product page) when ``actual`` can be among them, else ``[]``: what the
        worker's ranking evaluation reads (a list without ``actual`` is a miss, whichever it is). No proposal
        when ``actual`` provably is no candidate (:meth:`CandidateState.may_propose`), no features when it is
        not among the proposed, no shown scores."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        shop = self.state.shops.get(merchant_id)
        limit = max(self.candidate_limit, k)
        if shop is None or not self.state.may_propose(shop, shop.users.get(user_id), (actual,), limit):
            return []  # may_propose re-ranked the popular items as propose would have: the same state after
        proposed, co, trans = self.state.propose(merchant_id, user_id, limit)
        if actual not in proposed:
            return []
        items, _, _, best = self._best(shop, merchant_id, user_id, proposed, co, trans, k, timestamp)
        return [items[i] for i in best.tolist()]

    def _best(self, shop: Shop, merchant_id: str, user_id: str, proposed: dict[str, int], co: dict[str, float],
              trans: dict[str, float], k: int, timestamp: float | None) -> tuple[list, list, np.ndarray, np.ndarray]:
        """The proposed items, their masks and scores, and the rows of the top ``k`` by score (ties in order)."""
        items, masks = list(proposed), list(proposed.values())
        when = shop.clock if timestamp is None else timestamp
        scores = self.ranker.scores(merchant_id, self.feature_matrix(shop, shop.users.get(user_id), items, masks, co,
                                                                     trans, when))
        return items, masks, scores, np.argsort(-scores, kind="stable")[:k]

    # the candidate-generator protocol of registry.bundle (older bundles rank these with the click model)
    def candidates(self, merchant_id: str, user_id: str, limit: int = 100) -> list[str]:
        return [r.item_id for r in self.rank(merchant_id, user_id, limit)]

    def exclude(self, merchant_id: str, user_id: str) -> set[str]:
        return set()

    def merchants(self) -> list[str]:
        return sorted(self.state.shops)

    def size(self) -> dict[str, int]:
        return {**self.state.size(), "ranker_merchants": len(self.ranker.merchants)}


__all__ = ["ShopRecommender", "PairwiseRanker", "Recommended", "features", "features_reference", "FEATURES"]
