"""Drift detectors for one merchant's streams, all with one small interface, and their registry.

``detector.update(value, timestamp=..., index=...) -> DriftEvent | None``: feed one value, get an event
back on the update where the detector decides the stream changed; ``state()`` shows what it holds.
:data:`DETECTORS` (:mod:`drift.detectors.registry`) declares every detector: what it watches, how it is
built, which settings it reads. Families, rationale and measured figures: ``drift/README.md``.

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

from drift.detectors.base import Detector, _Trail, prequential_error, prequential_errors  # noqa: F401
from drift.detectors.errors import ErrorADWIN, ErrorPageHinkley, _ChunkedError  # noqa: F401
from drift.detectors.windows import CategoryShift, NumericShift, RateShift, _TwoWindow, psi, quantile_edges  # noqa: F401
from drift.detectors.price import PriceIndex  # noqa: F401
from drift.detectors.taste import TasteShift  # noqa: F401
from drift.detectors.registry import DETECTORS, DetectorSpec, Signal, build_detectors, watchers  # noqa: F401
