"""Events decoded where the fetched record batches are parsed (``EventConsumer``'s default) give exactly the
records, offsets and dead letters of decoding them in ``poll`` (``fetch_decoding=False``, the reference),
on the real broker, with poison of every kind scattered through batches of several partitions; either way
every poll's runs are its records split by partition."""

from __future__ import annotations

import random
from collections import Counter
from itertools import groupby
from operator import attrgetter

import msgspec
import pytest

from streams.consumer import EventConsumer
from streams.kafka import ensure_topics, make_producer
from streams.producer import header_dict
from streams.schemas import encode_event
from tests.conftest import unique_topics
from tests.test_streams_pipeline import NOW, bad_payloads, drain_raw, group, valid_events


class CountingConsumer(EventConsumer):
    """Counts the records built where their batches were parsed."""

    built = 0

    def _build_records(self, *columns):
        records = super()._build_records(*columns)
        self.built += len(records or ())
        return records


def _split_by_partition(batch) -> list:
    """A poll's records, once checked against its runs: the same records split by partition, in order."""
    want = [(key, list(run)) for key, run in groupby(batch.records, key=attrgetter("topic", "partition"))]
    assert batch.runs == want and len({key for key, _ in want}) == len(want)
    return batch.records


def _consume(settings, fetch_decoding: bool, merchants: frozenset[str]) -> tuple[list, list, int]:
    consumer = CountingConsumer(settings, group(), [settings.topics.clicks.name], now=NOW, max_records=150,
                                merchants=merchants, handle_signals=False, fetch_decoding=fetch_decoding)
    records = []
    consumer.run(lambda batch: records.extend(_split_by_partition(batch)), idle_timeout_s=2)
    letters = drain_raw(settings, settings.topics.dead_letter.name, consumer.dead_lettered)
    assert len(letters) == consumer.dead_lettered
    dead = [({k: v for k, v in header_dict(m.headers).items() if k != "source"}, m.value) for m in letters]
    return records, dead, consumer.built


@pytest.mark.parametrize("seed", [1, 2])
def test_events_decoded_at_fetch_equal_the_reference_records_and_dead_letters(kafka_settings, seed):
    rng = random.Random(seed)
    poison = [payload for reason, payload in bad_payloads().items() if reason != "oversize"]  # > a request
    poison += [None, b"", encode_event(valid_events(1)[0])[:-1]]
    small_batches = kafka_settings.kafka.model_copy(update={"producer_batch_size": 4096, "producer_linger_ms": 2000})
    producer = make_producer(kafka_settings.model_copy(update={"kafka": small_batches}))  # ~15 records a batch
    sent, bad = Counter(), 0
    strangers, poisoned = set(rng.sample(range(600), 5)), set(rng.sample(range(600), 6))
    for i, event in enumerate(valid_events(600, seed=seed)):
        partition = rng.randrange(4)
        if i in strangers:  # a merchant not on the allow-list
            event = msgspec.structs.replace(event, merchant_id="m99")
        producer.send(kafka_settings.topics.clicks.name, value=encode_event(event), key=event.merchant_id.encode(),
                      partition=partition)
        sent[partition] += 1
        if i in poisoned:
            producer.send(kafka_settings.topics.clicks.name, value=rng.choice(poison), key=b"?", partition=partition)
            bad += 1
    producer.flush()
    producer.close()
    merchants = frozenset({"m00", "m01", "m02", "m03"})
    reference_settings = kafka_settings.model_copy(update={"topics": kafka_settings.topics.model_copy(
        update={"dead_letter": unique_topics("ref").dead_letter})})
    ensure_topics(reference_settings)
    fast, fast_dead, built = _consume(kafka_settings, True, merchants)
    reference, reference_dead, reference_built = _consume(reference_settings, False, merchants)
    key = lambda r: (r.partition, r.offset)  # noqa: E731
    assert sorted(fast, key=key) == sorted(reference, key=key) and len({key(r) for r in fast}) == len(fast)
    assert Counter(map(repr, fast_dead)) == Counter(map(repr, reference_dead))
    reasons = Counter(headers["reason"] for headers, _ in fast_dead)
    assert reasons["unknown_merchant"] == len(strangers) and sum(reasons.values()) - len(strangers) == bad == 6
    assert len(fast) + sum(reasons.values()) == sum(sent.values()) + bad
    assert reference_built == 0 and len(fast) > built > len(fast) // 2  # batches with a bad record: in poll
