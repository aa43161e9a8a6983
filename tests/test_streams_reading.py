"""streams.reading: one reader of topics to their end (fetched high watermark), in one defined order."""

from __future__ import annotations

import threading
import time

from fedstream.settings import Topic
from streams.kafka import make_producer
from streams.reading import read_events, read_to_end, sort_events
from streams.schemas import CatalogItem, Click

IDLE = 20.0  # far longer than any read below takes: a stop before it is the high-watermark rule's


def _produce(settings, topic: Topic, rows) -> None:
    producer = make_producer(settings)
    try:
        for partition, key, value, timestamp_ms in rows:
            producer.send(topic.name, key=key, value=value, partition=partition, timestamp_ms=timestamp_ms)
        producer.flush()
    finally:
        producer.close()


def test_empty_topics_and_empty_partitions_end_at_their_watermark(kafka_settings) -> None:
    clicks, catalog = kafka_settings.topics.clicks, kafka_settings.topics.catalog
    started = time.monotonic()
    assert read_to_end(kafka_settings, [clicks, catalog], idle_timeout_s=IDLE) == []
    assert time.monotonic() - started < IDLE / 2
    # records on one partition of each topic only; the other partitions stay empty
    _produce(kafka_settings, clicks, [(2, b"m1", b"c-late", 3000), (2, b"m2", b"c-early", 1000)])
    _produce(kafka_settings, catalog, [(0, b"m1", b"k-tie", 3000), (0, b"m9", b"k-first", 500)])
    started = time.monotonic()
    records = read_to_end(kafka_settings, [clicks, catalog], idle_timeout_s=IDLE)
    assert time.monotonic() - started < IDLE / 2
    # record time, then the topic's place in the list (clicks before catalog at 3000), partition, offset
    assert [r.value for r in records] == [b"k-first", b"c-early", b"c-late", b"k-tie"]
    kept = read_to_end(kafka_settings, [catalog, clicks], keep_key=lambda key: key == b"m1", idle_timeout_s=IDLE)
    assert [r.value for r in kept] == [b"k-tie", b"c-late"]


def test_records_arriving_while_reading_leave_a_gapless_prefix(kafka_settings) -> None:
    clicks = kafka_settings.topics.clicks
    _produce(kafka_settings, clicks, [(p, b"m1", b"before", 1000 + p) for p in range(clicks.partitions)] * 50)
    stop = threading.Event()

    def keep_producing() -> None:
        producer = make_producer(kafka_settings)
        try:
            while not stop.is_set():
                for partition in range(clicks.partitions):
                    producer.send(clicks.name, key=b"m1", value=b"during", partition=partition)
                producer.flush()
        finally:
            producer.close()

    writer = threading.Thread(target=keep_producing, daemon=True)
    writer.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        records = read_to_end(kafka_settings, [clicks], idle_timeout_s=IDLE, max_wait_s=60.0)
        assert time.monotonic() - started < IDLE  # ends while records keep arriving
    finally:
        stop.set()
        writer.join(10)
    for partition in range(clicks.partitions):
        offsets = sorted(r.offset for r in records if r.partition == partition)
        assert offsets == list(range(len(offsets))) and len(offsets) >= 50  # every "before", no gap
    assert sum(r.value == b"before" for r in records) == 50 * clicks.partitions
    assert any(r.value == b"during" for r in records)  # the writer ran before and while reading


def test_events_come_decoded_filtered_and_in_event_order(kafka_settings) -> None:
    from streams.schemas import encode_event

    item = CatalogItem(event_id="c1", merchant_id="m1", item_id="i1", category="shoes", price=9.0, title="Shoe",
                       timestamp=1.7e9)
    click = Click(event_id="k1", merchant_id="m1", user_id="u1", session_id="s1", item_id="i1", timestamp=1.7e9,
                  clicked=True, position=0, page="home", device="app")
    other = Click(event_id="k2", merchant_id="m2", user_id="u2", session_id="s2", item_id="i9", timestamp=1.6e9,
                  clicked=False, position=1, page="search", device="mobile")
    topics = kafka_settings.topics
    _produce(kafka_settings, topics.clicks, [(0, b"m1", encode_event(click), None), (1, b"m2", encode_event(other), None),
                                             (1, b"m2", b"not an event", None)])
    _produce(kafka_settings, topics.catalog, [(0, b"m1", encode_event(item), None)])
    assert read_events(kafka_settings, idle_timeout_s=IDLE) == [other, item, click] == sort_events([click, other, item])
    assert read_events(kafka_settings, ["m1"], idle_timeout_s=IDLE) == [item, click]
