"""The learners' shared machinery (:class:`HashedLogisticRegression`: hashed weights, predictions, River
protocol, mini-batches, state) and the feature-hashing helpers; the learners themselves (SGD, Adam,
FTRL-Proximal) and their registry ``LEARNERS`` are in :mod:`online.learners`, which re-exports these names.

Design notes: `online/README.md` ("`online/learners.py`").
"""

from __future__ import annotations

import abc
import array
import math
from collections.abc import Iterable, Mapping
from typing import Any

import crc32c
import numpy as np
from river import base

from online import kernels

CLIP = kernels.CLIP  # |logit| cap: exp() stays finite, p stays in (1e-15, 1 - 1e-15)
DTYPES = ("float64", "float32", "q2.13")  # per-slot state; the log loss cost of each: online/README.md
Q_SCALE = kernels.Q_SCALE  # q2.13: a weight is an int16 code / 8192
_LABELS = (np.zeros(1), np.ones(1))  # learn_one's label as a kernel argument (read, never written)
_ONLY_STRINGS = {str}
KEY_CACHE = 1 << 16  # string feature keys whose slots learn_one / predict_proba_one memoize
SMALL_ROW = 16  # learn_one learns a dense row of at most this many keys in Python, no kernel call (online/README.md)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -CLIP, CLIP)))


def hash_key(key: Any, mask: int) -> int:
    """A River feature key as a slot: integers are slots already, anything else is CRC32C-hashed."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key) & mask
    return crc32c.crc32c(str(key).encode()) & mask


def _float32_sqrt(x: float) -> float:
    """√x rounded to float32: numba types ``float()`` of a float32 array element as float32, so the FTRL
    kernel takes ``√n_old`` in float32 on float32 state (correctly rounded either way, so this is it)."""
    return array.array("f", (math.sqrt(x),))[0]


def dict_to_arrays(x: Mapping[Any, float], mask: int) -> tuple[np.ndarray, np.ndarray]:
    """``{feature: value}`` as one ``(1, k)`` row of unique slots (colliding features add up)."""
    slots: dict[int, float] = {}
    for key, value in x.items():
        slot = hash_key(key, mask)
        slots[slot] = slots.get(slot, 0.0) + float(value)
    return (np.fromiter(slots.keys(), dtype=np.int64, count=len(slots))[None, :],
            np.fromiter(slots.values(), dtype=np.float64, count=len(slots))[None, :])


def _native_rows(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``(n, F)`` rows in the kernels' layout: C-contiguous int32 slots and float64 values."""
    return (np.ascontiguousarray(indices, dtype=np.int32),
            np.ascontiguousarray(values, dtype=np.float64))


def merge_row_duplicates(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose slots collide get their values summed into one entry (the others keep the slot with
    value 0, which changes neither predictions nor any optimizer statistic). Rows without collisions
    (nearly all) are returned untouched; this keeps per-coordinate squared gradients exact."""
    if indices.shape[1] < 2:
        return indices, values
    order = np.argsort(indices, axis=1, kind="stable")
    ordered = np.take_along_axis(indices, order, axis=1)
    same = ordered[:, 1:] == ordered[:, :-1]
    if not same.any():
        return indices, values
    rows = np.flatnonzero(same.any(axis=1))
    values = np.array(values, dtype=np.float64, copy=True)
    for row in rows.tolist():
        seen: dict[int, int] = {}
        for column in range(indices.shape[1]):
            slot = int(indices[row, column])
            first = seen.setdefault(slot, column)
            if first != column:
                values[row, first] += values[row, column]
                values[row, column] = 0.0
    return indices, values


class HashedLogisticRegression(base.Classifier):
    """Shared machinery: hashed weight vector, predictions, River protocol, mini-batch gradients, state.

    Subclasses implement :meth:`_learn_native` (rows one after the other, a kernel of
    :mod:`online.kernels`) and :meth:`_apply` (the numpy reference: one optimizer step given the flat
    slots and gradients of a chunk), and list their per-slot arrays in ``_arrays``.
    """

    _arrays: tuple[str, ...] = ("w",)

    def __init__(self, bits: int = 20, max_delay: int | None = 1, native: bool = True,
                 dtype: str = "float64", seed: int = 0) -> None:
        if not 1 <= bits <= 30:
            raise ValueError(f"bits must be in [1, 30], got {bits}")
        if max_delay is not None and max_delay < 1:
            raise ValueError(f"max_delay must be >= 1 (or None), got {max_delay}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.bits = bits
        self.max_delay = max_delay
        self.native = native
        self.dtype = dtype
        self.seed = seed
        self.n_features = 1 << bits
        self._mask = self.n_features - 1
        for name in self._arrays:
            setattr(self, name, np.zeros(self.n_features, dtype=self.array_dtype(name)))
        self.n_updates = 0  # examples learned
        self.n_batches = 0  # optimizer steps: one per row when exact, one per chunk of max_delay rows otherwise

    # -- inspection ---------------------------------------------------------------------------------------

    @property
    def quantized(self) -> bool:
        """True when the weights are stored as q2.13 codes (``dtype="q2.13"``)."""
        return self.dtype == "q2.13"

    def array_dtype(self, name: str) -> np.dtype:
        """The numpy dtype of per-slot array ``name`` (q2.13: int16 codes for ``w``, float32 statistics)."""
        if self.quantized:
            return np.dtype(np.int16 if name == "w" else np.float32)
        return np.dtype(self.dtype)

    @property
    def weights(self) -> np.ndarray:
        """The current weight vector ``float[2**bits]`` (slot ``i`` is the weight of hashed slot ``i``)."""
        return self.w / Q_SCALE if self.quantized else self.w

    def _w_at(self, slots: np.ndarray) -> np.ndarray:
        """The weights of ``slots`` as float64."""
        w = self.w[slots].astype(np.float64)
        return w / Q_SCALE if self.quantized else w

    def _set_w(self, slots: np.ndarray, values: np.ndarray) -> None:
        """``w[slots] = values``; q2.13 codes by randomized rounding (seeded by ``seed`` and the stream position)."""
        if self.quantized:
            noise = np.random.default_rng([self.seed, self.n_updates, self.n_batches]).random(np.shape(values))
            values = np.clip(np.floor(np.asarray(values) * Q_SCALE + noise), kernels.Q_MIN, kernels.Q_MAX)
        self.w[slots] = values

    def set_weights(self, values: np.ndarray) -> None:
        """Overwrite every weight (a warm start)."""
        self._set_w(slice(None), np.asarray(values, dtype=np.float64))

    def _seed_kernel(self) -> None:
        """Seed the kernels' randomized rounding from ``seed`` and the stream position (q2.13 only)."""
        if self.quantized:
            kernels.seed(int(np.random.default_rng([self.seed, self.n_updates]).integers(2**62)))

    def linear_terms(self) -> tuple[np.ndarray, float]:
        """``(weights, intercept)`` for :class:`registry.bundle.ModelBundle`'s fast ranking path. The
        intercept is 0: the featurizer's ``bias`` field is an ordinary slot."""
        return self.weights, 0.0

    @property
    def exact(self) -> bool:
        """True when rows are learned one after the other (``max_delay == 1``), as ``learn_one`` would."""
        return self.max_delay == 1

    @property
    def state_bytes_per_slot(self) -> int:
        """Bytes of optimizer state per hashed slot (weights included)."""
        return sum(self.array_dtype(name).itemsize for name in self._arrays)

    @property
    def nonzero(self) -> int:
        """How many slots have a non-zero weight (FTRL's L1 keeps this small)."""
        return int(np.count_nonzero(self.w))

    # -- vectorized protocol ------------------------------------------------------------------------------

    def _check(self, indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices, values = np.asarray(indices), np.asarray(values)
        if indices.ndim != 2 or indices.shape != values.shape:
            raise ValueError(f"indices and values must be (n, F) arrays of one shape, got "
                             f"{indices.shape} and {values.shape}")
        if indices.dtype.kind not in "ium":  # np.issubdtype(dtype, np.integer) (timedelta64 is one), cheaper
            raise TypeError(f"indices must be integers, got {indices.dtype}")
        if indices.size and not self._within(indices):
            raise ValueError(f"slot indices must be in [0, {self.n_features}) for bits={self.bits}")
        return indices, values

    def _within(self, indices: np.ndarray) -> bool:
        """Every slot in ``[0, 2**bits)``: the kernels' rows (C-contiguous int32) in one native pass, which
        also brings them into the cache for the kernel; any other array by its minimum and maximum."""
        if indices.dtype == np.int32 and indices.flags.c_contiguous:
            return kernels.slots_within(indices, self.n_features)
        return bool(indices.min() >= 0 and indices.max() < self.n_features)

    def decision_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Logits ``float[n]``."""
        indices, values = self._check(indices, values)
        return (self._w_at(indices) * values).sum(axis=1)

    def predict_proba_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        """P(y=True) ``float[n]`` for a batch of ``(n, F)`` slot indices and values."""
        if self.native:
            indices, values = _native_rows(*self._check(indices, values))
            out = np.empty(indices.shape[0])
            kernels.predict(self.w, indices, values, out)
            return out
        return sigmoid(self.decision_many(indices, values))

    def learn_many(self, indices: np.ndarray, values: np.ndarray, y: Any) -> np.ndarray:
        """Learn a mini-batch; returns the probabilities predicted before the update (test-then-train)."""
        indices, values = self._check(indices, values)
        labels = np.asarray(y, dtype=np.float64).reshape(-1)
        if labels.shape[0] != indices.shape[0]:
            raise ValueError(f"{indices.shape[0]} rows but {labels.shape[0]} labels")
        if indices.shape[0] == 0:
            return np.empty(0)
        if self.native and self.exact:
            indices, values = _native_rows(indices, values)
            out = np.empty(indices.shape[0])
            self._seed_kernel()
            self._learn_native(indices, values, np.ascontiguousarray(labels), out)
            self.n_updates += indices.shape[0]
            self.n_batches += indices.shape[0]
            return out
        indices, values = merge_row_duplicates(indices, values)
        values = values.astype(np.float64, copy=False)
        chunk = self.max_delay or indices.shape[0]
        if chunk >= indices.shape[0]:
            return self._learn_rows(indices, values, labels)
        return np.concatenate([self._learn_rows(indices[s:s + chunk], values[s:s + chunk], labels[s:s + chunk])
                               for s in range(0, indices.shape[0], chunk)])

    def _learn_rows(self, indices: np.ndarray, values: np.ndarray, labels: np.ndarray) -> np.ndarray:
        p = sigmoid((self._w_at(indices) * values).sum(axis=1))
        gradient = ((p - labels)[:, None] * values).ravel()
        self._apply(indices.ravel(), gradient, values.ravel(), indices.shape[0])
        self.n_updates += indices.shape[0]
        self.n_batches += 1
        return p

    @abc.abstractmethod
    def _learn_native(self, indices: np.ndarray, values: np.ndarray, labels: np.ndarray, out: np.ndarray) -> None:
        """Learn the rows one after the other with this optimizer's kernel from :mod:`online.kernels`."""

    @abc.abstractmethod
    def _apply(self, slots: np.ndarray, gradient: np.ndarray, values: np.ndarray, rows: int) -> None:
        """One optimizer step from the flat slots, gradients and feature values of ``rows`` examples."""

    # -- River protocol -----------------------------------------------------------------------------------

    def predict_proba_one(self, x: dict) -> dict[bool, float]:
        if self.native:  # a dict is small: a Python loop beats building arrays for a kernel call
            views = self.__dict__.get("_scratch_views")
            if views is None or views[0].obj is not self.w:
                views = self._new_views()
            weight, dot = views[0], 0.0
            layout = self.__dict__.get("_scratch_layout")
            if layout is not None and layout[1] and layout[0] == tuple(x):  # the dense layout learn_one knows
                for slot, value in zip(layout[1], x.values()):
                    dot += weight[slot] * value
            else:
                known, mask = self._keys().get, self._mask
                for key, value in x.items():
                    slot = known(key)  # memoized string keys (no other key equals a string)
                    if slot is None:
                        slot = key & mask if type(key) is int else self._slot(key)
                    dot += weight[slot] * value
            if self.dtype == "q2.13":
                dot /= Q_SCALE
            p = 1.0 / (1.0 + math.exp(-(-CLIP if dot < -CLIP else CLIP if dot > CLIP else dot)))
        else:
            indices, values = dict_to_arrays(x, self._mask)
            p = float(sigmoid((self._w_at(indices) * values).sum(axis=1))[0])
        return {False: 1.0 - p, True: p}

    def learn_one(self, x: dict, y: bool) -> None:
        if self.native:
            if len(x) <= SMALL_ROW:
                keys, layout = tuple(x), self.__dict__.get("_scratch_layout")
                if layout is not None and layout[0] == keys:  # the keys of the small row before: dense data
                    slots = self._layout_slots(keys) if layout[1] is False else layout[1]
                    if slots and self.dtype != "q2.13" and self._learn_small(slots, x, 1.0 if y else 0.0):
                        return
                else:
                    self.__dict__["_scratch_layout"] = keys, False  # False: slots not looked at yet
            indices, values = self._native_row(x)
            out = self.__dict__.get("_scratch_out")
            if out is None:
                out = self.__dict__["_scratch_out"] = np.empty(1)
            self._seed_kernel()
            self._learn_native(indices, values, _LABELS[1 if y else 0], out)
            self.n_updates += 1
            self.n_batches += 1
        else:
            self._learn_rows(*dict_to_arrays(x, self._mask), _LABELS[1 if y else 0].copy())

    def _learn_small(self, slots: list[int], x: Mapping[Any, float], label: float) -> bool:
        """Learn a small dict of distinct ``slots`` in Python (no arrays to build, no kernel call): the
        kernel's arithmetic in the kernel's order, the same floats bit for bit. False, with nothing
        changed, when the logit is not finite (a NaN or infinite value or weight; the kernel skips a NaN
        value in its update): the kernel learns such a row."""
        values = [*map(float, x.values())]
        views = self.__dict__.get("_scratch_views")
        if views is None or views[0].obj is not self.w:
            views = self._new_views()
        weight, dot = views[0], 0.0
        for slot, value in zip(slots, values):
            dot += weight[slot] * value
        if dot - dot != 0.0:
            return False
        error = 1.0 / (1.0 + math.exp(-(-CLIP if dot < -CLIP else CLIP if dot > CLIP else dot))) - label
        self._step_python(slots, values, error)
        self.n_updates += 1
        self.n_batches += 1
        return True

    @abc.abstractmethod
    def _step_python(self, slots: list[int], values: list[float], error: float) -> None:
        """This optimizer's update of one row of distinct slots, given ``p - y``, as its kernel does it, on
        the memoryviews of :meth:`_new_views` (checked first to still show this learner's arrays)."""

    def _native_row(self, x: Mapping[Any, float]) -> tuple[np.ndarray, np.ndarray]:
        """A dict as one ``(1, k)`` kernel row (colliding slots are merged by the kernels). String keys'
        slots are memoized (up to ``KEY_CACHE`` keys; the memo is never pickled)."""
        return (np.array(self._slots(x), dtype=np.int32).reshape(1, -1),
                np.fromiter(x.values(), dtype=np.float64, count=len(x)).reshape(1, -1))

    def _slots(self, keys: Iterable[Any]) -> list[int]:
        """The slots of ``keys`` (a dict: its keys), in order; string keys' from the memo (a miss, or slot
        0, asks :meth:`_slot`)."""
        known, mask = self._keys().get, self._mask
        return [key & mask if type(key) is int else known(key) or self._slot(key) for key in keys]

    def _layout_slots(self, keys: tuple) -> list[int] | None:
        """The slots of a small row whose keys repeat the small row before's, when ``learn_one`` may learn
        such rows in Python: all strings (no other key equals a string, while ``1 == True ==
        1.0`` hash to different slots), slots distinct; else None. Remembered with the keys (never pickled):
        a dense stream repeats its keys row after row, and its slots are then in the caches (a sparse one
        goes on through the kernel, which prefetches its cache misses)."""
        slots = None
        if {*map(type, keys)} == _ONLY_STRINGS:
            slots = self._slots(keys)
            slots = slots if len(set(slots)) == len(slots) else None
        self.__dict__["_scratch_layout"] = keys, slots
        return slots

    def _new_views(self) -> tuple[memoryview, ...]:
        """Memoryviews of the per-slot arrays in ``_arrays`` order: Python floats in and out, far cheaper per
        element than numpy scalars. Kept (never pickled) while each ``view.obj`` is still the array: the
        Python paths check that first, as the arrays are replaced on restoring a state."""
        views = self.__dict__["_scratch_views"] = tuple(memoryview(getattr(self, name)) for name in self._arrays)
        return views

    def _keys(self) -> dict[str, int]:
        cache = self.__dict__.get("_scratch_keys")
        if cache is None:
            cache = self.__dict__["_scratch_keys"] = {}
        return cache

    def _slot(self, key: Any) -> int:
        """The slot of a non-integer key; string keys' slots are memoized."""
        if type(key) is not str:
            return hash_key(key, self._mask)
        cache = self._keys()
        slot = cache.get(key)
        if slot is None:
            slot = hash_key(key, self._mask)
            if len(cache) < KEY_CACHE:
                cache[key] = slot
        return slot

    # -- state --------------------------------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._get_params()}

    def state(self) -> dict[str, Any]:
        """Plain-data snapshot (hyper-parameters, per-slot arrays, counters) for checkpoints."""
        return {
            "class": type(self).__name__,
            "params": self._params(),
            "arrays": {name: getattr(self, name).copy() for name in self._arrays},
            "counters": {"n_updates": self.n_updates, "n_batches": self.n_batches},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HashedLogisticRegression:
        """Rebuild a learner from :meth:`state` (the class is checked, the arrays are copied)."""
        if state.get("class") != cls.__name__:
            raise ValueError(f"state of {state.get('class')!r} cannot restore a {cls.__name__}")
        model = cls(**state["params"])
        for name in cls._arrays:
            array = np.asarray(state["arrays"][name], dtype=model.array_dtype(name))
            if array.shape != (model.n_features,):
                raise ValueError(f"array {name!r} has shape {array.shape}, expected ({model.n_features},)")
            setattr(model, name, array.copy())
        model.n_updates = int(state["counters"]["n_updates"])
        model.n_batches = int(state["counters"]["n_batches"])
        return model

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_scratch")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("max_delay", None)  # pickled before SGD and Adam had chunks: whole batches, as then
        state.setdefault("native", True)  # pickled before the kernels: exact rows (max_delay 1) never existed
        state.setdefault("dtype", "float64")
        state.setdefault("seed", 0)
        self.__dict__.update(state)

    def _scratch_buffers(self, count: int) -> list[np.ndarray]:
        """Zeroed per-slot accumulators reused across batches (reset after use, never pickled)."""
        buffers = self.__dict__.get("_scratch")
        if buffers is None or len(buffers) < count:
            buffers = [np.zeros(self.n_features, dtype=np.float64) for _ in range(count)]
            self.__dict__["_scratch"] = buffers
        return buffers[:count]


__all__ = ["HashedLogisticRegression", "CLIP", "DTYPES", "Q_SCALE", "KEY_CACHE", "SMALL_ROW", "sigmoid", "hash_key",
           "dict_to_arrays", "merge_row_duplicates"]
