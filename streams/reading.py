"""One way to read topics to their end: every partition from its beginning up to its fetched high watermark.

:func:`read_to_end` gives the records, :func:`read_events` the decoded events of the event topics in event
order (:func:`sort_events`). The federated stores, the drift report and ``fedstream drift status`` use them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from fedstream.settings import Settings, Topic
from streams.schemas import CatalogItem, Event, InvalidEvent, decode_event, event_topics

# the first fetch also fetches metadata: nothing arriving before this long says nothing yet
FIRST_FETCH_GRACE_S = 2.0


def read_to_end(settings: Settings, topics: Sequence[Topic], *, keep_key: Callable[[bytes | None], bool] | None = None,
                idle_timeout_s: float = 3.0, max_wait_s: float = 120.0) -> list:
    """Every record of ``topics`` (whose key ``keep_key`` accepts) from the beginning to the end, in one order:
    record timestamp, then the position of its topic in ``topics``, partition and offset.

    A group-less consumer (nothing committed) seeks every partition to its beginning. **The end is the high
    watermark the broker returns with each fetch** (``consumer.highwater``), not ``end_offsets``: tansu
    reports wrong end offsets. Reading stops when every partition's position has reached its fetched high
    watermark (a partition with no records has watermark 0: caught up at once), or after ``idle_timeout_s``
    without a record (at least :data:`FIRST_FETCH_GRACE_S` before the first), or after ``max_wait_s``.
    Records produced while reading are read when a fetch reports them before the stop, else left for the
    next read: the result is always a prefix of each partition, without gaps.
    """
    from kafka import TopicPartition

    from streams.kafka import make_consumer

    partitions = [TopicPartition(topic.name, p) for topic in topics for p in range(topic.partitions)]
    rank = {topic.name: position for position, topic in enumerate(topics)}
    consumer = make_consumer(settings, None, raw_records=True)
    found: list = []
    try:
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        started = last_data = time.monotonic()
        idle = max(idle_timeout_s, FIRST_FETCH_GRACE_S)
        while time.monotonic() - started < max_wait_s:
            batch = consumer.poll(timeout_ms=int(1000 * min(idle, 0.5)), max_records=50_000)
            for records in batch.values():
                last_data, idle = time.monotonic(), idle_timeout_s
                found.extend(r for r in records if keep_key is None or keep_key(r.key))
            if caught_up(consumer, partitions) or time.monotonic() - last_data > idle:
                break
    finally:
        consumer.close()
    found.sort(key=lambda r: (r.timestamp, rank[r.topic], r.partition, r.offset))
    return found


def caught_up(consumer, partitions: Iterable) -> bool:
    """Whether every partition's position has reached the high watermark of its last fetch (none yet: no)."""
    for tp in partitions:
        high = consumer.highwater(tp)
        if high is None or consumer.position(tp) < high:
            return False
    return True


def read_events(settings: Settings, merchant_ids: Iterable[str] | None = None, *, idle_timeout_s: float = 3.0,
                max_wait_s: float = 120.0) -> list[Event]:
    """The events of the event topics (:data:`streams.schemas.EVENT_KINDS`), of the given merchants (by record
    key and event; all when None), read to their end (:func:`read_to_end`), decoded (invalid records skipped:
    the streams room dead-letters them at ingest), in event order (:func:`sort_events`)."""
    wanted = {m.encode() for m in merchant_ids} if merchant_ids is not None else None
    topics = list(event_topics(settings.topics).values())
    keep = None if wanted is None else (lambda key: key is None or key in wanted)
    records = read_to_end(settings, topics, keep_key=keep, idle_timeout_s=idle_timeout_s, max_wait_s=max_wait_s)
    now = time.time() + 10 * 365 * 86_400  # stored events were validated at ingest; their age is no reason here
    events: list[Event] = []
    for record in records:
        try:
            event = decode_event(record.value, now=now)
        except InvalidEvent:
            continue
        if wanted is None or event.merchant_id.encode() in wanted:
            events.append(event)
    return sort_events(events)


def sort_events(events: Iterable[Event]) -> list[Event]:
    """Event time order (stable); at equal timestamps catalog events come first (they define the items).

    Files are read in their own order; this is for merging topics, whose partitions interleave arbitrarily.
    """
    return sorted(events, key=lambda e: (e.timestamp, not isinstance(e, CatalogItem)))
