"""Producer and consumer through the real embedded broker: routing, keys, dead letters, accounting, offsets."""

from __future__ import annotations

import gc
import hashlib
import os
import time
import signal
import uuid

import msgspec
import pytest
from kafka import TopicPartition

from streams.consumer import Batch, EventConsumer
from streams.generator import GeneratorConfig, generate
from streams.kafka import make_consumer, make_producer
from streams.producer import EventProducer, header_dict
import streams.records as records_module
from streams.records import RawPartitionRecords
from streams.schemas import (CatalogItem, Click, InvalidEvent, Order, decode_event, decode_valid_events, encode_event,
                             event_type)

NOW = 1_800_000_000.0  # validation clock: the generator's traffic is in late 2023


def group() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


def valid_events(n: int = 400, seed: int = 5):
    return list(generate(GeneratorConfig(merchants=4, events=n, seed=seed, items_per_merchant=(10, 40))))


def click_dict(**changes) -> dict:
    base = {"type": "click", "event_id": "e-bad", "merchant_id": "m00", "user_id": "u1", "item_id": "i1",
            "session_id": "s1", "timestamp": 1_700_000_000.0, "position": 1, "page": "home", "device": "app",
            "clicked": True}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def bad_payloads() -> dict[str, bytes]:
    """One payload per kind of bad input, named by the reason it must be dead-lettered with."""
    order = {"type": "order", "event_id": "o-bad", "order_id": "o1", "merchant_id": "m00", "user_id": "u1",
             "timestamp": 1_700_000_000.0, "currency": "EUR", "items": [{"item_id": "i1", "quantity": -2, "unit_price": 3.0}]}
    catalog = {"type": "catalog", "event_id": "c-bad", "merchant_id": "m00", "item_id": "i1", "category": "shoes",
               "price": -5.0, "title": "t", "timestamp": 1_700_000_000.0}
    enc = msgspec.json.encode
    return {
        "malformed_json": b'{"type": "click", "event_id": ',
        "missing_field": enc(click_dict(user_id=...)),
        "unexpected_field": enc(click_dict(coupon="FREE")),
        "wrong_type": enc(click_dict(position="first")),
        "out_of_range": enc(catalog),
        "out_of_range#quantity": enc(order),
        "future_timestamp": enc(click_dict(timestamp=NOW + 10 * 86_400)),
        "unknown_event_type": enc(click_dict(type="refund")),
        "oversize": enc(click_dict(query="q" * 1_100_000)),
        "not_utf8": b'{"type": "click", "event_id": "\xff\xfe"}',
        "not_an_object": b"[1, 2, 3]",
        "missing_type": enc({k: v for k, v in click_dict().items() if k != "type"}),
    }


def drain_raw(settings, topic: str, expected: int | None = None, idle_polls: int = 6) -> list:
    """Every record of a topic (stops early once ``expected`` records arrived)."""
    consumer = make_consumer(settings, None, topic)
    messages, idle = [], 0
    try:
        while idle < idle_polls and (expected is None or len(messages) < expected):
            batch = consumer.poll(timeout_ms=500)
            idle = 0 if batch else idle + 1
            for records in batch.values():
                messages.extend(records)
    finally:
        consumer.close()
    return messages


def test_producer_routes_by_type_keys_by_merchant_and_accounts(kafka_settings):
    events = valid_events(300)
    with EventProducer(kafka_settings, now=NOW) as producer:
        summary = producer.send_many(events)
    assert summary == {"accepted": len(events), "dead_lettered": 0, "reasons": {}, "failed": 0, "dead_letter_failed": 0}
    topics = kafka_settings.topics
    for kind, topic in (("click", topics.clicks), ("order", topics.orders), ("catalog", topics.catalog)):
        expected = [encode_event(e) for e in events if event_type(e) == kind]
        messages = drain_raw(kafka_settings, topic.name, len(expected))
        assert sorted(m.value for m in messages) == sorted(expected)
        partitions_of = {}
        for message in messages:
            merchant = msgspec.json.decode(message.value)["merchant_id"]
            assert message.key == merchant.encode()
            partitions_of.setdefault(merchant, set()).add(message.partition)
        assert all(len(parts) == 1 for parts in partitions_of.values())  # one merchant, one partition


def test_every_event_is_processed_or_dead_lettered_exactly_once(kafka_settings):
    """Bad payloads through the producer AND bad bytes written straight onto an input topic."""
    events = valid_events(400)
    bad = bad_payloads()
    half = len(events) // 2
    with EventProducer(kafka_settings, now=NOW, source="test-api") as producer:
        for event in events[:half]:
            producer.send_event(event)
        for payload in bad.values():
            assert producer.send_raw(payload) is False
        for event in events[half:]:
            producer.send_raw(encode_event(event))
    expected_reasons = {}
    for name in bad:
        expected_reasons[name.split("#")[0]] = expected_reasons.get(name.split("#")[0], 0) + 1
    assert producer.summary() == {"accepted": len(events), "dead_lettered": len(bad), "reasons": expected_reasons,
                                  "failed": 0, "dead_letter_failed": 0}

    # a misbehaving client bypasses validation and writes junk onto the clicks topic
    sneaked = [b"garbage", b'{"type": "click"}', b"\xc3\x28 not utf8", msgspec.json.encode(click_dict(device="fridge"))]
    raw = make_producer(kafka_settings)
    for payload in sneaked:
        raw.send(kafka_settings.topics.clicks.name, value=payload, key=b"m00")
    raw.flush()
    raw.close()

    processed: list[str] = []
    consumer = EventConsumer(kafka_settings, group(), now=NOW, handle_signals=False)
    consumer.run(lambda batch: processed.extend(r.event.event_id for r in batch), idle_timeout_s=4)
    assert sorted(processed) == sorted(e.event_id for e in events)  # exactly once each
    assert consumer.dead_lettered == len(sneaked)

    letters = drain_raw(kafka_settings, kafka_settings.topics.dead_letter.name)
    digests = [header_dict(m.headers).get("sha256") or hashlib.sha256(m.value).hexdigest() for m in letters]
    originals = list(bad.values()) + sneaked  # the oversize one is truncated to fit: its digest is a header
    assert sorted(digests) == sorted(hashlib.sha256(p).hexdigest() for p in originals)  # original bytes, once
    headers = [header_dict(m.headers) for m in letters]
    by_source = {}
    for h in headers:
        by_source.setdefault(h["source"].split(":")[0], []).append(h)
    assert len(by_source["test-api"]) == len(bad) and len(by_source["consumer"]) == len(sneaked)
    assert sorted(h["reason"] for h in by_source["consumer"]) == sorted(
        ["malformed_json", "missing_field", "not_utf8", "wrong_type"])
    assert all(h["topic"] == kafka_settings.topics.clicks.name and int(h["offset"]) >= 0 for h in by_source["consumer"])
    assert all(h["detail"] for h in headers)


def test_uncommitted_batches_are_redelivered(kafka_settings):
    events = [e for e in valid_events(200) if isinstance(e, Click)]
    with EventProducer(kafka_settings, now=NOW) as producer:
        for event in events:
            producer.send_event(event)
    name = group()
    topics = [kafka_settings.topics.clicks.name]
    first = EventConsumer(kafka_settings, name, topics, now=NOW, handle_signals=False, max_records=50)
    seen = poll_until(first, lambda got: len(got) > 0)
    first.close()  # crashed before commit
    again: list = []
    second = EventConsumer(kafka_settings, name, topics, now=NOW, handle_signals=False)
    second.run(lambda batch: again.extend(batch.records), idle_timeout_s=3)
    assert {r.event.event_id for r in seen} <= {r.event.event_id for r in again}
    assert sorted(r.event.event_id for r in again) == sorted(e.event_id for e in events)


def poll_until(consumer: EventConsumer, done, limit: int = 60) -> list:
    got: list = []
    for _ in range(limit):
        got.extend(consumer.poll().records)
        if done(got):
            break
    return got


def test_seek_hook_restores_own_checkpoints_and_lag_uses_the_high_watermark(kafka_settings):
    orders = [e for e in valid_events(3000) if isinstance(e, Order)]
    assert len(orders) >= 20
    topic = kafka_settings.topics.orders.name
    with EventProducer(kafka_settings, now=NOW) as producer:
        for event in orders:
            producer.send_event(event)
    checkpoint = {TopicPartition(topic, p): 2 for p in range(kafka_settings.topics.orders.partitions)}
    asked: list[set] = []

    def restore(partitions):
        asked.append(partitions)
        return {tp: checkpoint[tp] for tp in partitions}

    consumer = EventConsumer(kafka_settings, group(), [topic], now=NOW, handle_signals=False,
                             seek_on_assign=restore, max_records=3)
    records = poll_until(consumer, lambda got: len(got) >= 3)
    assert asked and asked[0] == set(checkpoint)
    assert all(r.offset >= 2 for r in records)
    last = {}
    for r in records:
        last[r.tp] = max(last.get(r.tp, -1), r.offset)
    positions = consumer.positions()
    assert all(positions[tp] == offset + 1 for tp, offset in last.items())  # what a checkpoint would save
    assert all(positions[tp] == 2 for tp in set(checkpoint) - set(last) if tp in positions)
    lag = consumer.lag()
    assert lag and sum(lag.values()) > 0
    for tp, behind in lag.items():
        assert behind == consumer.kafka.highwater(tp) - consumer.kafka.position(tp)
    rest = poll_until(consumer, lambda got: consumer.total_lag() == 0 and len(got) + len(records) >= len(orders) - 8)
    consumer.close()
    skipped = sum(min(2, n) for n in per_partition_counts(orders, kafka_settings).values())
    assert len(records) + len(rest) == len(orders) - skipped


def per_partition_counts(orders, settings) -> dict[int, int]:
    """How many of the orders landed in each partition (read back from the topic itself)."""
    messages = drain_raw(settings, settings.topics.orders.name, len(orders))
    counts: dict[int, int] = {}
    for message in messages:
        counts[message.partition] = counts.get(message.partition, 0) + 1
    assert sum(counts.values()) == len(orders)
    return counts


def test_sigterm_finishes_the_batch_commits_and_stops(kafka_settings):
    catalog = [e for e in valid_events(100) if isinstance(e, CatalogItem)]
    topic = kafka_settings.topics.catalog.name
    with EventProducer(kafka_settings, now=NOW) as producer:
        for event in catalog:
            producer.send_event(event)
    name = group()
    handled: list[Batch] = []

    def handle(batch: Batch) -> None:
        handled.append(batch)
        if len(handled) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-batch

    previous = signal.getsignal(signal.SIGTERM)
    consumer = EventConsumer(kafka_settings, name, [topic], now=NOW, max_records=20)
    consumer.run(handle)
    assert len(handled) == 1 and consumer.stopping
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
    rest: list = []
    EventConsumer(kafka_settings, name, [topic], now=NOW, handle_signals=False).run(
        lambda batch: rest.extend(batch.events), idle_timeout_s=3)
    first_ids = {r.event.event_id for r in handled[0]}
    assert first_ids.isdisjoint(e.event_id for e in rest)  # the batch was committed before stopping
    assert len(first_ids) + len(rest) == len(catalog)


def test_event_objects_are_validated_too(kafka_settings):
    broken = Click(event_id="", merchant_id="m00", user_id="u", item_id="i", session_id="s",
                   timestamp=1.7e9, position=-1, page="home", device="app")  # constructors do not check
    with EventProducer(kafka_settings, now=NOW) as producer:
        assert producer.send_event(broken) is False
    assert producer.summary()["reasons"] == {"out_of_range": 1}


@pytest.mark.parametrize("name", ["missing_field", "not_utf8"])
def test_dead_letter_headers_are_machine_readable(kafka_settings, name):
    with EventProducer(kafka_settings, now=NOW, source="unit") as producer:
        producer.send_raw(bad_payloads()[name])
    (letter,) = drain_raw(kafka_settings, kafka_settings.topics.dead_letter.name, 1)
    headers = header_dict(letter.headers)
    assert headers["reason"] == name and headers["source"] == "unit" and letter.value == bad_payloads()[name]


def test_payload_too_large_for_kafka_is_dead_lettered_truncated_with_its_digest(kafka_settings):
    huge = msgspec.json.encode(click_dict(query="z" * 3_000_000))
    with EventProducer(kafka_settings, now=NOW) as producer:
        assert producer.send_raw(huge) is False
    assert producer.summary()["reasons"] == {"oversize": 1}
    (letter,) = drain_raw(kafka_settings, kafka_settings.topics.dead_letter.name, 1)
    headers = header_dict(letter.headers)
    assert headers["truncated"] == "true" and int(headers["original_size"]) == len(huge)
    assert headers["sha256"] == hashlib.sha256(huge).hexdigest()
    assert huge.startswith(letter.value) and len(letter.value) < len(huge)


@pytest.mark.slow
def test_rebalance_calls_on_revoked_then_seeks_the_new_owner_to_its_checkpoint(kafka_settings):
    import threading

    topic = kafka_settings.topics.clicks.name
    name = group()
    revoked: list[set] = []
    assigned_b: list[set] = []
    first = EventConsumer(kafka_settings, name, [topic], now=NOW, handle_signals=False,
                          on_revoked=lambda parts: revoked.append(set(parts)))
    for _ in range(40):
        first.poll(timeout_ms=250)
        if first.assigned:
            break
    assert len(first.assigned) == kafka_settings.topics.clicks.partitions

    def second_member(out: dict) -> None:
        member = EventConsumer(kafka_settings, name, [topic], now=NOW, handle_signals=False,
                               seek_on_assign=lambda parts: assigned_b.append(set(parts)) or {tp: 0 for tp in parts})
        deadline = time.monotonic() + 40
        while not member.assigned and time.monotonic() < deadline:
            member.poll(timeout_ms=250)
        out["assigned"] = set(member.assigned)
        member.close()

    out: dict = {}
    thread = threading.Thread(target=second_member, args=(out,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 45
    while thread.is_alive() and time.monotonic() < deadline:
        first.poll(timeout_ms=250)  # keeps the first member in the group so the rebalance completes
    thread.join(timeout=5)
    first.close()
    assert revoked, "the first member was never asked to checkpoint"
    assert out.get("assigned") and assigned_b and assigned_b[0] == out["assigned"]
    assert out["assigned"] <= revoked[0]  # what it got had been revoked from the first member


def test_explicit_partitions_are_where_kafka_pythons_default_partitioner_puts_the_key(kafka_settings):
    """The producer computes each merchant's partition itself (cached murmur2); a plain kafka-python
    producer without ``partition=`` (and so a Java client) puts the same key in the same partition."""
    from kafka.partitioner import DefaultPartitioner

    clicks = [e for e in valid_events(300) if isinstance(e, Click)]
    extra = [Click(event_id=f"x{i}", merchant_id=f"shop-{i}-{'é' * (i % 3)}", user_id="u", item_id="i",
                   session_id="s", timestamp=1.7e9, position=0, page="home", device="app") for i in range(40)]
    with EventProducer(kafka_settings, now=NOW) as producer:
        assert producer.bulk  # the batch path is what is being checked
        producer.send_many(clicks + extra)
    topic = kafka_settings.topics.clicks
    messages = drain_raw(kafka_settings, topic.name, len(clicks) + len(extra))
    assert len(messages) == len(clicks) + len(extra)
    ours: dict[bytes, set[int]] = {}
    for message in messages:
        ours.setdefault(message.key, set()).add(message.partition)
    raw = make_producer(kafka_settings)  # kafka-python's DefaultPartitioner picks the partition
    assert isinstance(raw.config["partitioner"], DefaultPartitioner)
    futures = {key: raw.send(topic.name, value=b"{}", key=key) for key in ours}
    theirs = {key: {future.get(timeout=10).partition} for key, future in futures.items()}
    raw.close()
    assert ours == theirs and len({p for (p,) in ours.values()}) > 1

def test_a_lone_event_is_sent_after_linger_without_flush(kafka_settings):
    """Batches nobody adds to any more are handed off by the linger thread, not only by flush/close."""
    producer = EventProducer(kafka_settings, now=NOW, linger_ms=20)
    try:
        event = valid_events(50)[0]
        assert producer.send_event(event)
        (message,) = drain_raw(kafka_settings, producer.routes[event_type(event)], 1)
        assert message.value == encode_event(event) and message.key == event.merchant_id.encode()
        assert not producer._open  # handed off by the linger thread
    finally:
        producer.close()
    assert producer.summary() == {"accepted": 1, "dead_lettered": 0, "reasons": {}, "failed": 0, "dead_letter_failed": 0}


def test_batch_path_and_per_record_path_write_the_same_records(kafka_settings):
    events = valid_events(300)
    raw_lines = [msgspec.json.encode(msgspec.to_builtins(e)) for e in events]  # our encoding, via dicts
    spaced = [line.replace(b'","', b'", "') for line in raw_lines]  # valid, but not canonical bytes
    per_record = kafka_settings.model_copy(update={"topics": kafka_settings.topics.model_copy(update={
        "clicks": kafka_settings.topics.clicks.model_copy(update={"name": kafka_settings.topics.clicks.name + "-b"})})})
    from streams.kafka import ensure_topics

    ensure_topics(per_record, [per_record.topics.clicks])
    with EventProducer(kafka_settings, now=NOW) as bulk:
        summary = bulk.send_many(spaced)
    with EventProducer(per_record, now=NOW) as single:
        single.bulk = False
        assert single.send_many(spaced) == summary == {"accepted": len(events), "dead_lettered": 0, "reasons": {},
                                                       "failed": 0, "dead_letter_failed": 0}
    n_clicks = sum(isinstance(e, Click) for e in events)
    ours = drain_raw(kafka_settings, kafka_settings.topics.clicks.name, n_clicks)
    theirs = drain_raw(per_record, per_record.topics.clicks.name, n_clicks)
    assert len(ours) == n_clicks
    assert sorted((m.partition, m.offset, m.key, m.value) for m in ours) == sorted(
        (m.partition, m.offset, m.key, m.value) for m in theirs)
    assert {m.value for m in ours} == {encode_event(e) for e in events if isinstance(e, Click)}  # canonical again


def test_bulk_decoding_agrees_with_decoding_one_by_one():
    """decode_valid_events (the consumer's fast path) accepts a list exactly when decode_event accepts
    every member, and then gives the same events."""
    raws = [encode_event(event) for event in valid_events(120)]
    merchants = frozenset(msgspec.json.decode(raw)["merchant_id"] for raw in raws)
    assert decode_valid_events(raws, now=NOW, merchants=merchants) == [decode_event(r, now=NOW) for r in raws]
    assert decode_valid_events([], now=NOW) == []
    bad = dict(bad_payloads())
    bad["unsupported_schema_version"] = msgspec.json.encode(click_dict(schema_version=2))
    bad["unknown_merchant"] = msgspec.json.encode(click_dict(merchant_id="m-stranger"))
    bad["empty"] = b""
    for position, (name, payload) in enumerate(bad.items()):
        mixed = raws[:position * 7] + [payload] + raws[position * 7:]
        assert decode_valid_events(mixed, now=NOW, merchants=merchants) is None, name
        with pytest.raises(InvalidEvent):
            decode_event(payload, now=NOW, merchants=merchants)
    assert decode_valid_events(raws + [None], now=NOW) is None  # a tombstone
    limit = NOW + 86_400  # MAX_FUTURE_SKEW_S: a timestamp at the limit is valid, one just past it is not
    for timestamp, valid in ((limit, True), (limit + 1e-6, False), (limit - 1e-6, True)):
        edge = msgspec.json.encode(click_dict(timestamp=timestamp))
        mixed = raws[:50] + [edge] + raws[50:]
        bulk = decode_valid_events(mixed, now=NOW)
        assert bulk == ([decode_event(raw, now=NOW) for raw in mixed] if valid else None), timestamp


def test_decoding_clicks_and_catalog_items_sets_off_no_garbage_collection():
    """Decoded clicks and catalog items are not tracked by the cyclic collector, so decoding thousands of
    them adds nothing to its allocation count (before: one per event, a young collection every 700)."""
    events = valid_events(3000)
    raws = [encode_event(event) for event in events if not isinstance(event, Order)]
    order = next(encode_event(event) for event in events if isinstance(event, Order))
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        decoded = decode_valid_events(raws, now=NOW)
        allocated = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert len(decoded) == len(raws) > 2000 and {type(event) for event in decoded} == {Click, CatalogItem}
    assert allocated < 10 and not any(map(gc.is_tracked, decoded))
    assert gc.is_tracked(decode_event(order))  # an order holds a list: it stays tracked


def test_consumer_records_carry_the_offsets_timestamps_and_keys_kafka_python_reads(kafka_settings):
    events = valid_events(300)
    with EventProducer(kafka_settings, now=NOW) as producer:
        producer.send_many(events)
    consumer = EventConsumer(kafka_settings, group(), now=NOW, handle_signals=False, max_records=64)
    assert consumer.kafka._fetcher.PartitionRecords is RawPartitionRecords
    records = []
    consumer.run(lambda batch: records.extend(batch), idle_timeout_s=3)
    ours = {(r.topic, r.partition, r.offset): (r.timestamp_ms, r.key, encode_event(r.event)) for r in records}
    theirs = {}
    for topic in (kafka_settings.topics.clicks, kafka_settings.topics.orders, kafka_settings.topics.catalog):
        for m in drain_raw(kafka_settings, topic.name):
            theirs[(m.topic, m.partition, m.offset)] = (m.timestamp, m.key, m.value)
    assert len(ours) == len(events) and ours == theirs


def test_kafka_pythons_own_record_parser_gives_the_consumer_the_same_records(kafka_settings, monkeypatch):
    """The fallback when kafka-python's internals differ (no fast parser installed): same Records, same
    dead letters, chunks with a bad event in the middle included."""
    events = valid_events(300)
    raw = make_producer(kafka_settings)
    bad = 0
    for i, event in enumerate(events):  # one partition (one key): every poll's list holds whole chunks
        raw.send(kafka_settings.topics.clicks.name, value=encode_event(event), key=b"m00")
        if i % 97 == 50:
            raw.send(kafka_settings.topics.clicks.name, value=b"not json %d" % i, key=b"m00")
            bad += 1
    raw.flush()
    raw.close()

    def consume() -> tuple[list, int, type]:
        consumer = EventConsumer(kafka_settings, group(), [kafka_settings.topics.clicks.name], now=NOW,
                                 handle_signals=False)
        parser = consumer.kafka._fetcher.PartitionRecords
        records = []
        consumer.run(lambda batch: records.extend(batch), idle_timeout_s=3)
        return records, consumer.dead_lettered, parser

    fast, fast_dead, fast_parser = consume()
    monkeypatch.setattr(records_module, "SUPPORTED", False)
    slow, slow_dead, slow_parser = consume()
    assert fast_parser is RawPartitionRecords and slow_parser is not RawPartitionRecords
    assert fast_dead == slow_dead == bad > 1
    assert len(fast) == len(events) and sorted(fast, key=lambda r: r.offset) == sorted(slow, key=lambda r: r.offset)
