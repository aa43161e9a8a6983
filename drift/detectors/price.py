"""``feature.price.index``: the median log ratio of shown prices to each item's reference price."""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Hashable

import numpy as np

from drift.detectors.base import Detector


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
