"""The detector interface every family implements, and the prequential error the ``error.*`` family watches."""

from __future__ import annotations

import bisect
import math
import time
from abc import ABC, abstractmethod
from collections import deque

import numpy as np

from drift.events import DriftEvent
from fedstream.settings import DriftSettings

#: The calibrated thresholds (``benchmarks/drift.py --calibrate``) are the detectors' defaults too: one source.
CALIBRATED = DriftSettings()


def prequential_error(y: bool | int, p: float, metric: str = "excess_logloss", clip: float = 1e-3) -> float:
    """The error of predicting ``p`` = P(y=1) before seeing ``y``.

    ``excess_logloss`` (default) is the logloss minus the loss the model itself expects, the entropy
    ``H(p)``: its mean is 0 while the model is calibrated, whatever the base rate, so a click rate that
    moves with the hour of day does not look like a worse model, while a concept change does.
    ``logloss`` (clipped) and ``zero_one`` are the raw alternatives.

    >>> round(prequential_error(1, 0.9, "logloss"), 4), prequential_error(0, 0.9, "zero_one")
    (0.1054, 1.0)
    >>> round(0.1 * prequential_error(1, 0.1) + 0.9 * prequential_error(0, 0.1), 12)  # calibrated: 0 on average
    0.0
    """
    if metric == "zero_one":
        return float((p >= 0.5) != bool(y))
    if metric not in ("logloss", "excess_logloss"):
        raise ValueError(f"unknown error metric {metric!r}: use 'excess_logloss', 'logloss' or 'zero_one'")
    p = min(max(float(p), clip), 1.0 - clip)
    loss = -math.log(p if y else 1.0 - p)
    if metric == "logloss":
        return loss
    return loss + p * math.log(p) + (1.0 - p) * math.log(1.0 - p)


def prequential_errors(y: np.ndarray, p: np.ndarray, metric: str = "excess_logloss", clip: float = 1e-3) -> np.ndarray:
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
    q = 1.0 - p
    log_p, log_q = np.log(p), np.log(q)  # each value's log once (the same value per element as log of a mix)
    loss = np.where(y, log_p, log_q)
    np.negative(loss, out=loss)
    if metric == "logloss":
        return loss
    log_p *= p
    log_q *= q
    loss += log_p
    loss += log_q
    return loss


class _Trail:
    """Sparse, bounded map from a detector's value count to (merchant event index, timestamp).

    ADWIN windows can hold 100k+ values; remembering every 16th position is enough to date a window.
    """

    def __init__(self, stride: int = 16, maxlen: int = 16_384) -> None:
        self.stride = stride
        self.counts: deque[int] = deque(maxlen=maxlen)
        self.points: deque[tuple[int, float]] = deque(maxlen=maxlen)

    def add(self, count: int, index: int, timestamp: float) -> None:
        if count % self.stride == 0:
            self.counts.append(count)
            self.points.append((index, timestamp))

    def extend(self, counts: list[int], indices: list[int], timestamps: list[float]) -> None:
        """:meth:`add` of each ``(count, index, timestamp)`` in order."""
        if self.stride != 1:
            for count, index, timestamp in zip(counts, indices, timestamps):
                self.add(count, index, timestamp)
            return
        self.counts.extend(counts)
        self.points.extend(zip(indices, timestamps))

    def at(self, count: int) -> tuple[int, float]:
        if not self.counts:
            return (0, 0.0)
        pos = min(bisect.bisect_left(self.counts, count), len(self.counts) - 1)
        return self.points[pos]


class Detector(ABC):
    """Shared bookkeeping: counts, cool-down, the last event; subclasses implement ``_check``."""

    family = "feature"
    statistic = ""
    # calibration: the largest test statistic seen where a detection could have been reported (after warm-up,
    # outside cool-downs), in the units of the detector's threshold; class defaults keep old pickles loadable
    peak = 0.0
    _fresh: float | None = None

    def __init__(self, merchant_id: str, name: str, *, model_version: str | None = None, cooldown: int = 0,
                 warmup: int = 0) -> None:
        self.merchant_id = merchant_id
        self.name = name
        self.model_version = model_version
        self.cooldown = cooldown
        self.warmup = warmup
        self.n_seen = 0
        self.n_detections = 0
        self.last_event: DriftEvent | None = None
        self._quiet_until = warmup
        self._last_index = -1
        self._last_time = 0.0

    def update(self, value, *, timestamp: float, index: int | None = None) -> DriftEvent | None:
        """Feed one value observed at ``timestamp`` (``index``: the merchant's event count, default own count)."""
        index = self.n_seen if index is None else index
        self.n_seen += 1
        self._last_index, self._last_time = index, float(timestamp)
        found = self._observe(value, index, float(timestamp))
        if self._fresh is not None:
            if self.n_seen >= self._quiet_until and self._fresh > self.peak:
                self.peak = self._fresh
            self._fresh = None
        if found is None or self.n_seen < self._quiet_until:
            return None
        event = self._event(found, index, timestamp)
        self.n_detections += 1
        self.last_event = event
        self._quiet_until = self.n_seen + self.cooldown
        self._after_detection()
        return event

    def _event(self, found: tuple, index: int, timestamp: float) -> DriftEvent:
        """The event of a detection ``found`` (as :meth:`_observe` returns it) at the value ``index``, ``timestamp``."""
        statistic_value, threshold, (start_index, start_time), details = found
        return DriftEvent(
            merchant_id=self.merchant_id, model_version=self.model_version, detector=self.name,
            statistic=self.statistic, value=float(statistic_value), threshold=float(threshold),
            window_start_index=int(start_index), window_end_index=int(index),
            window_start_time=float(start_time), window_end_time=float(timestamp), event_index=int(index),
            detected_at=time.time(), details={k: float(v) for k, v in details.items()},
        )

    @abstractmethod
    def _observe(self, value, index: int, timestamp: float):
        """Return ``(value, threshold, (window start index, start time), details)`` when drift is seen."""

    def _measured(self, value: float) -> None:
        """Record the statistic just tested against the threshold (for :attr:`peak`)."""
        self._fresh = float(value)

    def _after_detection(self) -> None:
        """Forget the old regime (default: nothing to forget)."""

    def state(self) -> dict:
        """Inspectable state: counts, cool-down and detector-specific figures."""
        return {"detector": self.name, "merchant_id": self.merchant_id, "n_seen": self.n_seen,
                "n_detections": self.n_detections, "quiet_until": self._quiet_until,
                "last_index": self._last_index, "peak": self.peak}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.merchant_id!r}, {self.name!r}, n_seen={self.n_seen})"
