"""The worker's glue as it was before the C-level passes (frozen): the reference it is tested against.

A subclass of today's :class:`~online.worker.OnlineWorker` whose block glue (the block's columns, the
ranking steps, the merchant counts, the latencies) has its former bodies, so a reference and a fast worker
hold the same kinds of state and compare byte for byte (`tests/test_worker_glue.py`).
"""

from __future__ import annotations

import time

import numpy as np

from online.worker import OnlineWorker
from streams.schemas import Click, Order


class ReferenceGlueWorker(OnlineWorker):
    """:class:`OnlineWorker` with the per-record glue of commit 23fa541."""

    def _count(self, slot: int, records: list) -> None:
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
            self._observe_recommender(events)
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

    def _observe_recommender(self, events: list) -> None:
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

    def _record_latencies(self, produced_ms: list) -> None:
        stamps = np.array([t if t is not None else -1 for t in produced_ms], dtype=np.float64)
        stamps = stamps[stamps >= 0]
        if len(stamps):
            self.latencies.extend(((time.time() * 1000.0 - stamps) / 1000.0).tolist())
