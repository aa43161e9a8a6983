"""The prequential evaluator's block path against its frozen former self (tests/evaldrift_reference.py), value
for value, on seeded hostile streams; state pickled by the former classes loads and continues identically."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from fedstream.metrics import logloss
from online.prequential import PrequentialEvaluator, StreamMetrics, group_positions, label_logloss
from tests.evaldrift_reference import OldPrequentialEvaluator, OldStreamMetrics, load_as_reference

MERCHANTS = np.array(["m1", "m2", "shop-é", "m 4", "m5", "m6", "m7", "m8", "m9", "m10", "m11"])


def _blocks(seed: int, count: int, max_size: int = 700):
    """Blocks of varied size (1 to > window) and merchant mix (one merchant, all of them), probabilities on bin
    edges, at 0 and 1, at the log loss clip, and labels that disagree with them."""
    rng = np.random.default_rng(seed)
    for block in range(count):
        n = int(rng.integers(1, max_size))
        kinds = 1 if block % 4 == 0 else int(rng.integers(2, len(MERCHANTS) + 1))
        ids = MERCHANTS[rng.integers(0, kinds, n)]
        p = rng.random(n)
        edge = rng.random(n)
        p[edge < 0.1] = rng.integers(0, 11, int((edge < 0.1).sum())) / 10  # bin edges, 0 and 1
        p[(edge >= 0.1) & (edge < 0.15)] = 1 - 1e-16
        p[(edge >= 0.15) & (edge < 0.2)] = 5e-324
        y = rng.random(n) < np.where(block % 3 == 0, 1 - p, p)
        stamps = 1.7e9 + block * 1000 + np.arange(n)
        yield (ids.tolist() if block % 2 else ids), (stamps.tolist() if block % 2 else stamps), y, p


def _same_metrics(new: StreamMetrics, old: OldStreamMetrics) -> None:
    assert (new.events, new.positives, new.loss_sum, new.rankings) == (old.events, old.positives, old.loss_sum,
                                                                        old.rankings)
    for name in ("bin_count", "bin_p", "bin_y"):
        assert np.array_equal(getattr(new, name), getattr(old, name)), name
    assert new.recent().tolist() == [list(pair) for pair in old.recent]
    assert _comparable(new.report()) == _comparable(old.report())


def _comparable(value):
    """NaN == NaN, everything else exactly."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return "nan" if isinstance(value, float) and math.isnan(value) else value


def _same(new: PrequentialEvaluator, old: OldPrequentialEvaluator) -> None:
    _same_metrics(new.overall, old.overall)
    assert list(new.merchants) == list(old.merchants)
    for merchant, metrics in old.merchants.items():
        _same_metrics(new.merchants[merchant], metrics)
    assert list(new.errors) == list(old.errors) and new.errors.maxlen == old.errors.maxlen
    assert all(type(a) is type(b) for x, y in zip(new.errors, old.errors) for a, b in zip(x, y))
    assert _comparable(new.summary()) == _comparable(old.summary())


@pytest.mark.parametrize("window, keep_errors", [(7, 50), (1000, 10_000), (300, 0)])
def test_blocks_give_the_former_metrics_value_for_value(window, keep_errors):
    new, old = PrequentialEvaluator(window, 10, keep_errors), OldPrequentialEvaluator(window, 10, keep_errors)
    seen_new, seen_old = [], []
    new.subscribe(seen_new.append)
    old.subscribe(seen_old.append)
    for block, (ids, stamps, y, p) in enumerate(_blocks(window, 40)):
        new.update_many(ids, stamps, y, p)
        old.update_many(ids, stamps, y, p)
        if block % 9 == 0:  # per-event updates and rankings interleaved with blocks
            new.update(ids[0], stamps[0], y[0], p[0])
            old.update(ids[0], stamps[0], y[0], p[0])
            new.observe_ranking(ids[-1], ["a", "b", "c"], "b", k=2)
            old.observe_ranking(ids[-1], ["a", "b", "c"], "b", k=2)
        if block % 7 == 0:
            _same(new, old)
    _same(new, old)
    assert seen_new == seen_old and len(seen_new) > 10_000
    new.update_many([], [], np.array([], dtype=bool), np.array([]))
    _same(new, old)


def test_a_block_equals_its_events_one_by_one():
    """Counts, bins (exact sums of the same values in the same order per bin) and the window are the same as
    per-event updates; the cumulative log loss to rounding (a vectorized log and sum against math.log)."""
    blocked, single = PrequentialEvaluator(window=50, bins=10), PrequentialEvaluator(window=50, bins=10)
    for ids, stamps, y, p in _blocks(4, 12):
        blocked.update_many(ids, stamps, y, p)
        for row in zip(ids, stamps, y.tolist(), p.tolist()):
            single.update(*row)
    for new, one in [(blocked.overall, single.overall), *((blocked.merchants[m], single.merchants[m])
                                                         for m in single.merchants)]:
        assert (new.events, new.positives) == (one.events, one.positives)
        assert np.array_equal(new.bin_count, one.bin_count)
        assert np.array_equal(new.recent(), one.recent())
        assert new.loss_sum == pytest.approx(one.loss_sum, rel=1e-12)
    assert list(blocked.errors) == list(single.errors)


def test_state_pickled_by_the_former_classes_loads_and_continues_identically():
    """tests/data/evaluator_before_fastpath.pkl: an evaluator pickled by the code before the native path
    (tests/data/evaldrift_fixtures.py); continued here and in the frozen classes, pickled again mid-way."""
    blob = (Path(__file__).parent / "data" / "evaluator_before_fastpath.pkl").read_bytes()
    new, old = pickle.loads(blob), load_as_reference(blob)
    assert isinstance(new, PrequentialEvaluator) and isinstance(old, OldPrequentialEvaluator)
    _same(new, old)
    for block, (ids, stamps, y, p) in enumerate(_blocks(9, 20, max_size=120)):
        new.update_many(ids, stamps, y, p)
        old.update_many(ids, stamps, y, p)
        if block == 10:  # a checkpoint now has the former layout: the frozen classes read it too
            blob = pickle.dumps(new)
            new, old = pickle.loads(blob), load_as_reference(blob)
            _same(new, old)
    _same(new, old)


def test_bad_blocks_are_refused_before_anything_changes():
    evaluator = PrequentialEvaluator(window=5)
    evaluator.update_many(["a"], [1.0], np.array([True]), np.array([0.5]))
    for p in ([np.nan, 0.5], [0.5, 1.5], [-0.1, 0.5]):
        with pytest.raises(ValueError, match="probabilities"):
            evaluator.update_many(["a", "b"], [1.0, 2.0], np.array([True, False]), np.array(p))
    with pytest.raises(ValueError, match="one length"):
        evaluator.update_many(["a"], [1.0, 2.0], np.array([True]), np.array([0.5]))
    assert evaluator.overall.events == 1 and list(evaluator.merchants) == ["a"] and len(evaluator.errors) == 1


def test_group_positions_keeps_first_appearance_order_and_row_order():
    rng = np.random.default_rng(1)
    keys = [f"k{k}" for k in rng.integers(0, 9, 500)]
    groups = group_positions(keys)
    assert [key for key, _ in groups] == list(dict.fromkeys(keys))
    for key, at in groups:
        assert at.tolist() == [i for i, k in enumerate(keys) if k == key]
    assert group_positions(["x"] * 3) == [("x", None)] and group_positions([]) == []
    keys = ["a", "b", "a"]
    assert [(k, at.tolist()) for k, at in group_positions(keys)] == [("a", [0, 2]), ("b", [1])]
    assert group_positions(list(keys)) is group_positions(keys)  # an equal list: the same groups, no pass
    keys[1] = "a"  # changed in place after grouping: grouped again
    assert group_positions(keys) == [("a", None)]


def test_label_logloss_is_logloss_bit_for_bit():
    rng = np.random.default_rng(12)
    special = np.array([0.0, 1.0, 1e-15, 1 - 1e-15, 5e-324, 0.5, 1 - 1e-16])
    for n in (1, 7, 8, 9, 63, 64, 65, 257, 1000):
        p = rng.random(n)
        edge = rng.random(n) < 0.2
        p[edge] = rng.choice(special, int(edge.sum()))
        y = rng.random(n) < 0.5
        assert label_logloss(y, p).tobytes() == logloss(y.astype(np.float64), p).tobytes()
