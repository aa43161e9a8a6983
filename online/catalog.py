"""Which topics a learner reads in its group, and the catalog every learner reads whole, outside it.

Group assignment is per topic: with clicks and orders on 8 partitions and the catalog on 4, a merchant's
catalog partition can belong to another member than its clicks. The learner's state is owned per slot
(the partition number its merchant's clicks and orders share, :mod:`online.slices`), so the catalog, an
idempotent table of items (the latest record of an item wins), is read in full by every learner with a
group-less consumer and applied to every merchant. It is never committed: each start reads it again.
"""

from __future__ import annotations

import time
from typing import Any

from kafka import TopicPartition

from fedstream.logs import get_logger
from fedstream.settings import Settings
from streams.kafka import BrokerUnavailable, make_consumer
from streams.schemas import CatalogItem, InvalidEvent, decode_event, event_topic_names

log = get_logger("online.catalog")


class CatalogReader:
    """The whole catalog topic, read from its start without a group; keeps the latest record per item."""

    def __init__(self, settings: Settings, topic: str, consumer: Any) -> None:
        self.topic = topic
        self.consumer = consumer
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        self.partitions = partitions
        self.items: dict[tuple[str, str], CatalogItem] = {}
        self.invalid = 0

    def poll(self, timeout_ms: int = 0) -> list[tuple[int, int, CatalogItem]]:
        """``(partition, offset, item)`` of the catalog items fetched since the last poll (invalid records
        are counted and skipped: the dead-letter topic is the group consumer's job)."""
        out = []
        for tp, messages in self.consumer.poll(timeout_ms=timeout_ms, max_records=5000).items():
            for message in messages:
                try:
                    event = decode_event(message.value or b"")
                except InvalidEvent:
                    self.invalid += 1
                    continue
                if type(event) is CatalogItem:
                    self.items[(event.merchant_id, event.item_id)] = event
                    out.append((tp.partition, message.offset, event))
        return out

    def caught_up(self) -> bool:
        """Every partition read up to its fetched high watermark."""
        for tp in self.partitions:
            high = self.consumer.highwater(tp)
            if high is None or self.consumer.position(tp) < high:
                return False
        return True

    def read_until_caught_up(self, deadline_s: float) -> list[tuple[int, int, CatalogItem]]:
        """Poll until caught up (or ``deadline_s``): the catalog as it stands before any click is learned."""
        out, deadline = [], time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            out += self.poll(timeout_ms=200)
            if self.caught_up():
                break
        return out

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def _connect(settings: Settings) -> Any:
    """A group-less consumer, retried with backoff while the broker is away (as the group consumer is)."""
    from streams.consumer import RetryPolicy

    for attempt, delay in enumerate(RetryPolicy().delays(), start=1):
        try:
            return make_consumer(settings, None)
        except BrokerUnavailable as exc:
            log.warning("broker unreachable, retrying", extra={"attempt": attempt, "delay_s": delay, "error": str(exc)})
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def plan_topics(settings: Settings, topics: list[str] | None) -> tuple[list[str], CatalogReader | None, int]:
    """``(group topics, catalog reader or None, their partition count)``. The group's topics must share one
    partition count (a merchant's slot); the catalog topic, when its count differs, is read outside."""
    topics = list(dict.fromkeys(topics or event_topic_names(settings.topics)))
    probe = _connect(settings)
    counts = {topic: len(probe.partitions_for_topic(topic)) for topic in topics}
    catalog = settings.topics.catalog.name
    reader = None
    grouped = [t for t in topics if t != catalog] or topics
    if catalog in topics and grouped != topics and counts[catalog] != counts[grouped[0]]:
        reader, probe = CatalogReader(settings, catalog, probe), None
        topics = grouped
    if probe is not None:
        probe.close(autocommit=False)
    known = {counts[t] for t in topics if counts[t]}  # 0: not created yet (the group waits for it)
    if len(known) > 1:
        raise ValueError(f"the learner's group topics must have one partition count (a merchant's slot), got {counts}")
    return topics, reader, known.pop() if known else settings.topics.clicks.partitions


__all__ = ["CatalogReader", "plan_topics"]
