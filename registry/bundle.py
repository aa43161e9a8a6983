"""What a registered model version is: a scorer plus everything needed to featurize and rank for it.

A :class:`ModelBundle` pairs a model (anything with ``predict_proba_many(indices, values) -> float[n]``:
our numpy learners, River models wrapped by the online room, the federated model's numpy scorer) with the
feature space it was trained on (``feature_bits``), the :class:`~streams.features.FeatureContext` it was
trained against (catalogs, users' recent categories) and an optional recommender that proposes
candidates. The bundle is the unit MLflow stores (see :mod:`registry.flavor`) and serving loads; it
ranks through the recommender's own ``rank()`` or :class:`online.click_ranking.ClickRanker`.

Example:
    >>> import numpy as np
    >>> from streams.features import FeatureContext
    >>> context = FeatureContext()
    >>> for k in range(100):
    ...     context.set_item("m1", f"i{k}", category=f"c{k % 5}", price=10.0 + k)
    >>> bundle = ModelBundle(model=LinearScorer(bits=12), feature_bits=12, context=context)
    >>> [item for item, _ in bundle.recommend("m1", "u1", k=3)] == ["i0", "i1", "i2"]  # all-zero weights tie
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from online.click_ranking import ClickRanker
from online.ranking import Recommended
from streams.features import FeatureContext
from streams.schemas import Click


class Scorer(Protocol):
    def predict_proba_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray: ...


class Recommender(Protocol):
    def candidates(self, merchant_id: str, user_id: str, limit: int) -> list[str]: ...

    def exclude(self, merchant_id: str, user_id: str) -> set[str]: ...


class LinearScorer:
    """A logistic model over hashed slots as plain numpy: ``p = σ(b + Σ w[slot]·value)``.

    The smallest useful scorer: what a federated round exports (averaged weights), and a real, trainable
    model for tests and benchmarks (:meth:`learn_many` is one pass of mini-batch SGD on logloss).

    Example:
        >>> scorer = LinearScorer(bits=8)
        >>> indices, values = np.array([[1, 2]], dtype=np.int32), np.ones((1, 2), dtype=np.float32)
        >>> float(scorer.predict_proba_many(indices, values)[0])
        0.5
        >>> scorer.learn_many(indices, values, np.array([1.0]))
        >>> float(scorer.predict_proba_many(indices, values)[0]) > 0.5
        True
    """

    def __init__(self, bits: int = 20, weights: np.ndarray | None = None, bias: float = 0.0,
                 learning_rate: float = 0.1, l2: float = 1e-6) -> None:
        self.bits = bits
        self.weights = np.zeros(1 << bits, dtype=np.float32) if weights is None else np.asarray(weights, np.float32)
        if self.weights.shape != (1 << bits,):
            raise ValueError(f"weights must have shape ({1 << bits},), got {self.weights.shape}")
        self.bias = float(bias)
        self.learning_rate = learning_rate
        self.l2 = l2

    def linear_terms(self) -> tuple[np.ndarray, float]:
        """``(weights, bias)``: opts into ModelBundle's fast ranking path (p = σ(bias + Σ w[slot]))."""
        return self.weights, self.bias

    def decision_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        return self.bias + (self.weights[indices] * values).sum(axis=1, dtype=np.float32)

    def predict_proba_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(self.decision_many(indices, values), -35.0, 35.0)))

    def learn_many(self, indices: np.ndarray, values: np.ndarray, y: np.ndarray) -> None:
        """One SGD step on logloss; each slot moves by the mean gradient of the rows that touch it, so
        rare slots (user×item) learn as fast as common ones (merchant, device) without blowing up."""
        error = (self.predict_proba_many(indices, values) - np.asarray(y, np.float32)).astype(np.float32)
        slots, inverse, counts = np.unique(indices.ravel(), return_inverse=True, return_counts=True)
        gradient = np.bincount(inverse, weights=(error[:, None] * values).ravel(), minlength=len(slots))
        self.weights[slots] -= (self.learning_rate * (gradient / counts + self.l2 * self.weights[slots])).astype(np.float32)
        self.bias -= float(self.learning_rate * error.mean())


@dataclass
class ModelBundle:
    """A model and what it needs to score clicks and rank items; what each registered version holds.

    ``kind`` says which room trained it (``online`` or ``federated``); ``meta`` carries free-form facts
    (learner name, hyper-parameters) that travel with the pickled bundle; ``multitask`` (versions published
    with ``settings.multitask.enabled``) lets :meth:`recommend_items` rank by expected purchase. A model that also has
    ``linear_terms() -> (weights, bias)`` (a logistic model over the hashed slots) is ranked without
    building the ``(n, F)`` index matrix. Bundles are snapshots: after changing the context's catalogs
    or the model's weights in place, call :meth:`invalidate`.
    """

    model: Any
    feature_bits: int
    context: FeatureContext
    recommender: Any | None = None
    kind: Literal["online", "federated"] = "online"
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    candidate_limit: int = 500
    multitask: Any | None = None  # online.multitask.MultiTaskScorer: P(click), P(order | click) (multi-task on)

    def __post_init__(self) -> None:
        if not hasattr(self.model, "predict_proba_many"):
            raise TypeError(f"model {type(self.model).__name__} has no predict_proba_many(indices, values)")
        if self.kind not in ("online", "federated"):
            raise ValueError(f"kind must be 'online' or 'federated', got {self.kind!r}")
        self._init_caches()

    def _init_caches(self) -> None:
        self._ranker = ClickRanker(self.feature_bits)
        self.featurizer = self._ranker.featurizer

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for cache in ("featurizer", "_index", "_ranker"):  # _index: versions pickled before online.click_ranking
            state.pop(cache, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_caches()

    def merchants(self) -> list[str]:
        """Merchants this bundle can rank for (a catalog in its context, or known to its recommender)."""
        known = {m for m, ctx in self.context.merchants.items() if ctx.catalog}
        listed = getattr(self.recommender, "merchants", None)
        return sorted(known | set(listed() if callable(listed) else ()))

    def invalidate(self) -> None:
        """Drop cached candidate features (after mutating the context's catalogs or the weights in place)."""
        self._ranker.clear()

    def warm_up(self) -> None:
        """Build every merchant's candidate cache now (serving does this before swapping a model in)."""
        for merchant_id in self.merchants():
            self.recommend(merchant_id, "warm-up", k=1)

    def predict(self, clicks: Sequence[Click]) -> np.ndarray:
        """Click probabilities ``float[n]`` of impressions, featurized against the bundle's context."""
        if not clicks:
            return np.empty(0, dtype=np.float64)
        indices, values = self.featurizer.transform_many(clicks, self.context)
        return np.asarray(self.model.predict_proba_many(indices, values), dtype=np.float64)

    def recommend(self, merchant_id: str, user_id: str, k: int = 10, *, timestamp: float | None = None,
                  item_id: str | None = None) -> list[tuple[str, float]]:
        """Top-``k`` ``(item_id, score)`` for the user (see :meth:`recommend_items`)."""
        return [(r.item_id, r.score) for r in self.recommend_items(merchant_id, user_id, k, timestamp=timestamp,
                                                                    item_id=item_id)]

    def recommend_items(self, merchant_id: str, user_id: str, k: int = 10, *, timestamp: float | None = None,
                        item_id: str | None = None, by: str = "ranker", purchase_weight: float = 0.3,
                        depth: int = 30) -> list[Recommended]:
        """Top-``k`` items with their score and the source that proposed each.

        A recommender with ``rank()`` (:class:`online.ranking.ShopRecommender`) ranks its own candidates
        with its learned ranker (``item_id``: a product page, "bought together"); otherwise the click model
        ranks the recommender's candidates (or the whole catalog): :class:`online.click_ranking.ClickRanker`.
        With ``by="expected_purchase"`` and a multi-task model, that order's top ``depth`` is re-ordered by
        ``purchase_weight · log P(order | impression) - log(1 + rank)`` and each score is P(order |
        impression) (:func:`online.multitask.purchase_order`); :meth:`ranked_by` says which applies.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if by == "expected_purchase" and self.multitask is not None:
            return self._by_purchase(merchant_id, user_id, k, timestamp, item_id, purchase_weight, depth)
        rank = getattr(self.recommender, "rank", None)
        if rank is not None:
            return rank(merchant_id, user_id, k, timestamp=timestamp, item_id=item_id)
        when = time.time() if timestamp is None else timestamp
        return self._ranker.rank(self.model, self.context, self.recommender, merchant_id, user_id, k, when=when,
                                 item_id=item_id, candidate_limit=self.candidate_limit)

    def ranked_by(self, by: str = "ranker") -> str:
        """Which score orders :meth:`recommend_items` given ``by``: ``expected_purchase`` (asked for and the
        version has a multi-task model), ``ranker`` (a two-stage recommender) or ``click``."""
        if by == "expected_purchase" and self.multitask is not None:
            return "expected_purchase"
        return "ranker" if hasattr(self.recommender, "rank") else "click"

    def _by_purchase(self, merchant_id: str, user_id: str, k: int, timestamp: float | None, item_id: str | None,
                     weight: float, depth: int) -> list[Recommended]:
        from online.multitask import purchase_order

        ranked = self.recommend_items(merchant_id, user_id, max(k, depth), timestamp=timestamp, item_id=item_id)
        shop = getattr(getattr(self.recommender, "state", None), "shops", {}).get(merchant_id)
        clock = getattr(shop, "clock", -math.inf)
        when = timestamp if timestamp is not None else clock if math.isfinite(clock) else time.time()
        order, purchase = purchase_order(self.multitask.predict_many, self.featurizer, self.context, merchant_id,
                                         user_id, [r.item_id for r in ranked], when, weight=weight)
        return [Recommended(ranked[i].item_id, float(purchase[i]), ranked[i].source) for i in order[:k]]

    def candidate_features(self, merchant_id: str, user_id: str, when: float) -> tuple[list[str], np.ndarray]:
        """Candidate item ids and their slot indices ``int32[n, F]`` (values are all ones)."""
        return self._ranker.candidate_features(self.context, self.recommender, merchant_id, user_id, when,
                                               self.candidate_limit)

__all__ = ["ModelBundle", "LinearScorer", "Scorer", "Recommender"]
