"""Kafka client configuration and topic management, the same for tansu and a real Apache Kafka.

Every producer, consumer and admin client in the platform is built here, so the client
knobs (timeouts, acks, compression) are set in one place.
"""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaConnectionError, KafkaTimeoutError, TopicAlreadyExistsError

# kafka-python 3 raises KafkaTimeoutError("Unable to bootstrap") when nothing answers.
_UNREACHABLE = (KafkaTimeoutError, KafkaConnectionError)

from fedstream.errors import ExpectedFailure
from fedstream.logs import get_logger
from fedstream.settings import Settings, Topic
from streams.broker_record import read_broker_record
from streams.records import install_fast_fetch

log = get_logger("streams.kafka")


class BrokerUnavailable(ExpectedFailure, RuntimeError):
    """No Kafka broker answered at the configured bootstrap address."""


def bootstrap_servers(settings: Settings) -> str:
    """The configured bootstrap address, or the embedded broker recorded in the data directory."""
    if settings.bootstrap_servers:
        return settings.bootstrap_servers

    record = read_broker_record(settings.data_path)
    if record is None:
        raise BrokerUnavailable(
            "no Kafka bootstrap address: set FEDSTREAM_BOOTSTRAP_SERVERS or run `fedstream broker start`"
        )
    return record.bootstrap


def make_admin(settings: Settings, **overrides: Any) -> KafkaAdminClient:
    servers = bootstrap_servers(settings)
    try:
        return KafkaAdminClient(
            bootstrap_servers=servers,
            client_id="fedstream-admin",
            request_timeout_ms=settings.kafka.request_timeout_ms,
            bootstrap_timeout_ms=settings.kafka.bootstrap_timeout_ms,
            **overrides,
        )
    except _UNREACHABLE as exc:
        raise BrokerUnavailable(f"no Kafka broker reachable at {servers}") from exc


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """A producer with acks=all; records are keyed by merchant_id by the callers."""
    servers = bootstrap_servers(settings)
    config: dict[str, Any] = dict(
        bootstrap_servers=servers,
        client_id="fedstream-producer",
        acks="all",
        linger_ms=settings.kafka.producer_linger_ms,
        batch_size=settings.kafka.producer_batch_size,
        max_request_size=max(2 * settings.kafka.max_payload_bytes, 1_048_576) + 65_536,
        request_timeout_ms=settings.kafka.request_timeout_ms,
        retries=5,
        bootstrap_timeout_ms=settings.kafka.bootstrap_timeout_ms,
        max_block_ms=settings.kafka.producer_max_block_ms,  # bounded wait when the buffer is full
        max_in_flight_requests_per_connection=1,
    )
    config.update(overrides)
    try:
        return KafkaProducer(**config)
    except _UNREACHABLE as exc:
        raise BrokerUnavailable(f"no Kafka broker reachable at {servers}") from exc


def make_consumer(settings: Settings, group_id: str | None, *topics: str, raw_records: bool = False,
                  **overrides: Any) -> KafkaConsumer:
    """A consumer with manual commits, reading from the earliest uncommitted offset, parsing fetched
    record batches with :class:`streams.records.FastPartitionRecords`; with ``raw_records`` its polls give
    :class:`streams.records.RawRecord` (topic, partition, offset, timestamp, key, value) instead of
    ``ConsumerRecord`` where they can (see :class:`streams.records.RawPartitionRecords`).

    Never use ``auto_offset_reset='latest'`` or ``seek_to_end``: tansu reports wrong end offsets.
    """
    servers = bootstrap_servers(settings)
    config: dict[str, Any] = dict(
        bootstrap_servers=servers,
        group_id=group_id,
        client_id=f"fedstream-{group_id or 'reader'}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka.session_timeout_ms,
        heartbeat_interval_ms=settings.kafka.heartbeat_interval_ms,
        request_timeout_ms=max(settings.kafka.request_timeout_ms, settings.kafka.session_timeout_ms + 5000),
        bootstrap_timeout_ms=settings.kafka.bootstrap_timeout_ms,
        fetch_max_bytes=8 * 1024 * 1024,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        # a consumer must not create a missing topic with the broker's default partition count, which
        # would then clash with ensure_topics (Apache Kafka honours this; tansu auto-creates regardless)
        allow_auto_create_topics=False,
    )
    config.update(overrides)
    try:
        consumer = KafkaConsumer(*topics, **config)
    except _UNREACHABLE as exc:
        raise BrokerUnavailable(f"no Kafka broker reachable at {servers}") from exc
    install_fast_fetch(consumer, raw=raw_records)  # same records, parsed several times cheaper (streams.records)
    return consumer


def ensure_topics(settings: Settings, topics: list[Topic] | None = None, timeout_s: float = 15.0) -> None:
    """Create the platform topics with their fixed partition counts, or check existing ones match."""
    wanted = topics or settings.topics.all()
    admin = make_admin(settings)
    try:
        for topic in wanted:
            try:
                admin.create_topics([NewTopic(topic.name, topic.partitions, 1)])
                log.info("topic created", extra={"topic": topic.name, "partitions": topic.partitions})
            except TopicAlreadyExistsError:
                pass
        deadline = time.monotonic() + timeout_s
        for topic in wanted:
            while True:
                described = admin.describe_topics([topic.name])[0]
                found = len(described.get("partitions") or [])
                if found == topic.partitions:
                    break
                if found and found != topic.partitions:
                    raise RuntimeError(
                        f"topic {topic.name} has {found} partitions, settings say {topic.partitions}; "
                        "partitions cannot be changed in place: use a new topic name"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"topic {topic.name} did not appear within {timeout_s}s")
                time.sleep(0.1)
    finally:
        admin.close()
