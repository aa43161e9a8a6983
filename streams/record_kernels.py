"""Native (numba) scan of a Kafka v2 record batch: where each record's fields are, in one loop over the bytes.

:func:`streams.records.decode_batch_records` hands a batch of plain records (no headers, every length
within the batch) to :func:`scan`, which writes per record its offset and timestamp (absolute), which of the
batch's distinct keys it carries, and where its value starts and ends; Python then slices the distinct keys
and the values and builds the records in C-level passes. Anything else (headers, truncation, a varint wider
than 64 bits, bytes left over) makes :func:`scan` return -1 and the batch goes through the Python loop, which
says what is wrong exactly as kafka-python would. Compiled (or loaded from the on-disk cache, as
:mod:`streams.slot_kernels`) when first imported: the learner worker imports it before its first record; a
producer never does.
"""

from __future__ import annotations

from pathlib import Path

from fedstream.native import use_writable_cache

use_writable_cache(Path(__file__).parent)

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402  (the cache dir must be set before numba reads its configuration)

#: rows of the ``columns`` array :func:`scan` writes, one column per record (row-major: one ``tolist`` gives
#: every row as a list); KEY is an index into the ``keys`` array (-1: a null key), VALUE_END is -1 for a null value
OFFSET, TIMESTAMP, KEY, VALUE_START, VALUE_END = range(5)
#: distinct keys looked for among the latest ones found (records of one batch mostly share a few keys; a key
#: not found there is added again, which only costs one more slice)
KEY_WINDOW = 8


@njit(cache=True, nogil=True)
def _varint(data, pos, end):
    """Zig-zag varint at ``pos`` read before ``end``: (value, next position); next position -1 when it runs
    past ``end`` or is wider than 64 bits."""
    result = np.uint64(0)
    shift = 0
    while pos < end:
        byte = np.uint64(data[pos])
        pos += 1
        if shift == 63 and byte > 1:
            return 0, -1
        result |= (byte & np.uint64(0x7F)) << np.uint64(shift)
        if byte < 0x80:
            return np.int64(result >> np.uint64(1)) ^ -np.int64(result & np.uint64(1)), pos
        shift += 7
        if shift > 63:
            return 0, -1
    return 0, -1


_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min


@njit(cache=True, nogil=True)
def _fits_sum(a, b):
    """True when ``a + b`` is within int64 (Python's ints do not wrap: such a record goes to the Python loop)."""
    return a <= _INT64_MAX - b if b >= 0 else a >= _INT64_MIN - b


@njit(cache=True, nogil=True)
def _same_bytes(data, a, b, length):
    for i in range(length):
        if data[a + i] != data[b + i]:
            return False
    return True


@njit(cache=True, nogil=True)
def _key_index(data, start, length, keys, found):
    """Index of the key ``data[start:start + length]`` among the latest :data:`KEY_WINDOW` of the ``found``
    distinct keys in ``keys`` (rows: start, length), or -1."""
    for k in range(found - 1, max(found - KEY_WINDOW, 0) - 1, -1):
        if keys[1, k] == length and _same_bytes(data, keys[0, k], start, length):
            return k
    return -1


@njit(cache=True, nogil=True)
def scan(data, pos, base_offset, timestamp, log_append, columns, keys):
    """Scan ``columns.shape[1]`` records of ``data`` (uint8) from ``pos`` into ``columns`` (int64, rows
    :data:`OFFSET` ...) and their distinct keys into ``keys`` (int64, rows: start, length). ``timestamp``: the
    batch's first timestamp, or its max timestamp when ``log_append`` (every record carries that one).
    Returns (position after the last record, distinct keys found, null values); position -1 if any record
    is not plain (see the module)."""
    size = data.shape[0]
    found = 0
    null_values = 0
    for i in range(columns.shape[1]):
        length, pos = _varint(data, pos, size)
        if pos < 0 or length < 0 or pos + length > size:
            return -1, 0, 0
        end = pos + length
        _attributes, pos = _varint(data, pos, end)
        if pos < 0:
            return -1, 0, 0
        timestamp_delta, pos = _varint(data, pos, end)
        if pos < 0:
            return -1, 0, 0
        offset_delta, pos = _varint(data, pos, end)
        if pos < 0:
            return -1, 0, 0
        key_length, pos = _varint(data, pos, end)
        if pos < 0:
            return -1, 0, 0
        if key_length > end - pos:  # past the record (checked before the key's bytes are compared)
            return -1, 0, 0
        key = -1
        if key_length >= 0:
            key = _key_index(data, pos, key_length, keys, found)
            if key < 0:
                keys[0, found] = pos
                keys[1, found] = key_length
                key = found
                found += 1
            pos += key_length
        value_length, pos = _varint(data, pos, end)
        if pos < 0:
            return -1, 0, 0
        if value_length > end - pos:
            return -1, 0, 0
        value_start = pos
        value_end = -1
        if value_length >= 0:
            pos += value_length
            value_end = pos
        else:
            null_values += 1
        if pos + 1 != end or data[pos] != 0:  # headers, or a size that does not add up: the Python loop
            return -1, 0, 0
        if not _fits_sum(base_offset, offset_delta) or not (log_append or _fits_sum(timestamp, timestamp_delta)):
            return -1, 0, 0
        pos = end
        columns[OFFSET, i] = base_offset + offset_delta
        columns[TIMESTAMP, i] = timestamp if log_append else timestamp + timestamp_delta
        columns[KEY, i] = key
        columns[VALUE_START, i] = value_start
        columns[VALUE_END, i] = value_end
    return pos, found, null_values


__all__ = ["scan"]
