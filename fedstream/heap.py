"""The cyclic garbage collector's policy for a process that holds a large, long-lived state (a learner).

CPython's default thresholds (700, 10, 10) collect the young generation every 700 container allocations
and, now and then, the whole heap. A learner allocates a few containers per event and keeps millions of
objects alive (the catalog, the recommender's and the featurizer's state), so those collections cost it
several µs per event (measured: ``online/README.md``, "Garbage collection"). Reference counting frees
almost all of its garbage; the collector is only there for cycles.
"""

from __future__ import annotations

import gc

LEARNER_THRESHOLDS = (50_000, 20, 10)  # young collections every 50k allocations; the rest as CPython's ratio


def settle_long_lived(thresholds: tuple[int, int, int] = LEARNER_THRESHOLDS) -> int:
    """Collect once, move every object alive now out of the collector's scans (``gc.freeze``: the state just
    loaded is kept for the process's life, and what of it is freed later is freed by reference counting),
    and collect young objects in larger batches; returns how many objects were frozen.

    >>> import gc
    >>> frozen = settle_long_lived()
    >>> frozen > 0 and gc.get_threshold() == LEARNER_THRESHOLDS
    True
    >>> gc.unfreeze(); gc.set_threshold(700, 10, 10)
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
    return gc.get_freeze_count()
