"""The learner call at native speed: the slot range check in one native pass rejects exactly what the
numpy check did, and the worker's float64 values kept across blocks learn what float32 ones did."""

from __future__ import annotations

import numpy as np
import pytest

from online.learners import LEARNERS

BITS = 10


@pytest.mark.parametrize("dtype,bad", [(np.int32, None), (np.int32, -1), (np.int32, 1 << BITS), (np.int32, 2**31 - 1),
                                       (np.int32, -2**31), (np.int64, -1), (np.int64, 1 << 40), (np.uint16, None),
                                       (np.uint16, 1 << BITS)])
def test_slot_range_check_rejects_what_min_and_max_rejected(dtype, bad):
    model = LEARNERS["ftrl"](bits=BITS)
    rows = np.random.default_rng(1).integers(0, 1 << BITS, (40, 7)).astype(np.int64)
    if bad is not None:
        rows[23, 5] = bad
    for indices in (rows.astype(dtype), rows.astype(dtype)[:, ::-1], np.asfortranarray(rows.astype(dtype))):
        wanted = bool(indices.min() >= 0 and indices.max() < 1 << BITS)  # the check as it was
        assert model._within(indices) is wanted and wanted == (bad is None)
        if not wanted:
            with pytest.raises(ValueError, match="slot indices"):
                model.learn_many(indices, np.ones(indices.shape), np.ones(len(indices), bool))
    assert model.n_updates == 0 and not model.w.any()


@pytest.mark.parametrize("name", sorted(LEARNERS))
@pytest.mark.parametrize("state_dtype", ["float64", "float32", "q2.13"])
def test_float64_values_learn_what_float32_ones_learned(name, state_dtype):
    rng = np.random.default_rng(5)
    blocks = [(rng.integers(0, 1 << BITS, (n, 9)).astype(np.int32), rng.random(n) < 0.3) for n in (1, 64, 256, 17)]
    ones = np.ones((256, 9))
    models = [LEARNERS[name](bits=BITS, dtype=state_dtype, seed=3) for _ in range(2)]
    for indices, y in blocks:
        p_ref = models[0].learn_many(indices, np.ones(indices.shape, dtype=np.float32), y)
        p_new = models[1].learn_many(indices, ones[:len(indices)], y)
        assert np.array_equal(p_ref, p_new)
    for array in models[0]._arrays:
        assert np.array_equal(getattr(models[0], array), getattr(models[1], array)), array
    assert np.all(ones == 1.0)  # the learners only read their values
