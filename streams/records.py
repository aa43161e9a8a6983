"""Kafka record batches (message format v2) decoded and encoded in bulk: the two hot loops of our clients.

kafka-python parses and builds every record in pure Python through several objects per record
(``DefaultRecord``, varint calls, property lookups, a future per sent record), which costs ~15 µs per
record when consuming and ~25 µs when producing, far more than validating the event itself (~2 µs).
This module does the same wire work in one tight loop per batch, and plugs into kafka-python at two
narrow points so everything else (networking, group membership, retries, idempotence, offsets) stays
kafka-python's:

* :class:`FastPartitionRecords` replaces the fetcher's per-partition record parser of one consumer
  (:func:`install_fast_fetch`); it yields the very same ``ConsumerRecord`` tuples as kafka-python.
* :class:`RecordBatchEncoder` builds a record batch from ``(key, value)`` pairs; the producer hands the
  whole batch to kafka-python's accumulator (:func:`enqueue_batch`, see :mod:`streams.producer`).

Both are checked byte for byte / field for field against kafka-python's own implementation in
``tests/test_streams_records.py``. They rely on kafka-python internals pinned in ``uv.lock``
(``DefaultRecordBatch._buffer/_pos``, ``Fetcher.PartitionRecords``, the accumulator); :data:`SUPPORTED`
and :data:`SUPPORTED_PRODUCE` are False when those are missing, and the clients then fall back to
kafka-python's own code paths.
"""

from __future__ import annotations

from collections import Counter

from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.errors import CorruptRecordError, IllegalStateError
from kafka.producer.producer_batch import ProducerBatch
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecordsBuilder

try:
    from kafka.consumer.fetcher import IsolationLevel
except ImportError:  # pragma: no cover - other kafka-python layouts
    IsolationLevel = None

SUPPORTED = (
    IsolationLevel is not None
    and {"_buffer", "_pos"} <= set(DefaultRecordBatch.__slots__)
    and hasattr(Fetcher, "PartitionRecords")
    and hasattr(Fetcher.PartitionRecords, "_unpack_records")
)

_BUILDER_SLOTS = {"_buffer", "_first_timestamp", "_max_timestamp", "_last_offset", "_num_records"}
#: bulk producing: whole batches handed to kafka-python's accumulator (see :func:`enqueue_batch`)
SUPPORTED_PRODUCE = (
    _BUILDER_SLOTS <= set(DefaultRecordBatchBuilder.__slots__)
    and {"_builder", "_next_offset"} <= set(MemoryRecordsBuilder.__slots__)
)

_CONTROL_MASK = DefaultRecordBatch.CONTROL_MASK
_TIMESTAMP_TYPE_MASK = DefaultRecordBatch.TIMESTAMP_TYPE_MASK


def _varint(buffer, pos: int) -> tuple[int, int]:
    """Zig-zag varint at ``pos``: (value, next position)."""
    byte = buffer[pos]
    if byte < 0x80:
        return (byte >> 1) ^ -(byte & 1), pos + 1
    result = byte & 0x7F
    shift = 7
    pos += 1
    while True:
        byte = buffer[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift >= 64:
            raise CorruptRecordError("varint out of int64 range")


def decode_batch_records(batch: DefaultRecordBatch, topic: str, partition: int) -> list:
    """Every record of one v2 batch as kafka-python ``ConsumerRecord`` tuples (no deserializers)."""
    batch._maybe_uncompress()
    buffer = batch._buffer
    view = memoryview(buffer)
    pos = batch._pos
    count = batch.records_count
    base_offset = batch.base_offset
    first_timestamp = batch.first_timestamp
    log_append = bool(batch.attributes & _TIMESTAMP_TYPE_MASK)
    timestamp_type = 1 if log_append else 0
    max_timestamp = batch.max_timestamp
    epoch = batch.leader_epoch
    varint = _varint
    out = []
    append = out.append
    try:
        for _ in range(count):
            length, pos = varint(buffer, pos)
            end = pos + length
            pos += 1  # attributes (int8, unused in v2 records)
            ts_delta, pos = varint(buffer, pos)
            offset_delta, pos = varint(buffer, pos)
            key_len, pos = varint(buffer, pos)
            if key_len >= 0:
                key = bytes(view[pos:pos + key_len])
                pos += key_len
            else:
                key = None
            value_len, pos = varint(buffer, pos)
            if value_len >= 0:
                value = bytes(view[pos:pos + value_len])
                pos += value_len
            else:
                value = None
            header_count, pos = varint(buffer, pos)
            headers = []
            header_size = -1
            if header_count:
                if header_count < 0:
                    raise CorruptRecordError(f"invalid number of record headers {header_count}")
                header_size = 0
                for _h in range(header_count):
                    name_len, pos = varint(buffer, pos)
                    if name_len < 0:
                        raise CorruptRecordError(f"invalid negative header key size {name_len}")
                    name = bytes(view[pos:pos + name_len]).decode("utf-8")
                    pos += name_len
                    header_len, pos = varint(buffer, pos)
                    if header_len >= 0:
                        header_value = bytes(view[pos:pos + header_len])
                        pos += header_len
                        header_size += name_len + header_len
                    else:
                        header_value = None
                        header_size += name_len
                    headers.append((name, header_value))
            if pos != end:
                raise CorruptRecordError(f"invalid record size: expected {length} bytes, read {length + pos - end}")
            append(ConsumerRecord(topic, partition, epoch, base_offset + offset_delta,
                                  max_timestamp if log_append else first_timestamp + ts_delta, timestamp_type,
                                  key, value, headers, None, -1 if key is None else key_len,
                                  -1 if value is None else value_len, header_size))
    except (ValueError, IndexError) as exc:  # as kafka-python: truncated buffers, undecodable header names
        raise CorruptRecordError(f"invalid record structure: {exc!r}") from None
    if pos != len(buffer):
        raise CorruptRecordError(f"{len(buffer) - pos} unconsumed bytes after all records consumed")
    return out


class FastPartitionRecords(Fetcher.PartitionRecords):
    """kafka-python's per-partition record parser with the v2 batch loop done by
    :func:`decode_batch_records`; anything unusual (deserializers, read_committed, legacy message
    formats) goes through kafka-python's own parser unchanged."""

    def _unpack_records(self, tp, records, key_deserializer, value_deserializer):
        if (key_deserializer is not None or value_deserializer is not None
                or self.isolation_level != IsolationLevel.READ_UNCOMMITTED):
            yield from super()._unpack_records(tp, records, key_deserializer, value_deserializer)
            return
        try:
            batch = records.next_batch()
            last_batch = None
            while batch is not None:
                if batch.magic != 2:  # legacy formats: kafka-python's parser, for this fetch's rest
                    yield from super()._unpack_records(tp, _Rewound(batch, records), None, None)
                    return
                last_batch = batch
                if self.check_crcs and not batch.validate_crc():
                    raise CorruptRecordError(
                        f"Record batch for partition {tp} at offset {batch.base_offset} failed crc check")
                self.leader_epoch = batch.leader_epoch
                if batch.attributes & _CONTROL_MASK:
                    self.next_fetch_offset = batch.next_offset
                    batch = records.next_batch()
                    continue
                decoded = decode_batch_records(batch, tp.topic, tp.partition)
                self.records_read += len(decoded)
                self.bytes_read += batch.size_in_bytes
                for record in decoded:
                    self.next_fetch_offset = record.offset + 1
                    yield record
                batch = records.next_batch()
            if last_batch is not None:
                self.next_fetch_offset = last_batch.next_offset
            self.drain()
        except StopIteration:  # see kafka-python issue 545: never let it end the generator silently
            raise RuntimeError("StopIteration raised unpacking messageset") from None


class _Rewound:
    """``records`` with an already-read batch put back in front (for the legacy-format fallback)."""

    def __init__(self, first, records) -> None:
        self._first = first
        self._records = records

    def next_batch(self):
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return self._records.next_batch()


def install_fast_fetch(kafka_consumer) -> bool:
    """Make one kafka-python consumer parse fetched v2 batches with :class:`FastPartitionRecords`.
    Returns False (and changes nothing) when this kafka-python does not have the expected internals."""
    fetcher = getattr(kafka_consumer, "_fetcher", None)
    if not SUPPORTED or fetcher is None:
        return False
    fetcher.PartitionRecords = FastPartitionRecords
    return True


# -- producing --------------------------------------------------------------------------------------------

def _encode_varint(value: int) -> bytes:
    """Zig-zag varint (Kafka record fields)."""
    value = (value << 1) ^ (value >> 63)
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = tuple(_encode_varint(i) for i in range(1 << 14))
_N_SMALL = len(_SMALL_VARINTS)


def varint(value: int) -> bytes:
    return _SMALL_VARINTS[value] if 0 <= value < _N_SMALL else _encode_varint(value)


def key_field(key: bytes | None) -> bytes:
    """A record's key field (length + bytes), computed once per key by the producer."""
    return b"\x01" if key is None else varint(len(key)) + key  # varint(-1) is 0x01


class RecordBatchEncoder:
    """Records of one topic-partition in the v2 record format, encoded as they come (no headers), until
    :meth:`producer_batch` turns them into one kafka-python ``ProducerBatch``.

    >>> encoder = RecordBatchEncoder(opened=0.0)
    >>> encoder.add(key_field(b"m01"), b'{"x":1}', 1_700_000_000_000)
    >>> encoder.count, encoder.size
    (1, 17)
    """

    __slots__ = ("parts", "size", "count", "first_timestamp", "max_timestamp", "opened")

    def __init__(self, opened: float) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.count = 0
        self.first_timestamp = 0
        self.max_timestamp = 0
        self.opened = opened

    def add(self, key_field: bytes, value: bytes, timestamp_ms: int) -> None:
        small, n_small = _SMALL_VARINTS, _N_SMALL
        count = self.count
        if count == 0:
            self.first_timestamp = self.max_timestamp = timestamp_ms
            delta = 0
        else:
            delta = timestamp_ms - self.first_timestamp
            if timestamp_ms > self.max_timestamp:
                self.max_timestamp = timestamp_ms
        value_len = len(value)
        head = (b"\x00" + (small[delta] if 0 <= delta < n_small else _encode_varint(delta))
                + (small[count] if count < n_small else _encode_varint(count)) + key_field
                + (small[value_len] if value_len < n_small else _encode_varint(value_len)))
        body_len = len(head) + value_len + 1
        prefix = small[body_len] if body_len < n_small else _encode_varint(body_len)
        self.parts += (prefix, head, value, b"\x00")
        self.size += len(prefix) + body_len
        self.count = count + 1

    def producer_batch(self, tp, compression_attrs: int, now: float) -> ProducerBatch:
        """The records as a closed-for-appends ``ProducerBatch`` (its builder is full), ready to send."""
        records = MemoryRecordsBuilder(2, compression_attrs, 1)  # batch_size 1: nothing else fits
        builder = records._builder
        builder._buffer += b"".join(self.parts)
        builder._first_timestamp = self.first_timestamp
        builder._max_timestamp = self.max_timestamp
        builder._last_offset = self.count - 1
        builder._num_records = self.count
        records._next_offset = self.count
        return ProducerBatch(tp, records, now=now)


def supports_bulk(kafka_producer) -> bool:
    """True when :func:`enqueue_batch` can be used with this kafka-python producer (not transactional)."""
    accumulator = getattr(kafka_producer, "_accumulator", None)
    manager = getattr(kafka_producer, "_transaction_manager", None)
    return (SUPPORTED_PRODUCE and hasattr(kafka_producer, "_sender")
            and all(hasattr(accumulator, name) for name in ("_tp_lock", "_batches", "_incomplete", "_closed"))
            and not (manager is not None and manager.is_transactional()))


def enqueue_batch(kafka_producer, batch: ProducerBatch) -> None:
    """Queue a built batch in a kafka-python producer's accumulator, exactly where ``send`` would have
    put records, and wake its sender thread. ``batch.produce_future`` says how the whole batch fared."""
    accumulator = kafka_producer._accumulator
    tp = batch.topic_partition
    with accumulator._tp_lock(tp):
        if accumulator._closed:
            raise IllegalStateError("RecordAccumulator is closed")
        accumulator._batches[tp].append(batch)
        accumulator._incomplete.add(batch)
    kafka_producer._sender.wakeup()


def batch_errors(batch: ProducerBatch, count: int) -> Counter:
    """Why records of a handed-off batch were not delivered (empty when the broker acknowledged them all).

    kafka-python completes a batch's ``produce_future`` *successfully* even when the batch failed, with a
    function giving each record's exception; a batch still in flight counts as not acknowledged in time.
    """
    future = batch.produce_future
    if not future.is_done:
        return Counter({"not_acknowledged_in_time": count})
    if future.failed():
        return Counter({type(future.exception).__name__: count})
    record_exception = future.value[2]
    if record_exception is None:
        return Counter()
    return Counter(type(record_exception(index)).__name__ for index in range(count))
