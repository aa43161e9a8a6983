"""Validated event production: good events to their topic keyed by merchant, bad bytes to the dead-letter topic.

Design notes: `streams/README.md`, `streams/producer.py`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.partitioner.default import murmur2

from fedstream.errors import ExpectedFailure
from fedstream.logs import get_logger
from fedstream.settings import Settings
from streams.kafka import BrokerUnavailable, make_producer
from streams.records import RecordBatchEncoder, batch_errors, enqueue_batch, key_field, supports_bulk
from streams.schemas import Event, InvalidEvent, decode_event, encode_event, event_topics

log = get_logger("streams.producer")

MAX_DETAIL_CHARS = 1000  # and any other header value


class DeliveryFailed(ExpectedFailure, RuntimeError):
    """Some records were not acknowledged by the broker; ``failed`` says how many, ``errors`` why."""

    def __init__(self, failed: int, errors: Counter) -> None:
        super().__init__(f"{failed} record(s) were not delivered: {dict(errors)}")
        self.failed = failed
        self.errors = errors


def dead_letter_headers(reason: str, detail: str, source: str, **extra: Any) -> list[tuple[str, bytes]]:
    """Kafka headers of a dead-letter record: ``reason`` (one of ``streams.schemas.REASONS``), ``detail``,
    ``source`` (who rejected it: a producer's source name or ``consumer:<group>``), and any extras
    (``topic``/``partition``/``offset`` where a consumer found it, ``original_size``/``sha256``/
    ``truncated`` for payloads too large to forward whole)."""
    headers = [("reason", reason), ("detail", detail), ("source", source)]
    headers += [(key, str(value)) for key, value in extra.items()]
    return [(key, value[:MAX_DETAIL_CHARS].encode("utf-8", "replace")) for key, value in headers]


def dead_letter_limit(settings: Settings) -> int:
    """The largest dead-letter value: ``settings.kafka.max_payload_bytes`` (1,000,000), so that with its
    headers (a few KB at most) a dead letter fits a broker's default record limit (Apache Kafka's
    ``message.max.bytes`` is 1,048,588); larger payloads are truncated, see :func:`dead_letter_payload`."""
    return settings.kafka.max_payload_bytes


def dead_letter_payload(raw: bytes, limit: int) -> tuple[bytes, dict[str, Any]]:
    """The original bytes, or (beyond what a Kafka request can carry) their first ``limit`` bytes plus
    headers with the full size and SHA-256, so the record can still be identified and counted."""
    if len(raw) <= limit:
        return raw, {}
    return raw[:limit], {"truncated": "true", "original_size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def header_dict(headers: Iterable[tuple[str, bytes]] | None) -> dict[str, str]:
    """Record headers as a ``{name: text}`` dict."""
    return {key: value.decode("utf-8", "replace") for key, value in (headers or [])}


class EventProducer:
    """Validates, routes and sends events, dead-letters invalid payloads, and keeps the accounting."""

    def __init__(
        self, settings: Settings, *, source: str = "producer", merchants: frozenset[str] | None = None,
        now: float | None = None, max_pending: int = 50_000, **producer_overrides: Any,
    ) -> None:
        self.settings = settings
        self.source = source
        self.merchants = merchants
        self.now = now
        self.max_pending = max_pending
        topics = settings.topics
        self.routes = {tag: topic.name for tag, topic in event_topics(topics).items()}
        self._partition_counts: dict[str, int] = {}
        self._partitions: dict[tuple[str, bytes], int] = {}
        self._targets: dict[tuple[str, str], tuple[TopicPartition, bytes, bytes]] = {}
        self.dead_letter_topic = topics.dead_letter.name
        self.dead_letter_limit = dead_letter_limit(settings)
        self.accepted = 0  # valid events the broker acknowledged
        self.failed = 0  # valid events it did not
        self.dead_lettered = 0  # dead letters it acknowledged
        self.dead_letter_failed = 0
        self.reasons: Counter[str] = Counter()  # every rejected payload, by reason
        self.by_type: Counter[str] = Counter()
        self.delivery_errors: Counter[str] = Counter()
        self.last_line_sent: int | None = None  # the last ``line`` handed to the client
        self.failed_lines: list[int] = []  # lines of valid events not acknowledged
        self.acknowledged_after_failure: list[int] = []  # lines acknowledged in or after a failing flush
        self._pending: list[tuple[Any, int | None, bool]] = []  # (future, line, dead letter?) sent one by one
        self._pending_batches: list[tuple[Any, int, list[int]]] = []  # (ProducerBatch, records, their lines)
        self._pending_records = 0
        self._open: dict[TopicPartition, RecordBatchEncoder] = {}
        self._open_lines: dict[TopicPartition, list[int]] = {}
        self._oldest_open = 0.0
        self._lock = threading.Lock()
        self._has_open = threading.Event()
        self._closing = threading.Event()
        self._lingerer: threading.Thread | None = None
        self._producer = make_producer(settings, **producer_overrides)  # raises BrokerUnavailable
        config = self._producer.config
        self._linger_s = config["linger_ms"] / 1000
        self._batch_bytes = config["batch_size"]
        self._compression = config.get("compression_attrs", 0)
        self.bulk = supports_bulk(self._producer)  # False: every record goes through KafkaProducer.send

    # -- sending ------------------------------------------------------------------------------------------

    def send_raw(self, raw: bytes, *, source: str | None = None, original: bytes | None = None, **extra: Any) -> bool:
        """Validate serialized bytes and send them; True if accepted, False if dead-lettered.

        ``original``: the bytes as they arrived when ``raw`` is a conversion of them (a CSV line turned
        into JSON); the dead-letter topic keeps the original. ``extra`` becomes dead-letter headers.
        """
        return self._validate_and_send(raw, canonical=False, source=source, original=original, **extra)

    def send_event(self, event: Event, *, source: str | None = None) -> bool:
        """Validate an event object (constraints included) and send it; True if accepted."""
        return self._validate_and_send(encode_event(event), canonical=True, source=source)

    def _validate_and_send(self, raw: bytes, *, canonical: bool, source: str | None, original: bytes | None = None,
                           **extra: Any) -> bool:
        """``canonical``: ``raw`` is already our own encoding, so the validated bytes are sent as they are;
        other bytes (any key order, spacing, omitted defaults) are re-encoded to the canonical JSON."""
        try:
            event = decode_event(raw, now=self.now if self.now is not None else time.time(), merchants=self.merchants)
        except InvalidEvent as bad:
            self.dead_letter(raw if original is None else original, bad.reason, bad.detail, source=source, **extra)
            return False
        self._send_valid(event, raw if canonical else encode_event(event), extra.get("line"))
        return True

    def send_many(self, payloads: Iterable[bytes | Event], *, source: str | None = None) -> dict:
        """Send raw payloads and/or event objects, flush, and return :meth:`summary`."""
        for payload in payloads:
            if isinstance(payload, bytes | bytearray | memoryview):
                self.send_raw(bytes(payload), source=source)
            else:
                self.send_event(payload, source=source)
        self.flush()
        return self.summary()

    def dead_letter(self, raw: bytes, reason: str, detail: str, *, source: str | None = None, **extra: Any) -> None:
        """Send the original bytes (truncated to :attr:`dead_letter_limit`) to the dead-letter topic with the
        reason in the headers. Not delivering it is counted (``dead_letter_failed``), never raised."""
        value, size_headers = dead_letter_payload(raw, self.dead_letter_limit)
        headers = dead_letter_headers(reason, detail, source or self.source, **size_headers, **extra)
        self.reasons[reason] += 1
        self._make_room()  # may raise DeliveryFailed for earlier valid events
        try:
            self._send(self.dead_letter_topic, value, key=None, headers=headers, line=extra.get("line"), dead=True)
        except (BrokerUnavailable, KafkaError) as exc:
            self.dead_letter_failed += 1
            self.delivery_errors[f"dead_letter:{type(exc).__name__}"] += 1
            log.error("dead letter not sent", extra={"reason": reason, "error": str(exc)[:300]})

    def _send_valid(self, event: Event, value: bytes, line: int | None = None) -> None:
        kind = type(event).__struct_config__.tag  # event_type(event), inlined: this runs per event
        target = self._targets.get((kind, event.merchant_id))
        if target is None:
            target = self._target(kind, event.merchant_id)
        tp, key, field = target
        if self.bulk:
            self._append(tp, field, value, line)
        else:
            self._make_room()
            self._send(tp.topic, value, key=key, partition=tp.partition, line=line)
        self.by_type[kind] += 1

    def _target(self, kind: str, merchant_id: str) -> tuple[TopicPartition, bytes, bytes]:
        """(topic-partition, key, encoded key field) of a merchant's events of one kind, computed once."""
        topic = self.routes[kind]
        key = merchant_id.encode()
        found = self._targets[(kind, merchant_id)] = (TopicPartition(topic, self._partition(topic, key)), key,
                                                      key_field(key))
        return found

    def _partition(self, topic: str, key: bytes) -> int:
        """Kafka's default partition of a key (murmur2, as the Java client and kafka-python's default
        partitioner), cached per merchant: kafka-python's pure-Python murmur2 costs ~5 µs a call."""
        found = self._partitions.get((topic, key))
        if found is None:
            count = self._partition_counts.get(topic)
            if count is None:
                count = self._partition_counts[topic] = self._topic_partitions(topic)
            found = self._partitions[(topic, key)] = (murmur2(key) & 0x7FFFFFFF) % count
        return found

    def _append(self, tp: TopicPartition, field: bytes, value: bytes, line: int | None) -> None:
        """Encode one record into its partition's open batch; hand batches off when full or lingered."""
        now = time.monotonic()
        with self._lock:
            encoder = self._open.get(tp)
            if encoder is not None and encoder.size + len(value) > self._batch_bytes:
                self._hand_off(tp)  # batches stay within batch_size (or hold one record): never split
                encoder = None
            if encoder is None:
                if not self._open:
                    self._oldest_open = now
                    self._start_lingerer()
                encoder = self._open[tp] = RecordBatchEncoder(opened=now)
            encoder.add(field, value, int(time.time() * 1000))
            if line is not None:
                self._open_lines.setdefault(tp, []).append(line)
                self.last_line_sent = line
            if encoder.size >= self._batch_bytes:
                self._hand_off(tp)
            elif now - self._oldest_open >= self._linger_s:
                self._hand_off_all()
        if self._pending_records >= self.max_pending:
            self.flush()

    def _hand_off(self, tp: TopicPartition) -> None:
        """(Under the lock.) Queue one open batch in kafka-python's accumulator."""
        encoder = self._open.pop(tp)
        lines = self._open_lines.pop(tp, [])
        batch = encoder.producer_batch(tp, self._compression, time.monotonic())
        enqueue_batch(self._producer, batch)
        self._pending_batches.append((batch, encoder.count, lines))
        self._pending_records += encoder.count

    def _hand_off_all(self) -> None:
        for tp in list(self._open):
            self._hand_off(tp)

    def _start_lingerer(self) -> None:
        """(Under the lock.) Wake the thread that hands off batches nobody adds to any more."""
        self._has_open.set()
        if self._lingerer is None:
            self._lingerer = threading.Thread(target=self._linger_loop, name="fedstream-producer-linger",
                                              daemon=True)
            self._lingerer.start()

    def _linger_loop(self) -> None:
        while not self._closing.is_set():
            self._has_open.wait()
            if self._closing.wait(self._linger_s):
                return
            with self._lock:
                if self._open and time.monotonic() - self._oldest_open >= self._linger_s:
                    try:
                        self._hand_off_all()
                    except KafkaError as exc:  # closed underneath us: flush/close report the records
                        log.warning("could not hand off lingering batches", extra={"error": str(exc)})
                        return
                if not self._open:
                    self._has_open.clear()

    def prefetch_metadata(self) -> None:
        """Fetch the partition counts of every routed topic now (raises :class:`BrokerUnavailable`), so the
        first events of each type do not wait for metadata."""
        for topic in self.routes.values():
            if topic not in self._partition_counts:
                self._partition_counts[topic] = self._topic_partitions(topic)

    def _topic_partitions(self, topic: str) -> int:
        try:
            found = self._producer.partitions_for(topic)  # waits for metadata up to max_block_ms
        except KafkaTimeoutError as exc:
            raise BrokerUnavailable(f"no metadata for topic {topic}: {exc}") from exc
        if not found:
            raise BrokerUnavailable(f"topic {topic} does not exist (create it with ensure_topics)")
        return len(found)

    def _make_room(self) -> None:
        if len(self._pending) >= self.max_pending:
            self.flush()

    def _send(self, topic: str, value: bytes, *, key: bytes | None, headers: list | None = None,
              partition: int | None = None, line: int | None = None, dead: bool = False) -> None:
        try:
            future = self._producer.send(topic, value=value, key=key, headers=headers, partition=partition)
        except KafkaTimeoutError as exc:  # metadata or buffer space not available within max_block_ms
            raise BrokerUnavailable(f"broker did not accept a record for {topic} in time: {exc}") from exc
        self._pending.append((future, line, dead))
        if line is not None:
            self.last_line_sent = line

    # -- delivery and accounting --------------------------------------------------------------------------

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait for every pending send and count what was acknowledged; raise :class:`DeliveryFailed` if a
        valid event was not (a dead letter that was not is counted and logged)."""
        timeout = timeout_s if timeout_s is not None else self.settings.kafka.request_timeout_ms / 1000 * 2
        pending, batches = self._take_pending()
        try:
            self._producer.flush(timeout=timeout)
        except KafkaTimeoutError:
            pass  # the futures below say exactly which records failed
        self._count_outcomes(pending, batches)

    def _take_pending(self) -> tuple[list, list]:
        with self._lock:
            self._hand_off_all()
            pending, self._pending = self._pending, []
            batches, self._pending_batches = self._pending_batches, []
            self._pending_records = 0
        return pending, batches

    def _count_outcomes(self, pending: list, batches: list) -> None:
        errors: Counter[str] = Counter()
        acked: list[int] = []
        failed_lines: list[int] = []
        for future, line, dead in pending:
            error = _future_error(future)
            if error is None:
                if dead:
                    self.dead_lettered += 1
                else:
                    self.accepted += 1
                if line is not None:
                    acked.append(line)
            elif dead:
                self.dead_letter_failed += 1
                self.delivery_errors[f"dead_letter:{error}"] += 1
                log.error("dead letter not delivered", extra={"line": line, "error": error})
            else:
                errors[error] += 1
                if line is not None:
                    failed_lines.append(line)
        for batch, count, lines in batches:
            batch_failed = batch_errors(batch, count)
            if batch_failed:
                errors += batch_failed
                failed_lines += lines
            else:
                self.accepted += count
                acked += lines
        self._account_lines(acked, failed_lines)
        failed = sum(errors.values())
        self.failed += failed
        self.delivery_errors += errors
        if failed:
            log.error("records not delivered", extra={"failed": failed, "errors": dict(self.delivery_errors)})
            raise DeliveryFailed(failed, Counter(errors))

    def _account_lines(self, acked: list[int], failed: list[int]) -> None:
        """Remember failed lines and, once any failed, the lines acknowledged from this flush on (every line
        of an earlier flush is older than any line of this one)."""
        if failed or self.failed_lines:
            self.failed_lines += failed
            self.acknowledged_after_failure += acked

    def resume_point(self, next_unsent_line: int | None) -> tuple[int | None, list[int]]:
        """Where to resume a line-tracked input: the first line whose valid event was not acknowledged or
        ``next_unsent_line`` (the first line never handed over; None: the input was read to its end),
        whichever comes first, and the later lines acknowledged all the same (to skip on resume, or they
        would be sent twice). ``(None, [])`` when nothing is left to send."""
        candidates = self.failed_lines if next_unsent_line is None else [*self.failed_lines, next_unsent_line]
        if not candidates:
            return None, []
        start = min(candidates)
        return start, sorted(line for line in set(self.acknowledged_after_failure) if line >= start)

    def summary(self) -> dict:
        """``{"accepted": N, "dead_lettered": M, "reasons": {reason: count}, "failed": F,
        "dead_letter_failed": D}``: acknowledged valid events and dead letters, every rejected payload by
        reason, and what the broker did not acknowledge (as of the last :meth:`flush`)."""
        return {"accepted": self.accepted, "dead_lettered": self.dead_lettered, "reasons": dict(sorted(self.reasons.items())),
                "failed": self.failed, "dead_letter_failed": self.dead_letter_failed}

    def close(self, timeout_s: float | None = None) -> None:
        """Hand off what is open, wait up to ``timeout_s`` for acknowledgements, close the client (aborting
        what is left), then count: every record is acknowledged or failed by then, none in flight.
        Raises :class:`DeliveryFailed` like :meth:`flush`."""
        timeout = timeout_s if timeout_s is not None else self.settings.kafka.request_timeout_ms / 1000 * 2
        self._closing.set()
        self._has_open.set()  # let the linger thread see the close
        pending, batches = [], []
        try:
            pending, batches = self._take_pending()
            self._producer.flush(timeout=timeout)
            self._producer.close(timeout=timeout)
        except KafkaError as exc:  # kafka-python's close gives up at its flush: abort what is left ourselves
            log.warning("closing the producer by force", extra={"error": str(exc)[:300]})
            _force_close(self._producer, timeout)
        self._count_outcomes(pending, batches)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not mask the original error with a flush failure
            try:
                self.close()
            except (DeliveryFailed, KafkaError):
                pass


def _future_error(future: Any) -> str | None:
    """Why a one-record send was not acknowledged (None if it was)."""
    if not future.is_done:
        return "not_acknowledged_in_time"
    if future.failed():
        return type(future.exception).__name__
    return None


def _force_close(producer: Any, timeout_s: float) -> None:
    """Stop a kafka-python producer whose broker does not answer: its sender aborts the incomplete batches
    (their futures fail), so every record has an outcome."""
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()
        sender.join(timeout_s)
    try:
        producer.close(timeout=0)
    except KafkaError:  # pragma: no cover - still nothing to flush to
        pass
