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

import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedstream.metrics import logloss, mean_logloss, roc_auc  # noqa: F401  (re-exported: the scores' old home)
from online import metric_kernels

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


def label_logloss(labels: np.ndarray, p: np.ndarray, clip: float = 1e-15) -> np.ndarray:
    """:func:`logloss` of boolean labels, the same value for value in 5 array passes instead of 9: with a label
    of 1 its ``-(y log p + (1 - y) log(1 - p))`` is exactly ``-log p`` (``0 * log(1 - p)`` is -0.0, which adds
    nothing), with 0 exactly ``-log(1 - p)``; numpy's log of each value does not depend on its neighbours.

    >>> bool((label_logloss(np.array([True, False]), np.array([0.9, 0.9])) == logloss(np.array([1.0, 0.0]),
    ...                                                                              np.array([0.9, 0.9]))).all())
    True
    """
    q = np.clip(p, clip, 1 - clip)
    out = np.where(labels, q, 1 - q)
    np.log(out, out=out)
    return np.negative(out, out=out)


def group_positions(keys: Sequence[str]) -> list[tuple[str, np.ndarray | None]]:
    """Each distinct key in order of first appearance, with its positions in ``keys`` (ascending); ``None``
    for the positions when there is one key only (all of them). One pass, no per-key mask; a list equal to the
    one grouped last gets the same (shared, read-only) groups back without a pass.

    >>> [(key, None if at is None else at.tolist()) for key, at in group_positions(["b", "a", "b", "c"])]
    [('b', [0, 2]), ('a', [1]), ('c', [3])]
    """
    global _last_grouping
    last_keys, last_groups = _last_grouping
    if type(keys) is list and keys == last_keys:  # the worker groups each block twice (evaluator, drift monitor)
        return last_groups
    firsts: dict = {}  # key -> position of its first row; one pass over the keys (each key object read once)
    first = np.fromiter(map(firsts.setdefault, keys, itertools.count()), dtype=np.intp, count=len(keys))
    if len(firsts) <= 1:
        groups = [(key, None) for key in firsts]
    else:
        order = np.empty(len(keys), dtype=np.intp)
        ends = metric_kernels.group_order(first, order).tolist()
        groups = [(key, order[start:end]) for key, start, end in zip(firsts, [0, *ends], ends)]
    if type(keys) is list:
        _last_grouping = (list(keys), groups)
    return groups


# The last list grouped (a copy: comparing it with the next list is a pointer comparison per equal string, and a
# list changed in place since no longer compares equal) and its groups. Equal keys give equal groups.
_last_grouping: tuple[list | None, list] = (None, [])


class StreamMetrics:
    """Metrics of one stream of (y, p) pairs and of one stream of ranked lists.

    The last ``window`` pairs live in two ring arrays (pickled as the deque of ``(y, p)`` they replaced, so
    checkpoints keep their layout both ways).
    """

    def __init__(self, window: int = 1000, bins: int = 10) -> None:
        self.window = window
        self.bins = bins
        self.events = 0
        self.positives = 0
        self.loss_sum = 0.0
        self._forget_recent()
        self.bin_count = np.zeros(bins)
        self.bin_p = np.zeros(bins)
        self.bin_y = np.zeros(bins)
        self.rankings: dict[int, list[float]] = {}  # k -> [lists, hits, ndcg sum]

    def _forget_recent(self) -> None:
        self._recent_y, self._recent_p = np.zeros(self.window), np.zeros(self.window)
        self._recent_n = 0  # pairs held (<= window)
        self._recent_at = 0  # where the next pair goes; the oldest pair once full

    def update(self, y: float, p: float) -> None:
        self.events += 1
        self.positives += int(y)
        q = min(max(p, 1e-15), 1 - 1e-15)
        self.loss_sum -= math.log(q) if y else math.log(1 - q)
        at = self._recent_at
        self._recent_y[at], self._recent_p[at] = y, p
        self._recent_at, self._recent_n = (at + 1) % self.window, min(self._recent_n + 1, self.window)
        b = min(int(p * self.bins), self.bins - 1)
        self.bin_count[b] += 1
        self.bin_p[b] += p
        self.bin_y[b] += y

    def update_many(self, y: np.ndarray, p: np.ndarray) -> None:
        """:meth:`update` for arrays of labels and probabilities."""
        if len(y) == 0:
            return
        yf = np.asarray(y, dtype=np.float64)
        self.add_block(yf, np.asarray(p, dtype=np.float64), logloss(yf, p))

    def add_block(self, y: np.ndarray, p: np.ndarray, loss: np.ndarray) -> None:
        """Fold in a non-empty block: float labels, probabilities and their :func:`logloss`."""
        self.events += len(y)
        self.loss_sum += float(np.add.reduce(loss))  # numpy's pairwise sum, as ``loss.sum()``
        positives, self._recent_at = metric_kernels.fold_block(p, y, self.bin_count, self.bin_p, self.bin_y,
                                                               self._recent_y, self._recent_p, self._recent_at)
        self.positives += positives
        self._recent_n = min(self._recent_n + len(y), self.window)

    def recent(self) -> np.ndarray:
        """The last ``window`` pairs, oldest first: an ``(n, 2)`` array of ``(y, p)`` rows."""
        n, at = self._recent_n, self._recent_at
        pairs = np.empty((n, 2))
        for column, ring in enumerate((self._recent_y, self._recent_p)):
            pairs[:, column] = ring[:n] if n < self.window else np.concatenate((ring[at:], ring[:at]))
        return pairs

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_recent")}
        state["recent"] = deque(map(tuple, self.recent().tolist()), maxlen=self.window)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        pairs = state.pop("recent")
        self.__dict__.update(state)
        self._forget_recent()
        if pairs:
            y, p = np.array(pairs, dtype=np.float64).T
            self._recent_at = metric_kernels.write_ring(self._recent_y, self._recent_p, 0, y, p)
            self._recent_n = min(len(y), self.window)

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
        if self._recent_n:
            y, p = self.recent().T
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
        self._listed: deque[ErrorTuple] = deque(maxlen=keep_errors)
        self._unlisted: deque[tuple] = deque()  # blocks (ids, timestamps, y, p) not yet turned into tuples
        self._unlisted_n = 0
        self._subscribers: list[Callable[[ErrorTuple], Any]] = []

    @property
    def errors(self) -> deque[ErrorTuple]:
        """The last ``keep_errors`` ``(merchant_id, timestamp, y, p)``, oldest first. Blocks are kept as
        arrays and turned into tuples only when this is read."""
        if self._unlisted:
            listed = self._listed
            if listed.maxlen is not None and self._unlisted_n >= listed.maxlen:
                listed.clear()
            for ids, stamps, labels, probs in self._unlisted:
                listed.extend(zip(ids, map(float, stamps), labels.tolist(), probs.tolist()))
            self._unlisted.clear()
            self._unlisted_n = 0
        return self._listed

    def _keep_block(self, ids: list, stamps, labels: np.ndarray, probs: np.ndarray) -> None:
        """Queue a block for :attr:`errors`, dropping whole blocks the newer ones push out."""
        unlisted, limit = self._unlisted, self._listed.maxlen
        unlisted.append((ids, stamps, labels, probs))
        self._unlisted_n += len(ids)
        while limit is not None and unlisted and self._unlisted_n - len(unlisted[0][0]) >= limit:
            self._unlisted_n -= len(unlisted.popleft()[0])

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
        """:meth:`update` for a batch (the same metrics as the block path always gave: one log loss, bins in
        one native loop, the merchants grouped once)."""
        labels = np.array(y, dtype=bool)  # copies: the error blocks keep them
        probs = np.array(p, dtype=np.float64)
        if labels.shape != probs.shape or len(labels) != len(merchant_ids) or len(labels) != len(timestamps):
            raise ValueError("merchant_ids, timestamps, y and p must have one length")
        if len(labels) == 0:
            return
        if not (np.minimum.reduce(probs, axis=None) >= 0.0 and np.maximum.reduce(probs, axis=None) <= 1.0):  # NaN fails
            raise ValueError("p must be probabilities in [0, 1]")
        yf = labels.astype(np.float64)
        loss = label_logloss(labels, probs)
        self.overall.add_block(yf, probs, loss)
        for merchant_id, at in group_positions(merchant_ids):
            if at is None:
                self._merchant(merchant_id).add_block(yf, probs, loss)
            else:
                self._merchant(merchant_id).add_block(yf[at], probs[at], loss[at])
        ids = list(merchant_ids)
        stamps = np.array(timestamps) if isinstance(timestamps, np.ndarray) else list(timestamps)
        self._keep_block(ids, stamps, labels, probs)
        if self._subscribers:
            items = list(zip(ids, map(float, stamps), labels.tolist(), probs.tolist()))
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
        """The layout of the evaluator that kept ``errors`` as tuples (checkpoints load both ways)."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_listed", "_unlisted", "_unlisted_n")}
        state["errors"] = self.errors
        state["_subscribers"] = []
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        self._listed = state.pop("errors")
        self._unlisted, self._unlisted_n = deque(), 0
        self.__dict__.update(state)


__all__ = ["PrequentialEvaluator", "StreamMetrics", "group_positions", "label_logloss", "roc_auc", "reliability",
           "logloss"]
