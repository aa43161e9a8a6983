"""The recommender alone, driven as the learner worker drives it, over the online benchmark's backlog: process
CPU per event and one digest of all it computed (the pickled recommender, its generator's state and every
ranking evaluation's shown list). A pass over ``online/ranking.py`` or ``online/candidates.py`` is timed
against the code it replaces by alternating runs of both checkouts, and shown to compute the same by equal
digests (the digest does not depend on the process: every table is an insertion-ordered dict).

    PYTHONPATH=. .venv/bin/python -m benchmarks._reco_replay [events]   # a prefix of the backlog, or all

The catalog is folded in first (untimed: the worker reads it before its first poll), then the clicks and
orders in order through ``ShopRecommender.observe_block``, with ``ranked_ids`` before every 50th step (the
worker's ``rank_every`` and ``rank_k`` defaults), in stream order: the worker's blocks per partition are
not reproduced (they interleave the merchants otherwise, and the ranker's shared weights see that order).
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import pickle
import sys
import time

RANK_EVERY, RANK_K = 50, 10


def replay(events: list, rank_every: int = RANK_EVERY, k: int = RANK_K) -> dict:
    """CPU µs per click or order of the recommender's update, training and ranking steps, and their digest."""
    from online.candidates import CandidateState
    from online.ranking import ShopRecommender
    from online.worker import _is_step
    from streams.schemas import CatalogItem, Click

    recommender = ShopRecommender(candidates=CandidateState())
    recommender.observe_block([event for event in events if type(event) is CatalogItem])
    rest = [event for event in events if type(event) is not CatalogItem]
    ranked_at = [position for position, event in enumerate(rest) if _is_step(event)][rank_every - 1::rank_every]
    shown, start = [], 0
    gc.collect()
    cpu = time.process_time()
    for position in ranked_at:
        recommender.observe_block(rest[start:position])
        event = rest[position]
        actual = event.item_id if type(event) is Click else event.items[0].item_id
        shown.append(recommender.ranked_ids(event.merchant_id, event.user_id, actual, k, timestamp=event.timestamp))
        start = position
    recommender.observe_block(rest[start:])
    cpu = time.process_time() - cpu
    return {"events": len(rest), "rankings": len(shown), "cpu_us_per_event": 1e6 * cpu / max(len(rest), 1),
            "digest": digest((recommender, recommender.rng.getstate(), shown))}


def digest(value) -> str:
    """A digest of ``value``'s pickle without the memo: what it holds, not which of its equal strings are one
    object (a pickle writes a string seen before as a reference to it)."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=5)
    pickler.fast = True
    pickler.dump(value)
    return hashlib.sha256(out.getbuffer()).hexdigest()[:16]


def main(argv: list[str]) -> None:
    from benchmarks.online import CALIBRATION_SEEDS, stream

    events = stream(CALIBRATION_SEEDS[0])[0]
    print(json.dumps(replay(events[: int(argv[0])] if argv else events)))


if __name__ == "__main__":
    main(sys.argv[1:])
