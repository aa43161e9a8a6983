"""Native (numba) slot hashing for ``Featurizer.featurize_block``: interned string ids -> the 18 CRC32C slots.

The featurizer's Python loop turns each click into one row of integer codes (``COLUMNS``: interned strings
and small integers); :func:`slots` then spells every field's name (``streams.features._NAME_FORMATS``) as
bytes and hashes it with CRC32C in one numba loop over the block, byte for byte the name that
:func:`streams.features.feature_slot` formats, so the slots are bit-identical to the Python path's
(tested). Each field's spelling is compiled once into a small program: the CRC register after its leading
literal (``"user×item="``), then the pieces that follow (a column's string or integer, a literal such as
``"/"``). Strings are interned once (:class:`StringTable`: one dict lookup per id per click, the UTF-8 bytes
appended to one buffer the first time an id is seen).

Compilation: one signature, compiled when this module is first imported (by the first
``featurize_block``) and cached on disk like ``online.kernels`` (next to this file when writable, else
``$NUMBA_CACHE_DIR`` or ``<tmp>/fedstream-numba``).
"""

from __future__ import annotations

import string
import struct
from pathlib import Path

from fedstream.native import use_writable_cache

use_writable_cache(Path(__file__).parent)

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402  (the cache dir must be set before numba reads its configuration)

from streams.feature_fields import FIELDS, NAME_FORMATS as _NAME_FORMATS  # noqa: E402

# A click's row of codes, in this column order (strings are StringTable codes; the rest plain integers). The
# featurizer's loop encodes the first ones (ENCODED); the kernel caps the position and makes hour and weekday
# from the click's timestamp.
COLUMNS = ("merchant", "user", "item", "category", "bucket", "device", "page", "position", "affinity",
           "hour", "weekday")
ENCODED = COLUMNS[:9]
_WIDTH, _N_COLUMNS = len(ENCODED), len(COLUMNS)
_POSITION, _HOUR, _WEEKDAY = (COLUMNS.index(name) for name in ("position", "hour", "weekday"))
_STRING_COLUMNS = frozenset({"merchant", "user", "item", "category", "device", "page", "affinity"})
# The values of each field's name, in the order of its format's {0}, {1}, {2} (as Featurizer.slots_for).
FIELD_ARGS: dict[str, tuple[str, ...]] = {
    "bias": (), "merchant": ("merchant",), "item": ("merchant", "item"), "category": ("category",),
    "price_bucket": ("bucket",), "hour": ("hour",), "weekday": ("weekday",), "device": ("device",),
    "page": ("page",), "position": ("position",), "user": ("merchant", "user"),
    "user×category": ("merchant", "user", "category"), "user×item": ("merchant", "user", "item"),
    "category×device": ("category", "device"), "page×position": ("page", "position"),
    "merchant×category": ("merchant", "category"), "user_affinity": ("affinity",),
    "category×hour": ("category", "hour"),
}
_LITERAL, _STRING, _INTEGER = 0, 1, 2


def _crc_table() -> np.ndarray:
    """The byte table of CRC32C (Castagnoli, reflected polynomial 0x82F63B78)."""
    table = np.empty(256, dtype=np.uint32)
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table[byte] = crc
    return table


_TABLE = _crc_table()


def _register(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """The CRC32C register after feeding ``data`` (the checksum is its complement)."""
    for byte in data:
        crc = int(_TABLE[(crc ^ byte) & 0xFF]) ^ (crc >> 8)
    return crc


class Programs:
    """Every field's spelling as ``starts[f]`` (the register after the leading literal), ``ops[f, k]`` =
    ``(kind, a, b)`` (a literal: offset and length in ``literals``; a string or integer: its column) and
    ``counts[f]`` ops."""

    def __init__(self) -> None:
        columns = {name: index for index, name in enumerate(COLUMNS)}
        parsed = [list(string.Formatter().parse(fmt)) for fmt in _NAME_FORMATS]
        width = max(2 * len(pieces) for pieces in parsed)
        self.starts = np.empty(len(FIELDS), dtype=np.uint32)
        self.ops = np.zeros((len(FIELDS), width, 3), dtype=np.int64)
        self.counts = np.zeros(len(FIELDS), dtype=np.int64)
        literals = bytearray()
        for f, (name, pieces) in enumerate(zip(FIELDS, parsed)):
            ops: list[tuple[int, int, int]] = []
            for k, (literal, argument, _spec, _conversion) in enumerate(pieces):
                data = literal.encode()
                if k == 0:
                    self.starts[f] = _register(data)
                elif data:
                    ops.append((_LITERAL, len(literals), len(data)))
                    literals += data
                if argument is not None:
                    column = FIELD_ARGS[name][int(argument)]
                    ops.append((_STRING if column in _STRING_COLUMNS else _INTEGER, columns[column], 0))
            self.counts[f] = len(ops)
            self.ops[f, :len(ops)] = np.array(ops, dtype=np.int64).reshape(len(ops), 3)
        self.literals = np.frombuffer(bytes(literals) or b"\0", dtype=np.uint8).copy()


class StringTable(dict):
    """``str -> code``: a miss appends the string's UTF-8 bytes to the table (codes are dense, from 0).

    :meth:`arrays` hands the kernel ``(bytes, starts)``: string ``k`` is ``bytes[starts[k]:starts[k + 1]]``.
    Codes stay valid until :meth:`reset`, which the featurizer calls only between blocks.
    """

    __slots__ = ("_data", "_starts", "_size", "_used", "_pending", "_pending_ends")

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.clear()
        self._data = np.zeros(1 << 16, dtype=np.uint8)
        self._starts = np.zeros(1 << 12, dtype=np.int64)
        self._size, self._used = 0, 0  # strings and bytes moved into the arrays
        self._pending, self._pending_ends = bytearray(), []

    def __missing__(self, text: str) -> int:
        code = self[text] = self._size + len(self._pending_ends)
        self._pending += text.encode()
        self._pending_ends.append(len(self._pending))
        return code

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._pending_ends:
            new, added = len(self._pending_ends), len(self._pending)
            self._data = _grown(self._data, self._used + added)
            self._starts = _grown(self._starts, self._size + new + 1)
            self._data[self._used:self._used + added] = np.frombuffer(bytes(self._pending), dtype=np.uint8)
            self._starts[self._size + 1:self._size + new + 1] = self._used + np.array(self._pending_ends)
            self._size, self._used = self._size + new, self._used + added
            self._pending, self._pending_ends = bytearray(), []
        return self._data, self._starts


def _grown(array: np.ndarray, needed: int) -> np.ndarray:
    if needed <= len(array):
        return array
    bigger = np.zeros(max(needed, 2 * len(array)), dtype=array.dtype)
    bigger[:len(array)] = array
    return bigger


@njit("void(int64[::1], float64[::1], uint8[::1], int64[::1], uint32[::1], int64[:, :, ::1], int64[::1], "
      "uint8[::1], uint32[::1], int64, int32[:, ::1])", cache=True, nogil=True)
def slots(codes, stamps, data, starts, program_starts, ops, counts, literals, table, mask, out):
    """``out[r, f]``: the CRC32C slot of field ``f``'s name spelled from click ``r`` (see :class:`Programs`):
    its ``ENCODED`` codes ``codes[r * len(ENCODED):]`` and its timestamp ``stamps[r]``, from which the row's
    capped position, hour and weekday are made as ``Featurizer.slots_for`` makes them."""
    digits = np.empty(24, dtype=np.uint8)
    row = np.empty(_N_COLUMNS, dtype=np.int64)
    for r in range(out.shape[0]):
        row[:_WIDTH] = codes[r * _WIDTH:(r + 1) * _WIDTH]
        if row[_POSITION] > 20:
            row[_POSITION] = 20
        hours = stamps[r] // 3600.0  # Python's float floor division (numba follows CPython's float_divmod)
        row[_HOUR] = int(hours % 24.0)
        row[_WEEKDAY] = int((hours // 24.0 + 3.0) % 7.0)
        for f in range(out.shape[1]):
            crc = program_starts[f]
            for k in range(counts[f]):
                kind, a = ops[f, k, 0], ops[f, k, 1]
                if kind == 0:
                    for j in range(a, a + ops[f, k, 2]):
                        crc = table[(crc ^ literals[j]) & 0xFF] ^ (crc >> 8)
                elif kind == 1:
                    code = row[a]
                    for j in range(starts[code], starts[code + 1]):
                        crc = table[(crc ^ data[j]) & 0xFF] ^ (crc >> 8)
                else:
                    value = row[a]
                    if value < 0:
                        crc = table[(crc ^ 45) & 0xFF] ^ (crc >> 8)  # "-"
                        value = -value
                    n = 0
                    while True:
                        digits[n] = 48 + value % 10
                        n += 1
                        value //= 10
                        if value == 0:
                            break
                    for j in range(n - 1, -1, -1):
                        crc = table[(crc ^ digits[j]) & 0xFF] ^ (crc >> 8)
            out[r, f] = (~crc) & mask


PROGRAMS = Programs()


def hash_block(codes: list[int], stamps: list[float], table: StringTable, mask: int) -> np.ndarray:
    """Slots ``int32[n, F]`` of ``n`` clicks given as their ``ENCODED`` codes one click after another (strings
    interned in ``table``) and their timestamps. The lists are packed with ``struct`` (~10 ns per value here,
    against ~25-35 for ``array.array`` or ``np.array`` of a list of ints); a value out of int64 raises."""
    n = len(stamps)
    out = np.empty((n, len(FIELDS)), dtype=np.int32)
    if not n:
        return out
    packed, times = np.empty(len(codes), dtype=np.int64), np.empty(n, dtype=np.float64)
    struct.pack_into(f"={len(codes)}q", packed, 0, *codes)
    struct.pack_into(f"={n}d", times, 0, *stamps)
    data, starts = table.arrays()
    slots(packed, times, data, starts, PROGRAMS.starts, PROGRAMS.ops, PROGRAMS.counts, PROGRAMS.literals, _TABLE,
          mask, out)
    return out
