"""The prequential evaluator and the drift monitor's block path as they were before the native path (frozen):
the reference they are tested against (tests/test_online_prequential.py, tests/test_drift_native.py).

* :class:`OldStreamMetrics`, :class:`OldPrequentialEvaluator`: the evaluator's former classes, verbatim.
* :func:`old_observe_predictions`: ``DriftMonitor.observe_predictions``'s former body, feeding each error
  detector through :func:`old_chunked_update_many` (``_ChunkedError.update_many``'s former loop: River's test
  once per chunk, through ``Detector.update``), with the former :func:`old_prequential_errors`.
* :func:`load_as_reference`: unpickles state written by the current classes into the frozen ones.
"""

from __future__ import annotations

import io
import math
import pickle
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from drift.detectors import Signal, _ChunkedError, watchers
from drift.events import DriftEvent
from drift.monitor import DriftMonitor
from online.prequential import _bins_table, logloss, reliability, roc_auc

ErrorTuple = tuple[str, float, bool, float]


class OldStreamMetrics:
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


class OldPrequentialEvaluator:
    """Global and per-merchant :class:`StreamMetrics`; emits the error stream to subscribers."""

    def __init__(self, window: int = 1000, bins: int = 10, keep_errors: int = 10_000) -> None:
        if window < 2 or bins < 1:
            raise ValueError("window must be >= 2 and bins >= 1")
        self.window = window
        self.bins = bins
        self.overall = OldStreamMetrics(window, bins)
        self.merchants: dict[str, OldStreamMetrics] = {}
        self.errors: deque[ErrorTuple] = deque(maxlen=keep_errors)
        self._subscribers: list[Callable[[ErrorTuple], Any]] = []

    def subscribe(self, callback: Callable[[ErrorTuple], Any]) -> None:
        """Call ``callback((merchant_id, timestamp, y, p))`` for every evaluated event (not pickled)."""
        self._subscribers.append(callback)

    def _merchant(self, merchant_id: str) -> OldStreamMetrics:
        found = self.merchants.get(merchant_id)
        if found is None:
            found = self.merchants[merchant_id] = OldStreamMetrics(self.window, self.bins)
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


def old_prequential_errors(y: np.ndarray, p: np.ndarray, metric: str = "excess_logloss", clip: float = 1e-3) -> np.ndarray:
    """:func:`prequential_error` of a whole block of predictions at once (the online worker's path).

    >>> errors = prequential_errors(np.array([True, False, True]), np.array([0.9, 0.9, 0.0005]))
    >>> bool(np.allclose(errors, [prequential_error(1, 0.9), prequential_error(0, 0.9), prequential_error(1, 0.0005)]))
    True
    """
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    if metric == "zero_one":
        return ((p >= 0.5) != y).astype(np.float64)
    if metric not in ("logloss", "excess_logloss"):
        raise ValueError(f"unknown error metric {metric!r}: use 'excess_logloss', 'logloss' or 'zero_one'")
    p = np.clip(p, clip, 1.0 - clip)
    loss = -np.log(np.where(y, p, 1.0 - p))
    if metric == "logloss":
        return loss
    return loss + p * np.log(p) + (1.0 - p) * np.log(1.0 - p)


def old_observe_predictions(self: DriftMonitor, merchant_ids: Sequence[str], timestamps: Sequence[float], y: Sequence,
                        p: Sequence) -> list[DriftEvent]:
    """:meth:`observe_prediction` for a block of predictions in stream order (one call per learned block).

    The errors are computed at once, then each merchant's detectors take that merchant's errors in one
    :meth:`~drift.detectors._ChunkedError.update_many` call; detections are emitted in stream order.
    """
    errors = old_prequential_errors(np.asarray(y), np.asarray(p), self.config.error_metric, self.config.error_clip)
    if len(errors) != len(merchant_ids) or len(errors) != len(timestamps):
        raise ValueError("merchant_ids, timestamps, y and p must have one length")
    codes: dict[str, int] = {}
    merchant_codes = [codes.setdefault(m, len(codes)) for m in merchant_ids]
    if len(codes) == 1:
        groups = [(merchant_ids[0], None)]
    else:
        merchant_codes = np.array(merchant_codes)
        groups = [(m, np.flatnonzero(merchant_codes == code)) for m, code in codes.items()]
    stamps = np.asarray(timestamps, dtype=np.float64)
    fired: list[tuple[int, int, DriftEvent]] = []
    for merchant_id, positions in groups:
        detectors = self._detectors_of(merchant_id)
        mine = errors if positions is None else errors[positions]
        indices = self._count_predictions(merchant_id, len(mine))
        values, when = mine.tolist(), stamps if positions is None else stamps[positions]
        for rank, name in enumerate(n for n in watchers(Signal.ERROR) if n in detectors):
            for position, event in old_chunked_update_many(detectors[name], values, when, indices):
                fired.append((position if positions is None else int(positions[position]), rank, event))
    fired.sort(key=lambda found: found[:2])
    return self._emit([event for _, _, event in fired]) if fired else []



def old_chunked_update_many(self: _ChunkedError, values: list[float], timestamps, indices) -> list[tuple[int, DriftEvent]]:
    """:meth:`update` of each value in order; returns ``(position, event)`` for each detection.

    Only the value that completes a chunk goes through :meth:`update`; the others are counted and
    queued in bulk (the worker's hot path: one call per merchant per learned block).
    """
    fired: list[tuple[int, DriftEvent]] = []
    position, n = 0, len(values)
    while position < n:
        if self.n_seen < self.warmup:  # warm-up values are only counted
            take = min(self.warmup - self.n_seen, n - position)
        else:
            take = min(self.chunk - 1 - len(self._pending), n - position)
            self._pending.extend(values[position:position + take])
        if take > 0:
            self.n_seen += take
            position += take
            self._last_index, self._last_time = int(indices[position - 1]), float(timestamps[position - 1])
            continue
        event = self.update(values[position], timestamp=timestamps[position], index=int(indices[position]))
        if event is not None:
            fired.append((position, event))
        position += 1
    return fired


class _ReferenceUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "online.prequential" and name in ("StreamMetrics", "PrequentialEvaluator"):
            return {"StreamMetrics": OldStreamMetrics, "PrequentialEvaluator": OldPrequentialEvaluator}[name]
        return super().find_class(module, name)


def load_as_reference(blob: bytes):
    """``pickle.loads`` with the evaluator's classes replaced by the frozen ones."""
    return _ReferenceUnpickler(io.BytesIO(blob)).load()
