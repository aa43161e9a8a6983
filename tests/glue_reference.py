"""The worker's glue as it was before the learner took float64 values kept across blocks, the latencies
were computed without numpy, polls came split by partition and the ranking steps were picked from their
positions (frozen): the reference it is tested against.

A subclass of today's :class:`~online.worker.OnlineWorker` whose ``accept``, ``_enqueue``, ``_count``,
``learn_block``, ``_observe_recommender`` and ``_record_latencies`` have their former bodies, so a reference
and a fast worker hold the same kinds of state and compare byte for byte (`tests/test_worker_glue.py`).
"""

from __future__ import annotations

import time
from itertools import groupby
from operator import attrgetter

import numpy as np

from online.worker import OnlineWorker
from streams.schemas import Click, Order

_where, _offset = attrgetter("topic", "partition"), attrgetter("offset")


class ReferenceGlueWorker(OnlineWorker):
    """:class:`OnlineWorker` with the block glue of commit 23fa541 and the queueing of f3c05ba."""

    def accept(self, records) -> None:
        now = time.monotonic()
        if self.first_record_at is None:
            self.first_record_at, self.first_record_cpu = now, time.process_time()
        for key, run in groupby(records, key=_where):
            self._enqueue(key, list(run), now)

    def _enqueue(self, key: tuple[str, int], run: list, now: float) -> None:
        offsets = list(map(_offset, run))
        first, count = offsets[0], len(offsets)
        if offsets[-1] - first != count - 1 or sorted(offsets) != offsets:
            for record in run:
                self._enqueue_one(key, record, now)
            return
        expected = self.state.offsets.get(key)
        if expected is not None and first < expected:
            run = run[expected - first:]
            if not run:
                return
            first, count = expected, len(run)
        block, start = self.config.block, 0
        for end in range((block - 1 - first) % block + 1, count + 1, block):
            self._queue(key, now).extend(run[start:end])
            self._flush(key)
            start = end
        if start < count:
            self._queue(key, now).extend(run[start:])

    def _count(self, slot: int, records: list, merchants: list[str] | None) -> None:
        # merchants: what the inherited OnlineWorker._flush passes on from learn_block, None from this one (it
        # returns nothing); unread: the reference counts the records' own merchant ids, as before 0a17495
        state = self.state
        state.slots[slot] = state.slots.get(slot, 0) + len(records)
        if slot in self._resuming:
            self._resuming.discard(slot)
        counts = state.merchant_events
        for record in records:
            merchant = record.event.merchant_id
            counts[merchant] = counts.get(merchant, 0) + 1

    def learn_block(self, records: list) -> None:
        state = self.state
        events = [record.event for record in records]
        if hasattr(state.recommender, "rank"):
            indices, at = self.featurizer.featurize_block(events, state.context)
            self._reference_observe_recommender(events)
        else:
            indices, at = self._featurize_interleaved(events)
        if at:
            clicks = [events[i] for i in at]
            y = np.fromiter([click.clicked for click in clicks], dtype=bool, count=len(clicks))
            merchants = [click.merchant_id for click in clicks]
            stamps = [click.timestamp for click in clicks]
            p = state.model.learn_many(indices, np.ones(indices.shape, dtype=np.float32), y)
            state.evaluator.update_many(merchants, stamps, y, p)
            for monitor in state.monitors.values():
                monitor.observe_predictions(merchants, stamps, y, p)
            state.clicks += len(clicks)
            self._record_latencies([records[i].timestamp_ms for i in at])
        if state.multitask is not None:
            state.multitask.observe_block(events, indices)
        state.events += len(records)
        self.learned_this_run += len(records)
        self.last_learned_at, self.last_learned_cpu = time.monotonic(), time.process_time()

    def _record_latencies(self, produced_ms: list) -> None:
        stamps = np.array([t if t is not None else -1 for t in produced_ms], dtype=np.float64)
        stamps = stamps[stamps >= 0]
        if len(stamps):
            self.latencies.extend(((time.time() * 1000.0 - stamps) / 1000.0).tolist())

    def _reference_observe_recommender(self, events: list) -> None:
        rank_every, state = self.config.rank_every, self.state
        observe_block, start = state.recommender.observe_block, 0
        if rank_every:
            for position, event in enumerate(events):
                if event.clicked if type(event) is Click else type(event) is Order:
                    state.ranked += 1
                    if state.ranked % rank_every == 0:
                        observe_block(events[start:position])
                        self._score_ranking(event)
                        start = position
        observe_block(events[start:])
