"""The online learning worker (``fedstream learn``): Kafka -> featurize -> test-then-train -> metrics.

A consumer-group member that learns in deterministic blocks and composes a
:class:`~online.checkpoints.CheckpointWriter` (exactly-once state after a crash) and a
:class:`~online.publishing.Publisher` (scheduled MLflow registration). Per-merchant state is owned per
partition slot and moves with it between the workers of a group (:mod:`online.slices`); publications
assemble every worker's newest slots (:mod:`online.assembly`). How and why: ``online/README.md``, "Worker"
and "Scale-out".
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from itertools import compress, groupby
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np

from fedstream.heap import LEARNER_THRESHOLDS, settle_long_lived
from fedstream.logs import get_logger
from fedstream.settings import Settings
from online.catalog import CatalogReader, plan_topics
from online.checkpoints import CheckpointWriter
from online.multitask import MultiTaskState
from online.publishing import Publisher
from online.state import (CHECKPOINT_VERSION, LearnerState, PredictionMonitor, WorkerConfig,
                          default_checkpoint_path, group_store, load_checkpoint, read_checkpoint)
from online.store import DirectoryStore
from online.reco import recommend
from online.river_models import make_model
from online.slices import adopt, copy_rank, drop_taken, newest, newest_epoch, own_slots, read_store, slot_of
from online.transfer import warm_start
from streams import record_kernels  # noqa: F401  (the fetched batches' scan, loaded before the first record)
from streams import slot_kernels  # noqa: F401  (featurize_block's kernel, loaded before the first record)
from streams.consumer import Batch, EventConsumer, seek_to_saved
from streams.features import Featurizer
from streams.schemas import Click, Order

log = get_logger("online.worker")

_where = attrgetter("topic", "partition")


def _is_step(event) -> bool:
    """A ranking step: a clicked impression or an order (what a ranked list is scored against)."""
    return event.clicked if type(event) is Click else type(event) is Order


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM: its own address space, unlike ru_maxrss after fork)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class OnlineWorker:
    """A consumer-group member that learns online (see the module docstring)."""

    def __init__(self, settings: Settings, config: WorkerConfig,
                 monitors: Mapping[str, Callable[[bytes | None], PredictionMonitor]] | None = None) -> None:
        """``monitors`` (e.g. drift detectors) receive each block's predictions ``(merchant_ids, timestamps,
        y, p)`` in one call and are part of the checkpoint: each factory is called with the snapshot the checkpoint holds under its name (``None``
        on a fresh start) and returns a :class:`PredictionMonitor`, so after a crash the detectors resume
        exactly where the model does.
        """
        self.settings = settings
        self.config = config
        self.featurizer = Featurizer(settings.feature_bits)
        # with a store (the default, or --store) the group's workers share state through their checkpoints;
        # an explicit checkpoint file alone is a worker on its own
        self.store = group_store(settings, config) if config.store or not config.checkpoint_path else None
        own = DirectoryStore(config.checkpoint_path.parent) if config.checkpoint_path else self.store
        self.checkpoint_name = config.checkpoint_path.name if config.checkpoint_path else f"{config.worker_id}.ckpt"
        self.checkpoint_path: Path | str = (own.root / self.checkpoint_name if isinstance(own, DirectoryStore)
                                            else own.where(self.checkpoint_name))
        saved = load_checkpoint(own, self.checkpoint_name)
        if saved is not None:
            if saved["model_name"] != config.model or saved["bits"] != settings.feature_bits:
                raise ValueError(f"checkpoint {self.checkpoint_path} holds {saved['model_name']} with "
                                 f"{saved['bits']} bits, not {config.model} with {settings.feature_bits}")
            self.state = LearnerState.from_checkpoint(saved)
            self.state.recommender.state.text = config.text_candidates  # catalog texts from now on
            log.info("resumed from checkpoint", extra={"path": str(self.checkpoint_path), "events": self.state.events,
                                                        "offsets": {f"{t}:{p}": o for (t, p), o in self.state.offsets.items()}})
        else:
            model = warm_start(settings, make_model(config.model, settings.feature_bits, **config.params),
                               config.warm_start, config.transfer)
            self.state = LearnerState(model, settings.feature_bits, config.model, config.metrics_window,
                                      config.text_candidates)
        for name, factory in (monitors or {}).items():
            self.state.monitors[name] = factory(self.state.saved_monitors.get(name))
        if not settings.multitask.enabled:  # the setting decides, also for a checkpoint written with it on
            self.state.multitask = None
        elif self.state.multitask is None:
            self.state.multitask = MultiTaskState.from_settings(settings.multitask, settings.feature_bits)
        self.pending: dict[tuple[str, int], list] = {}
        self.pending_since: dict[tuple[str, int], float] = {}
        self.latencies: deque[float] = deque(maxlen=200_000)
        self._ones_rows: np.ndarray | None = None  # the blocks' feature values (see _ones)
        self.learned_this_run = 0
        self.first_record_at: float | None = None  # monotonic clock: learning rate excludes joins and idling
        self.last_learned_at: float | None = None
        self.first_record_cpu = self.last_learned_cpu = 0.0  # process CPU seconds at those moments
        self.checkpoints = CheckpointWriter(partial(own.write, self.checkpoint_name), config.checkpoint_every, config.checkpoint_seconds,
                                            self.state.events)
        self.publisher = Publisher(settings, config)
        self.catalog: CatalogReader | None = None
        self.catalog_this_run = 0  # catalog items first seen in this run (in state.events, not learned_this_run)
        self._resuming: set[int] = set()  # slots adopted from a peer, until their first block is learned here
        if self.store is not None:  # a publication assembles every worker's newest slots (online.assembly)
            self.publisher.assemble_from(self.store, before=lambda: self.checkpoint(wait=True))
            self.publisher.scheduled = False  # until the group assigns it slot 0 (_assigned)
        self._closing = False

    @property
    def published(self) -> list[str]:
        """Version numbers registered by this worker, in order."""
        return self.publisher.published

    @property
    def publish_errors(self) -> list[str]:
        """One line per failed publication (the registry being down never stops learning)."""
        return self.publisher.errors

    # -- consumer hooks -----------------------------------------------------------------------------------

    def _revoked(self, partitions: set) -> None:
        if self.store is not None and any(tp.partition == 0 for tp in partitions):
            self.publisher.scheduled = False  # slot 0 moves on: so does publishing for the group
        if self._closing:  # leaving the group at the end: the final checkpoint is already written
            return
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._flush(key)
        self._checkpoint_in_rebalance()

    def _checkpoint_in_rebalance(self) -> None:
        """Write the checkpoint without committing offsets: kafka-python runs rebalance callbacks on its IO
        thread, where a blocking commit raises; the group's offsets are committed by a later checkpoint."""
        commit, self.checkpoints.commit_offsets = self.checkpoints.commit_offsets, None
        try:
            self.checkpoint(commit=False)
        finally:
            self.checkpoints.commit_offsets = commit

    def _assigned(self, partitions: set) -> dict:
        """``seek_on_assign``: adopt the newest copy of each assigned slot from the store and write the new
        fencing epochs at once (a stale owner's later copies lose), then resume every assigned partition at
        its saved offset. The member given slot 0 publishes for the group (:class:`Publisher`)."""
        adopted, slots = [], {tp.partition for tp in partitions}
        shared = self.store is not None and bool(slots)
        if shared:
            adopted = self.adopt_newest(slots)
        own_slots(self.state, slots)  # the held clicks of slots given up are parked: their new owner learns them
        if shared:
            self._checkpoint_in_rebalance()
            # the range assignment gives partition 0 of every group topic to one live member: the group's publisher
            self.publisher.scheduled = self.publisher.scheduled or 0 in slots
        log.info("partitions assigned", extra={"worker_id": self.config.worker_id, "adopted_slots": adopted,
                                               "epochs": {p: self.state.epochs.get(p) for p in sorted(slots)},
                                               "partitions": sorted(f"{tp.topic}:{tp.partition}" for tp in partitions)})
        return seek_to_saved(self.state.offsets)(partitions)

    def adopt_newest(self, slots: set[int]) -> list[int]:
        """Load the parts of ``slots`` that a peer's checkpoint holds newer than ours (a partition that moved
        here: its last owner died or gave it up) and take a new fencing epoch for each of ``slots``, one above
        any copy's; returns the slots adopted."""
        if not slots:
            return []
        own = self.checkpoint_name if self.config.checkpoint_path is None else None
        peers = read_store(self.store, CHECKPOINT_VERSION, skip=own)
        owners, state = newest(peers), self.state
        drop_taken(state, peers, slots)  # the held clicks of slots a peer took after us: it learns them
        taken: dict[str, list[int]] = {}  # peer checkpoint -> the slots adopted from it
        for slot in sorted(slots):
            path = owners.get(slot)
            mine = (state.epochs.get(slot, 0), state.slots.get(slot, -1))
            if path is not None and copy_rank(peers[path], slot) > mine:
                taken.setdefault(path, []).append(slot)
        for path, from_path in taken.items():
            self._adopt(from_path, path, peers[path])
        for slot in slots:
            state.epochs[slot] = 1 + max(state.epochs.get(slot, 0), newest_epoch(peers, slot))
            state.slots.setdefault(slot, 0)  # our copy exists from now on, even before we learn into it
        return sorted(slot for from_path in taken.values() for slot in from_path)

    def _adopt(self, slots: list[int], path: str, saved: dict[str, Any]) -> None:
        """Adopt ``slots`` from one peer checkpoint at once (its context and monitors are read once)."""
        if saved["model_name"] != self.state.model_name or saved["bits"] != self.state.bits:
            raise ValueError(f"{path} holds {saved['model_name']} with {saved['bits']} bits, not "
                             f"{self.state.model_name} with {self.state.bits}: one store per model")
        for key in [key for key in self.pending if key[1] in slots]:
            self.pending.pop(key), self.pending_since.pop(key, None)
        adopt(self.state, saved, slots)
        self._resuming.update(slots)
        self._apply_catalog([(-1, -1, item) for (merchant, _), item in self.catalog.items.items()
                             if slot_of(merchant, self.state.partitions) in slots] if self.catalog else [])
        for slot in slots:
            log.info("adopted a partition slot", extra={"slot": slot, "from": path, "events": saved["slots"][slot],
                                                        "epoch": saved.get("epochs", {}).get(slot, 0)})

    def _apply_catalog(self, records: list) -> None:
        """Fold catalog items read outside the group (``(partition, offset, item)``) into every merchant's
        context and candidates; each record counts as an event once, the first time this state sees its
        offset (the catalog is read again from its start at every run)."""
        state = self.state
        observe_context, observe_reco, seen = state.context.observe, state.recommender.observe, state.catalog_offsets
        for partition, offset, item in records:
            observe_context(item)
            observe_reco(item)
            if offset >= seen.get(partition, 0):
                seen[partition] = offset + 1
                state.events += 1
                self.catalog_this_run += 1

    def _plan(self) -> list[str]:
        """The group's topics; opens the catalog reader and reads the catalog up to now when it is outside."""
        topics, self.catalog, partitions = plan_topics(self.settings, self.config.topics)
        if self.state.slots and partitions != self.state.partitions:
            raise ValueError(f"checkpoint {self.checkpoint_path} slots merchants over {self.state.partitions} "
                             f"partitions, the topics have {partitions}")
        self.state.partitions = partitions
        if self.catalog is not None:
            self._apply_catalog(self.catalog.read_until_caught_up(deadline_s=30.0))
        return topics

    def settle_heap(self) -> None:
        """The collector's learner policy (:mod:`fedstream.heap`), once the resumed state and the catalog are in."""
        frozen = settle_long_lived()
        log.info("heap settled", extra={"frozen_objects": frozen, "gc_thresholds": list(LEARNER_THRESHOLDS)})

    # -- learning -----------------------------------------------------------------------------------------

    def accept(self, records: Iterable) -> None:
        """Queue polled records (a poll holds each partition's records in one run; an
        :class:`~streams.consumer.Batch` has them split by partition already); learn every block that is
        complete."""
        now = time.monotonic()
        if self.first_record_at is None:
            self.first_record_at, self.first_record_cpu = now, time.process_time()
        if type(records) is Batch and (records.runs or not records.records):
            runs = records.runs
        else:  # a list, or a Batch made without its runs: grouped here
            runs = ((key, list(run)) for key, run in groupby(records, key=_where))
        for key, run in runs:
            self._enqueue(key, run, now)

    def _enqueue(self, key: tuple[str, int], run: list, now: float) -> None:
        """Queue one partition's records, learning each block as it completes (a block ends at an offset
        ``o`` with ``(o + 1) % block == 0``); a record below the partition's learned offset is a redelivery
        after a rebalance and is never learned twice."""
        offsets = [record.offset for record in run]
        first, count = offsets[0], len(offsets)
        if offsets[-1] - first != count - 1 or sorted(offsets) != offsets:
            for record in run:  # gaps (dead letters, compaction) or an unordered list: record by record
                self._enqueue_one(key, record, now)
            return
        expected = self.state.offsets.get(key)
        if expected is not None and first < expected:
            run = run[expected - first:]  # consecutive offsets: the redelivered ones are a prefix
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

    def _enqueue_one(self, key: tuple[str, int], record, now: float) -> None:
        expected = self.state.offsets.get(key)
        if expected is not None and record.offset < expected:
            return
        self._queue(key, now).append(record)
        if (record.offset + 1) % self.config.block == 0:
            self._flush(key)

    def _queue(self, key: tuple[str, int], now: float) -> list:
        queue = self.pending.setdefault(key, [])
        if not queue:
            self.pending_since[key] = now
        return queue

    def _poll_size(self) -> int:
        """Records to poll: ``max_records``, and no more than ``max_events`` still needs beyond those queued."""
        if self.config.max_events is None:
            return self.config.max_records
        return max(1, min(self.config.max_records, self.config.max_events - self.learned_this_run - self._queued()))

    def _learned_max_events(self) -> bool:
        """Whether ``max_events`` are learned; once they are all polled, the queued partial blocks are learned
        at once (with :meth:`_poll_size`, a worker stops at exactly ``max_events``)."""
        if self.learned_this_run + self._queued() >= self.config.max_events:
            self.flush_stale(force=True)
        return self.learned_this_run >= self.config.max_events

    def _queued(self) -> int:
        """Records queued in partial blocks, not yet learned."""
        return sum(map(len, self.pending.values()))

    def flush_stale(self, force: bool = False) -> None:
        now = time.monotonic()
        for key in list(self.pending):
            if self.pending[key] and (force or now - self.pending_since[key] >= self.config.flush_after_s):
                self._flush(key)

    def flush_caught_up(self, lag: dict) -> None:
        """Learn the partial block of every partition read up to its fetched high watermark
        (``lag`` is ``EventConsumer.lag()``: ``{TopicPartition: records behind}``)."""
        for tp, behind in lag.items():
            if behind == 0 and self.pending.get((tp.topic, tp.partition)):
                self._flush((tp.topic, tp.partition))

    def _flush(self, key: tuple[str, int]) -> None:
        records = self.pending.pop(key, None)
        self.pending_since.pop(key, None)
        if records:
            merchants = self.learn_block(records)
            self.state.offsets[key] = records[-1].offset + 1
            self._count(key[1], records, merchants)

    def _count(self, slot: int, records: list, merchants: list[str]) -> None:
        """Events learned into ``slot`` (its generation) and per merchant (``merchants``: the merchant id of
        every one of ``records``, in order): saved with the offsets."""
        state = self.state
        state.slots[slot] = state.slots.get(slot, 0) + len(records)
        if slot in self._resuming:
            self._resuming.discard(slot)
            log.info("adopted slot resumed", extra={"worker_id": self.config.worker_id, "slot": slot,
                                                    "offset": records[0].offset, "events": state.slots[slot]})
        counts = state.merchant_events  # new merchants in the order of their first event, as one by one
        for merchant, count in Counter(merchants).items():
            counts[merchant] = counts.get(merchant, 0) + count

    def learn_block(self, records: list) -> list[str]:
        """Test-then-train on one block of one partition, in offset order; returns the merchant id of every
        record, in order (what :meth:`_count` folds).

        The hot path of the worker. The featurizer reads each click against the context as it stands
        *before* the click (earlier events of the block already observed) and folds every event into the
        context (:meth:`~streams.features.Featurizer.featurize_block`, one loop for the block); the
        recommender, which reads none of that context, then takes the block's events in order, each
        ranking sample scored before its event is folded in; then the model predicts and learns the
        block's clicks at once and the evaluator and monitors score those predictions.
        """
        state = self.state
        events = [record.event for record in records]
        merchants_all = [event.merchant_id for event in events]
        two_stage = hasattr(state.recommender, "rank")
        if two_stage:
            indices, at = self.featurizer.featurize_block(events, state.context)
        else:  # the first-generation recommender ranks with the click model's features: all interleaved
            indices, at = self._featurize_interleaved(events)
        every_one = len(at) == len(events)  # a block of the clicks topic: at is every position, in order
        clicks = events if every_one else [events[i] for i in at]
        clicked = [click.clicked for click in clicks]
        if two_stage:
            self._observe_recommender(events, self._ranking_steps(events, at, clicked) if self.config.rank_every else [])
        if at:
            y = np.fromiter(clicked, dtype=bool, count=len(clicks))
            merchants = merchants_all if every_one else [click.merchant_id for click in clicks]
            stamps = [click.timestamp for click in clicks]
            p = state.model.learn_many(indices, self._ones(indices.shape), y)
            state.evaluator.update_many(merchants, stamps, y, p)
            for monitor in state.monitors.values():
                monitor.observe_predictions(merchants, stamps, y, p)
            state.clicks += len(clicks)
            self._record_latencies([record.timestamp_ms for record in records] if every_one
                                   else [records[i].timestamp_ms for i in at])
        if state.multitask is not None:
            state.multitask.observe_block(events, indices)
        state.events += len(records)
        self.learned_this_run += len(records)
        self.last_learned_at, self.last_learned_cpu = time.monotonic(), time.process_time()
        return merchants_all

    def _ones(self, shape: tuple[int, int]) -> np.ndarray:
        """The block's feature values: all 1.0, as the learners' kernels take them (C-contiguous float64),
        sliced from one array kept across blocks (the learners only read their values)."""
        ones = self._ones_rows
        if ones is None or ones.shape[0] < shape[0] or ones.shape[1] != shape[1]:
            ones = self._ones_rows = np.ones((max(shape[0], self.config.block), shape[1]), dtype=np.float64)
        return ones[:shape[0]]

    def _observe_recommender(self, events: list, steps: list[int]) -> None:
        """Fold a block's events into the recommender in order (``observe_block``, in runs), scoring every
        ``rank_every``-th ranking step (``steps``: their positions, :meth:`_ranking_steps`) before its event
        is folded in."""
        rank_every, state = self.config.rank_every, self.state
        observe_block, start = state.recommender.observe_block, 0
        if rank_every:
            first = (rank_every - 1 - state.ranked) % rank_every  # the step that brings ranked to a multiple
            state.ranked += len(steps)
            for position in steps[first::rank_every]:
                observe_block(events[start:position])
                self._score_ranking(events[position])
                start = position
        observe_block(events[start:])

    @staticmethod
    def _ranking_steps(events: list, at: list[int], clicked: list[bool]) -> list[int]:
        """Positions of a block's ranking steps, in order: its clicked clicks (``at``: the positions of its
        clicks, ``clicked`` their labels) and its orders. A block holds one partition of one topic: all
        clicks or none, but for a topic of mixed kinds."""
        if len(at) == len(events):
            return list(compress(at, clicked))
        return [position for position, event in enumerate(events) if _is_step(event)]

    def _count_ranked(self, event: Click | Order) -> None:
        self.state.ranked += 1
        if self.state.ranked % self.config.rank_every == 0:
            self._score_ranking(event)

    def _featurize_interleaved(self, events: list) -> tuple[np.ndarray, list[int]]:
        """Slots of the block's clicks (the reference :meth:`~streams.features.Featurizer.slots_for`) with
        the context, ranking samples and recommender updated event by event."""
        slots_for, context, recommender = self.featurizer.slots_for, self.state.context, self.state.recommender
        rows, at = [], []
        for position, event in enumerate(events):
            if type(event) is Click:
                rows.append(slots_for(event.merchant_id, event.user_id, event.item_id, event.timestamp,
                                      event.device, event.page, event.position, context))
                at.append(position)
            if self.config.rank_every and _is_step(event):
                self._count_ranked(event)
            context.observe(event)
            recommender.observe(event)
        return np.array(rows, dtype=np.int32).reshape(len(rows), self.featurizer.n_fields), at

    def _record_latencies(self, produced_ms: list) -> None:
        """Produced (Kafka record timestamp) -> learned, in seconds, for the clicks just learned (records
        without a timestamp, None or negative, are left out). Plain float arithmetic: numpy's conversion of
        ~1e12 Python ints costs more than the whole list (the same IEEE operations either way)."""
        now_ms = time.time() * 1000.0
        self.latencies.extend([(now_ms - t) / 1000.0 for t in produced_ms if t is not None and t >= 0])

    def _score_ranking(self, event: Click | Order) -> None:
        actual = event.item_id if isinstance(event, Click) else event.items[0].item_id
        ranked_ids = getattr(self.state.recommender, "ranked_ids", None)
        if ranked_ids is not None:  # the two-stage recommender ranks its own candidates (what serving shows)
            shown = ranked_ids(event.merchant_id, event.user_id, actual, self.config.rank_k, timestamp=event.timestamp)
            self.state.evaluator.observe_ranking(event.merchant_id, shown, actual, self.config.rank_k)
            return
        ranked = recommend(self.state.model, self.featurizer, self.state.context, event.merchant_id, event.user_id,
                           self.config.rank_k, recommender=self.state.recommender, timestamp=event.timestamp,
                           candidate_limit=50)
        self.state.evaluator.observe_ranking(event.merchant_id, [item for item, _ in ranked], actual, self.config.rank_k)

    # -- checkpoints and publishing -----------------------------------------------------------------------

    def checkpoint(self, commit: bool = True, wait: bool = True) -> None:
        """Write the state atomically, then commit the same offsets to Kafka.

        The state is serialized here, between blocks; the file is written by the
        :class:`~online.checkpoints.CheckpointWriter`, in a background thread with ``wait=False``, and its
        offsets are committed once it is safe.
        """
        self.checkpoints.write(self.state.to_bytes(), dict(self.state.offsets), self.state.events, commit, wait)

    def _maybe_checkpoint(self) -> None:
        self.checkpoints.collect()
        if self.checkpoints.due(self.state.events):
            self.checkpoint(wait=False)

    def _maybe_publish(self, force: bool = False) -> None:
        self.publisher.maybe_publish(self.state, self.metrics, force)

    def prepare_publishing(self) -> None:
        """Import MLflow and open the tracking store before the first record."""
        self.publisher.prepare()

    def publish(self) -> str:
        """Register the current state as a new ``challenger`` version; returns the version number."""
        return self.publisher.publish(self.state, self.metrics())

    def metrics(self) -> dict[str, float]:
        out = self.state.evaluator.summary()
        out["clicks_evaluated"] = out.pop("events", 0.0)
        out["events_seen"] = float(self.state.events)
        if self.latencies:
            latencies = np.fromiter(self.latencies, float)
            for q in (50, 95, 99):
                out[f"latency_p{q}_s"] = float(np.percentile(latencies, q))
            out["latency_max_s"] = float(latencies.max())
        if self.state.multitask is not None:
            out.update({f"multitask_{k}": float(v) for k, v in self.state.multitask.joiner.stats().items()})
        return out

    # -- main loop ----------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Consume until stopped (SIGTERM/SIGINT), ``max_events`` learned, or ``idle_timeout_s`` without
        records; checkpoint and publish at the end. Returns a summary."""
        from kafka.coordinator.assignors.range import RangePartitionAssignor

        config = self.config
        started, cpu_started = time.monotonic(), time.process_time()
        if config.publish_every_s or config.publish_at_end:
            self.prepare_publishing()
        topics = self._plan()
        if config.settle_heap:
            self.settle_heap()
        consumer = EventConsumer(self.settings, config.group, topics, max_records=config.max_records,
                                 poll_timeout_ms=config.poll_timeout_ms, seek_on_assign=self._assigned,
                                 on_revoked=self._revoked, fetch_max_wait_ms=config.fetch_max_wait_ms,
                                 # range: partition p of every group topic goes to one member (a slot, whole)
                                 partition_assignment_strategy=(RangePartitionAssignor,))
        self.checkpoints.commit_offsets = consumer.commit_saved
        last_data = time.monotonic()
        idle = False
        try:
            while not consumer.stopping:
                batch = consumer.poll(max_records=self._poll_size())
                if self.catalog is not None:
                    self._apply_catalog(self.catalog.poll())
                if batch.records:
                    self.accept(batch)
                    if config.flush_when_caught_up:
                        self.flush_caught_up(consumer.lag())
                if batch.offsets or not consumer.assigned:
                    last_data = time.monotonic()
                elif config.idle_timeout_s is not None and time.monotonic() - last_data > config.idle_timeout_s:
                    idle = True
                    break
                self.flush_stale()
                self._maybe_checkpoint()
                self._maybe_publish()
                if config.max_events is not None and self._learned_max_events():
                    break
            if idle:
                self.flush_stale(force=True)  # end of the stream: the last partial blocks
            self.checkpoint()
            if config.publish_at_end:
                self._maybe_publish(force=True)
        finally:
            self._closing = True
            self.checkpoints.abandon()  # an error stopped the loop mid-write: let the file land, commit nothing
            consumer.close()
            if self.catalog is not None:
                self.catalog.close()
            self.checkpoints.commit_offsets = None
            self.publisher.join(timeout=120)  # a scheduled publication still registering
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
        busy = (self.last_learned_at - self.first_record_at) if self.first_record_at and self.last_learned_at else 0.0
        summary = {"events": self.state.events, "learned_this_run": self.learned_this_run, "clicks": self.state.clicks,
                   "catalog_items_this_run": self.catalog_this_run,
                   "elapsed_s": elapsed, "cpu_s": cpu, "checkpoint": str(self.checkpoint_path), "published_versions": self.published,
                   "publish_unchanged": self.publisher.unchanged, "publish_errors": self.publish_errors,
                   "events_per_s": self.learned_this_run / busy if busy > 0 else None,
                   "busy_cpu_us_per_event": (1e6 * (self.last_learned_cpu - self.first_record_cpu) / self.learned_this_run
                                             if self.learned_this_run else None),
                   "peak_rss_mb": peak_rss_mb(),
                   # CLOCK_MONOTONIC is one clock for every process of a host: a group's span is max - min
                   "learning_window_monotonic": [self.first_record_at, self.last_learned_at],
                   "stopped": "idle" if idle else ("max_events" if config.max_events is not None
                                                   and self.learned_this_run >= config.max_events else "signal"),
                   **{k: v for k, v in self.metrics().items()}}
        log.info("worker stopped", extra=summary)
        return summary


__all__ = ["CHECKPOINT_VERSION", "LearnerState", "OnlineWorker", "PredictionMonitor", "WorkerConfig", "default_checkpoint_path",
           "group_store", "read_checkpoint"]
