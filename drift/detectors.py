"""Drift detectors for one merchant's streams, all with the same small interface.

``detector.update(value, timestamp=..., index=...) -> DriftEvent | None``: feed one value, get an event
back on the update where the detector decides the stream changed. ``state()`` shows what it holds.

Three families, named by what they watch:

* ``error.*`` — the prequential error of the serving model (per-event logloss or 0/1 error, see
  :func:`prequential_error`). River's ADWIN and PageHinkley; only *rises* in error count as drift (a model
  that gets better is not a problem). River's FHDDM is not used: it flags drops of its input.
* ``label.*`` — label rates (click-through, conversion) with a two-window, two-proportion z-test.
* ``feature.<field>.*`` — a feature's distribution: PSI and Kolmogorov-Smirnov for numeric fields (price,
  hour of day), PSI and chi-squared for category shares, reference window vs current window;
  ``feature.user_category.cusum`` — category shares *per user*: how well each user's own history predicts
  the categories they choose (:class:`TasteShift`), the one that sees a change of tastes.

Window tests compare the current window (the last ``window`` values) with the reference window just
before it (the ``reference`` values preceding it); a ``min_span_seconds`` stretches both windows to cover
whole periods of event time, so the hour of day is compared day(s) against day(s) and its daily cycle is
not reported as drift. After a detector fires it forgets the old regime and stays quiet for ``cooldown``
values, so one change is reported once.

Thresholds (``settings.drift``) come from one documented rule applied on drift-free calibration streams
only (:mod:`drift.calibration`: 1.4x the highest statistic seen; ``benchmarks/drift.py --calibrate``);
the benchmark reports false alarms and power on other, held-out seeds (``drift/README.md``). The
generator's traffic comes in sessions (a session's impressions share user, page category and hour), so
events are far from independent and textbook p-values alone fire every day: hence effect-size gates (PSI,
KS distance, Cramér's V, relative rate change) on top of p-values, one hour and device value per session,
day-aligned windows for the hour, device and label rates. Price changes are caught by
``feature.price.index`` (same items, new prices); a taste change the online model re-learns within ~1k
events barely moves the error or the platform-wide shares, which ``feature.user_category.cusum`` sees;
``traffic.rate`` (:mod:`drift.traffic`) sees traffic collapse or surge.

Example (a seeded stream whose mean jumps at value 5000):
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> stream = np.r_[rng.normal(10, 2, 5000), rng.normal(13, 2, 5000)]
    >>> detector = NumericShift("m1", "price", statistic="ks", reference=1000, window=500)
    >>> fired = [e for i, x in enumerate(stream) if (e := detector.update(x, timestamp=float(i)))]
    >>> len(fired), 5000 <= fired[0].event_index < 5500
    (1, True)
"""

from __future__ import annotations

import bisect
import math
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Literal

import numpy as np

from drift.events import DriftEvent
from fedstream.settings import DriftSettings


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
    loss = -np.log(np.where(y, p, 1.0 - p))
    if metric == "logloss":
        return loss
    return loss + p * np.log(p) + (1.0 - p) * np.log(1.0 - p)


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
        statistic_value, threshold, (start_index, start_time), details = found
        event = DriftEvent(
            merchant_id=self.merchant_id, model_version=self.model_version, detector=self.name,
            statistic=self.statistic, value=float(statistic_value), threshold=float(threshold),
            window_start_index=int(start_index), window_end_index=int(index),
            window_start_time=float(start_time), window_end_time=float(timestamp), event_index=int(index),
            detected_at=time.time(), details={k: float(v) for k, v in details.items()},
        )
        self.n_detections += 1
        self.last_event = event
        self._quiet_until = self.n_seen + self.cooldown
        self._after_detection()
        return event

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


class _ChunkedError(Detector):
    """An error detector whose test sees the sum of every ``chunk`` consecutive errors of its merchant.

    River's ADWIN costs ~5 µs per value, a third of the learner worker's budget per event when fed every
    prediction. Sums of ``chunk`` errors cost 1/chunk of that and keep the test's power: a rise in mean
    error is ``chunk`` times larger in the sums, their spread ``sqrt(chunk)`` times, and ADWIN's Bernstein
    bound (``sqrt(2 m v ln) + 2/3 m ln``, ``m`` ~ 1/window) scales by exactly ``chunk`` too, so ADWIN on sums
    cuts about where ADWIN on single errors would (8 seeded streams whose mean error rises 0.40 -> 0.55:
    median delay 415 errors at chunk 16 with a look every 128 errors, 255 unchunked with a look every 32;
    feeding means instead inflates the bound's range term ``chunk``-fold, ~5x the delay at 16). Counts, warm-up, cool-down and event indices stay in single
    predictions. Sums are exact (``math.fsum``), so feeding values one by one (:meth:`update`) or in blocks
    (:meth:`update_many`) leaves identical state whatever the block boundaries: a worker resumed from a
    checkpoint detects exactly as an uninterrupted one.
    """

    family = "error"

    def __init__(self, merchant_id: str, name: str, *, chunk: int = 16, model_version: str | None = None,
                 cooldown: int = 0, warmup: int = 0) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        super().__init__(merchant_id, name, model_version=model_version, cooldown=cooldown, warmup=warmup)
        self.chunk = chunk
        self._pending: list[float] = []
        self._trail = _Trail(stride=1)  # one point per chunk: 16k chunks date windows of 16k*chunk values

    def _observe(self, value: float, index: int, timestamp: float):
        if self.n_seen <= self.warmup:
            return None  # a learning model's early errors would inflate the baseline
        pending = self._pending
        pending.append(float(value))
        if len(pending) < self.chunk:
            return None
        total = math.fsum(pending)
        pending.clear()
        self._trail.add(self.n_seen, index, timestamp)
        return self._observe_sum(total)

    @abstractmethod
    def _observe_sum(self, total: float):
        """:meth:`Detector._observe` for the sum of one chunk."""

    def update_many(self, values: list[float], timestamps, indices) -> list[tuple[int, DriftEvent]]:
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

    def state(self) -> dict:
        return {**super().state(), "chunk": self.chunk, "pending": len(self._pending)}


class ErrorADWIN(_ChunkedError):
    """ADWIN (River) on the prequential error; fires only when the recent window's error is higher.

    ADWIN keeps the longest recent window whose mean is consistent; when it cuts, the kept (recent)
    window's mean is compared with the dropped (older) part's, and only a rise above ``min_increase``
    (absolute, in error units: the default excess logloss has mean ~0, so a ratio would mean nothing) is drift.
    ADWIN sees chunk sums (see :class:`_ChunkedError`); ``clock`` (how often it looks for a cut), the
    reported window and means are in single errors.

    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> errors = np.r_[rng.random(8000) < 0.2, rng.random(4000) < 0.35].astype(float)
    >>> det = ErrorADWIN("m1", delta=1e-5, min_increase=0.01, warmup=0)
    >>> fired = [e for i, x in enumerate(errors) if (e := det.update(x, timestamp=float(i)))]
    >>> len(fired), 8000 <= fired[0].event_index < 9000
    (1, True)
    """

    statistic = "mean_error_increase"

    def __init__(self, merchant_id: str, name: str = "error.adwin", *, delta: float = 1e-5, clock: int = 128,
                 min_increase: float = 0.01, chunk: int = 16, model_version: str | None = None, cooldown: int = 0,
                 warmup: int = 0) -> None:
        from river.drift import ADWIN

        super().__init__(merchant_id, name, chunk=chunk, model_version=model_version, cooldown=cooldown,
                         warmup=warmup)
        self.min_increase = min_increase
        self.adwin = ADWIN(delta=delta, clock=max(1, round(clock / chunk)))

    def _observe_sum(self, total: float):
        total_before = self.adwin.total + total
        width_before = self.adwin.width + 1
        self.adwin.update(total)
        if not self.adwin.drift_detected:
            return None
        kept, width = self.adwin.estimation / self.chunk, self.adwin.width
        dropped = (total_before / self.chunk - kept * width) / max(width_before - width, 1.0)
        self._measured(kept - dropped)
        if kept - dropped <= self.min_increase:
            return None  # a drop (or a tiny rise) in error is not a problem
        start = self._trail.at(self.n_seen - int(width) * self.chunk)
        return kept - dropped, self.min_increase, start, {"mean_before": dropped, "mean_after": kept,
                                                          "window": float(width * self.chunk)}

    def state(self) -> dict:
        return {**super().state(), "mean_error": self.adwin.estimation / self.chunk,
                "width": int(self.adwin.width) * self.chunk,
                "delta": self.adwin.delta}


class ErrorPageHinkley(_ChunkedError):
    """Page-Hinkley (River, ``mode="up"``) on the prequential error: a cumulative test for a rising mean.

    ``threshold`` is the cumulative excess error (over the running mean plus ``delta`` per event) needed,
    so the delay is about ``threshold / (rise - delta)`` events. River's test runs on chunk sums (see
    :class:`_ChunkedError`) with ``delta`` multiplied by ``chunk``, ``alpha`` raised to ``chunk`` and
    ``min_instances`` divided by it: a chunk sum's excess over its running mean is the sum of its errors'
    excesses, so threshold and statistic keep their meaning in single errors.

    >>> import numpy as np
    >>> rng = np.random.default_rng(2)
    >>> errors = np.r_[rng.exponential(0.4, 6000), rng.exponential(0.6, 4000)]
    >>> det = ErrorPageHinkley("m1", threshold=50.0, delta=0.05, warmup=0)
    >>> fired = [e for i, x in enumerate(errors) if (e := det.update(x, timestamp=float(i)))]
    >>> len(fired) >= 1 and 6000 <= fired[0].event_index < 7000
    True
    """

    statistic = "page_hinkley"

    def __init__(self, merchant_id: str, name: str = "error.page_hinkley", *, threshold: float = 250.0,
                 delta: float = 0.01, alpha: float = 1 - 1e-4, min_instances: int = 500, chunk: int = 16,
                 model_version: str | None = None, cooldown: int = 0, warmup: int = 0) -> None:
        super().__init__(merchant_id, name, chunk=chunk, model_version=model_version, cooldown=cooldown,
                         warmup=warmup)
        self.params = dict(min_instances=max(1, math.ceil(min_instances / chunk)), delta=delta * chunk,
                           threshold=threshold, alpha=alpha ** chunk, mode="up")
        self._since_reset = 0  # chunks
        self.ph = self._new_test()

    def _new_test(self):
        from river.drift import PageHinkley

        return PageHinkley(**self.params)

    def _observe_sum(self, total: float):
        mean_before = self.ph._x_mean.get() / self.chunk
        self.ph.update(total)
        self._since_reset += 1
        self._measured(self.ph._sum_increase - self.ph._min_increase)
        if not self.ph.drift_detected:
            return None
        statistic = self.ph._sum_increase - self.ph._min_increase
        start = self._trail.at(self.n_seen - self._since_reset * self.chunk)
        return statistic, self.ph.threshold, start, {"mean_error": mean_before}

    def _after_detection(self) -> None:
        self.ph = self._new_test()
        self._since_reset = 0

    def state(self) -> dict:
        statistic = self.ph._sum_increase - self.ph._min_increase if self.ph._x_mean.n else 0.0
        return {**super().state(), "statistic": statistic, "threshold": self.ph.threshold,
                "mean_error": self.ph._x_mean.get() / self.chunk}


class _TwoWindow(Detector):
    """Reference window right before a current window; the test runs every ``check_every`` values.

    With ``min_span_seconds`` (a period P) both windows are whole numbers of periods of event time: the
    current window is the last k·P seconds (the smallest k holding ``window`` values), the reference the
    k·P seconds before, so periodic fields are compared period against period (memory: ``max_values``).
    """

    def __init__(self, merchant_id: str, name: str, *, reference: int = 3000, window: int = 1500,
                 check_every: int = 250, min_span_seconds: float = 0.0, max_values: int = 200_000,
                 model_version: str | None = None, cooldown: int = 0, warmup: int = 0) -> None:
        super().__init__(merchant_id, name, model_version=model_version, cooldown=cooldown, warmup=warmup)
        if reference < 2 or window < 2:
            raise ValueError("reference and window need at least 2 values each")
        self.reference, self.window, self.check_every = reference, window, check_every
        self.min_span_seconds, self.max_values = min_span_seconds, max_values
        self._values: list = []
        self._times: list[float] = []
        self._indices: list[int] = []
        self.last_statistic: float | None = None

    def _observe(self, value, index: int, timestamp: float):
        self._values.append(value)
        self._times.append(timestamp)
        self._indices.append(index)
        if self.n_seen % self.check_every or self.n_seen < self._quiet_until:
            self._trim_to(len(self._values) - self.max_values)
            return None
        split = self._split()
        if split is None:
            return None
        ref_start, cur_start = split
        self._trim_to(ref_start)
        cur_start -= ref_start
        reference, current = self._values[:cur_start], self._values[cur_start:]
        found = self._test(reference, current)
        if found is None:
            return None
        statistic, threshold, details = found
        details = {**details, "reference_size": len(reference), "window_size": len(current)}
        return statistic, threshold, (self._indices[cur_start], self._times[cur_start]), details

    def _split(self) -> tuple[int, int] | None:
        n = len(self._values)
        if self.min_span_seconds:
            return self._split_by_periods(n)
        cur_start, ref_start = n - self.window, n - self.window - self.reference
        return None if ref_start < 0 else (ref_start, cur_start)

    def _split_by_periods(self, n: int) -> tuple[int, int] | None:
        """Current window = the last k whole periods (k: enough for ``window`` values), reference = the k before."""
        t_end = self._times[-1]
        needed = t_end - self._times[max(n - self.window, 0)]
        length = max(1, math.ceil(needed / self.min_span_seconds)) * self.min_span_seconds
        if self._times[0] > t_end - 2 * length:
            return None  # history does not cover two windows of whole periods yet
        cur_start = bisect.bisect_left(self._times, t_end - length)
        ref_start = bisect.bisect_left(self._times, t_end - 2 * length)
        if cur_start - ref_start < 2 or n - cur_start < 2:
            return None
        return ref_start, cur_start

    def _trim_to(self, start: int) -> None:
        if start > 0:
            del self._values[:start], self._times[:start], self._indices[:start]

    @abstractmethod
    def _test(self, reference: list, current: list) -> tuple[float, float, dict] | None:
        """Return ``(statistic, threshold, details)`` when the windows differ enough to call it drift."""

    def _after_detection(self) -> None:
        self._values.clear(), self._times.clear(), self._indices.clear()

    def state(self) -> dict:
        return {**super().state(), "held": len(self._values), "reference": self.reference,
                "window": self.window, "last_statistic": self.last_statistic}


class RateShift(_TwoWindow):
    """A label rate (CTR, conversion) moved: two-proportion z-test, both directions, plus a relative size.

    >>> import numpy as np
    >>> rng = np.random.default_rng(3)
    >>> labels = np.r_[rng.random(10_000) < 0.10, rng.random(5000) < 0.16]
    >>> det = RateShift("m1", "label.ctr", z_threshold=6.0, reference=3000, window=1500)
    >>> fired = [e for i, y in enumerate(labels) if (e := det.update(y, timestamp=float(i)))]
    >>> len(fired), 10_000 <= fired[0].event_index < 12_000
    (1, True)
    """

    family = "label"
    statistic = "z"

    def __init__(self, merchant_id: str, name: str, *, z_threshold: float = 5.0, min_relative_change: float = 0.2,
                 reference: int = 5000, window: int = 2500, **options) -> None:
        super().__init__(merchant_id, name, reference=reference, window=window, **options)
        self.z_threshold, self.min_relative_change = z_threshold, min_relative_change

    def _test(self, reference: list, current: list):
        n1, n2 = len(reference), len(current)
        k1, k2 = float(np.count_nonzero(reference)), float(np.count_nonzero(current))
        p1, p2, pooled = k1 / n1, k2 / n2, (k1 + k2) / (n1 + n2)
        variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
        z = (p2 - p1) / math.sqrt(variance) if variance > 0 else 0.0
        self.last_statistic = z
        self._measured(abs(z))
        relative = abs(p2 - p1) / max(p1, 1.0 / n1)
        if abs(z) < self.z_threshold or relative < self.min_relative_change:
            return None
        return z, self.z_threshold, {"rate_before": p1, "rate_after": p2, "relative_change": relative}


def psi(reference: np.ndarray, current: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index between two share vectors (same bins): sum (c - r) ln(c / r).

    >>> round(psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])), 6), psi(np.array([0.9, 0.1]), np.array([0.5, 0.5])) > 0.25
    (0.0, True)
    """
    r = np.clip(reference, eps, None)
    c = np.clip(current, eps, None)
    r, c = r / r.sum(), c / c.sum()
    return float(np.sum((c - r) * np.log(c / r)))


def quantile_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (ties collapse, so discrete fields get fewer bins)."""
    return np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))


class NumericShift(_TwoWindow):
    """A numeric feature's distribution moved: ``statistic="psi"`` (quantile bins) or ``"ks"`` (scipy).

    KS fires when the distance D exceeds ``ks_threshold`` *and* its p-value is below ``ks_alpha``: large
    windows make tiny, harmless differences significant, so an effect size is required too.

    >>> import numpy as np
    >>> rng = np.random.default_rng(4)
    >>> det = NumericShift("m1", "price", statistic="psi", reference=2000, window=1000)
    >>> [det.update(x, timestamp=0.0) for x in rng.lognormal(3, 0.5, 20_000)].count(None)
    20000
    """

    def __init__(self, merchant_id: str, field: str, *, statistic: Literal["psi", "ks"] = "psi",
                 psi_threshold: float = 0.25, bins: int = 10, ks_threshold: float = 0.15, ks_alpha: float = 1e-6,
                 name: str | None = None, **window) -> None:
        if statistic not in ("psi", "ks"):
            raise ValueError(f"numeric statistic must be 'psi' or 'ks', got {statistic!r}")
        super().__init__(merchant_id, name or f"feature.{field}.{statistic}", **window)
        self.field, self.statistic = field, statistic
        self.psi_threshold, self.bins = psi_threshold, bins
        self.ks_threshold, self.ks_alpha = ks_threshold, ks_alpha

    def _test(self, reference: list, current: list):
        ref = np.asarray(reference, dtype=float)
        cur = np.asarray(current, dtype=float)
        details = {"mean_before": float(ref.mean()), "mean_after": float(cur.mean())}
        if self.statistic == "ks":
            from scipy.stats import ks_2samp

            result = ks_2samp(ref, cur, method="asymp")
            self.last_statistic = float(result.statistic)
            self._measured(result.statistic)
            if result.statistic < self.ks_threshold or result.pvalue > self.ks_alpha:
                return None
            return float(result.statistic), self.ks_threshold, {**details, "p_value": float(result.pvalue)}
        edges = quantile_edges(ref, self.bins)
        ref_shares = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref)
        cur_shares = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) / len(cur)
        value = psi(ref_shares, cur_shares)
        self.last_statistic = value
        self._measured(value)
        if value < self.psi_threshold:
            return None
        return value, self.psi_threshold, details


class CategoryShift(_TwoWindow):
    """Category shares moved: ``statistic="psi"`` or ``"chi2"`` (p-value below ``chi2_alpha`` and Cramér's V
    above ``min_effect``).

    >>> import numpy as np
    >>> rng = np.random.default_rng(5)
    >>> cats = np.r_[rng.choice(list("abc"), 6000, p=[.6, .3, .1]), rng.choice(list("abc"), 3000, p=[.3, .3, .4])]
    >>> det = CategoryShift("m1", "category", statistic="chi2", reference=2000, window=1000)
    >>> fired = [e for i, c in enumerate(cats) if (e := det.update(c, timestamp=float(i)))]
    >>> len(fired), 6000 <= fired[0].event_index < 7000
    (1, True)
    """

    def __init__(self, merchant_id: str, field: str, *, statistic: Literal["psi", "chi2"] = "chi2",
                 psi_threshold: float = 0.25, chi2_alpha: float = 1e-8, min_effect: float = 0.2,
                 name: str | None = None, **window) -> None:
        if statistic not in ("psi", "chi2"):
            raise ValueError(f"categorical statistic must be 'psi' or 'chi2', got {statistic!r}")
        super().__init__(merchant_id, name or f"feature.{field}.{statistic}", **window)
        self.field, self.statistic = field, statistic
        self.psi_threshold, self.chi2_alpha, self.min_effect = psi_threshold, chi2_alpha, min_effect

    @staticmethod
    def _counts(reference: list[Hashable], current: list[Hashable]) -> tuple[np.ndarray, np.ndarray, list]:
        labels, codes = np.unique(np.asarray([str(v) for v in reference + current]), return_inverse=True)
        ref_counts = np.bincount(codes[: len(reference)], minlength=len(labels))
        cur_counts = np.bincount(codes[len(reference):], minlength=len(labels))
        return ref_counts, cur_counts, labels.tolist()

    def _test(self, reference: list, current: list):
        ref_counts, cur_counts, labels = self._counts(reference, current)
        if self.statistic == "psi":
            value = psi(ref_counts / ref_counts.sum(), cur_counts / cur_counts.sum())
            self.last_statistic = value
            self._measured(value)
            return None if value < self.psi_threshold else (value, self.psi_threshold, {"categories": len(labels)})
        if len(labels) < 2:
            self.last_statistic = 0.0
            return None
        from scipy.stats import chi2_contingency

        chi2, p_value, _, _ = chi2_contingency(np.vstack([ref_counts, cur_counts]), correction=False)
        cramers_v = math.sqrt(chi2 / (ref_counts.sum() + cur_counts.sum()))
        self.last_statistic = float(chi2)
        self._measured(cramers_v)  # the calibrated gate is the effect size (the p-value is tiny at these sizes)
        if p_value > self.chi2_alpha or cramers_v < self.min_effect:
            return None
        return float(chi2), self.chi2_alpha, {"p_value": float(p_value), "cramers_v": cramers_v,
                                              "categories": len(labels)}


class PriceIndex(Detector):
    """The merchant re-priced: the median log price ratio of shown items vs their reference prices moved.

    ``update((item_id, price))`` per impression. Each item's first seen price is its reference (at most
    ``max_items`` remembered, oldest forgotten first); the value is ``log(price / reference)``, 0 while
    prices stand still. Every ``check_every`` values the median over the last ``window`` values is tested:
    ``|median| > threshold`` means most impressions now show items whose price moved the same way, a
    price-level change (a promotion on a few items does not move the median). Fast and precise where PSI
    and KS on the price *distribution* must wait for a full window and are blurred by the category mix of
    sessions. After firing, the current prices become the references.

    >>> det = PriceIndex("m1", threshold=0.05, window=100, check_every=10)
    >>> prices = {f"i{k}": 10.0 + k for k in range(50)}
    >>> fired = []
    >>> for n in range(2000):
    ...     item = f"i{n % 50}"
    ...     price = prices[item] * (1.2 if n >= 1000 else 1.0)
    ...     if (event := det.update((item, price), timestamp=float(n))) is not None:
    ...         fired.append((event.event_index, round(event.value, 3)))
    >>> fired
    [(1049, 0.091)]
    """

    family = "feature"
    statistic = "median_log_ratio"

    def __init__(self, merchant_id: str, name: str = "feature.price.index", *, threshold: float = 0.05,
                 window: int = 200, check_every: int = 50, max_items: int = 200_000,
                 model_version: str | None = None, cooldown: int = 0, warmup: int = 0) -> None:
        super().__init__(merchant_id, name, model_version=model_version, cooldown=cooldown, warmup=warmup)
        if threshold <= 0 or window < 2 or check_every < 1 or max_items < 1:
            raise ValueError("threshold must be > 0, window >= 2, check_every >= 1 and max_items >= 1")
        self.threshold, self.window, self.check_every, self.max_items = threshold, window, check_every, max_items
        self.references: OrderedDict[Hashable, float] = OrderedDict()
        self._ratios: deque[float] = deque(maxlen=window)
        self._points: deque[tuple[int, float]] = deque(maxlen=window)
        self.last_statistic: float | None = None

    def _observe(self, value, index: int, timestamp: float):
        item_id, price = value
        price = float(price)
        if not price > 0:
            return None  # a free or broken price says nothing about the price level
        reference = self.references.get(item_id)
        if reference is None:
            reference = self.references[item_id] = price
            if len(self.references) > self.max_items:
                self.references.popitem(last=False)
        self._ratios.append(math.log(price / reference))
        self._points.append((index, timestamp))
        if self.n_seen % self.check_every or len(self._ratios) < self.window:
            return None
        median = float(np.median(self._ratios))
        self.last_statistic = median
        self._measured(abs(median))
        if abs(median) <= self.threshold:
            return None
        return median, self.threshold, self._points[0], {"changed_share": float(np.mean(np.abs(self._ratios) > 1e-9)),
                                                         "items": float(len(self.references))}

    def _after_detection(self) -> None:
        """The new prices are the references from now on."""
        self.references.clear()
        self._ratios.clear(), self._points.clear()

    def state(self) -> dict:
        return {**super().state(), "items": len(self.references), "last_statistic": self.last_statistic,
                "threshold": self.threshold}


class TasteShift(Detector):
    """Users stop choosing the categories their own history predicts: a one-sided CUSUM on a taste score.

    A change of tastes (concept drift) can leave every share the platform counts unchanged (the same
    categories are shown, clicked and bought as often as before, only by *other* users), and an online
    model re-learns it within ~1k events, so the error barely rises. What does move at once is the link
    between a user and a category. Each ``update((user_id, category[, session_id]))`` (a category the user
    chose: a page they navigated to, a recommendation slot, a clicked item) scores the category against the
    user's own history of *earlier sessions* (a session agrees with itself whatever the tastes, so its
    choices join the history when the user's next session starts; without a session id at once)::

        score = log( P_user(category) / P_merchant(category) ),
        P_user = (n_user[c] + prior * P_merchant) / (n_user + prior),  P_merchant = (n[c] + 1) / (n + K)

    (positive when the history predicts the choice; users without a history give no score). Scores are
    standardized by a reference (up to ``reference`` scores, lagging ``lag`` scores behind, so a change
    does not leak into it before it is found), clipped to ``±clip`` and accumulated as
    ``S = max(0, S + (mean_ref - score) / sd_ref - slack)``; ``S > threshold`` is drift. Only a *drop* counts:
    histories grow, so the score rises on its own. After firing, the CUSUM and its reference start over
    (re-armed after ``min_reference`` new scores), while user histories are kept. Memory: at most
    ``max_users`` user histories (least recently active evicted), each halved beyond ``history_cap`` choices.

    Example (600 users who each favour one of 6 categories; at choice 20 000 every user's favourite moves on):
        >>> import numpy as np
        >>> rng = np.random.default_rng(6)
        >>> favourite = rng.integers(0, 6, 600)
        >>> det = TasteShift("m1")
        >>> fired = []
        >>> for i in range(30_000):
        ...     user = int(rng.integers(600))
        ...     liked = (favourite[user] + (i >= 20_000)) % 6
        ...     category = liked if rng.random() < 0.5 else int(rng.integers(6))
        ...     if (event := det.update((f"u{user}", f"c{category}"), timestamp=float(i))) is not None:
        ...         fired.append(event.event_index)
        >>> len(fired), 20_000 <= fired[0] < 20_300
        (1, True)
    """

    family = "feature"
    statistic = "cusum"

    def __init__(self, merchant_id: str, name: str = "feature.user_category.cusum", *, slack: float = 0.3,
                 threshold: float = 30.0, min_reference: int = 100, reference: int = 3000, lag: int = 200,
                 clip: float = 3.0, prior: float = 1.0, max_users: int = 20_000, history_cap: int = 64,
                 model_version: str | None = None, cooldown: int = 0, warmup: int = 0) -> None:
        super().__init__(merchant_id, name, model_version=model_version, cooldown=cooldown, warmup=warmup)
        if threshold <= 0 or slack < 0 or clip <= 0 or prior <= 0:
            raise ValueError("threshold, clip and prior must be > 0 and slack >= 0")
        if min_reference < 2 or reference < min_reference or lag < 0 or max_users < 1 or history_cap < 2:
            raise ValueError("need 2 <= min_reference <= reference, lag >= 0, max_users >= 1, history_cap >= 2")
        self.slack, self.threshold, self.clip, self.prior = slack, threshold, clip, prior
        self.min_reference, self.reference, self.lag = min_reference, reference, lag
        self.max_users, self.history_cap = max_users, history_cap
        self.users: OrderedDict[Hashable, dict[Hashable, float]] = OrderedDict()
        self.category_counts: dict[Hashable, float] = {}
        self.n_choices = 0.0
        self.n_scores = 0
        self.cusum = 0.0
        self._armed = False
        self._reference: deque[float] = deque()
        self._pending: deque[float] = deque()
        self._sum = self._sum_sq = 0.0
        self._since: tuple[int, float] = (0, 0.0)  # where S last left 0: the change's estimated start
        self._since_scores: list[float] = [0.0, 0.0]  # count and sum of scores since then

    def score(self, user_id: Hashable, category: Hashable) -> float | None:
        """The choice's log lift under the user's history (None for a user without one); does not learn."""
        found = self.users.get(user_id)
        history = found[0] if found else None
        if not history or self.n_choices <= 0:
            return None
        merchant_share = (self.category_counts.get(category, 0.0) + 1.0) / (self.n_choices + len(self.category_counts) + 1)
        user_total = sum(history.values())
        user_share = (history.get(category, 0.0) + self.prior * merchant_share) / (user_total + self.prior)
        return math.log(user_share / merchant_share)

    def _learn(self, user_id: Hashable, category: Hashable, session: Hashable | None) -> None:
        """Add the choice to the user's history, or to the session's pending choices (history when it ends)."""
        found = self.users.get(user_id)
        if found is None:
            found = self.users[user_id] = [{}, session, {}]  # history, open session, its pending choices
            if len(self.users) > self.max_users:
                self.users.popitem(last=False)
        else:
            self.users.move_to_end(user_id)
        history, open_session, pending = found
        if session is None or session != open_session:
            self._commit(history, pending)
            found[1] = session
        pending[category] = pending.get(category, 0.0) + 1.0
        if session is None:
            self._commit(history, pending)
        self.category_counts[category] = self.category_counts.get(category, 0.0) + 1.0
        self.n_choices += 1.0

    def _commit(self, history: dict, pending: dict) -> None:
        for category, count in pending.items():
            history[category] = history.get(category, 0.0) + count
        pending.clear()
        if sum(history.values()) > self.history_cap:  # recent choices weigh more; counts stay bounded
            for key in history:
                history[key] /= 2.0

    def _observe(self, value, index: int, timestamp: float):
        user_id, category, *session = value
        score = self.score(user_id, category)
        self._learn(user_id, category, session[0] if session else None)
        if score is None:
            return None
        self.n_scores += 1
        if not self._armed:  # (re)arming: the first scores of a regime are its reference
            self._add_reference(score)
            self._armed = len(self._reference) >= self.min_reference
            return None
        count = len(self._reference)
        mean = self._sum / count
        sd = math.sqrt(max(self._sum_sq / count - mean * mean, 1e-12))
        z = min(max((mean - score) / sd, -self.clip), self.clip)
        if self.cusum == 0.0:
            self._since, self._since_scores = (index, timestamp), [0.0, 0.0]
        self.cusum = max(0.0, self.cusum + z - self.slack)
        self._since_scores[0] += 1
        self._since_scores[1] += score
        self._measured(self.cusum)
        if self.cusum > self.threshold:
            n, total = self._since_scores
            return self.cusum, self.threshold, self._since, {
                "reference_mean": mean, "reference_sd": sd, "mean_since_change": total / n,
                "scores_since_change": n, "reference_size": count}
        self._pending.append(score)
        if len(self._pending) > self.lag:
            self._add_reference(self._pending.popleft())
        return None

    def _add_reference(self, score: float) -> None:
        self._reference.append(score)
        self._sum += score
        self._sum_sq += score * score
        if len(self._reference) > self.reference:
            old = self._reference.popleft()
            self._sum -= old
            self._sum_sq -= old * old

    def _after_detection(self) -> None:
        """Start the CUSUM and its reference over in the new regime; user histories stay."""
        self.cusum = 0.0
        self._armed = False
        self._reference.clear(), self._pending.clear()
        self._sum = self._sum_sq = 0.0

    def state(self) -> dict:
        return {**super().state(), "cusum": self.cusum, "threshold": self.threshold, "armed": self._armed,
                "reference_size": len(self._reference), "scores": self.n_scores, "users": len(self.users)}


ERROR_DETECTORS = ("error.adwin", "error.page_hinkley")
LABEL_DETECTORS = ("label.ctr", "label.conversion")
TASTE_DETECTOR = "feature.user_category.cusum"
PRICE_INDEX_DETECTOR = "feature.price.index"
RATE_DETECTOR = "traffic.rate"


def build_detectors(config: DriftSettings, merchant_id: str, model_version: str | None = None) -> dict[str, Detector]:
    """Every detector for one merchant, named ``family.field.statistic``, configured from settings.

    >>> from fedstream.settings import DriftSettings
    >>> sorted(build_detectors(DriftSettings(), "m1"))[:4]
    ['error.page_hinkley', 'feature.category.chi2', 'feature.category.psi', 'feature.device.chi2']
    """
    common = dict(model_version=model_version, cooldown=config.cooldown_events)
    error_common = {**common, "warmup": config.warmup_events, "chunk": config.error_chunk}
    detectors: dict[str, Detector] = {
        "error.adwin": ErrorADWIN(merchant_id, delta=config.adwin_delta, clock=config.adwin_clock,
                                  min_increase=config.adwin_min_increase, **error_common),
        "error.page_hinkley": ErrorPageHinkley(merchant_id, threshold=config.ph_threshold, delta=config.ph_delta,
                                               alpha=config.ph_alpha, min_instances=config.ph_min_instances,
                                               **error_common),
    }
    # click rates follow the hour of day: label windows are whole days, compared day(s) against day(s)
    label_window = dict(reference=config.label_reference, window=config.label_window,
                        check_every=config.check_every, min_span_seconds=config.hour_period_seconds, **common)
    for name in LABEL_DETECTORS:
        detectors[name] = RateShift(merchant_id, name, z_threshold=config.label_z,
                                    min_relative_change=config.label_min_relative_change, **label_window)
    feature_window = dict(reference=config.feature_reference, window=config.feature_window,
                          check_every=config.check_every, **common)
    per_session = {**feature_window, "window": config.session_window}  # hour, device: one value per session
    for field in config.numeric_fields:
        span = config.hour_period_seconds if field == "hour" else 0.0
        windows = per_session if field == "hour" else feature_window
        psi_threshold = config.psi_thresholds.get(field, config.psi_threshold)
        for statistic in ("psi", "ks"):
            detectors[f"feature.{field}.{statistic}"] = NumericShift(
                merchant_id, field, statistic=statistic, psi_threshold=psi_threshold, bins=config.psi_bins,
                ks_threshold=config.ks_threshold, ks_alpha=config.ks_alpha, min_span_seconds=span, **windows)
    if "price" in config.numeric_fields and config.price_index:
        detectors[PRICE_INDEX_DETECTOR] = PriceIndex(
            merchant_id, PRICE_INDEX_DETECTOR, threshold=config.price_index_threshold, window=config.price_index_window,
            check_every=min(config.check_every, config.price_index_window), max_items=config.price_index_max_items,
            **common)
    for field in config.categorical_fields:
        psi_threshold = config.psi_thresholds.get(field, config.psi_threshold)
        span = config.hour_period_seconds if field == "device" else 0.0  # devices follow the hour of day
        windows = per_session if field == "device" else feature_window
        for statistic in ("psi", "chi2"):
            detectors[f"feature.{field}.{statistic}"] = CategoryShift(
                merchant_id, field, statistic=statistic, psi_threshold=psi_threshold, chi2_alpha=config.chi2_alpha,
                min_effect=config.chi2_min_effects.get(field, config.chi2_min_effect), min_span_seconds=span,
                **windows)
    if config.user_category:
        # its own re-arming is its cool-down: after firing it needs min_reference new scores and a new climb
        detectors[TASTE_DETECTOR] = TasteShift(
            merchant_id, TASTE_DETECTOR, slack=config.user_category_slack, threshold=config.user_category_threshold,
            min_reference=config.user_category_min_reference,
            reference=max(config.user_category_reference, config.user_category_min_reference),
            lag=config.user_category_lag, max_users=config.user_category_max_users, model_version=model_version)
    if config.traffic_rate:
        from drift.traffic import ArrivalRate

        detectors[RATE_DETECTOR] = ArrivalRate(
            merchant_id, RATE_DETECTOR, threshold=config.rate_threshold, period_seconds=config.hour_period_seconds,
            window=config.rate_window_periods, reference=config.rate_reference_periods,
            min_count=config.rate_min_count, **common)
    return {name: detector for name, detector in detectors.items() if name not in config.disabled}
