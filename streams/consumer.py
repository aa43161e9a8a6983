"""The consumer every worker builds on: a group member reading validated events, at least once.

Design notes: `streams/README.md`, `streams/consumer.py`.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import groupby, repeat
from operator import attrgetter
from typing import Any

import msgspec
from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from fedstream.logs import get_logger
from fedstream.settings import Settings
from streams.kafka import BrokerUnavailable, make_consumer, make_producer
from streams.producer import dead_letter_headers, dead_letter_limit, dead_letter_payload
from streams.fetch_ahead import install_fetch_ahead, install_large_reads
from streams.records import build_raw_batches
from streams.schemas import Event, InvalidEvent, decode_event, decode_valid_events, event_topic_names

log = get_logger("streams.consumer")

UNREACHABLE_WARNING_EVERY_S = 10.0  # a broker away logs once per this many seconds of failing polls

# fields of fetched records (streams.records.RawRecord, or kafka-python's ConsumerRecord in its fallbacks),
# read in bulk by EventConsumer.poll
_value, _offset, _timestamp, _key = (attrgetter(name) for name in ("value", "offset", "timestamp", "key"))
#: records decoded together by EventConsumer.poll: one invalid event sends only its chunk the slow way
_CHUNK = 256


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``initial_s``, times ``factor`` per attempt, capped at ``max_s``; give up after
    ``deadline_s`` seconds in total (None: keep trying until stopped)."""

    initial_s: float = 0.2
    factor: float = 2.0
    max_s: float = 5.0
    deadline_s: float | None = None

    def delays(self) -> Iterator[float]:
        delay = self.initial_s
        while True:
            yield delay
            delay = min(delay * self.factor, self.max_s)


class Record(msgspec.Struct, frozen=True, gc=False):
    """A decoded event and where it was read (a frozen msgspec struct: ~10x cheaper to build than a
    frozen dataclass, which matters at tens of thousands of records per second; not tracked by the
    garbage collector, as it can be in no reference cycle, so that consuming does not set off collections)."""

    event: Event
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


#: the kinds of a fetched run that went in whole (:meth:`EventConsumer._decode_messages`)
_ONLY_RECORDS = frozenset({Record})


@dataclass
class Batch:
    """Valid records of one poll plus the offsets to commit once they are processed (next offset per
    partition, covering dead-lettered records too); ``runs`` holds the same records split by partition,
    ``((topic, partition), records)`` in the order of ``records``, for a reader that takes them per
    partition without reading every record's topic and partition (``OnlineWorker.accept``)."""

    records: list[Record] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    dead_lettered: int = 0
    runs: list[tuple[tuple[str, int], list[Record]]] = field(default_factory=list)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def events(self) -> list[Event]:
        return [record.event for record in self.records]


class _Listener(ConsumerRebalanceListener):
    def __init__(self, owner: EventConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.owner._revoked(set(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.owner._assigned(set(assigned))


def seek_to_saved(offsets: Mapping[tuple[str, int], int]) -> Callable[[set[TopicPartition]], dict[TopicPartition, int]]:
    """A ``seek_on_assign`` hook for a member that checkpoints its own offsets (``offsets``: the live
    ``{(topic, partition): next offset}`` it keeps): an assigned partition found there resumes at its
    saved offset, any other at the group's committed one."""

    def seek(partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: offsets[(tp.topic, tp.partition)] for tp in partitions if (tp.topic, tp.partition) in offsets}

    return seek


class EventConsumer:
    """A consumer group member yielding validated events; see the module docstring for the contract."""

    def __init__(
        self, settings: Settings, group_id: str, topics: list[str] | None = None, *,
        max_records: int = 500, poll_timeout_ms: int = 500,
        seek_on_assign: Callable[[set[TopicPartition]], dict[TopicPartition, int]] | None = None,
        on_revoked: Callable[[set[TopicPartition]], None] | None = None,
        retry: RetryPolicy = RetryPolicy(), now: float | None = None,
        merchants: frozenset[str] | None = None, handle_signals: bool = True, fetch_decoding: bool = True,
        fetch_ahead: bool = True, **consumer_overrides: Any,
    ) -> None:
        """``fetch_decoding``: decode the events of a natively parsed record batch right there, into
        :class:`Record` (:meth:`_build_records`), instead of as :class:`~streams.records.RawRecord` decoded
        again in :meth:`poll`; the same records and dead letters either way (False: the reference path).
        ``fetch_ahead``: fetch the next records while a partition's are still handed out
        (:class:`~streams.fetch_ahead.AheadFetcher`); the same records either way (False: kafka-python's fetching)."""
        t = settings.topics
        self.settings = settings
        self.group_id = group_id
        self.topics = topics or event_topic_names(t)
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.seek_on_assign = seek_on_assign
        self.on_revoked = on_revoked
        self.retry = retry
        self._warned_unreachable_at = -UNREACHABLE_WARNING_EVERY_S
        self.now = now
        self.merchants = merchants
        self.processed = 0
        self.dead_lettered = 0
        self.dead_letter_failed = 0  # dead letters the broker did not take (counted and logged, not raised)
        self.assigned: set[TopicPartition] = set()
        self._stop = threading.Event()
        self._positions: dict[TopicPartition, int] = {}
        self._dead_letter_producer = None
        self._previous_handlers: dict[int, Any] = {}
        self._closed = False
        if handle_signals:
            self._install_signal_handlers()
        self._consumer = self._connect(consumer_overrides)
        if fetch_decoding:
            build_raw_batches(self._consumer, self._build_records)
        if fetch_ahead:
            install_fetch_ahead(self._consumer)
        install_large_reads(self._consumer)  # the same bytes, fetched responses read 256 KiB per recv
        self._consumer.subscribe(self.topics, listener=_Listener(self))

    # -- connection and signals ---------------------------------------------------------------------------

    def _connect(self, overrides: dict[str, Any]):
        started = time.monotonic()
        for attempt, delay in enumerate(self.retry.delays(), start=1):
            try:
                return make_consumer(self.settings, self.group_id, raw_records=True, **overrides)
            except BrokerUnavailable as exc:
                waited = time.monotonic() - started
                if self._stop.is_set() or (self.retry.deadline_s is not None and waited + delay > self.retry.deadline_s):
                    self._restore_signal_handlers()
                    raise
                log.warning("broker unreachable, retrying", extra={"attempt": attempt, "delay_s": delay, "error": str(exc)})
                self._stop.wait(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("stop requested", extra={"signal": signal.Signals(signum).name, "group": self.group_id})
        self._stop.set()

    def stop(self) -> None:
        """Ask :meth:`run` to finish after the current batch (thread- and signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- rebalance hooks ----------------------------------------------------------------------------------

    def _revoked(self, partitions: set[TopicPartition]) -> None:
        if self.on_revoked is not None and partitions:
            self.on_revoked(partitions)
        self.assigned -= partitions
        for tp in partitions:
            self._positions.pop(tp, None)

    def _assigned(self, partitions: set[TopicPartition]) -> None:
        self.assigned |= partitions
        if self.seek_on_assign is None or not partitions:
            return
        for tp, offset in (self.seek_on_assign(partitions) or {}).items():
            if tp in partitions and offset is not None:
                self._consumer.seek(tp, int(offset))
                self._positions[tp] = int(offset)
                log.info("seeked to checkpoint", extra={"topic": tp.topic, "partition": tp.partition, "offset": offset})

    # -- reading ------------------------------------------------------------------------------------------

    def poll(self, timeout_ms: int | None = None, max_records: int | None = None) -> Batch:
        """One batch: valid events as :class:`Record`; invalid ones go to the dead-letter topic."""
        fetched = self._fetch(self.poll_timeout_ms if timeout_ms is None else timeout_ms,
                              max_records or self.max_records)
        batch = Batch()
        if not fetched:
            return batch
        now = self.now if self.now is not None else time.time()
        futures = []
        for tp, messages in fetched.items():
            start = len(batch.records)
            self._decode_messages(batch, tp, messages, now, futures)
            if len(batch.records) > start:
                batch.runs.append(((tp.topic, tp.partition), batch.records[start:]))
            if messages:
                batch.offsets[tp] = messages[-1].offset + 1
                self._positions[tp] = messages[-1].offset + 1
        if futures:  # the dead letters must be safe before their offsets can be committed
            self._await_dead_letters(futures)
        self.dead_lettered += batch.dead_lettered
        return batch

    def _fetch(self, timeout_ms: int, max_records: int) -> dict:
        """kafka-python's poll, where a broker that is away gives an empty poll, waited out, never an error.

        kafka-python 3.0.12's group coordinator lookup lets a failed metadata refresh escape its ``poll`` as a
        retriable error (``KafkaConnectionError``) when a reconnect backoff has just run out. Anything else raises.
        """
        started = time.monotonic()
        try:
            return self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as exc:
            if not exc.retriable:
                raise
            if started - self._warned_unreachable_at > UNREACHABLE_WARNING_EVERY_S:
                self._warned_unreachable_at = started
                log.warning("broker unreachable while polling, waiting", extra={"error": str(exc)})
            self._stop.wait(max(0.0, timeout_ms / 1000 - (time.monotonic() - started)))
            return {}

    def _await_dead_letters(self, futures: list) -> None:
        """Wait for the dead letters of a poll; one not delivered after the client's retries is counted and
        logged, not raised: raising would stop the worker on the same record at every restart."""
        timeout = self.settings.kafka.request_timeout_ms / 1000
        try:
            self._dead_letter_producer.flush(timeout=timeout * 2)
        except KafkaError:
            pass  # the futures say which ones failed
        for future in futures:
            try:
                if future is None:
                    raise KafkaError("not sent")
                future.get(timeout=timeout)
            except KafkaError as exc:
                self.dead_letter_failed += 1
                log.error("dead letter not delivered", extra={"group": self.group_id, "error": str(exc)[:300]})

    def _build_records(self, topic: str, partition: int, offsets: list[int], timestamps: list[int], keys: list,
                       values: list) -> list[Record] | None:
        """A fetched batch's :class:`Record` from its columns (a :data:`~streams.records.BatchBuilder`), when
        every value is a valid event; else None: the batch comes as RawRecords and :meth:`poll` says which
        records are not and why."""
        events = decode_valid_events(values, now=self.now if self.now is not None else time.time(),
                                     merchants=self.merchants)
        if events is None:
            return None
        return list(map(Record, events, repeat(topic), repeat(partition), offsets, timestamps, keys))

    def _decode_messages(self, batch: Batch, tp: TopicPartition, messages: list, now: float, futures: list) -> None:
        """A partition's fetched records in order: runs already built as :class:`Record` go in as they are,
        the others (RawRecords, kafka-python's records) are decoded in chunks of :data:`_CHUNK`."""
        if set(map(type, messages)) == _ONLY_RECORDS:  # the common case, in one C-level pass
            batch.records += messages
            return
        for kind, run in groupby(messages, key=type):
            run = list(run)
            if kind is Record:
                batch.records += run
                continue
            for start in range(0, len(run), _CHUNK):
                self._decode_chunk(batch, tp, run[start:start + _CHUNK], now, futures)

    def _decode_chunk(self, batch: Batch, tp: TopicPartition, messages: list, now: float, futures: list) -> None:
        """Records of valid events into ``batch``, invalid ones to the dead-letter topic (their send futures
        into ``futures``). All at once when all are valid; else one by one, each with its own reason."""
        topic, partition, merchants = tp.topic, tp.partition, self.merchants
        events = decode_valid_events(list(map(_value, messages)), now=now, merchants=merchants)
        if events is not None:  # the common case: Records built in one C-level pass
            batch.records += map(Record, events, repeat(topic), repeat(partition), map(_offset, messages),
                                 map(_timestamp, messages), map(_key, messages))
            return
        for message in messages:
            try:
                event = decode_event(message.value or b"", now=now, merchants=merchants)
            except InvalidEvent as bad:
                futures.append(self._dead_letter(message, bad))
                batch.dead_lettered += 1
            else:
                batch.records.append(Record(event, topic, partition, message.offset, message.timestamp, message.key))

    def _dead_letter(self, message: Any, bad: InvalidEvent):
        """Send a bad record to the dead-letter topic (at most ``dead_letter_limit`` bytes of it); its future,
        or None when the client would not even take it."""
        if self._dead_letter_producer is None:
            self._dead_letter_producer = make_producer(self.settings)
        value, size_headers = dead_letter_payload(message.value or b"", dead_letter_limit(self.settings))
        headers = dead_letter_headers(bad.reason, bad.detail, f"consumer:{self.group_id}", topic=message.topic,
                                      partition=message.partition, offset=message.offset, **size_headers)
        try:
            return self._dead_letter_producer.send(self.settings.topics.dead_letter.name, value=value,
                                                   key=message.key, headers=headers)
        except KafkaError as exc:  # e.g. no metadata within max_block_ms
            log.error("dead letter not sent", extra={"group": self.group_id, "error": str(exc)[:300]})
            return None

    def commit_saved(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """:meth:`commit` the offsets a checkpoint holds (``{(topic, partition): next offset}``)."""
        self.commit({TopicPartition(topic, partition): offset for (topic, partition), offset in offsets.items()})

    def commit(self, batch: Batch | dict[TopicPartition, int] | None = None) -> None:
        """Commit a processed batch's offsets (or explicit ``{TopicPartition: next offset}``, or every
        position read so far), retrying with backoff while the broker is away.

        A commit rejected because the group rebalanced is logged and dropped, and so is a failing commit
        once a stop was requested: those records will be read again (at least once, never lost).
        """
        if isinstance(batch, Batch):
            offsets = batch.offsets
        else:
            offsets = batch if batch is not None else self.positions()
        offsets = {tp: off for tp, off in offsets.items() if tp in self.assigned}
        if not offsets:
            return
        payload = {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}
        started = time.monotonic()
        for delay in self.retry.delays():
            try:
                self._consumer.commit(payload)
                if isinstance(batch, Batch):
                    self.processed += len(batch)
                return
            except CommitFailedError as exc:
                log.warning("commit rejected after a rebalance; records will be redelivered", extra={"error": str(exc)})
                return
            except KafkaError as exc:
                waited = time.monotonic() - started
                if self.retry.deadline_s is not None and waited + delay > self.retry.deadline_s:
                    raise BrokerUnavailable(f"could not commit offsets: {exc}") from exc
                if self._stop.is_set():
                    log.warning("commit failed while stopping; records will be redelivered", extra={"error": str(exc)})
                    return
                log.warning("commit failed, retrying", extra={"delay_s": delay, "error": str(exc)})
                self._stop.wait(delay)

    def positions(self) -> dict[TopicPartition, int]:
        """Next offset to read per assigned partition, as far as this consumer has read or seeked
        (what a worker saves with its checkpoint and later returns from ``seek_on_assign``)."""
        return {tp: off for tp, off in self._positions.items() if tp in self.assigned}

    def lag(self) -> dict[TopicPartition, int]:
        """Records behind per assigned partition: fetched high watermark minus position (unknown: skipped)."""
        out = {}
        for tp in self.assigned:
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            position = self._positions.get(tp)
            if position is None:
                position = self._consumer.position(tp)
            out[tp] = max(0, high - position)
        return out

    def total_lag(self) -> int:
        return sum(self.lag().values())

    def run(
        self, handle: Callable[[Batch], None], *, max_batches: int | None = None, idle_timeout_s: float | None = None,
    ) -> int:
        """Poll, ``handle(batch)``, commit, until stopped (signal or :meth:`stop`), ``max_batches`` polls, or
        ``idle_timeout_s`` without a record. Returns the number of valid records processed; closes at the end."""
        processed = 0
        polls = 0
        last_data = time.monotonic()
        try:
            while not self._stop.is_set() and (max_batches is None or polls < max_batches):
                batch = self.poll()
                polls += 1
                if batch.records:
                    handle(batch)
                    processed += len(batch)
                if batch.offsets:
                    self.commit(batch)
                if batch.offsets or not self.assigned:  # idle time counts only once partitions are ours
                    last_data = time.monotonic()
                elif idle_timeout_s is not None and time.monotonic() - last_data > idle_timeout_s:
                    break
        finally:
            self.close()
        return processed

    def close(self) -> None:
        """Close clients and restore signal handlers (offsets are only committed explicitly)."""
        self._restore_signal_handlers()
        if self._closed:
            return
        self._closed = True
        if self._dead_letter_producer is not None:
            self._dead_letter_producer.close(timeout=10)
            self._dead_letter_producer = None
        try:
            self._consumer.close(autocommit=False)
        except KafkaError:  # pragma: no cover - closing against a dead broker
            pass

    def __enter__(self) -> EventConsumer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def kafka(self):
        """The underlying kafka-python consumer (for pause/resume or metrics)."""
        return self._consumer
