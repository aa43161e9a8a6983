"""``error.*``: River's ADWIN and Page-Hinkley on sums of chunks of a merchant's prequential errors."""

from __future__ import annotations

import math
from abc import abstractmethod

import numpy as np

from drift.detectors import kernels
from drift.detectors.base import CALIBRATED, Detector, _Trail
from drift.events import DriftEvent


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
        if isinstance(values, np.ndarray):
            values = values.tolist()
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

    def __init__(self, merchant_id: str, name: str = "error.page_hinkley", *, threshold: float = CALIBRATED.ph_threshold,
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

        from drift.detectors.river_check import page_hinkley_agrees

        page_hinkley_agrees()  # the privates read below still mean what they meant (checked once, raises if not)
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

    def update_many(self, values, timestamps, indices) -> list[tuple[int, DriftEvent]]:
        """:meth:`update` of each value in order, natively (:func:`drift.detectors.kernels.page_hinkley_block`):
        the same detections at the same positions and the same state, River's object included."""
        values = np.ascontiguousarray(values, dtype=np.float64)
        if len(values) == 0:
            return []
        ph, seen = self.ph, self.n_seen
        if seen + len(values) <= self.warmup:  # warm-up values are only counted
            self.n_seen += len(values)
            self._last_index, self._last_time = int(indices[-1]), float(timestamps[-1])
            return []
        state = np.array([seen, self.warmup, self._quiet_until, self.cooldown, self._since_reset, self.chunk,
                          ph.min_instances, len(self._pending), ph._x_mean.n, ph._x_mean._mean, ph._sum_increase,
                          ph._sum_decrease, ph._min_increase, ph._max_decrease, ph._drift_detected, self.peak,
                          ph.alpha, ph.delta, ph.threshold, *self._pending, *[0.0] * (self.chunk - len(self._pending))])
        rows = len(values) // self.chunk + 1
        ends, hits = np.empty(rows, dtype=np.int64), np.empty((rows, 4))
        n_ends, n_hits = kernels.page_hinkley_block(values, state, ends, hits)
        fired = self._date_and_report(ends[:n_ends].tolist(), hits[:n_hits].tolist(), seen, timestamps, indices)
        if fired:
            self.ph = self._new_test()  # as after each reported detection; its state is written just below
        self._set_state(state.tolist())
        self._last_index, self._last_time = int(indices[-1]), float(timestamps[-1])
        return fired

    def _date_and_report(self, ends: list[int], hits: list[list[float]], seen: int, timestamps,
                         indices) -> list[tuple[int, DriftEvent]]:
        """Add each completed chunk to the trail, and build each reported detection's event when its chunk
        is reached (the trail dates the window as it stood then)."""
        if not ends:
            return []
        self._fresh = None  # as Detector.update leaves it after a tested value
        counts = [seen + position + 1 for position in ends]
        at = [int(indices[position]) for position in ends]
        stamps = np.asarray(timestamps, dtype=np.float64)[ends].tolist()
        fired, done = [], 0
        for chunk, statistic, mean_before, since_reset in hits:
            k = int(chunk)
            self._trail.extend(counts[done:k + 1], at[done:k + 1], stamps[done:k + 1])
            done = k + 1
            start = self._trail.at(counts[k] - int(since_reset) * self.chunk)
            event = self._event((statistic, self.ph.threshold, start, {"mean_error": mean_before}), at[k],
                                timestamps[ends[k]])
            self.n_detections += 1
            self.last_event = event
            fired.append((ends[k], event))
        self._trail.extend(counts[done:], at[done:], stamps[done:])
        return fired

    def _set_state(self, state: list[float]) -> None:
        """Write the kernel's state back: the counts, the open chunk, and River's state in River's own types (a
        count of 0 and ``_max_decrease`` of -1 are ints until River first assigns them)."""
        ph, k = self.ph, kernels
        self.n_seen, self._quiet_until, self._since_reset = (int(state[i]) for i in (k.N_SEEN, k.QUIET_UNTIL,
                                                                                       k.SINCE_RESET))
        self._pending = state[k.PENDING:k.PENDING + int(state[k.N_PENDING])]
        n, high = state[k.PH_N], state[k.MAX_DEC]
        ph._x_mean.n, ph._x_mean._mean = (n if n else 0), state[k.PH_MEAN]
        ph._sum_increase, ph._sum_decrease, ph._min_increase = state[k.SUM_INC:k.MIN_INC + 1]
        ph._max_decrease = -1 if high == -1.0 else high
        ph._drift_detected = bool(state[k.DETECTED])
        if state[k.PEAK] != self.peak:
            self.peak = state[k.PEAK]

    def state(self) -> dict:
        statistic = self.ph._sum_increase - self.ph._min_increase if self.ph._x_mean.n else 0.0
        return {**super().state(), "statistic": statistic, "threshold": self.ph.threshold,
                "mean_error": self.ph._x_mean.get() / self.chunk}
