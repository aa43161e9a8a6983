"""Ranking by a click model: a recommender's candidates (or a whole catalog) ordered by click probability.

The one path for bundles that carry a click model and the first-generation recommender
(:mod:`online.reco`): serving (:class:`registry.bundle.ModelBundle`) and the learner worker's evaluation
(:func:`online.reco.recommend`) both rank through :class:`ClickRanker`. With ``cached=True`` (snapshots:
bundles) a merchant's catalog is hashed once and a request hashes only what depends on the user and the
hour (see ``online/README.md``, "Ranking a catalog in milliseconds"); features are bit-identical to
:meth:`streams.features.Featurizer.candidates`, which the uncached mode (a live, changing context) uses.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numpy as np

from online.ranking import Recommended
from streams.features import FIELD_INDEX, FIELDS, FeatureContext, Featurizer, feature_slot, price_bucket

DEVICE, PAGE, POSITION = "desktop", "recommendation", 0  # what Featurizer.candidates assumes
# slots of a candidate that depend on neither the user nor the time: hashed once per merchant
STATIC_FIELDS = ("bias", "merchant", "item", "category", "price_bucket", "device", "page", "position",
                 "category×device", "page×position", "merchant×category")



@dataclass
class _MerchantCandidates:
    """A merchant's catalog pre-hashed for ranking: item-only slots, category codes, user×item partial CRCs."""

    item_ids: list[str]
    rows: dict[str, int]
    categories: list[str]
    category_codes: np.ndarray  # int32[n]
    static: np.ndarray  # int32[n, F]: every slot that does not depend on user or time
    user_item_base: np.ndarray  # uint32[n]: crc("user×item={m}/" + "|" + item)
    suffix_lengths: np.ndarray  # int32[n]: len(("|" + item).encode())
    length_codes: np.ndarray  # int32[n]: index into suffix_length_values
    suffix_length_values: list[int]
    base_zero_crc: list[int]  # per suffix length n: crc("user×item={m}/" + "\0" * n)
    catalog_key: tuple[int, int]
    _static_logits: tuple[np.ndarray, np.ndarray] | None = None  # (weights it was computed with, float64[n])
    _time_slots: dict[tuple[int, int, int], tuple[int, int, np.ndarray]] = field(default_factory=dict)
    _time_logits: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def static_logits(self, weights: np.ndarray) -> np.ndarray:
        """Σ w[slot] over the user- and time-independent slots of every item, for a linear model."""
        found = self._static_logits
        if found is None or found[0] is not weights:
            columns = [FIELD_INDEX[name] for name in STATIC_FIELDS]
            logits = weights[self.static[:, columns]].sum(axis=1, dtype=np.float64)
            self._static_logits = found = (weights, logits)
        return found[1]

    def time_slots(self, hour: int, weekday: int, mask: int) -> tuple[int, int, np.ndarray]:
        """``hour``, ``weekday`` slots and ``category×hour`` slot per category code (memoized: 168 keys)."""
        key = (hour, weekday, mask)
        found = self._time_slots.get(key)
        if found is None:
            by_category = np.fromiter((feature_slot("category×hour", c, hour, mask=mask) for c in self.categories),
                                      dtype=np.int32, count=len(self.categories))
            found = self._time_slots[key] = (feature_slot("hour", hour, mask=mask), feature_slot("weekday", weekday, mask=mask),
                                             by_category)
        return found

    def time_logits(self, weights: np.ndarray, hour: int, weekday: int, mask: int) -> np.ndarray:
        """static_logits + the hour, weekday and category×hour weights of every item (memoized per hour)."""
        key = (hour, weekday, mask)
        found = self._time_logits.get(key)
        if found is None or found[0] is not weights:
            hour_slot, weekday_slot, category_hour = self.time_slots(hour, weekday, mask)
            logits = self.static_logits(weights) + weights[category_hour].astype(np.float64)[self.category_codes]
            logits += float(weights[hour_slot]) + float(weights[weekday_slot])
            if len(self._time_logits) >= 8:  # only the current hour matters; stay small
                self._time_logits.clear()
            found = self._time_logits[key] = (weights, logits)
        return found[1]


class _CandidateIndex:
    """Per-merchant cache of :class:`_MerchantCandidates`; rebuilt when the catalog dict changes size."""

    def __init__(self, featurizer: Featurizer) -> None:
        self.featurizer = featurizer
        self._merchants: dict[str, _MerchantCandidates] = {}
        self._lock = threading.Lock()

    def get(self, merchant_id: str, context: FeatureContext) -> _MerchantCandidates | None:
        merchant = context.merchants.get(merchant_id)
        if merchant is None or not merchant.catalog:
            return None
        key = (id(merchant.catalog), len(merchant.catalog))
        found = self._merchants.get(merchant_id)
        if found is not None and found.catalog_key == key:
            return found
        with self._lock:
            found = self._merchants.get(merchant_id)
            if found is None or found.catalog_key != key:
                found = self._merchants[merchant_id] = self._build(merchant_id, merchant.catalog, key)
        return found

    def clear(self) -> None:
        with self._lock:
            self._merchants.clear()

    def _build(self, merchant_id: str, catalog: dict, key: tuple[int, int]) -> _MerchantCandidates:
        mask = self.featurizer.n_features - 1
        item_ids = list(catalog)
        categories = sorted({info.category for info in catalog.values()})
        code_of = {category: code for code, category in enumerate(categories)}
        n = len(item_ids)
        static = np.zeros((n, len(FIELDS)), dtype=np.int32)
        constant = {"bias": (), "merchant": (merchant_id,), "device": (DEVICE,), "page": (PAGE,),
                    "position": (POSITION,), "page×position": (PAGE, POSITION)}
        for name, values in constant.items():
            static[:, FIELD_INDEX[name]] = feature_slot(name, *values, mask=mask)
        codes = np.empty(n, dtype=np.int32)
        base_prefix = f"user×item={merchant_id}/"
        base_crc = np.empty(n, dtype=np.uint32)
        lengths = np.empty(n, dtype=np.int32)
        for row, item_id in enumerate(item_ids):
            info = catalog[item_id]
            codes[row] = code_of[info.category]
            static[row, FIELD_INDEX["item"]] = feature_slot("item", merchant_id, item_id, mask=mask)
            static[row, FIELD_INDEX["category"]] = feature_slot("category", info.category, mask=mask)
            static[row, FIELD_INDEX["price_bucket"]] = feature_slot("price_bucket", price_bucket(info.price), mask=mask)
            static[row, FIELD_INDEX["category×device"]] = feature_slot("category×device", info.category, DEVICE, mask=mask)
            static[row, FIELD_INDEX["merchant×category"]] = feature_slot("merchant×category", merchant_id, info.category, mask=mask)
            suffix = f"|{item_id}".encode()
            base_crc[row] = crc32c.crc32c(base_prefix.encode() + suffix)
            lengths[row] = len(suffix)
        length_values, length_codes = np.unique(lengths, return_inverse=True)
        zero_crc = [crc32c.crc32c(base_prefix.encode() + bytes(int(length))) for length in length_values]
        return _MerchantCandidates(item_ids, {item: row for row, item in enumerate(item_ids)}, categories, codes,
                                   static, base_crc, lengths, length_codes.astype(np.int32),
                                   [int(v) for v in length_values], zero_crc, key)


@dataclass
class _UserSlots:
    """The slots of one ranking request that depend on the user or the time (everything else is cached)."""

    hour: int
    weekday: int
    user: int
    user_category: np.ndarray  # int32[C], by category code
    affinity: np.ndarray  # int32[C]
    category_hour: np.ndarray  # int32[C]
    codes: np.ndarray  # int32[n]: category code of each candidate row
    user_item: np.ndarray  # int32[n]


def _user_slots(cached: _MerchantCandidates, merchant_id: str, user_id: str, recent: Sequence[str], when: float,
                rows: np.ndarray | None, mask: int) -> _UserSlots:
    tm = time.gmtime(when)
    hour_slot, weekday_slot, category_hour = cached.time_slots(tm.tm_hour, tm.tm_wday, mask)
    user_cat = np.fromiter((feature_slot("user×category", merchant_id, user_id, c, mask=mask) for c in cached.categories),
                           dtype=np.int32, count=len(cached.categories))
    if recent:
        recent_set = set(recent)
        is_recent = np.fromiter((c in recent_set for c in cached.categories), dtype=bool, count=len(cached.categories))
        affinity = np.where(is_recent, _affinity_slot("match", mask), _affinity_slot("other", mask)).astype(np.int32)
    else:
        affinity = np.full(len(cached.categories), _affinity_slot("new", mask), dtype=np.int32)
    return _UserSlots(
        hour=hour_slot, weekday=weekday_slot, user=feature_slot("user", merchant_id, user_id, mask=mask),
        user_category=user_cat, affinity=affinity, category_hour=category_hour,
        codes=cached.category_codes if rows is None else cached.category_codes[rows],
        user_item=_user_item_slots(cached, merchant_id, user_id, rows) & mask,
    )


@functools.lru_cache(maxsize=64)
def _affinity_slot(label: str, mask: int) -> int:
    return feature_slot("user_affinity", label, mask=mask)


def _user_item_slots(cached: _MerchantCandidates, merchant_id: str, user_id: str, rows: np.ndarray | None) -> np.ndarray:
    """``crc("user×item={m}/{u}|{item}")`` for every item from cached CRCs, by CRC linearity (exact)."""
    prefix = f"user×item={merchant_id}/{user_id}".encode()
    shifts = np.fromiter((crc32c.crc32c(prefix + bytes(length)) ^ zero for length, zero
                          in zip(cached.suffix_length_values, cached.base_zero_crc)), dtype=np.uint32)
    base = cached.user_item_base if rows is None else cached.user_item_base[rows]
    codes = cached.length_codes if rows is None else cached.length_codes[rows]
    return (base ^ shifts[codes]).view(np.int32)


def _assemble(cached: _MerchantCandidates, slots: _UserSlots, rows: np.ndarray | None) -> np.ndarray:
    """Slot indices ``int32[n, F]``, identical to :meth:`Featurizer.candidates`."""
    out = (cached.static if rows is None else cached.static[rows]).copy()
    out[:, FIELD_INDEX["hour"]] = slots.hour
    out[:, FIELD_INDEX["weekday"]] = slots.weekday
    out[:, FIELD_INDEX["user"]] = slots.user
    out[:, FIELD_INDEX["user×category"]] = slots.user_category[slots.codes]
    out[:, FIELD_INDEX["user_affinity"]] = slots.affinity[slots.codes]
    out[:, FIELD_INDEX["category×hour"]] = slots.category_hour[slots.codes]
    out[:, FIELD_INDEX["user×item"]] = slots.user_item
    return out


def _linear_logits(cached: _MerchantCandidates, slots: _UserSlots, rows: np.ndarray | None,
                   weights: np.ndarray, bias: float, when: float, mask: int) -> np.ndarray:
    """``bias + Σ w[slot]`` per candidate without materializing the ``(n, F)`` index matrix: the item-
    and time-only part is memoized per hour, so a request adds two per-category and one per-item term."""
    tm = time.gmtime(when)
    base = cached.time_logits(weights, tm.tm_hour, tm.tm_wday, mask)
    per_category = weights[slots.user_category].astype(np.float64)
    per_category += weights[slots.affinity]
    logits = per_category[slots.codes]
    logits += base if rows is None else base[rows]
    logits += weights[slots.user_item]
    logits += bias + float(weights[slots.user])
    return logits


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` best scores, best first; ties go to the earlier position (deterministic)."""
    if k >= len(scores):
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    threshold = scores[part].min()
    above = np.flatnonzero(scores > threshold)
    chosen = np.concatenate([above, np.flatnonzero(scores == threshold)[: k - len(above)]])
    return chosen[np.lexsort((chosen, -scores[chosen]))]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -35.0, 35.0)))


class ClickRanker:
    """Top-``k`` items by a click model: the recommender's candidates (up to ``candidate_limit``; all catalog
    items without a recommender), minus what the recommender excludes and the item on show (``item_id``).

    ``cached``: hash each merchant's catalog once (for a context that does not change: a bundle; call
    :meth:`clear` after changing it in place); otherwise featurize every request with the featurizer.
    A model with ``linear_terms() -> (weights, bias)`` is scored from the cache without building the
    ``(n, F)`` slot matrix.
    """

    def __init__(self, feature_bits: int, *, cached: bool = True, featurizer: Featurizer | None = None) -> None:
        if featurizer is not None and featurizer.bits != feature_bits:
            raise ValueError(f"featurizer has {featurizer.bits} bits, the ranker {feature_bits}")
        self.featurizer = featurizer or Featurizer(feature_bits)
        self.cached = cached
        self._index = _CandidateIndex(self.featurizer)

    def clear(self) -> None:
        """Drop cached candidate slots (after mutating the context's catalogs or the weights in place)."""
        self._index.clear()

    def rank(self, model: Any, context: FeatureContext, recommender: Any | None, merchant_id: str, user_id: str,
             k: int, *, when: float, item_id: str | None = None, candidate_limit: int = 500) -> list[Recommended]:
        """Top-``k`` :class:`~online.ranking.Recommended` (source ``click-model`` without a recommender,
        ``candidates`` with one), best first; ties go to the earlier candidate."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        item_ids, scores, are_logits = self._scores(model, context, recommender, merchant_id, user_id, when,
                                                    max(candidate_limit, k))
        if not item_ids:
            return []
        excluded = recommender.exclude(merchant_id, user_id) if recommender is not None else set()
        if item_id is not None:
            excluded = excluded | {item_id}
        if excluded:
            keep = np.fromiter((item not in excluded for item in item_ids), dtype=bool, count=len(item_ids))
            scores = np.where(keep, scores, -np.inf)
        best = _top_k(scores, k)
        best = best[np.isfinite(scores[best])]
        chosen = _sigmoid(scores[best]) if are_logits else scores[best]
        source = "click-model" if recommender is None else "candidates"
        return [Recommended(item_ids[i], float(p), source) for i, p in zip(best.tolist(), chosen.tolist())]

    def candidate_features(self, context: FeatureContext, recommender: Any | None, merchant_id: str, user_id: str,
                           when: float, candidate_limit: int = 500) -> tuple[list[str], np.ndarray]:
        """Candidate item ids and their slot indices ``int32[n, F]`` (values are all ones)."""
        item_ids, cached, rows, slots, unknown = self._candidates(context, recommender, merchant_id, user_id, when,
                                                                  candidate_limit)
        parts = [_assemble(cached, slots, rows)] if slots is not None else []
        if unknown:
            parts.append(self.featurizer.candidates(merchant_id, user_id, unknown, context, timestamp=when)[0])
        if not parts:
            return [], np.empty((0, len(FIELDS)), dtype=np.int32)
        return item_ids, np.concatenate(parts)

    def _scores(self, model: Any, context: FeatureContext, recommender: Any | None, merchant_id: str, user_id: str,
                when: float, limit: int) -> tuple[list[str], np.ndarray, bool]:
        """Candidate ids and their scores: logits on the linear cached path, else probabilities."""
        linear = getattr(model, "linear_terms", None) if self.cached else None
        if linear is None:
            item_ids, indices = self.candidate_features(context, recommender, merchant_id, user_id, when, limit)
            if not item_ids:
                return [], np.empty(0), False
            ones = np.ones(indices.shape, np.float32)
            return item_ids, np.asarray(model.predict_proba_many(indices, ones), np.float64), False
        weights, bias = linear()
        item_ids, cached, rows, slots, unknown = self._candidates(context, recommender, merchant_id, user_id, when,
                                                                  limit)
        mask = self.featurizer.n_features - 1
        parts = [_linear_logits(cached, slots, rows, weights, float(bias), when, mask)] if slots is not None else []
        if unknown:
            indices, _ = self.featurizer.candidates(merchant_id, user_id, unknown, context, timestamp=when)
            parts.append(float(bias) + weights[indices].sum(axis=1, dtype=np.float64))
        return item_ids, (np.concatenate(parts) if parts else np.empty(0)), True

    def _candidates(self, context: FeatureContext, recommender: Any | None, merchant_id: str, user_id: str,
                    when: float, limit: int):
        """(item ids, merchant cache, cached rows or None for all, user slots or None, uncached item ids)."""
        merchant = context.merchants.get(merchant_id)
        if not self.cached:
            if recommender is not None:
                proposed = list(dict.fromkeys(recommender.candidates(merchant_id, user_id, limit)))
            else:
                proposed = list(merchant.catalog) if merchant is not None else []
            return proposed, None, None, None, proposed
        cached = self._index.get(merchant_id, context)
        recent = merchant.recent_categories(user_id) if merchant is not None else ()
        mask = self.featurizer.n_features - 1
        if recommender is None:
            if cached is None:
                return [], None, None, None, []
            return cached.item_ids, cached, None, _user_slots(cached, merchant_id, user_id, recent, when, None, mask), []
        proposed = list(dict.fromkeys(recommender.candidates(merchant_id, user_id, limit)))
        known = [item for item in proposed if cached is not None and item in cached.rows]
        unknown = [item for item in proposed if cached is None or item not in cached.rows]  # never in the catalog
        if not known:
            return unknown, cached, None, None, unknown
        rows = np.fromiter((cached.rows[item] for item in known), dtype=np.int64, count=len(known))
        return known + unknown, cached, rows, _user_slots(cached, merchant_id, user_id, recent, when, rows, mask), unknown


__all__ = ["ClickRanker"]
