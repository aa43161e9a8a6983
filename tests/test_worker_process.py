"""The worker's per-poll work outside the hot path: blocks cut from each partition's run of a poll at once
equal the record-by-record semantics (in-process, no broker)."""

from __future__ import annotations

import random
import time

import pytest

from online.worker import OnlineWorker, WorkerConfig
from streams.consumer import Record
from streams.generator import GeneratorConfig, generate
from streams.schemas import Click, Order

BLOCK = 16


def reference_blocks(polls: list[list[tuple[str, int, int]]], block: int, resumed: dict) -> list[tuple]:
    """Blocks the worker must learn, record by record as specified: a record below its partition's learned
    offset is skipped; a block ends after offset o with (o + 1) % block == 0; what is left is pending."""
    learned, pending, blocks = dict(resumed), {}, []
    for poll in polls:
        for topic, partition, offset in poll:
            key = (topic, partition)
            if key in learned and offset < learned[key]:
                continue
            pending.setdefault(key, []).append(offset)
            if (offset + 1) % block == 0:
                blocks.append((key, tuple(pending.pop(key))))
                learned[key] = offset + 1
    return blocks, {key: tuple(offsets) for key, offsets in pending.items() if offsets}


def _polls(rng: random.Random) -> tuple[list[list[tuple[str, int, int]]], dict]:
    """Seeded polls over 3 partitions: runs per partition, redelivered prefixes, gaps, unordered lists."""
    next_offset = {("clicks", 0): 5, ("clicks", 1): 0, ("orders", 0): 40}
    resumed = {("clicks", 0): 5, ("orders", 0): 40}
    polls = []
    for _ in range(40):
        poll = []
        for key in rng.sample(sorted(next_offset), k=rng.randint(1, 3)):
            start = next_offset[key]
            if rng.random() < 0.2:
                start = max(0, start - rng.randint(1, 20))  # a redelivery after a rebalance
            offsets = list(range(start, start + rng.randint(1, 45)))
            if rng.random() < 0.15 and len(offsets) > 3:
                del offsets[rng.randrange(1, len(offsets) - 1)]  # a dead-lettered record: a gap
            if rng.random() < 0.05:
                rng.shuffle(offsets)
            next_offset[key] = max(next_offset[key], max(offsets) + 1)
            poll += [(*key, offset) for offset in offsets]
        polls.append(poll)
    return polls, resumed


@pytest.fixture(scope="module")
def events() -> list:
    return [e for e in generate(GeneratorConfig(merchants=3, events=3000, seed=11)) if isinstance(e, (Click, Order))]


def _worker(settings, tmp_path) -> OnlineWorker:
    return OnlineWorker(settings, WorkerConfig(model="ftrl", checkpoint_path=tmp_path / "w.ckpt", block=BLOCK,
                                               flush_after_s=3600, publish_every_s=None, rank_every=0))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_accept_cuts_the_blocks_record_by_record_semantics_give(settings, tmp_path, events, seed):
    polls, resumed = _polls(random.Random(seed))
    worker = _worker(settings, tmp_path)
    worker.state.offsets.update(resumed)
    learned = []
    worker.learn_block = lambda records: learned.append(tuple(r.offset for r in records))
    keys = []
    flush = worker._flush

    def tracked(key):
        keys.append(key)
        flush(key)
    worker._flush = tracked
    now_ms = int(time.time() * 1000)
    for poll in polls:
        worker.accept([Record(events[offset % len(events)], topic, partition, offset, now_ms, None)
                       for topic, partition, offset in poll])
    expected, pending = reference_blocks(polls, BLOCK, resumed)
    assert list(zip(keys, learned)) == expected and len(expected) > 20
    assert {key: tuple(r.offset for r in records) for key, records in worker.pending.items() if records} == pending
