"""Poisoned records written straight onto an input topic (bypassing the producer), on the real broker:
the learner and the drift follower dead-letter them and go on learning every valid event."""

from __future__ import annotations

import pytest

from drift.follow import DriftFollower
from drift.monitor import DriftMonitor
from fedstream.settings import load_settings
from online.worker import OnlineWorker
from streams.generator import GeneratorConfig, generate
from streams.kafka import make_producer
from streams.producer import EventProducer, header_dict
from streams.schemas import CatalogItem, Click, LineItem, Order
from tests.test_online_worker import _config, single_partition_settings
from tests.test_streams_pipeline import drain_raw

#: (value, key, headers, reason it must be dead-lettered with)
POISON = [
    (b'{"a":' * 1000 + b"1" + b"}" * 1000, b"m00", [], "too_deep"),  # 6 KB: RecursionError in msgspec
    (b"[" * 100_000, b"\xff\xfe", [("h", b"\xff")], "too_deep"),  # key and header not UTF-8
    (b'{"type":"click","position":' + b"9" * 5000 + b"}", None, [], "out_of_range"),
    (b"\xff\xfe\xfd", b"m01", [], "not_utf8"),
    (None, b"m00", [], "malformed_json"),  # a tombstone
]


def extreme_but_valid(before) -> list:
    """Valid events at the edges of the schema: the largest doubles, 500 lines of 100,000 units each."""
    item = getattr(before, "item_id", "i-extreme")
    return [CatalogItem(event_id="c-max", merchant_id=before.merchant_id, item_id=item, category="c" * 128,
                        price=1.7e308, title="t" * 1000, timestamp=before.timestamp),
            Order(event_id="o-max", order_id="o-max", merchant_id=before.merchant_id, user_id="u" * 128,
                  timestamp=before.timestamp, currency="XXX",
                  items=[LineItem(item_id=item, quantity=100_000, unit_price=1.7e308)] * 500),
            Click(event_id="k-max", merchant_id=before.merchant_id, user_id="u" * 128, item_id=item, session_id="s",
                  timestamp=0.0, position=10_000, page="other", device="app", query="q" * 10_000)]


@pytest.fixture
def poisoned(broker, tmp_path):
    """A single-partition topic: valid events, the poison in the middle, valid events again."""
    settings = single_partition_settings(load_settings(data_dir=tmp_path / "data", feature_bits=16), broker)
    events = list(generate(GeneratorConfig(merchants=3, events=600, seed=4, items_per_merchant=(10, 30))))
    half = len(events) // 2
    events[half:half] = extreme_but_valid(events[half - 1])
    with EventProducer(settings, source="test-poison") as producer:
        producer.send_many(events[:half])
    raw = make_producer(settings)
    for value, key, headers, _ in POISON:
        raw.send(settings.topics.clicks.name, value=value, key=key, headers=headers)
    raw.flush()
    raw.close()
    with EventProducer(settings, source="test-poison") as producer:
        producer.send_many(events[half:])
    return settings, events


def _dead_letters(settings, group: str) -> list[str]:
    letters = drain_raw(settings, settings.topics.dead_letter.name, len(POISON))
    headers = [header_dict(letter.headers) for letter in letters]
    assert all(h["source"] == f"consumer:{group}" for h in headers)
    return [h["reason"] for h in sorted(headers, key=lambda h: int(h["offset"]))]


def test_the_learner_dead_letters_poison_written_onto_its_topic_and_learns_every_valid_event(poisoned, tmp_path):
    settings, events = poisoned
    summary = OnlineWorker(settings, _config(tmp_path, "poisoned-learner")).run()
    assert summary["stopped"] == "idle" and summary["events"] == len(events) == summary["learned_this_run"]
    assert 0 < summary["prequential_logloss"] < 1  # the extreme values did not turn the model into NaNs
    assert _dead_letters(settings, "poisoned-learner") == [reason for *_, reason in POISON]


def test_the_drift_follower_dead_letters_the_poison_and_observes_every_valid_event(poisoned, tmp_path):
    settings, events = poisoned
    follower = DriftFollower(settings, group="poisoned-drift", checkpoint_path=tmp_path / "drift.ckpt",
                             idle_timeout_s=3)
    summary = follower.run()
    assert summary["stopped"] == "idle" and summary["observed_this_run"] == len(events)
    assert _dead_letters(settings, "poisoned-drift") == [reason for *_, reason in POISON]
    reference = DriftMonitor(settings)
    for event in events:
        reference.observe(event)
    resumed = DriftFollower(settings, group="poisoned-drift", checkpoint_path=tmp_path / "drift.ckpt").monitor
    assert resumed.global_index == reference.global_index > 0
    assert all(resumed.state(m) == reference.state(m) for m in {event.merchant_id for event in events})


def test_a_consumer_whose_dead_letter_fails_counts_it_and_goes_on(kafka_settings):
    """A dead letter the client cannot deliver (here: over its max_request_size, a real kafka-python failure)
    is counted and logged; the consumer does not stop on it (it would again at every restart)."""
    from streams.consumer import EventConsumer

    events = list(generate(GeneratorConfig(merchants=2, events=100, seed=6, items_per_merchant=(5, 10))))
    raw = make_producer(kafka_settings)
    raw.send(kafka_settings.topics.clicks.name, value=b'{"type": "click", "query": "' + b"q" * 2000 + b'"}')
    raw.flush()
    raw.close()
    with EventProducer(kafka_settings, source="test-poison") as producer:
        producer.send_many(events)
    consumer = EventConsumer(kafka_settings, "failing-dead-letters", handle_signals=False)
    consumer._dead_letter_producer = make_producer(kafka_settings, max_request_size=1000)  # refuses 2 KB records
    seen: list[str] = []
    consumer.run(lambda batch: seen.extend(r.event.event_id for r in batch), idle_timeout_s=3)
    assert sorted(seen) == sorted(e.event_id for e in events)
    assert consumer.dead_letter_failed == 1 and consumer.dead_lettered == 1
