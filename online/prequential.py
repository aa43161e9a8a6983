"""Prequential (test-then-train) evaluation per merchant and overall, plus the per-event error stream.

Each prediction is made before its label is learned, so every event is a test event (Gama et al. 2013).
:class:`PrequentialEvaluator` keeps, for the whole stream and for each merchant:

* log loss — cumulative and over the last ``window`` events;
* ROC AUC — exact, over the last ``window`` events (Mann-Whitney with tied ranks, computed on demand:
  updates stay O(1));
* calibration — binned reliability (mean prediction vs click rate per probability bin) and expected
  calibration error, cumulative and over the window;
* recommendations — HitRate@K and NDCG@K of a ranked list against the next item the user clicked or
  ordered (:meth:`PrequentialEvaluator.observe_ranking`).

Every update emits ``(merchant_id, timestamp, y, p)`` to its subscribers (callbacks; the worker feeds its
drift detectors per block instead) and keeps the last ones in :attr:`PrequentialEvaluator.errors`.

Example:
    >>> evaluator = PrequentialEvaluator(window=100)
    >>> seen = []
    >>> evaluator.subscribe(seen.append)
    >>> for t, (y, p) in enumerate([(1, 0.9), (0, 0.2), (1, 0.6), (0, 0.4)]):
    ...     _ = evaluator.update("m1", float(t), y, p)
    >>> report = evaluator.report()
    >>> report["events"], report["rolling_auc"], round(report["logloss"], 4)
    (4, 1.0, 0.3375)
    >>> seen[0]
    ('m1', 0.0, True, 0.9)
    >>> evaluator.observe_ranking("m1", ["i3", "i7", "i1"], "i7", k=3)
    >>> round(evaluator.report("m1")["ndcg@3"], 4), evaluator.report("m1")["hit_rate@3"]
    (0.6309, 1.0)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedstream.metrics import logloss, mean_logloss, roc_auc  # noqa: F401  (re-exported: the scores' old home)

ErrorTuple = tuple[str, float, bool, float]


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[list[dict], float]:
    """Per-bin ``{low, high, count, mean_p, rate}`` and the expected calibration error."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    sum_p = np.bincount(which, weights=p, minlength=bins)
    sum_y = np.bincount(which, weights=y, minlength=bins)
    return _bins_table(count, sum_p, sum_y, bins)


def _bins_table(count: np.ndarray, sum_p: np.ndarray, sum_y: np.ndarray, bins: int) -> tuple[list[dict], float]:
    total = count.sum()
    table, ece = [], 0.0
    for b in range(bins):
        if count[b]:
            mean_p, rate = sum_p[b] / count[b], sum_y[b] / count[b]
            ece += count[b] / total * abs(mean_p - rate)
            table.append({"low": b / bins, "high": (b + 1) / bins, "count": int(count[b]),
                          "mean_p": float(mean_p), "rate": float(rate)})
    return table, (float(ece) if total else float("nan"))


class StreamMetrics:
    """Metrics of one stream of (y, p) pairs and of one stream of ranked lists."""

    def __init__(self, window: int = 1000, bins: int = 10) -> None:
        self.window = window
        self.bins = bins
        self.events = 0
        self.positives = 0
        self.loss_sum = 0.0
        self.recent: deque[tuple[float, float]] = deque(maxlen=window)
        self.bin_count = np.zeros(bins)
        self.bin_p = np.zeros(bins)
        self.bin_y = np.zeros(bins)
        self.rankings: dict[int, list[float]] = {}  # k -> [lists, hits, ndcg sum]

    def update(self, y: float, p: float) -> None:
        self.events += 1
        self.positives += int(y)
        q = min(max(p, 1e-15), 1 - 1e-15)
        self.loss_sum -= math.log(q) if y else math.log(1 - q)
        self.recent.append((y, p))
        b = min(int(p * self.bins), self.bins - 1)
        self.bin_count[b] += 1
        self.bin_p[b] += p
        self.bin_y[b] += y

    def update_many(self, y: np.ndarray, p: np.ndarray) -> None:
        """:meth:`update` for arrays of labels and probabilities."""
        if len(y) == 0:
            return
        yf = y.astype(np.float64)
        self.events += len(y)
        self.positives += int(y.sum())
        self.loss_sum += float(logloss(yf, p).sum())
        self.recent.extend(zip(yf.tolist(), p.tolist()))
        which = np.minimum((p * self.bins).astype(np.int64), self.bins - 1)
        self.bin_count += np.bincount(which, minlength=self.bins)
        self.bin_p += np.bincount(which, weights=p, minlength=self.bins)
        self.bin_y += np.bincount(which, weights=yf, minlength=self.bins)

    def rank(self, ranked: Sequence[str], actual: str, k: int) -> None:
        stats = self.rankings.setdefault(k, [0.0, 0.0, 0.0])
        stats[0] += 1
        top = list(ranked[:k])
        if actual in top:
            stats[1] += 1
            stats[2] += 1.0 / math.log2(top.index(actual) + 2)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"events": self.events,
                               "click_rate": self.positives / self.events if self.events else float("nan"),
                               "logloss": self.loss_sum / self.events if self.events else float("nan")}
        if self.recent:
            y, p = np.array(self.recent).T
            out["rolling_logloss"] = float(logloss(y, p).mean())
            out["rolling_auc"] = roc_auc(y, p)
            out["rolling_ece"] = reliability(y, p, self.bins)[1]
            out["window_events"] = len(y)
        table, ece = _bins_table(self.bin_count, self.bin_p, self.bin_y, self.bins)
        out["ece"] = ece
        out["reliability"] = table
        for k, (lists, hits, ndcg) in sorted(self.rankings.items()):
            out[f"hit_rate@{k}"] = hits / lists
            out[f"ndcg@{k}"] = ndcg / lists
            out[f"rankings@{k}"] = int(lists)
        return out


class PrequentialEvaluator:
    """Global and per-merchant :class:`StreamMetrics`; emits the error stream to subscribers."""

    def __init__(self, window: int = 1000, bins: int = 10, keep_errors: int = 10_000) -> None:
        if window < 2 or bins < 1:
            raise ValueError("window must be >= 2 and bins >= 1")
        self.window = window
        self.bins = bins
        self.overall = StreamMetrics(window, bins)
        self.merchants: dict[str, StreamMetrics] = {}
        self.errors: deque[ErrorTuple] = deque(maxlen=keep_errors)
        self._subscribers: list[Callable[[ErrorTuple], Any]] = []

    def subscribe(self, callback: Callable[[ErrorTuple], Any]) -> None:
        """Call ``callback((merchant_id, timestamp, y, p))`` for every evaluated event (not pickled)."""
        self._subscribers.append(callback)

    def _merchant(self, merchant_id: str) -> StreamMetrics:
        found = self.merchants.get(merchant_id)
        if found is None:
            found = self.merchants[merchant_id] = StreamMetrics(self.window, self.bins)
        return found

    def update(self, merchant_id: str, timestamp: float, y: bool | int | float, p: float) -> ErrorTuple:
        """Record one test-then-train prediction ``p`` of label ``y``."""
        p = float(p)
        if not 0.0 <= p <= 1.0 or math.isnan(p):
            raise ValueError(f"p must be a probability, got {p}")
        label = bool(y)
        self.overall.update(float(label), p)
        self._merchant(merchant_id).update(float(label), p)
        item = (merchant_id, float(timestamp), label, p)
        self.errors.append(item)
        for callback in self._subscribers:
            callback(item)
        return item

    def update_many(self, merchant_ids: Sequence[str], timestamps: Sequence[float], y: Sequence, p: Sequence) -> None:
        """:meth:`update` for a batch (same result, vectorized per merchant)."""
        labels = np.asarray(y, dtype=bool)
        probs = np.asarray(p, dtype=np.float64)
        if labels.shape != probs.shape or len(labels) != len(merchant_ids) or len(labels) != len(timestamps):
            raise ValueError("merchant_ids, timestamps, y and p must have one length")
        if np.isnan(probs).any() or (probs < 0).any() or (probs > 1).any():
            raise ValueError("p must be probabilities in [0, 1]")
        self.overall.update_many(labels, probs)
        ids = np.asarray(merchant_ids, dtype=object)
        for merchant_id in dict.fromkeys(merchant_ids):
            mine = ids == merchant_id
            self._merchant(merchant_id).update_many(labels[mine], probs[mine])
        items = list(zip(merchant_ids, map(float, timestamps), labels.tolist(), probs.tolist()))
        self.errors.extend(items)
        for callback in self._subscribers:
            for item in items:
                callback(item)

    def observe_ranking(self, merchant_id: str, ranked: Sequence[str], actual: str, k: int = 10) -> None:
        """Score a ranked list shown before the user's next click/order on ``actual``."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.overall.rank(ranked, actual, k)
        self._merchant(merchant_id).rank(ranked, actual, k)

    def report(self, merchant_id: str | None = None) -> dict[str, Any]:
        """All metrics of one merchant, or of the whole stream."""
        if merchant_id is None:
            return self.overall.report()
        if merchant_id not in self.merchants:
            raise KeyError(f"no events evaluated for merchant {merchant_id!r}")
        return self.merchants[merchant_id].report()

    def summary(self) -> dict[str, float]:
        """Flat numeric metrics for MLflow; ``prequential_logloss`` is the windowed log loss the registry's
        promotion policy compares, ``window_events`` how many events it covers."""
        report = self.overall.report()
        out = {k.replace("@", "_at_"): float(v) for k, v in report.items()  # MLflow names: no "@"
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "rolling_logloss" in report:
            out["prequential_logloss"] = report["rolling_logloss"]
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def per_merchant(self) -> dict[str, dict[str, Any]]:
        return {m: metrics.report() for m, metrics in sorted(self.merchants.items())}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_subscribers"] = []
        return state


__all__ = ["PrequentialEvaluator", "StreamMetrics", "roc_auc", "reliability", "logloss"]
