"""Native (numba) scan of a Kafka v2 record batch: where each record's fields are, in one loop over the bytes.

:func:`streams.records.decode_batch_records` hands a batch of plain records (no headers, every length
within the batch) to :func:`scan`, which writes per record its timestamp delta, offset delta, and the start
and length of its key and value; Python then slices the keys and values and builds the records in C-level
passes. Anything else (headers, truncation, a varint wider than 64 bits, bytes left over) makes :func:`scan`
return -1 and the batch goes through the Python loop, which says what is wrong exactly as kafka-python
would. Compiled (or loaded from the on-disk cache, as :mod:`streams.slot_kernels`) when first imported: the
learner worker imports it before its first record; a producer never does.
"""

from __future__ import annotations

from pathlib import Path

from fedstream.native import use_writable_cache

use_writable_cache(Path(__file__).parent)

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402  (the cache dir must be set before numba reads its configuration)

#: columns :func:`scan` writes per record
TIMESTAMP_DELTA, OFFSET_DELTA, KEY_START, KEY_LENGTH, VALUE_START, VALUE_LENGTH = range(6)


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


@njit(cache=True, nogil=True)
def scan(data, pos, fields):
    """Scan ``fields.shape[0]`` records of ``data`` (uint8) from ``pos`` into ``fields`` (int64, 6 columns);
    returns the position after the last record, or -1 if any record is not plain (see the module)."""
    size = data.shape[0]
    for i in range(fields.shape[0]):
        length, pos = _varint(data, pos, size)
        if pos < 0 or length < 0 or pos + length > size:
            return -1
        end = pos + length
        _attributes, pos = _varint(data, pos, end)
        if pos < 0:
            return -1
        timestamp_delta, pos = _varint(data, pos, end)
        if pos < 0:
            return -1
        offset_delta, pos = _varint(data, pos, end)
        if pos < 0:
            return -1
        key_length, pos = _varint(data, pos, end)
        if pos < 0:
            return -1
        key_start = pos
        if key_length >= 0:
            pos += key_length
        value_length, pos = _varint(data, pos, end)
        if pos < 0:
            return -1
        value_start = pos
        if value_length >= 0:
            pos += value_length
        if pos + 1 != end or data[pos] != 0:  # headers, or a size that does not add up: the Python loop
            return -1
        pos = end
        fields[i, TIMESTAMP_DELTA] = timestamp_delta
        fields[i, OFFSET_DELTA] = offset_delta
        fields[i, KEY_START] = key_start
        fields[i, KEY_LENGTH] = key_length
        fields[i, VALUE_START] = value_start
        fields[i, VALUE_LENGTH] = value_length
    return pos


__all__ = ["scan"]
