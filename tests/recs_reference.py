"""The recommender's update path as it was before the fast path (frozen): the reference it is tested against.

Subclasses of today's classes overriding the update and training methods with their former bodies, so a
reference and a fast recommender hold the same kinds of state and compare field by field
(`tests/test_recs_fastpath.py`).
"""

from __future__ import annotations

import heapq
import math
from collections import deque

import numpy as np

from online.candidates import CATALOG, COOCCUR, HISTORY, POPULAR, TRANSITION, CandidateState, ItemStats, Shop, Shopper
from online.candidates import source_name
from online.ranking import FEATURES, PairwiseRanker, Recommended, ShopRecommender
from streams.schemas import CatalogItem, Event


def repeat_rate(shop: Shop, item: str, prior: float = 5.0) -> float:
    base = (shop.totals.repeats + 0.1) / (shop.totals.count + 1.0)
    stats = shop.stats.get(item)
    if stats is None:
        return base
    return (stats.repeats + prior * base) / (stats.count + prior)


def gap_model(shop: Shop, item: str, prior: float = 3.0) -> tuple[float, float]:
    t = shop.totals
    mean0 = t.gap_sum / t.repeats if t.repeats else math.log(7 * 86_400.0)
    var0 = max(t.gap_sq / t.repeats - mean0 * mean0, 0.25) if t.repeats else 4.0
    stats = shop.stats.get(item)
    n = stats.repeats if stats is not None else 0.0
    if not n:
        return mean0, math.sqrt(var0)
    mean = (stats.gap_sum + prior * mean0) / (n + prior)
    var = (stats.gap_sq + prior * (var0 + mean0 * mean0)) / (n + prior) - mean * mean
    return mean, math.sqrt(max(var, 0.25))


def reference_features(shop: Shop, user: Shopper | None, items: list[str], masks: list[int], co: dict[str, float],
                       trans: dict[str, float], when: float) -> np.ndarray:
    if not items:
        return np.zeros((0, len(FEATURES)))
    co_max = max(co.values(), default=0.0) or 1.0
    trans_max = max(trans.values(), default=0.0) or 1.0
    pop_max = max((shop.popularity.get(shop.ranked[0], 0.0) if shop.ranked else 0.0), 1e-300)
    merchant_repeat = (shop.totals.repeats + 0.1) / (shop.totals.count + 1.0)
    user_items = user.items if user is not None else {}
    user_total = user.total if user is not None else 0
    log, log1p, exp = math.log, math.log1p, math.exp
    rows = []
    for item, mask in zip(items, masks):
        repeat = repeat_rate(shop, item)
        entry = user_items.get(item)
        if entry is not None:
            gap = max(when - entry[2], 1.0)
            mean, sd = gap_model(shop, item)
            z = (log(gap) - mean) / sd
            history = (log1p(entry[0]), 1.0, log1p(entry[1]), log1p(gap / 3600.0) / 5.0, exp(-gap / 86_400.0),
                       exp(-0.5 * z * z), repeat, repeat, merchant_repeat)
        else:
            history = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, repeat, 0.0, 0.0)
        c, t = co.get(item, 0.0), trans.get(item, 0.0)
        stats = shop.stats.get(item)
        category = shop.catalog.get(item)
        rows.append((1.0, *history, log1p(10.0 * c), c / co_max, log1p(10.0 * t), t / trans_max,
                     log(shop.popularity.get(item, 0.0) / pop_max + 1e-4) / 9.2 + 1.0,
                     log1p(stats.count) / 10.0 if stats is not None else 0.0,
                     user.categories.get(category, 0) / user_total if category is not None and user_total else 0.0,
                     mask & HISTORY and 1, mask & COOCCUR and 1, mask & TRANSITION and 1, mask & POPULAR and 1,
                     mask & CATALOG and 1))
    return np.array(rows, dtype=np.float64)


class ReferenceState(CandidateState):
    """:class:`CandidateState` with the former update and proposal methods, its links in rows held as dicts."""

    def shop(self, merchant_id: str) -> Shop:
        found = self.shops.get(merchant_id)
        if found is None:
            found = self.shops[merchant_id] = Shop(co={}, trans={})
            self._link_rows_from_dicts(found)
        return found

    def hold_rows_as_dicts(self) -> None:
        """Turn the shops' link rows (a state made or loaded by today's code) into the rows as dicts it reads."""
        for shop in self.shops.values():
            if not isinstance(shop.co, dict):
                shop.co, shop.trans = shop.co.as_dict(), shop.trans.as_dict()
            self._link_rows_from_dicts(shop)

    def _link_rows_from_dicts(self, shop: Shop) -> None:  # the rows stay dicts; their sums made afresh
        shop.totals_co = {i: sum(row.values()) for i, row in shop.co.items()}
        shop.totals_trans = {i: sum(row.values()) for i, row in shop.trans.items()}

    def may_propose(self, shop: Shop, user: Shopper | None, items: tuple[str, ...], limit: int) -> bool:
        per_source = max(limit // 3, 10)
        top = self.popular(shop, per_source)
        text, unchosen = shop.text, shop.unchosen
        for item in items:
            if item in top or (text is not None and (item in text.index or item in unchosen)):
                return True
            if item in unchosen and item in list(unchosen)[:limit]:
                return True
            if user is None:
                continue
            if item in list(user.items)[-per_source:]:
                return True
            for table, sources in ((shop.co, user.recent), (shop.trans, user.last_step)):
                for source in sources:
                    if item in table.get(source, {}):
                        return True
        return False

    def _prune_items(self, shop: Shop) -> None:
        keep = dict(heapq.nlargest(self.max_items, shop.popularity.items(), key=lambda kv: kv[1]))
        shop.popularity = keep
        shop.stats = {i: s for i, s in shop.stats.items() if i in keep}
        shop.co = {i: row for i, row in shop.co.items() if i in keep}
        shop.trans = {i: row for i, row in shop.trans.items() if i in keep}
        self._link_rows_from_dicts(shop)
        shop.ranked = []

    def user(self, shop: Shop, user_id: str, create: bool = False) -> Shopper | None:
        found = shop.users.get(user_id)
        if found is not None:
            shop.users.move_to_end(user_id)
        elif create:
            found = shop.users[user_id] = Shopper(recent=deque(maxlen=self.history))
            if len(shop.users) > self.max_users:
                shop.users.popitem(last=False)
        return found

    def fold(self, event: Event, step: tuple[tuple[str, ...], bool] | None) -> None:  # catalog text: not compared
        shop = self.shop(event.merchant_id)
        if event.timestamp > shop.clock:
            shop.clock = event.timestamp
        if type(event) is CatalogItem:
            if event.item_id in shop.catalog or len(shop.catalog) < self.max_items:
                shop.catalog[event.item_id] = event.category
                if event.item_id not in shop.stats:
                    shop.unchosen[event.item_id] = None
            return
        if step is not None:
            self.choose(shop, event.user_id, step[0], event.timestamp, step[1], getattr(event, "session_id", None))

    def choose(self, shop: Shop, user_id: str, items: tuple[str, ...], when: float, is_order: bool,
               session: str | None) -> None:
        user = self.user(shop, user_id, create=True)
        value = self._decayed(shop, when)
        same_session = (session is not None and session == user.last_session) or when - user.last_time <= self.session_gap_s
        for item in items:
            if item in shop.unchosen:
                del shop.unchosen[item]
                if shop.text is not None and item in shop.text.index:
                    shop.text_open[shop.text.index[item]] = 0
            shop.popularity[item] = shop.popularity.get(item, 0.0) + value
            self._repeat_stats(shop, user, item, when)
            others = [other for other in dict.fromkeys((*user.recent, *items))
                      if other != item and (other not in items or other < item)]
            self._link(shop.co, shop.totals_co, [pair for other in others for pair in ((other, item), (item, other))])
            if same_session:
                self._link(shop.trans, shop.totals_trans,
                           [(previous, item) for previous in user.last_step if previous != item])
        for item in items:
            entry = user.items.pop(item, None)
            if entry is None:
                entry = [0, 0, when]
            user.items[item] = entry
            entry[0] += 1
            entry[1] += is_order
            entry[2] = when
            category = shop.catalog.get(item)
            if category is not None:
                user.categories[category] = user.categories.get(category, 0) + 1
            user.total += 1
            if not user.recent or user.recent[-1] != item:
                user.recent.append(item)
        if len(user.items) > 2 * self.max_user_items:
            user.items = dict(list(user.items.items())[-self.max_user_items:])
        user.last_step, user.last_time, user.last_session = items, when, session
        shop.since_rank += len(items)
        if len(shop.stats) > 2 * self.max_items:
            self._prune_items(shop)

    def _repeat_stats(self, shop: Shop, user: Shopper, item: str, when: float) -> None:
        stats = shop.stats.get(item)
        if stats is None:
            stats = shop.stats[item] = ItemStats()
        stats.count += 1
        shop.totals.count += 1
        entry = user.items.get(item)
        if entry is not None:
            gap = math.log(max(when - entry[2], 1.0))
            for target in (stats, shop.totals):
                target.repeats += 1
                target.gap_sum += gap
                target.gap_sq += gap * gap

    def _decayed(self, shop: Shop, when: float) -> float:
        if shop.landmark is None:
            shop.landmark = when
        exponent = (when - shop.landmark) * math.log(2) / self.half_life_s
        if exponent > 200:
            shift = math.exp(-exponent)
            shop.popularity = {i: c * shift for i, c in shop.popularity.items()}
            shop.landmark, exponent = when, 0.0
        return math.exp(exponent)

    def _link(self, table: dict[str, dict[str, float]], totals: dict[str, float], pairs: list[tuple[str, str]]) -> None:
        cap = 2 * self.max_neighbors
        for a, b in pairs:
            row = table.get(a)
            if row is None:
                row = table[a] = {}
            row[b] = row.get(b, 0.0) + 1.0
            totals[a] = totals.get(a, 0.0) + 1.0
            if len(row) > cap:
                kept = table[a] = {i: row[i] for i in sorted(row, key=row.get, reverse=True)[: self.max_neighbors]}
                totals[a] = sum(kept.values())

    def popular(self, shop: Shop, limit: int) -> list[str]:
        if shop.since_rank >= self.rerank_every or len(shop.ranked) < min(limit, len(shop.popularity)):
            shop.ranked = [i for i, _ in heapq.nlargest(max(limit, 200), shop.popularity.items(), key=lambda kv: kv[1])]
            shop.since_rank = 0
        return shop.ranked[:limit]

    def related(self, shop: Shop, table: dict[str, dict[str, float]], sources: list[tuple[str, float]],
                limit: int) -> dict[str, float]:
        totals = shop.totals_co if table is shop.co else shop.totals_trans
        scores: dict[str, float] = {}
        get = scores.get
        for item, weight in sources:
            row = table.get(item)
            if not row:
                continue
            scale = weight / totals[item]
            for other, value in row.items():
                scores[other] = get(other, 0.0) + scale * value
        if len(scores) > limit:
            scores = {i: scores[i] for i in heapq.nlargest(limit, scores, key=get)}
        return scores

    def propose(self, merchant_id: str, user_id: str, limit: int = 150, item_id: str | None = None,
                ) -> tuple[dict[str, int], dict[str, float], dict[str, float]]:
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
        if user is not None:
            for item in list(user.items)[-per_source:]:
                out[item] = HISTORY
        for table, bit in ((co, COOCCUR), (trans, TRANSITION)):
            for item in table:
                out[item] = out.get(item, 0) | bit
        for item in self.popular(shop, per_source):
            out[item] = out.get(item, 0) | POPULAR
        if len(out) < limit:
            for item in self.cold_start(shop, user, limit - len(out)):
                if item not in out:
                    out[item] = CATALOG
                    if len(out) >= limit:
                        break
        return out, co, trans


class ReferenceRanker(PairwiseRanker):
    """:class:`PairwiseRanker` with the former numpy AdaGrad step."""

    def learn(self, merchant_id: str, positives: np.ndarray, negatives: np.ndarray) -> None:
        if not len(positives) or not len(negatives):
            return
        own = self.merchants.get(merchant_id)
        if own is None:
            own = self.merchants[merchant_id] = (np.zeros(len(FEATURES)), np.full(len(FEATURES), 1e-6))
        diff = (positives[:, None, :] - negatives[None, :, :]).reshape(-1, len(FEATURES))
        margin = diff @ (self.weights + own[0])
        gradient = -(np.add.reduce(diff * (1.0 / (1.0 + np.exp(np.clip(margin, -35.0, 35.0))))[:, None], axis=0)
                     / len(diff))
        for weights, squares, rate in ((self.weights, self.squares, self.learning_rate), (own[0], own[1], self.merchant_rate)):
            g = gradient + self.l2 * weights
            squares += g * g
            weights -= rate * g / np.sqrt(squares)
        self.updates += 1


class ReferenceRecommender(ShopRecommender):
    """:class:`ShopRecommender` updated event by event by the former code."""

    def __init__(self, **options) -> None:
        state = options.pop("candidates", None) or ReferenceState()
        super().__init__(candidates=state, ranker=ReferenceRanker(), **options)

    def observe(self, event: Event) -> None:
        step = CandidateState.step_of(event)
        if step is not None:
            self.steps += 1
            seen = self.merchant_steps[event.merchant_id] = self.merchant_steps.get(event.merchant_id, 0) + 1
            if seen <= self.warm_up_steps or seen % self.train_every == 0:
                self._train(event.merchant_id, event.user_id, step[0], event.timestamp)
            self.n_observed += 1
        self.state.fold(event, step)

    def _train(self, merchant_id: str, user_id: str, chosen: tuple[str, ...], when: float) -> None:
        shop = self.state.shops.get(merchant_id)
        if shop is None or not shop.popularity:
            return
        proposed, co, trans = self.state.propose(merchant_id, user_id, self.train_candidates)
        positives = [item for item in chosen if item in proposed]
        others = [item for item in proposed if item not in chosen]
        if not positives or not others:
            return
        sampled = self.rng.sample(others, min(self.negatives, len(others)))
        items = positives + sampled
        user = shop.users.get(user_id)
        x = reference_features(shop, user, items, [proposed[i] for i in items], co, trans, when)
        self.ranker.learn(merchant_id, x[: len(positives)], x[len(positives):])

    def rank(self, merchant_id: str, user_id: str, k: int = 10, *, timestamp: float | None = None,
             item_id: str | None = None) -> list[Recommended]:
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
        items = list(proposed)
        masks = [proposed[i] for i in items]
        when = shop.clock if timestamp is None else timestamp
        x = reference_features(shop, shop.users.get(user_id), items, masks, co, trans, when)
        scores = self.ranker.scores(merchant_id, x)
        best = np.argsort(-scores, kind="stable")[:k]
        shown = 1.0 / (1.0 + np.exp(-np.clip(scores[best], -35.0, 35.0)))  # in (0, 1), same order
        return [Recommended(items[i], float(p), source_name(masks[i])) for i, p in zip(best.tolist(), shown.tolist())]
