"""Broker outages: clear producer errors, consumers that wait with backoff, nothing lost once it is back.

Each test runs its own tansu on a fixed free port (the session broker is never stopped).
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from fedstream.settings import KafkaClientSettings, Topic, Topics
from fedstream.processes import terminate
from streams.broker import free_port, start_broker_process
from streams.consumer import EventConsumer, RetryPolicy
from streams.generator import GeneratorConfig, generate
from streams.kafka import BrokerUnavailable, ensure_topics
from streams.producer import DeliveryFailed, EventProducer
from tests.conftest import unique_topics

NOW = 1_800_000_000.0
FAST = KafkaClientSettings(request_timeout_ms=3000, bootstrap_timeout_ms=1500, producer_max_block_ms=2000,
                           session_timeout_ms=6000)


def own_broker_settings(settings, port: int):
    return settings.model_copy(update={"bootstrap_servers": f"127.0.0.1:{port}", "topics": unique_topics("down"),
                                       "kafka": FAST})


def small_events(n: int = 300):
    return list(generate(GeneratorConfig(merchants=3, events=n, seed=9, items_per_merchant=(10, 30))))


def test_producer_without_broker_fails_fast_and_clearly(settings):
    dead = own_broker_settings(settings, free_port())
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=dead.bootstrap_servers):
        EventProducer(dead)
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_broker_dying_mid_stream_is_reported_not_swallowed(settings, tmp_path):
    port = free_port()
    proc, _ = start_broker_process(tmp_path, port=port)
    configured = own_broker_settings(settings, port)
    try:
        ensure_topics(configured)
        producer = EventProducer(configured, now=NOW, delivery_timeout_ms=4000, max_pending=100_000)
        events = small_events()
        for event in events[:100]:
            producer.send_event(event)
        producer.flush()  # these are safe
        assert producer.accepted == 100
    finally:
        terminate(proc.pid)
    with pytest.raises((DeliveryFailed, BrokerUnavailable)) as failure:
        for event in events[100:]:
            producer.send_event(event)
        producer.flush(timeout_s=8)
    if isinstance(failure.value, DeliveryFailed):
        assert failure.value.failed > 0
    producer._producer.close(timeout=1)


@pytest.mark.slow
def test_consumer_started_before_the_broker_retries_then_reads_everything(settings, tmp_path):
    port = free_port()
    configured = own_broker_settings(settings, port)
    events = small_events()
    broker: dict = {}

    def bring_up_later() -> None:
        time.sleep(2.0)
        proc, _ = start_broker_process(tmp_path, port=port)
        broker["proc"] = proc
        ensure_topics(configured)
        with EventProducer(configured, now=NOW) as producer:
            for event in events:
                producer.send_event(event)

    thread = threading.Thread(target=bring_up_later, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        consumer = EventConsumer(configured, f"g-{uuid.uuid4().hex[:6]}", now=NOW, handle_signals=False,
                                 retry=RetryPolicy(initial_s=0.2, max_s=1.0, deadline_s=60))
        assert time.monotonic() - started >= 1.5  # it really waited for the broker
        seen: list[str] = []
        consumer.run(lambda batch: seen.extend(r.event.event_id for r in batch), idle_timeout_s=5)
        thread.join(timeout=30)
        assert sorted(seen) == sorted(e.event_id for e in events)
    finally:
        thread.join(timeout=30)
        if "proc" in broker:
            terminate(broker["proc"].pid)


def test_consumer_gives_up_after_its_retry_deadline(settings):
    dead = own_broker_settings(settings, free_port())
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        EventConsumer(dead, "g", handle_signals=False, retry=RetryPolicy(initial_s=0.1, max_s=0.5, deadline_s=3))
    assert 2 < time.monotonic() - started < 20


@pytest.mark.slow
def test_consumer_survives_a_broker_restart_and_reads_what_comes_after(settings, tmp_path):
    """tansu loses everything on restart: topics are recreated, offsets reset to the earliest, and the
    same consumer (no restart of its own) reads every event produced after the broker came back.

    Commits made while the group re-forms are rejected, so some records arrive twice: at least once,
    never lost. tansu auto-creates topics a reconnecting client asks about (with 4 partitions) and may
    win the race against ``ensure_topics``, so every topic here has those 4 partitions.

    While the broker is away, kafka-python 3.0.12's group coordinator lookup lets a failed metadata refresh
    escape its ``poll`` as ``KafkaConnectionError`` when a reconnect backoff has just run out (CI met it once
    under load). Clearing the client's backoffs before each poll makes that race happen every time: each
    poll must still come back empty, after waiting its timeout (no busy loop).
    """
    port = free_port()
    configured = own_broker_settings(settings, port)
    configured = configured.model_copy(update={"topics": Topics(**{
        t: Topic(name=getattr(configured.topics, t).name, partitions=4)
        for t in ("clicks", "orders", "catalog", "dead_letter", "drift")})})
    events = small_events(400)
    before, after = events[:150], events[150:]
    proc, _ = start_broker_process(tmp_path, port=port)
    try:
        ensure_topics(configured)
        with EventProducer(configured, now=NOW) as producer:
            for event in before:
                producer.send_event(event)
        consumer = EventConsumer(configured, "restart", now=NOW, handle_signals=False,
                                 retry=RetryPolicy(initial_s=0.2, max_s=1.0, deadline_s=30))
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while len(seen) < len(before) and time.monotonic() < deadline:
            batch = consumer.poll()
            seen.extend(r.event.event_id for r in batch)
            consumer.commit(batch)
        assert sorted(seen) == sorted(e.event_id for e in before)
        terminate(proc.pid)
        started = time.monotonic()
        for _ in range(12):  # polls against a dead broker just come back empty
            consumer._consumer._manager._backoff.clear()  # the reconnect backoff has just run out
            assert len(consumer.poll(timeout_ms=300)) == 0
        assert time.monotonic() - started >= 12 * 0.3 * 0.9
        proc, _ = start_broker_process(tmp_path, port=port)
        ensure_topics(configured)
        with EventProducer(configured, now=NOW) as producer:
            for event in after:
                producer.send_event(event)
        later: list[str] = []
        wanted = {e.event_id for e in after}
        deadline = time.monotonic() + 90
        while set(later) != wanted and time.monotonic() < deadline:
            batch = consumer.poll()
            later.extend(r.event.event_id for r in batch)
            consumer.commit(batch)
        consumer.close()
        assert set(later) == wanted
    finally:
        terminate(proc.pid)
