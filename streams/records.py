"""Kafka record batches (message format v2) decoded and encoded in bulk: the two hot loops of our clients.

Design notes: `streams/README.md`, `streams/records.py`.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Callable
from itertools import repeat

import kafka
import msgspec
import numpy as np
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.errors import CorruptRecordError, IllegalStateError
from kafka.producer.producer_batch import ProducerBatch
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder
from kafka.structs import TopicPartition

from fedstream.logs import get_logger

try:
    from kafka.consumer.fetcher import IsolationLevel
except ImportError:  # pragma: no cover - other kafka-python layouts
    IsolationLevel = None

SUPPORTED = (
    IsolationLevel is not None
    and {"_buffer", "_pos", "_header_data", "_num_records"} <= set(DefaultRecordBatch.__slots__)
    and hasattr(Fetcher, "PartitionRecords")
    and all(hasattr(Fetcher.PartitionRecords, name)
            for name in ("_unpack_records", "take", "drain", "_maybe_skip_record", "_maybe_raise_next_inline_exception"))
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


class RawRecord(msgspec.Struct, frozen=True, gc=False):
    """A fetched record reduced to what a consumer of events reads, under ``ConsumerRecord``'s field names
    (:class:`RawPartitionRecords`). One untracked object instead of a namedtuple and a headers list, both
    tracked by the garbage collector: at tens of thousands of records per second those set off
    collections, full ones included, that cost more than building the records."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


#: ``build(topic, partition, offsets, timestamps, keys, values) -> records | None``: a consumer's own records
#: made from the columns of one natively scanned batch (lists; records with the same key share its bytes), or
#: None to get the batch as :class:`RawRecord` (e.g. a value that does not decode). Installed per consumer
#: by :func:`build_raw_batches`; ``EventConsumer`` decodes its events there, in one pass per batch.
BatchBuilder = Callable[[str, int, list, list, list, list], "list | None"]

#: batches of at least this many records are scanned natively when decoded as RawRecords (numba: a consumer
#: of events pays its import once; smaller batches are not worth a kernel call)
NATIVE_MIN_RECORDS = 8
#: zig-zag decoded value of every 1- and 2-byte varint, indexed by its 14 payload bits (low group first)
_ZIGZAG = tuple((raw >> 1) ^ -(raw & 1) for raw in range(1 << 14))
_new_tuple = tuple.__new__  # ConsumerRecord(...) without the namedtuple's Python-level __new__ frame


def decode_batch_records(batch: DefaultRecordBatch, topic: str, partition: int, raw: bool = False,
                         build: BatchBuilder | None = None) -> list:
    """Every record of one v2 batch as kafka-python ``ConsumerRecord`` tuples (no deserializers), or as
    :class:`RawRecord` when ``raw``; with ``build`` too, a natively scanned batch becomes what ``build``
    makes of its columns when it makes something (see :data:`BatchBuilder`).

    The hot loop of consuming: varints of one or two bytes (nearly all of them: lengths up to 8 KiB,
    offset deltas, key lengths) are decoded inline through :data:`_ZIGZAG`, longer ones by :func:`_varint`;
    the batch is copied to ``bytes`` once so that keys and values are plain slices.
    """
    batch._maybe_uncompress()
    data = bytes(batch._buffer)
    pos = batch._pos
    header = batch._header_data  # base_offset, length, epoch, magic, crc, attributes, ..., first/max timestamp
    base_offset = header[0]
    epoch = header[2]
    log_append = bool(header[5] & _TIMESTAMP_TYPE_MASK)
    timestamp_type = 1 if log_append else 0
    first_timestamp = header[7]
    max_timestamp = header[8]
    if raw and batch._num_records >= NATIVE_MIN_RECORDS:
        native = _native_raw_records(data, pos, batch._num_records, base_offset,
                                     max_timestamp if log_append else None, first_timestamp, topic, partition, build)
        if native is not None:
            return native
    zigzag, varint, new, record_type, raw_record = _ZIGZAG, _varint, _new_tuple, ConsumerRecord, RawRecord
    out = []
    append = out.append
    try:
        for _ in range(batch._num_records):
            # Record => Length Attributes TimestampDelta OffsetDelta KeyLen Key ValueLen Value Headers
            byte = data[pos]
            if byte < 0x80:
                length = zigzag[byte]
                pos += 1
            elif data[pos + 1] < 0x80:
                length = zigzag[(byte & 0x7F) | (data[pos + 1] << 7)]
                pos += 2
            else:
                length, pos = varint(data, pos)
            end = pos + length
            if data[pos] < 0x80:  # attributes (unused): an int8 by the spec, a varint to kafka-python
                pos += 1
            else:
                pos = varint(data, pos)[1]
            byte = data[pos]
            if byte < 0x80:
                ts_delta = zigzag[byte]
                pos += 1
            else:
                ts_delta, pos = varint(data, pos)
            byte = data[pos]
            if byte < 0x80:
                offset_delta = zigzag[byte]
                pos += 1
            elif data[pos + 1] < 0x80:
                offset_delta = zigzag[(byte & 0x7F) | (data[pos + 1] << 7)]
                pos += 2
            else:
                offset_delta, pos = varint(data, pos)
            byte = data[pos]
            if byte < 0x80:
                key_len = zigzag[byte]
                pos += 1
            else:
                key_len, pos = varint(data, pos)
            if key_len >= 0:
                key = data[pos:pos + key_len]
                pos += key_len
            else:
                key = None
            byte = data[pos]
            if byte < 0x80:
                value_len = zigzag[byte]
                pos += 1
            elif data[pos + 1] < 0x80:
                value_len = zigzag[(byte & 0x7F) | (data[pos + 1] << 7)]
                pos += 2
            else:
                value_len, pos = varint(data, pos)
            if value_len >= 0:
                value = data[pos:pos + value_len]
                pos += value_len
            else:
                value = None
            if data[pos] == 0:  # no headers: the common case
                pos += 1
                headers = None
            else:
                headers, header_size, pos = _headers(data, pos)
            if pos != end:
                raise CorruptRecordError(f"invalid record size: expected {length} bytes, read {length + pos - end}")
            if raw:
                append(raw_record(topic, partition, base_offset + offset_delta,
                                  max_timestamp if log_append else first_timestamp + ts_delta, key, value))
            else:
                if headers is None:
                    headers, header_size = [], -1
                append(new(record_type, (topic, partition, epoch, base_offset + offset_delta,
                                         max_timestamp if log_append else first_timestamp + ts_delta, timestamp_type,
                                         key, value, headers, None, -1 if key is None else key_len,
                                         -1 if value is None else value_len, header_size)))
    except (ValueError, IndexError) as exc:  # as kafka-python: truncated buffers, undecodable header names
        raise CorruptRecordError(f"invalid record structure: {exc!r}") from None
    if pos != len(data):
        raise CorruptRecordError(f"{len(data) - pos} unconsumed bytes after all records consumed")
    return out


def _native_raw_records(data: bytes, pos: int, count: int, base_offset: int, log_append_timestamp: int | None,
                        first_timestamp: int, topic: str, partition: int,
                        build: BatchBuilder | None = None) -> list | None:
    """The batch's records as :class:`RawRecord` (or as ``build`` makes them) from one native scan
    (:mod:`streams.record_kernels`); None when a record is not plain (headers, a size that does not add
    up), for the Python loop to decode. Records carrying the same key share one ``bytes`` of it."""
    from streams import record_kernels  # numba: loaded by the first big raw batch (a worker loads it earlier)

    columns = np.empty((5, count), dtype=np.int64)
    distinct = np.empty((2, count), dtype=np.int64)
    log_append = log_append_timestamp is not None
    end, found, null_values = record_kernels.scan(
        np.frombuffer(data, dtype=np.uint8), pos, base_offset, log_append_timestamp if log_append else first_timestamp,
        log_append, columns, distinct)
    if end != len(data):
        return None
    offsets, stamps, key_indices, value_starts, value_ends = columns.tolist()
    key_starts, key_lengths = distinct[:, :found].tolist()
    key_table = [data[start:start + length] for start, length in zip(key_starts, key_lengths)]
    key_table.append(None)  # index -1: a null key
    keys = list(map(key_table.__getitem__, key_indices))
    if null_values:
        values = [data[start:stop] if stop >= 0 else None for start, stop in zip(value_starts, value_ends)]
    else:
        values = [data[start:stop] for start, stop in zip(value_starts, value_ends)]
    if build is not None:
        built = build(topic, partition, offsets, stamps, keys, values)
        if built is not None:
            return built
    return list(map(RawRecord, repeat(topic), repeat(partition), offsets, stamps, keys, values))


def _headers(data: bytes, pos: int) -> tuple[list, int, int]:
    """A record's headers at ``pos`` (count varint first): (headers, kafka-python's header size, next pos)."""
    header_count, pos = _varint(data, pos)
    if header_count < 0:
        raise CorruptRecordError(f"invalid number of record headers {header_count}")
    headers = []
    header_size = 0
    for _h in range(header_count):
        name_len, pos = _varint(data, pos)
        if name_len < 0:
            raise CorruptRecordError(f"invalid negative header key size {name_len}")
        name = data[pos:pos + name_len].decode("utf-8")
        pos += name_len
        header_len, pos = _varint(data, pos)
        if header_len >= 0:
            header_value = data[pos:pos + header_len]
            pos += header_len
            header_size += name_len + header_len
        else:
            header_value = None
            header_size += name_len
        headers.append((name, header_value))
    return headers, header_size if headers else -1, pos  # as kafka-python: -1 without headers


class FastPartitionRecords(Fetcher.PartitionRecords):
    """kafka-python's per-partition record parser with the v2 batch loop done by
    :func:`decode_batch_records`, and :meth:`take` handing out slices of decoded batches instead of pulling
    records one by one through a generator (same records, same ``next_fetch_offset`` after every take, same
    skipping of records before the fetch offset, same drain at the end). Anything unusual (deserializers,
    read_committed, legacy message formats) goes through kafka-python's own parser unchanged."""

    raw = False  # ConsumerRecords (True: RawRecords, see RawPartitionRecords)
    _batches = None  # decoded batches (lists of records) still to hand out; None: kafka-python's own path

    def _unpack_records(self, tp, records, key_deserializer, value_deserializer):
        if (key_deserializer is not None or value_deserializer is not None
                or self.isolation_level != IsolationLevel.READ_UNCOMMITTED):
            return super()._unpack_records(tp, records, key_deserializer, value_deserializer)
        self._batches = self._decoded_batches(tp, records)
        self._pending: list = []  # the decoded batch being handed out ...
        self._taken = 0  # ... and how many of its records were handed out already
        return iter(())  # the record iterator kafka-python keeps: only its None-ness (drained) is used

    def _decoded_batches(self, tp, records):
        """Decoded v2 batches, each a non-empty list, with kafka-python's per-batch bookkeeping."""
        build = self._builder() if self.raw else None
        try:
            skipping = True  # records before the fetch offset (a fetch can start mid-batch) are dropped
            batch = records.next_batch()
            last_batch = None
            while batch is not None:
                if batch.magic != 2:  # legacy formats: kafka-python's parser, for this fetch's rest
                    self.record_iterator = itertools.dropwhile(
                        self._maybe_skip_record, super()._unpack_records(tp, _Rewound(batch, records), None, None))
                    self._batches = None
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
                decoded = decode_batch_records(batch, tp.topic, tp.partition, self.raw, build)
                self.records_read += len(decoded)
                self.bytes_read += batch.size_in_bytes
                if skipping and decoded:
                    first_wanted = next((i for i, record in enumerate(decoded) if record.offset >= self.fetch_offset),
                                        len(decoded))
                    if first_wanted:
                        self.next_fetch_offset = decoded[first_wanted - 1].offset + 1
                        del decoded[:first_wanted]
                    skipping = not decoded
                if decoded:
                    yield decoded
                batch = records.next_batch()
            if last_batch is not None:
                self.next_fetch_offset = last_batch.next_offset
            self.drain()
        except StopIteration:  # see kafka-python issue 545: never let it end the generator silently
            raise RuntimeError("StopIteration raised unpacking messageset") from None

    def _builder(self) -> BatchBuilder | None:
        """The :data:`BatchBuilder` :func:`build_raw_batches` installed on this parser's fetcher (kafka-python
        hands every parser its fetcher's ``_on_partition_records_drain``), or None."""
        return getattr(getattr(self.on_drain, "__self__", None), "fedstream_build", None)

    def take(self, n=None):
        """Up to ``n`` records (all when None), as kafka-python's ``take``: an error after some records
        were gathered is raised by the next call."""
        if self._batches is None:
            return super().take(n)
        self._maybe_raise_next_inline_exception()
        out = []
        try:
            while self.record_iterator is not None and (n is None or len(out) < n):
                pending, start = self._pending, self._taken
                if start < len(pending):
                    stop = len(pending) if n is None else min(len(pending), start + n - len(out))
                    out += pending[start:stop] if start or stop < len(pending) else pending
                    self._taken = stop
                    self.next_fetch_offset = pending[stop - 1].offset + 1
                    continue
                batch = next(self._batches, None)
                if batch is not None:
                    self._pending, self._taken = batch, 0
                elif self._batches is None:  # a legacy batch: kafka-python's parser takes over
                    out += super().take(None if n is None else n - len(out))
                    break
                elif self.record_iterator is not None:  # ended by an error raised earlier: nothing more
                    self.drain()
        except Exception as exc:
            if not out:
                raise
            self._next_inline_exception = exc
        return out


class RawPartitionRecords(FastPartitionRecords):
    """:class:`FastPartitionRecords` handing out v2 records as :class:`RawRecord` (topic, partition, offset,
    timestamp, key, value; no headers): for a consumer that reads only those (``EventConsumer``). Records of
    the fallbacks (legacy formats, deserializers, read_committed) stay kafka-python's ``ConsumerRecord``,
    which has the same fields."""

    raw = True


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


def install_fast_fetch(kafka_consumer, raw: bool = False) -> bool:
    """Make one kafka-python consumer parse fetched v2 batches with :class:`FastPartitionRecords`
    (:class:`RawPartitionRecords` when ``raw``). Returns False (and changes nothing) when this
    kafka-python does not have the expected internals."""
    fetcher = getattr(kafka_consumer, "_fetcher", None)
    if not SUPPORTED or fetcher is None or not fast_paths_agree():
        return False
    fetcher.PartitionRecords = RawPartitionRecords if raw else FastPartitionRecords
    return True


def build_raw_batches(kafka_consumer, build: BatchBuilder | None) -> bool:
    """Have a consumer's :class:`RawPartitionRecords` (see :func:`install_fast_fetch`) make its natively
    scanned batches with ``build`` (None: as :class:`RawRecord` again). Returns False (and changes nothing)
    when that parser is not installed."""
    fetcher = getattr(kafka_consumer, "_fetcher", None)
    if fetcher is None or fetcher.PartitionRecords is not RawPartitionRecords:
        return False
    fetcher.fedstream_build = build
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
    return (SUPPORTED_PRODUCE and fast_paths_agree() and hasattr(kafka_producer, "_sender")
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


# -- the meaning check ------------------------------------------------------------------------------------

_SAMPLE = [(1_700_000_000_000 + delta, key, value, headers) for delta, key, value, headers in (
    (0, b"m01", b'{"type":"click"}', []), (5, None, b"", [("reason", b"x"), ("empty", None)]),
    (9000, b"k" * 200, b"v" * 300, []), (-3, b"", b"\x00\xff", [("\u00fcn\u00ef", b"")]))]


def _disagreement() -> str | None:
    """What differs between our paths and kafka-python's on :data:`_SAMPLE` (None: nothing)."""
    tp = TopicPartition("fedstream-self-check", 0)
    builder = MemoryRecordsBuilder(2, 0, 1 << 20, offset=0)
    for timestamp, key, value, headers in _SAMPLE:
        builder.append(timestamp, key, value, headers)
    builder.close()
    batch = bytes(builder.buffer())
    if SUPPORTED:
        ours = FastPartitionRecords(0, tp, MemoryRecords(batch)).take()
        theirs = Fetcher.PartitionRecords(0, tp, MemoryRecords(batch)).take()
        if ours != theirs:
            return "consuming: FastPartitionRecords yields other records than Fetcher.PartitionRecords"
    if SUPPORTED_PRODUCE:
        reference = MemoryRecordsBuilder(2, 0, 1 << 30)
        encoder = RecordBatchEncoder(opened=0.0)
        for timestamp, key, value, _ in _SAMPLE:
            reference.append(timestamp, key, value, [])
            encoder.add(key_field(key), value, timestamp)
        ours_built = encoder.producer_batch(tp, 0, now=0.0).records
        ours_built.close()
        reference.close()
        if bytes(ours_built.buffer()) != bytes(reference.buffer()):
            return "producing: RecordBatchEncoder writes other bytes than MemoryRecordsBuilder"
    return None


@functools.cache
def fast_paths_agree() -> bool:
    """True when the fast paths give exactly kafka-python's records and bytes on a sample (checked once);
    otherwise an ERROR says what changed and the clients use kafka-python's own code."""
    try:
        problem = _disagreement()
    except Exception as exc:  # a private that kept its name but not its shape
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        get_logger("streams.records").error(
            "kafka-python internals changed meaning: fast record paths disabled",
            extra={"kafka_python": kafka.__version__, "problem": problem})
    return problem is None

