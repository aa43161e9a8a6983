"""The worker's block glue as it was before the learner took float64 values kept across blocks and the
latencies were computed without numpy (frozen): the reference it is tested against.

A subclass of today's :class:`~online.worker.OnlineWorker` whose ``learn_block`` and ``_record_latencies``
have their former bodies, so a reference and a fast worker hold the same kinds of state and compare byte
for byte (`tests/test_worker_glue.py`).
"""

from __future__ import annotations

import time

import numpy as np

from online.worker import OnlineWorker


class ReferenceGlueWorker(OnlineWorker):
    """:class:`OnlineWorker` with the block glue of commit 23fa541."""

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

    def _record_latencies(self, produced_ms: list) -> None:
        stamps = np.array([t if t is not None else -1 for t in produced_ms], dtype=np.float64)
        stamps = stamps[stamps >= 0]
        if len(stamps):
            self.latencies.extend(((time.time() * 1000.0 - stamps) / 1000.0).tolist())
