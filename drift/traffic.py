"""Traffic detectors: how many events a merchant gets per period, not what they contain.

Design notes: `drift/README.md`, `drift/traffic.py`.

Example (a shop whose 300 orders a day fall to 100 on day 20):
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = ArrivalRate("m1", threshold=5.0, window=3, reference=7)
    >>> fired = []
    >>> for day in range(30):
    ...     n = rng.poisson(300 if day < 20 else 100)
    ...     for t in np.sort(rng.random(n)):
    ...         if (event := det.update(None, timestamp=(day + t) * 86_400.0)) is not None:
    ...             fired.append(int(event.window_end_time // 86_400))
    >>> fired
    [21]
"""

from __future__ import annotations

import math
from collections import deque

from drift.detectors.base import CALIBRATED, Detector


class ArrivalRate(Detector):
    """Mean events per period, last ``window`` periods vs the ``reference`` periods before them (see module)."""

    family = "traffic"
    statistic = "rate_z"

    def __init__(self, merchant_id: str, name: str = "traffic.rate", *, threshold: float = CALIBRATED.rate_threshold,
                 period_seconds: float = 86_400.0, window: int = 3, reference: int = 7, min_count: float = 20.0,
                 model_version: str | None = None, cooldown: int = 0, warmup: int = 0) -> None:
        super().__init__(merchant_id, name, model_version=model_version, cooldown=cooldown, warmup=warmup)
        if threshold <= 0 or period_seconds <= 0 or window < 1 or reference < 1 or min_count < 0:
            raise ValueError("threshold and period_seconds must be > 0, window and reference >= 1, min_count >= 0")
        self.threshold, self.period_seconds = threshold, period_seconds
        self.window, self.reference, self.min_count = window, reference, min_count
        self.closed: deque[tuple[int, int, float]] = deque(maxlen=window + reference)  # (count, first index, time)
        self._period: int | None = None
        self._skip = True  # the first period is only partly observed
        self._open = (0, 0, 0.0)
        self.last_statistic: float | None = None

    def _observe(self, value, index: int, timestamp: float):
        period = math.floor(timestamp / self.period_seconds)
        if self._period is None:
            self._period, self._open = period, (0, index, timestamp)
        found = None
        if period > self._period:  # late events (period < open one) count in the open period
            found = self._close(period)
            self._period, self._open = period, (0, index, timestamp)
        count, first_index, first_time = self._open
        self._open = (count + 1, first_index, first_time)
        return found

    def _close(self, period: int):
        """Close the open period and any empty ones up to ``period``, testing after each; the first drift found."""
        if self._skip:
            self._skip = False
        else:
            self.closed.append(self._open)
            found = self._test()
            if found is not None:
                return found
        for gap in range(self._period + 1, min(period, self._period + 1 + self.closed.maxlen)):
            self.closed.append((0, self._open[1], gap * self.period_seconds))
            found = self._test()
            if found is not None:
                return found
        return None

    def _test(self):
        if len(self.closed) < self.window + self.reference:
            return None
        counts = [c for c, _, _ in self.closed]
        before = sum(counts[: self.reference]) / self.reference
        after = sum(counts[self.reference:]) / self.window
        if before < self.min_count:
            return None  # too little traffic for a rate to mean anything
        variance = sum((c - before) ** 2 for c in counts[: self.reference]) / max(self.reference - 1, 1)
        value = abs(after - before) / math.sqrt(max(variance, before) * (1 / self.window + 1 / self.reference))
        self.last_statistic = value
        self._measured(value)
        if value <= self.threshold:
            return None
        _, start_index, start_time = self.closed[self.reference]
        return value, self.threshold, (start_index, start_time), {"rate_before": before, "rate_after": after}

    def _after_detection(self) -> None:
        """The new rate needs a new reference: closed periods are forgotten."""
        self.closed.clear()

    def state(self) -> dict:
        return {**super().state(), "periods": len(self.closed), "last_statistic": self.last_statistic,
                "threshold": self.threshold}
