"""The worker's block glue (float64 values kept across blocks, latencies without numpy) learns, counts and
checkpoints exactly what the reference glue did (`tests/glue_reference.py`), on seeded polls with gaps,
redeliveries, unordered runs, orders, unclicked clicks, catalog items and records without a timestamp."""

from __future__ import annotations

import pickle
import random
import time

import numpy as np
import pytest

from drift.monitor import DriftMonitor
from online.worker import OnlineWorker, WorkerConfig
from streams.consumer import Batch, Record
from streams.generator import GeneratorConfig, generate
from streams.schemas import CatalogItem
from tests.glue_reference import ReferenceGlueWorker

@pytest.fixture(scope="module")
def events() -> list:
    return list(generate(GeneratorConfig(merchants=4, events=1200, seed=5)))


def _partitions(events: list) -> dict[tuple[str, int], list]:
    """Clicks and orders on 2 partitions each by merchant, plus a catalog partition read in the group."""
    parts: dict[tuple[str, int], list] = {("catalog", 0): []}
    for event in events:
        if type(event) is CatalogItem:
            parts[("catalog", 0)].append(event)
        else:
            key = (type(event).__name__.lower(), int(event.merchant_id[-1]) % 2)
            parts.setdefault(key, []).append(event)
    parts[("catalog", 0)] = parts[("catalog", 0)][:150]
    return parts


def _polls(rng: random.Random, parts: dict) -> list[Batch]:
    """Polls of runs per partition, as :class:`Batch` (its records and the same split by partition):
    redelivered prefixes, dead-lettered gaps, a few unordered runs; some records without a timestamp (None)
    or with a negative one."""
    now_ms = int(time.time() * 1000)
    next_offset = dict.fromkeys(parts, 0)
    polls = []
    while any(next_offset[key] < len(parts[key]) for key in parts):
        poll = Batch()
        for key in rng.sample(sorted(parts), k=rng.randint(1, len(parts))):
            start = next_offset[key]
            if rng.random() < 0.2:
                start = max(0, start - rng.randint(1, 30))
            offsets = list(range(start, min(start + rng.randint(1, 120), len(parts[key]))))
            if rng.random() < 0.15 and len(offsets) > 3:
                del offsets[rng.randrange(1, len(offsets) - 1)]
            if rng.random() < 0.05:
                rng.shuffle(offsets)
            if offsets:
                next_offset[key] = max(next_offset[key], max(offsets) + 1)
            run = []
            for offset in offsets:
                stamp = rng.choice((None, -5)) if rng.random() < 0.03 else now_ms - rng.randint(0, 5000)
                run.append(Record(parts[key][offset], key[0], key[1], offset, stamp, None))
            if run:
                poll.records += run
                poll.runs.append((key, run))
        polls.append(poll)
    return polls


def _worker(cls, settings, tmp_path, name: str, rank_every: int):
    config = WorkerConfig(model="ftrl", checkpoint_path=tmp_path / f"{name}.ckpt", block=32, flush_after_s=3600,
                          rank_every=rank_every, publish_every_s=None, publish_at_end=False)
    return cls(settings, config, monitors={"drift": lambda _: DriftMonitor(settings, sinks=[])})


def _state(worker: OnlineWorker) -> dict[str, bytes]:
    state = pickle.loads(worker.state.to_bytes())
    state.pop("written_at")
    return {key: pickle.dumps(value) for key, value in state.items()}


@pytest.mark.parametrize("seed,rank_every,batches", [(1, 3, True), (2, 7, False), (3, 0, True), (4, 11, True),
                                                     (5, 1, False)])
def test_glue_learns_counts_and_checkpoints_what_the_reference_glue_does(settings, tmp_path, events, seed, rank_every,
                                                                         batches):
    """The fast worker takes each poll as a Batch (its runs) or as a list of records; the reference as a list."""
    polls = _polls(random.Random(seed), _partitions(events))
    fast = _worker(OnlineWorker, settings, tmp_path, "fast", rank_every)
    reference = _worker(ReferenceGlueWorker, settings, tmp_path, "reference", rank_every)
    for worker in (fast, reference):
        worker.state.offsets[("clicks", 1)] = 40  # resumed: records below are redeliveries, never learned
        worker.state.ranked = seed  # ranking steps counted before: the scored ones are shifted
        for poll in polls:
            worker.accept(poll if worker is fast and batches else list(poll.records))
        worker.flush_stale(force=True)
    got, want = _state(fast), _state(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key], key
    assert list(fast.state.merchant_events) == list(reference.state.merchant_events)  # insertion order too
    assert fast.learned_this_run == reference.learned_this_run > 1000
    assert len(fast.latencies) == len(reference.latencies) > 500
    assert fast.state.clicks > 500 and (rank_every == 0 or fast.state.evaluator.report()["rankings@10"] > 20)


def test_a_batch_made_without_its_runs_is_learned_as_its_records(settings, tmp_path, events):
    """A :class:`Batch` built by hand with records only (no ``runs``) loses nothing: it is grouped as a list."""
    polls = _polls(random.Random(6), _partitions(events))
    bare = _worker(OnlineWorker, settings, tmp_path, "bare", 5)
    listed = _worker(OnlineWorker, settings, tmp_path, "listed", 5)
    for poll in polls:
        bare.accept(Batch(records=list(poll.records), offsets=dict(poll.offsets)))
        listed.accept(list(poll.records))
    for worker in (bare, listed):
        worker.flush_stale(force=True)
    assert bare.learned_this_run == listed.learned_this_run > 1000
    assert _state(bare) == _state(listed)


def test_latencies_are_numpy_s_to_the_last_bit():
    rng = np.random.default_rng(3)
    now_ms = time.time() * 1000.0
    produced = [int(t) for t in now_ms - rng.integers(0, 10**7, 2000)] + [0, None, -1, int(now_ms) + 5]
    stamps = np.array([t if t is not None else -1 for t in produced], dtype=np.float64)
    stamps = stamps[stamps >= 0]
    want = ((now_ms - stamps) / 1000.0).tolist()
    assert [(now_ms - t) / 1000.0 for t in produced if t is not None and t >= 0] == want and len(want) == 2002
