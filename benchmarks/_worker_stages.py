"""Where the learner worker's CPU goes, stage by stage (issue #16 target 3: ~10 µs per event in all).

Two measurements on the online benchmark's backlog:

* :func:`stage_costs`: the worker's hot path in-process (``OnlineWorker.accept`` in polls of 2,000 records,
  blocks per partition as from Kafka, drift detectors on): the process CPU per learned event (a click or an
  order), split by the exclusive wall time of each stage (nested calls are charged to the inner stage; what
  no stage covers is ``worker glue``: queueing records, building the block's arrays). The catalog is folded
  in first and not timed, as the worker reads it before its first poll, then the heap is settled as
  ``fedstream learn`` does (:mod:`fedstream.heap`): the figures compare with the
  worker process's ``busy_cpu_us_per_event`` (same events, same denominator).
* :func:`consumer_cost`: ``EventConsumer.poll`` alone over the backlog's clicks and orders on the embedded
  broker (fetch, record batch parsing, event decoding and validation): process CPU per event, network
  thread included, and the wall events/s of that drain: the ceiling of any worker that reads through it.

Run alone: ``BENCH_QUICK=1 .venv/bin/python -m benchmarks.online stages`` (a table and one JSON line).
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
import uuid
import zlib
from pathlib import Path

from streams.schemas import CatalogItem

# stage -> (attribute path from the worker, method name); a missing one (older code) is skipped
STAGES = {
    "featurize (slots + context)": [("featurizer", "featurize_block"), ("featurizer", "slots_for"),
                                    ("state.context", "observe")],
    "recommender update": [("state.recommender", "observe_block"), ("state.recommender", "observe")],
    "ranking evaluation (every rank_every-th step)": [("", "_score_ranking")],
    "learner (FTRL learn_many)": [("state.model", "learn_many")],
    "prequential evaluator": [("state.evaluator", "update_many")],
    "drift monitor": [("state.monitors.drift", "observe_predictions")],
}


class _Clock:
    """Exclusive wall time per stage: a call's time minus that of the stages it calls."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self.stack: list[float] = []  # time spent in nested stages, per open call

    def wrap(self, stage: str, function):
        def timed(*args, **kwargs):
            self.stack.append(0.0)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                nested = self.stack.pop()
                self.spent[stage] = self.spent.get(stage, 0.0) + elapsed - nested
                if self.stack:
                    self.stack[-1] += elapsed
        return timed


def _resolve(worker, path: str):
    target = worker
    for part in filter(None, path.split(".")):
        target = target.get(part) if isinstance(target, dict) else getattr(target, part, None)
    return target


def records_of(events: list) -> list:
    """Consumer records as the benchmark's topics hold them: clicks and orders on 4 partitions by merchant."""
    from streams.consumer import Record

    offsets: dict[tuple[str, int], int] = {}
    out = []
    for event in events:
        topic = type(event).__name__.lower()
        partition = 0 if isinstance(event, CatalogItem) else zlib.crc32(event.merchant_id.encode()) % 4
        offset = offsets[topic, partition] = offsets.get((topic, partition), -1) + 1
        out.append(Record(event, topic, partition, offset, int(event.timestamp * 1000), None))
    return out


def stage_costs(events: list, bits: int = 20) -> dict:
    """CPU µs per event of each stage of the in-process hot path, and in all (see the module docstring)."""
    import river.drift  # noqa: F401  (imported by the worker's drift factory before the first record)

    from drift.monitor import prediction_monitor
    from fedstream.settings import load_settings
    from online.worker import OnlineWorker, WorkerConfig

    records = records_of(events)
    catalog = [(record.partition, record.offset, record.event) for record in records
               if type(record.event) is CatalogItem]
    records = [record for record in records if type(record.event) is not CatalogItem]
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(data_dir=Path(tmp), feature_bits=bits)
        config = WorkerConfig(model="ftrl", checkpoint_path=Path(tmp) / "stages.ckpt", publish_every_s=None,
                              publish_at_end=False)
        worker = OnlineWorker(settings, config, monitors={"drift": lambda _: prediction_monitor(settings, None)})
        worker._apply_catalog(catalog)  # the worker reads the catalog before its first poll (untimed there too)
        thresholds = gc.get_threshold()
        worker.settle_heap()  # as `fedstream learn` does then (fedstream.heap); undone below for the rest of the run
        clock = _Clock()
        for stage, places in STAGES.items():
            for path, name in places:
                owner = _resolve(worker, path)
                if owner is not None and hasattr(owner, name):
                    setattr(owner, name, clock.wrap(stage, getattr(owner, name)))
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(records), 2000):
            worker.accept(records[start:start + 2000])
        worker.flush_stale(force=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    scale = 1e6 * cpu / wall / len(records)  # wall shares of the CPU time, per event
    stages = {stage: clock.spent.get(stage, 0.0) * scale for stage in STAGES}
    stages["worker glue"] = max(wall - sum(clock.spent.values()), 0.0) * scale
    return {"events": len(records), "catalog_items": len(catalog), "cpu_us_per_event": 1e6 * cpu / len(records),
            "stages_us_per_event": stages}


def consumer_cost(settings, events: int) -> dict:
    """Process CPU µs per event of polling (fetch + parse + decode) the backlog's ``events`` clicks and orders
    with a fresh group, as the worker polls them (the catalog is read outside the group)."""
    from streams import record_kernels  # noqa: F401  (loaded before the first record, as in the worker)
    from streams.consumer import EventConsumer

    topics = [settings.topics.clicks.name, settings.topics.orders.name]
    consumer = EventConsumer(settings, f"stages-{uuid.uuid4().hex[:6]}", topics, max_records=2000, poll_timeout_ms=200,
                             fetch_max_wait_ms=100, handle_signals=False)
    try:
        seen, empty, cpu, wall = 0, 0, None, None
        while seen < events and empty < 50:
            before, started = time.process_time(), time.perf_counter()
            batch = consumer.poll()
            if cpu is None and batch.records:
                cpu, wall = before, started  # from the poll that brought the first records: joining is not counted
            seen += len(batch.records)
            empty = 0 if batch.records else empty + 1
        spent = time.process_time() - cpu if cpu is not None else 0.0
        elapsed = time.perf_counter() - wall if wall is not None else 0.0
    finally:
        consumer.close()
    return {"events": seen, "cpu_us_per_event": 1e6 * spent / seen if seen else None,
            "events_per_s": seen / elapsed if elapsed else None}


def print_stages(figures: dict) -> None:
    """The stage table of :func:`stage_costs`'s figures, then its JSON line."""
    print(f"worker hot path, {figures['events']:,} clicks and orders (catalog of {figures['catalog_items']:,} read "
          f"first): {figures['cpu_us_per_event']:.1f} µs CPU per event")
    for stage, us in sorted(figures["stages_us_per_event"].items(), key=lambda kv: -kv[1]):
        print(f"  {stage:48s} {us:6.1f} µs/event")
    print(json.dumps(figures))
