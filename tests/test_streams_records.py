"""streams.records: the bulk record codec must give exactly what kafka-python's own code gives."""

from __future__ import annotations

import gc
import gzip
import random
from collections import Counter
from types import SimpleNamespace

import pytest
from kafka import TopicPartition
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

from kafka.producer.producer_batch import ProducerBatch

from streams.records import (SUPPORTED, FastPartitionRecords, RawPartitionRecords, RawRecord, RecordBatchEncoder,
                             key_field, varint)

TP = TopicPartition("t", 3)


def build(records, *, compression: int = 0, batch_size: int = 1 << 20, base_offset: int = 0) -> bytes:
    """One v2 batch written by kafka-python's own builder."""
    builder = MemoryRecordsBuilder(2, compression, batch_size, offset=0)
    for timestamp, key, value, headers in records:
        assert builder.append(timestamp, key, value, headers) is not None
    builder.close()
    buffer = bytearray(builder.buffer())
    buffer[0:8] = base_offset.to_bytes(8, "big")  # the broker assigns base offsets
    return bytes(buffer)


def take_all(parser_class, buffer: bytes, fetch_offset: int = 0, n: int | None = None) -> tuple[list, int]:
    parser = parser_class(fetch_offset, TP, MemoryRecords(buffer))
    records = parser.take(n)
    return records, parser.next_fetch_offset


def varied_records(n: int, seed: int = 3):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        key = None if i % 7 == 0 else rng.randbytes(rng.randint(0, 40))
        value = None if i % 11 == 5 else rng.randbytes(rng.choice([0, 1, 63, 64, 127, 128, 300, 20_000]))
        headers = [] if i % 3 else [("reason", b"x" * rng.randint(0, 200)), ("empty", None), ("ünï", b"")]
        timestamp = 1_700_000_000_000 + rng.choice([0, 1, 63, 64, 8191, 8192, 10**9])
        out.append((timestamp, key, value, headers))
    return out


pytestmark = pytest.mark.skipif(not SUPPORTED, reason="kafka-python internals differ from the pinned version")


@pytest.mark.parametrize("compression", [0, 1])  # none, gzip
def test_fast_parser_yields_exactly_kafka_pythons_records(compression):
    buffers = [build(varied_records(150, seed), compression=compression, base_offset=base)
               for seed, base in ((1, 0), (2, 150), (3, 300))]
    buffer = b"".join(buffers)
    ours, our_next = take_all(FastPartitionRecords, buffer)
    theirs, their_next = take_all(Fetcher.PartitionRecords, buffer)
    assert len(ours) == 450
    assert ours == theirs and our_next == their_next == 450


def test_partial_takes_and_mid_batch_fetch_offsets_agree():
    buffer = build(varied_records(40), base_offset=100)
    for fetch_offset, n in ((100, 7), (117, 5), (139, None)):
        ours, our_next = take_all(FastPartitionRecords, buffer, fetch_offset, n)
        theirs, their_next = take_all(Fetcher.PartitionRecords, buffer, fetch_offset, n)
        assert ours == theirs and our_next == their_next
        assert ours[0].offset == fetch_offset


def test_corrupt_batches_raise_like_kafka_python():
    buffer = bytearray(build(varied_records(10)))
    buffer[-5] ^= 0xFF  # payload byte flipped: the batch CRC no longer matches
    with pytest.raises(CorruptRecordError):
        take_all(FastPartitionRecords, bytes(buffer))
    broken = bytearray(build(varied_records(10)))
    broken[61] = 0x7F  # the first record's length varint (after the 61-byte batch header) is now -64
    for parser_class in (FastPartitionRecords, Fetcher.PartitionRecords):
        parser = parser_class(0, TP, MemoryRecords(bytes(broken)), check_crcs=False)
        with pytest.raises(CorruptRecordError):
            parser.take()


def kafka_python_batch(records, compression: int = 0, producer_state=None) -> bytes:
    builder = MemoryRecordsBuilder(2, compression, 1 << 30)
    for timestamp, key, value in records:
        assert builder.append(timestamp, key, value, []) is not None
    if producer_state:
        builder.set_producer_state(*producer_state)
    builder.close()
    return bytes(builder.buffer())


def our_batch(records, compression: int = 0, producer_state=None) -> tuple[bytes, ProducerBatch]:
    encoder = RecordBatchEncoder(opened=0.0)
    for timestamp, key, value in records:
        encoder.add(key_field(key), value, timestamp)
    batch = encoder.producer_batch(TP, compression, now=0.0)
    if producer_state:
        batch.records.set_producer_state(*producer_state)
    batch.records.close()
    return bytes(batch.records.buffer()), batch


@pytest.mark.parametrize("compression", [0, 1])
@pytest.mark.parametrize("producer_state", [None, (4242, 3, 17, False)])  # idempotent producers set these
def test_encoded_batches_are_byte_identical_to_kafka_pythons(compression, producer_state, monkeypatch):
    # gzip writes the current second into its header: both batches must be compressed "at the same time"
    monkeypatch.setattr(gzip, "time", SimpleNamespace(time=lambda: 1_700_000_000.0))
    rng = random.Random(11)
    records = []
    for i in range(20_000 if compression == 0 and producer_state is None else 300):
        key = None if i % 9 == 0 else f"m{rng.randint(0, 999):03d}".encode() * rng.choice([1, 50])
        value = rng.randbytes(rng.choice([0, 1, 63, 64, 200, 8191, 8192, 70_000]) if i % 100 == 0 else rng.randint(0, 400))
        records.append((1_700_000_000_000 + i // 3 + rng.choice([0, 0, 0, -5, 9000, 20_000]), key, value))
    ours, batch = our_batch(records, compression, producer_state)
    assert ours == kafka_python_batch(records, compression, producer_state)
    assert batch.record_count == len(records)
    assert batch.records.is_full()  # the accumulator never appends another record to it
    assert batch.records.append(1_700_000_000_000, b"k", b"v") is None
    parsed = [(r.timestamp, r.key, r.value) for r in take_all(FastPartitionRecords, ours)[0]]
    assert parsed == records


def test_varints_match_kafka_pythons():
    from kafka.record.util import encode_varint

    for value in [0, 1, 63, 64, 127, 128, 8191, 8192, 16383, 16384, 2**31, -1, -64, -65, -(2**40)]:
        expected = bytearray()
        encode_varint(value, expected.append)
        assert varint(value) == bytes(expected)


def test_every_consumer_built_by_make_consumer_uses_the_fast_parser(settings, broker):
    from streams.kafka import make_consumer

    configured = settings.model_copy(update={"bootstrap_servers": broker})
    consumer = make_consumer(configured, None)
    try:
        assert consumer._fetcher.PartitionRecords is FastPartitionRecords
    finally:
        consumer.close()


def test_takes_of_every_size_agree_record_for_record_and_offset_for_offset():
    buffer = b"".join(build(varied_records(60, seed), base_offset=base) for seed, base in ((4, 0), (5, 60), (6, 120)))
    for fetch_offset, sizes in ((0, [1, 7, 59, 60, 3, None]), (37, [23, 1, 200]), (61, [500]), (179, [1, 1])):
        ours = FastPartitionRecords(fetch_offset, TP, MemoryRecords(buffer))
        theirs = Fetcher.PartitionRecords(fetch_offset, TP, MemoryRecords(buffer))
        for n in sizes:
            assert ours.take(n) == theirs.take(n)
            assert ours.next_fetch_offset == theirs.next_fetch_offset
            assert bool(ours) == bool(theirs)
        assert not ours and not theirs  # drained, with the fetch's end as the next offset
        assert ours.next_fetch_offset == theirs.next_fetch_offset == 180
        assert ours.records_read == theirs.records_read  # (ours counts a batch when decoding it)


def read_until_error(parser_class, buffer: bytes) -> tuple[list, object]:
    """Records taken (5 at a time) until drained or until the parser raises CorruptRecordError."""
    parser = parser_class(0, TP, MemoryRecords(buffer), check_crcs=False)
    records = []
    try:
        while parser:
            records += parser.take(5)
    except CorruptRecordError:
        return records, "corrupt"
    return records, parser.next_fetch_offset


def test_corrupted_bytes_give_kafka_pythons_records_or_its_error():
    rng = random.Random(5)
    small = [(timestamp, key and key[:4], value and value[:rng.choice([0, 5, 70, 130])],
              [(name, header and header[:3]) for name, header in headers])
             for timestamp, key, value, headers in varied_records(24, seed=7)]  # mostly varints, little payload
    batches = [build(small[:12]), build(small[12:], base_offset=12)]
    clean = b"".join(batches)
    record_areas = [(61, len(batches[0])), (len(batches[0]) + 61, len(clean))]  # after each 61-byte batch header
    outcomes = Counter()
    for trial in range(600):
        broken = bytearray(clean)
        for _ in range(rng.choice([1, 1, 2])):
            broken[rng.randrange(*rng.choice(record_areas))] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0x81, 0xFF, rng.randrange(256)])
        ours = read_until_error(FastPartitionRecords, bytes(broken))
        theirs = read_until_error(Fetcher.PartitionRecords, bytes(broken))
        if ours[1] == "corrupt":  # ours fails a whole batch at once: the records of the batches before it
            assert theirs[1] == "corrupt" and ours[0] == theirs[0][:len(ours[0])], f"trial {trial}"
            assert len(ours[0]) in (0, 12)
        else:
            assert ours == theirs, f"trial {trial}"
        outcomes[ours[1] == "corrupt"] += 1
    assert outcomes[True] > 120 and outcomes[False] > 120  # both kinds really exercised


def test_legacy_message_format_after_v2_batches_falls_back_to_kafka_python():
    legacy = MemoryRecordsBuilder(1, 0, 1 << 20, offset=9)  # message format v1, after nine v2 records
    for i in range(5):
        legacy.append(1_700_000_000_000 + i, b"k", b"legacy-%d" % i, None)
    legacy.close()
    buffer = build(varied_records(9)) + bytes(legacy.buffer())
    ours = FastPartitionRecords(0, TP, MemoryRecords(buffer))
    theirs = Fetcher.PartitionRecords(0, TP, MemoryRecords(buffer))
    for n in (4, 7, None):  # the second take crosses from our parser into kafka-python's
        assert ours.take(n) == theirs.take(n)
        assert ours.next_fetch_offset == theirs.next_fetch_offset
    assert not ours and not theirs and ours.next_fetch_offset == 14


def test_raw_records_carry_the_fields_of_kafka_pythons_records():
    buffer = b"".join(build(varied_records(80, seed), base_offset=base) for seed, base in ((9, 0), (10, 80)))
    ours = RawPartitionRecords(5, TP, MemoryRecords(buffer))
    theirs = Fetcher.PartitionRecords(5, TP, MemoryRecords(buffer))
    fields = ("topic", "partition", "offset", "timestamp", "key", "value")
    for n in (3, 100, None):
        taken = ours.take(n)
        assert all(type(record) is RawRecord for record in taken)
        assert [tuple(getattr(r, f) for f in fields) for r in taken] == [
            tuple(getattr(r, f) for f in fields) for r in theirs.take(n)]
        assert ours.next_fetch_offset == theirs.next_fetch_offset
    assert not ours and not theirs
    assert not gc.is_tracked(taken[0])  # no work for the garbage collector


def test_a_zero_header_count_in_two_bytes_reads_as_no_headers():
    clean = build([(1_700_000_000_000, b"k", b"v" * 10, [])])
    length = clean[61] >> 1  # the record's length varint (one byte for so small a record)
    assert clean[-1] == 0 and length + 1 < 64
    batch = bytearray(clean[:61]) + bytes([(length + 1) << 1]) + clean[62:-1] + b"\x80\x00"  # header count 0, two bytes
    batch[8:12] = (int.from_bytes(clean[8:12], "big") + 1).to_bytes(4, "big")  # the batch length field
    parsers = [parser_class(0, TP, MemoryRecords(bytes(batch)), check_crcs=False)
               for parser_class in (FastPartitionRecords, Fetcher.PartitionRecords)]
    ours, theirs = (parser.take() for parser in parsers)
    assert ours == theirs and ours[0].headers == [] and ours[0].serialized_header_size == -1


def _raw_fields(parser_class, buffer: bytes) -> tuple[list, str]:
    fields = ("topic", "partition", "offset", "timestamp", "key", "value")
    records, outcome = read_until_error(parser_class, buffer)
    return [tuple(getattr(r, f) for f in fields) for r in records], outcome


def _headerless(n: int, seed: int, cut: int | None = None):
    """Plain records (no headers: the native scan's case) with 1-, 2- and 3-byte varints and null fields;
    ``cut``: values cut to at most that many bytes (mostly varints, so that corruption hits them)."""
    return [(timestamp - (i % 5) * 70_000, key and key[:cut], value and value[:cut], [])
            for i, (timestamp, key, value, _) in enumerate(varied_records(n, seed))]


@pytest.mark.parametrize("log_append", [False, True])
def test_native_scan_gives_the_python_loops_raw_records_or_its_error(monkeypatch, log_append):
    import streams.records as records

    rng = random.Random(13)
    batches = [build(_headerless(40, 21, cut=12), base_offset=0),
               build(_headerless(20, 24), base_offset=40),  # 3-byte varints (values of 20,000 bytes)
               build(_headerless(30, 22, cut=12) + varied_records(5, 23), base_offset=60)]  # headers: the Python loop
    if log_append:  # the broker's timestamps: every record carries the batch's max timestamp
        batches = [bytes(b[:22]) + bytes([b[22] | 0x08]) + bytes(b[23:]) for b in batches]
    clean = b"".join(batches)
    areas = [(61, len(batches[0])), (len(clean) - len(batches[2]) + 61, len(clean))]
    outcomes, scanned, native_records = Counter(), Counter(), records._native_raw_records

    def counted(*args):
        out = native_records(*args)
        scanned[out is not None, args[2]] += 1  # args[2]: the batch's record count
        return out
    monkeypatch.setattr(records, "_native_raw_records", counted)
    for trial in range(300):
        broken = bytearray(clean)
        for _ in range(rng.choice([0, 1, 2, 3])):
            broken[rng.randrange(*rng.choice(areas))] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        monkeypatch.setattr(records, "NATIVE_MIN_RECORDS", 8)
        native = _raw_fields(RawPartitionRecords, bytes(broken))
        monkeypatch.setattr(records, "NATIVE_MIN_RECORDS", 1 << 30)
        assert native == _raw_fields(RawPartitionRecords, bytes(broken)), f"trial {trial}"
        outcomes[native[1]] += 1
    assert outcomes["corrupt"] > 50 and sum(outcomes.values()) - outcomes["corrupt"] > 50
    # the kernel decoded the plain batches, handed back the one with headers and corrupted plain ones
    assert scanned[True, 40] > 150 and scanned[True, 20] > 150 and scanned[False, 40] > 30
    assert scanned[False, 35] > 150 and not scanned[True, 35]


def test_native_scan_shares_repeated_keys_and_leaves_int64_overflow_to_the_python_loop(monkeypatch):
    """Records with the same key share one bytes of it (more distinct keys than the scan's window, null keys
    and values among them), and a batch whose offsets or timestamps overflow int64 (the Python loop's ints
    do not) is handed back: both give the Python loop's records."""
    import streams.records as records
    from streams.record_kernels import KEY_WINDOW

    rng = random.Random(17)
    merchants = [b"m%02d" % i for i in range(KEY_WINDOW + 4)]
    plain = [(1_700_000_000_000 + i, None if i % 13 == 0 else rng.choice(merchants[:3] if i < 100 else merchants),
              None if i % 17 == 4 else b'{"n": %d}' % i, []) for i in range(300)]
    overflowing = []
    for field in (slice(27, 35), slice(0, 8)):  # first timestamp, base offset: int64 max - 3, then deltas up to 19
        batch = bytearray(build(plain[:20]))
        batch[field] = (2**63 - 4).to_bytes(8, "big", signed=True)
        overflowing.append(bytes(batch))
    scanned, native_records = [], records._native_raw_records

    def counted(*args):
        out = native_records(*args)
        scanned.append(out is not None)
        return out
    monkeypatch.setattr(records, "_native_raw_records", counted)
    for buffer in (build(plain), *overflowing):
        monkeypatch.setattr(records, "NATIVE_MIN_RECORDS", 8)
        native = _raw_fields(RawPartitionRecords, buffer)
        monkeypatch.setattr(records, "NATIVE_MIN_RECORDS", 1 << 30)
        assert native == _raw_fields(RawPartitionRecords, buffer)
    assert scanned == [True, False, False]
    assert max(timestamp for _, _, _, timestamp, _, _ in _raw_fields(RawPartitionRecords, overflowing[0])[0]) >= 2**63
    monkeypatch.setattr(records, "NATIVE_MIN_RECORDS", 8)
    taken = RawPartitionRecords(0, TP, MemoryRecords(build(plain))).take()
    assert [record.key for record in taken] == [key for _, key, _, _ in plain]
    assert len({id(record.key) for record in taken[:100] if record.key is not None}) == 3
    assert len({id(record.key) for record in taken if record.key is not None}) < 100  # 12 keys: some sliced again
