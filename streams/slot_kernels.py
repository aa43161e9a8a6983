"""Native (numba) slot hashing for ``Featurizer.featurize_block``: interned string ids -> the 18 CRC32C slots.

The featurizer's Python loop turns each click into one row of integer codes (``COLUMNS``: interned strings
and small integers); :func:`slots` then spells every field's name (``streams.features._NAME_FORMATS``) as
bytes and hashes it with CRC32C in one numba loop over the block, byte for byte the name that
:func:`streams.features.feature_slot` formats, so the slots are bit-identical to the Python path's
(tested). Each field's spelling is compiled once into a small program: the CRC register after its leading
literal (``"user×item="``), then the pieces that follow (a column's string or integer, a literal such as
``"/"``). Strings are interned once (:class:`StringTable`: one dict lookup per id per click; the first time an
id is seen, its CRC32C register from zero and its length in UTF-8 bytes are recorded).

Pieces are folded whole, not byte by byte: CRC32C's register is linear, so feeding ``n`` bytes ``B`` to
register ``S`` gives ``A^n(S) ^ R(B)``, where ``R(B)`` is the register ``B`` leaves from zero (kept per string,
per literal and per small integer) and ``A^n`` is ``n`` zero bytes, applied with four lookups in
``SHIFTS[n]`` (:func:`_advance`). Integers outside the small range are spelled digit by digit.

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

import math  # noqa: E402

import crc32c  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit  # noqa: E402  (the cache dir must be set before numba reads its configuration)

from streams.feature_fields import FIELDS, NAME_FORMATS as _NAME_FORMATS, price_bucket  # noqa: E402

# A click's row of codes, in this column order (strings are StringTable codes; the rest plain integers). The
# featurizer's loop encodes the first ones (ENCODED, with in the bucket's place 1 when the item has a catalog
# entry, else 0); the kernel makes the price bucket from the entry's price, caps the position and makes hour
# and weekday from the click's timestamp.
COLUMNS = ("merchant", "user", "item", "category", "bucket", "device", "page", "position", "affinity",
           "hour", "weekday")
ENCODED = COLUMNS[:9]
ROW = (*ENCODED, "timestamp", "price")  # a click as the loop hands it over: 9 int64 codes, then 2 float64
_WIDTH, _N_COLUMNS, _ROW_WIDTH = len(ENCODED), len(COLUMNS), len(ROW)
_BUCKET, _POSITION, _HOUR, _WEEKDAY = (COLUMNS.index(name) for name in ("bucket", "position", "hour", "weekday"))
_TIMESTAMP, _PRICE = ROW.index("timestamp"), ROW.index("price")
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
    """The CRC32C register after feeding ``data`` to register ``crc`` (the checksum is its complement)."""
    return crc32c.crc32c(data, crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


MAX_SHIFT = 32  # SHIFTS holds 0..MAX_SHIFT zero bytes; longer pieces advance by MAX_SHIFT first
SMALL_INTEGERS = range(-1, 1024)  # integers whose register is kept (bucket -1, hours, positions, ...)


def _shift_tables() -> np.ndarray:
    """``SHIFTS[n, k, b]``: the register ``b << 8k`` becomes after ``n`` zero bytes. The register is linear in
    its bytes, so ``A^n(S)`` is the XOR of ``SHIFTS[n, k, byte k of S]`` over its four bytes."""
    shifted = np.array([b << (8 * k) for k in range(4) for b in range(256)], dtype=np.uint32)
    tables = np.empty((MAX_SHIFT + 1, 4, 256), dtype=np.uint32)
    for n in range(MAX_SHIFT + 1):
        tables[n] = shifted.reshape(4, 256)
        shifted = _TABLE[shifted & 0xFF] ^ (shifted >> 8)
    return tables


SHIFTS = _shift_tables()
_SMALL_REGISTERS = np.array([_register(str(v).encode(), 0) for v in SMALL_INTEGERS], dtype=np.uint32)
_SMALL_LENGTHS = np.array([len(str(v)) for v in SMALL_INTEGERS], dtype=np.int64)
_SMALLEST = SMALL_INTEGERS[0]


class Programs:
    """Every field's spelling as ``starts[f]`` (the register after the leading literal), ``ops[f, k]`` =
    ``(kind, a, b)`` (a literal: its register from zero and its length; a string or integer: its column) and
    ``counts[f]`` ops."""

    def __init__(self) -> None:
        columns = {name: index for index, name in enumerate(COLUMNS)}
        parsed = [list(string.Formatter().parse(fmt)) for fmt in _NAME_FORMATS]
        width = max(2 * len(pieces) for pieces in parsed)
        self.starts = np.empty(len(FIELDS), dtype=np.uint32)
        self.ops = np.zeros((len(FIELDS), width, 3), dtype=np.int64)
        self.counts = np.zeros(len(FIELDS), dtype=np.int64)
        for f, (name, pieces) in enumerate(zip(FIELDS, parsed)):
            ops: list[tuple[int, int, int]] = []
            for k, (literal, argument, _spec, _conversion) in enumerate(pieces):
                data = literal.encode()
                if k == 0:
                    self.starts[f] = _register(data)
                elif data:
                    ops.append((_LITERAL, _register(data, 0), len(data)))
                if argument is not None:
                    column = FIELD_ARGS[name][int(argument)]
                    ops.append((_STRING if column in _STRING_COLUMNS else _INTEGER, columns[column], 0))
            self.counts[f] = len(ops)
            self.ops[f, :len(ops)] = np.array(ops, dtype=np.int64).reshape(len(ops), 3)


class StringTable:
    """``codes``: ``str -> code``, a plain dict; :meth:`intern` adds a string, recording its CRC32C register from
    zero and its UTF-8 length, all the kernel needs of it (codes are dense, from 0).

    The featurizer's loop subscripts ``codes`` and interns only on a ``KeyError``: CPython routes a subscript of
    any dict subclass through a Python-level ``__getitem__`` lookup (``slot_mp_subscript``), ~2.5x the cost
    of a plain dict's here, and the loop makes ~7 per click. :meth:`arrays` hands the kernel
    ``(registers, lengths)`` indexed by code. Codes stay valid until :meth:`reset`, which the featurizer calls
    only between blocks.
    """

    __slots__ = ("codes", "_registers", "_lengths", "_size", "_pending")

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.reset()

    def __len__(self) -> int:
        return len(self.codes)

    def reset(self) -> None:
        self.codes.clear()
        self._registers = np.zeros(1 << 12, dtype=np.uint32)
        self._lengths = np.zeros(1 << 12, dtype=np.int64)
        self._size = 0  # strings moved into the arrays
        self._pending: list[tuple[int, int]] = []  # (register, length) of the strings seen since

    def intern(self, text: str) -> int:
        code = self.codes.get(text)
        if code is None:
            code = self.codes[text] = self._size + len(self._pending)
            data = text.encode()
            self._pending.append((_register(data, 0), len(data)))
        return code

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._pending:
            end = self._size + len(self._pending)
            self._registers, self._lengths = _grown(self._registers, end), _grown(self._lengths, end)
            pending = np.array(self._pending, dtype=np.int64)
            self._registers[self._size:end], self._lengths[self._size:end] = pending[:, 0], pending[:, 1]
            self._size, self._pending = end, []
        return self._registers, self._lengths


def _grown(array: np.ndarray, needed: int) -> np.ndarray:
    if needed <= len(array):
        return array
    bigger = np.zeros(max(needed, 2 * len(array)), dtype=array.dtype)
    bigger[:len(array)] = array
    return bigger


@njit(cache=True, nogil=True, inline="always")
def _advance(crc, n, shifts):
    """The register ``crc`` (an int64) becomes after ``n`` zero bytes (see :data:`SHIFTS`)."""
    while n > MAX_SHIFT:
        crc = np.int64(shifts[MAX_SHIFT, 0, crc & 0xFF] ^ shifts[MAX_SHIFT, 1, (crc >> 8) & 0xFF]
                       ^ shifts[MAX_SHIFT, 2, (crc >> 16) & 0xFF] ^ shifts[MAX_SHIFT, 3, (crc >> 24) & 0xFF])
        n -= MAX_SHIFT
    return np.int64(shifts[n, 0, crc & 0xFF] ^ shifts[n, 1, (crc >> 8) & 0xFF] ^ shifts[n, 2, (crc >> 16) & 0xFF]
                    ^ shifts[n, 3, (crc >> 24) & 0xFF])


@njit("int64(int64[::1], float64[::1], uint32[::1], int64[::1], uint32[::1], int64[:, :, ::1], int64[::1], "
      "uint32[::1], int64[::1], uint32[:, :, ::1], uint32[::1], int64, int32[:, ::1])", cache=True, nogil=True)
def slots(codes, floats, registers, lengths, program_starts, ops, counts, small_registers, small_lengths, shifts,
          table, mask, out):
    """``out[r, f]``: the CRC32C slot of field ``f``'s name spelled from click ``r`` (see :class:`Programs`):
    its ``ENCODED`` codes ``codes[r * len(ROW):]``, its timestamp and its item's price (``floats``: ``codes``
    and ``floats`` view the same rows of ``ROW``), from which the row's price bucket, capped position, hour and
    weekday are made as ``Featurizer.slots_for`` makes them. Returns -1, or the first row whose price has no
    bucket (not finite: ``price_bucket`` raises on it), whose slots are left unwritten."""
    digits = np.empty(24, dtype=np.uint8)
    row = np.empty(_N_COLUMNS, dtype=np.int64)
    smallest, n_small = _SMALLEST, small_registers.shape[0]
    for r in range(out.shape[0]):
        row[:_WIDTH] = codes[r * _ROW_WIDTH:r * _ROW_WIDTH + _WIDTH]
        if row[_BUCKET] == 0:  # no catalog entry
            row[_BUCKET] = -1
        else:  # price_bucket's int(2 * log2(1 + max(price, 0.0))): numba's log2 is libm's, as math.log2
            price = floats[r * _ROW_WIDTH + _PRICE]
            if not np.isfinite(price):
                return r
            row[_BUCKET] = int(2.0 * math.log2(1.0 + (0.0 if 0.0 > price else price)))
        if row[_POSITION] > 20:
            row[_POSITION] = 20
        hours = floats[r * _ROW_WIDTH + _TIMESTAMP] // 3600.0  # Python's float floor division (numba follows CPython's float_divmod)
        row[_HOUR] = int(hours % 24.0)
        row[_WEEKDAY] = int((hours // 24.0 + 3.0) % 7.0)
        for f in range(out.shape[1]):
            crc = np.int64(program_starts[f])
            for k in range(counts[f]):
                kind, a = ops[f, k, 0], ops[f, k, 1]
                if kind == 0:
                    crc = _advance(crc, ops[f, k, 2], shifts) ^ a
                elif kind == 1:
                    code = row[a]
                    crc = _advance(crc, lengths[code], shifts) ^ np.int64(registers[code])
                elif smallest <= row[a] < smallest + n_small:
                    small = row[a] - smallest
                    crc = _advance(crc, small_lengths[small], shifts) ^ np.int64(small_registers[small])
                else:
                    value = row[a]
                    if value < 0:
                        crc = table[(crc ^ 45) & 0xFF] ^ (crc >> 8)  # "-"
                    n = 0
                    while True:  # the digits of |value|, last first (int64's least has no int64 negation)
                        digits[n] = 48 + (value % 10 if value >= 0 else -(value % -10))
                        n += 1
                        value = value // 10 if value >= 0 else value // -10
                        if value == 0:
                            break
                    for j in range(n - 1, -1, -1):
                        crc = table[(crc ^ digits[j]) & 0xFF] ^ (crc >> 8)
            out[r, f] = (~crc) & mask
    return -1


PROGRAMS = Programs()
_ROW_FORMAT = f"{_WIDTH}q2d"  # struct's spelling of one ROW
_PACKERS: dict[int, struct.Struct] = {}


def _packer(n: int) -> struct.Struct:
    """The compiled ``struct`` of ``n`` rows, kept for the last few block sizes: spelling and looking up a
    format of ``4n`` characters at every block cost ~40 ns a row, a third of the packing."""
    found = _PACKERS.get(n)
    if found is None:
        if len(_PACKERS) >= 32:
            _PACKERS.clear()
        found = _PACKERS[n] = struct.Struct(f"={_ROW_FORMAT * n}")
    return found


def hash_block(rows: list, table: StringTable, mask: int) -> np.ndarray:
    """Slots ``int32[n, F]`` of ``n`` clicks given as their ``ROW`` values one click after another (strings
    interned in ``table``). The list is packed with ``struct`` (~10 ns per value here, against ~25-35 for
    ``array.array`` or ``np.array`` of a list of ints) into rows of 9 int64 and 2 float64, which the kernel
    reads through an int64 and a float64 view; a code out of int64 raises, and so does a price that is not
    finite, as ``price_bucket`` raises on it."""
    n = len(rows) // _ROW_WIDTH
    out = np.empty((n, len(FIELDS)), dtype=np.int32)
    if not n:
        return out
    packed = np.empty(len(rows), dtype=np.int64)
    _packer(n).pack_into(packed, 0, *rows)
    registers, lengths = table.arrays()
    unpriced = slots(packed, packed.view(np.float64), registers, lengths, PROGRAMS.starts, PROGRAMS.ops,
                     PROGRAMS.counts, _SMALL_REGISTERS, _SMALL_LENGTHS, SHIFTS, _TABLE, mask, out)
    if unpriced >= 0:
        price_bucket(rows[unpriced * _ROW_WIDTH + _PRICE])  # raises ValueError (NaN) or OverflowError (infinity)
    return out
