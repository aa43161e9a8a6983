"""``Featurizer.featurize_block`` (interned codes, numba slot hashing) equals the Python reference value for value.

The reference is ``Featurizer.slots_for`` then ``FeatureContext.observe`` per event. The streams here are
built to hit every branch of the native path: items of one id in several merchants with different
categories, catalog re-issues mid-stream, clicks on unknown items, orders teaching unknown items, non-ASCII
ids and categories, positions past the cap, timestamps on hour and day boundaries, more users than the
context keeps (LRU eviction) and more strings than the featurizer's memos hold (tables reset between blocks).
"""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from online.river_models import make_model
from streams.features import FeatureContext, Featurizer
from streams.generator import GeneratorConfig, generate
from streams.schemas import CatalogItem, Click, LineItem, Order
from tests.test_online_batch_path import reference_rows

BITS = 18
MERCHANTS = ("m0", "shop-é", "店舗")
CATEGORIES = ("shoes", "bücher", "×", "游戏", "a|b/c")


def hostile_stream(seed: int, n: int = 6000, users: int = 400, items: int = 60) -> list:
    rng = random.Random(seed)
    base = 1_700_000_000.0 - 1_700_000_000.0 % 86_400  # midnight: hour and weekday boundaries land in the stream
    out: list = []
    for k in range(n):
        merchant, item = rng.choice(MERCHANTS), f"i{rng.randrange(items)}"
        stamp = base + rng.choice((0.0, 3600.0 * rng.randrange(48), rng.uniform(0, 3 * 86_400)))
        stamp -= rng.choice((0.0, 0.0, 1e-6))  # just before a boundary too
        draw = rng.random()
        if draw < 0.06:
            out.append(CatalogItem(event_id=f"k{k}", merchant_id=merchant, item_id=item, title=item, timestamp=stamp,
                                   category=rng.choice(CATEGORIES), price=rng.choice((0.0, 0.5, 9.99, 1e6))))
        elif draw < 0.09:
            lines = [LineItem(item_id=f"i{rng.randrange(items + 20)}", quantity=1, unit_price=rng.uniform(0, 300))
                     for _ in range(rng.randrange(1, 4))]
            out.append(Order(event_id=f"o{k}", order_id=f"o{k}", merchant_id=merchant, timestamp=stamp,
                             user_id=f"u{rng.randrange(users)}", currency="EUR", items=lines))
        else:
            out.append(Click(event_id=f"c{k}", merchant_id=merchant, user_id=f"ü{rng.randrange(users)}",
                             item_id=f"i{rng.randrange(items + 20)}", session_id="s", timestamp=max(stamp, 0.0),
                             position=rng.choice((0, 1, 7, 19, 20, 21, 10_000)),
                             page=rng.choice(("home", "search", "cart")), device=rng.choice(("app", "mobile")),
                             clicked=rng.random() < 0.4))
    return out


def run_both(events: list, block: int, memo_size: int, max_users: int) -> tuple:
    fast, slow = Featurizer(BITS, memo_size=memo_size), Featurizer(BITS, memo_size=memo_size)
    fast_context, slow_context = FeatureContext(max_users), FeatureContext(max_users)
    fast_model, slow_model = make_model("ftrl", BITS), make_model("ftrl", BITS)
    rows = 0
    for start in range(0, len(events), block):
        part = events[start:start + block]
        got, got_at = fast.featurize_block(part, fast_context)
        want, want_at = reference_rows(slow, part, slow_context)
        assert got_at == want_at
        assert got.dtype == np.int32 and got.shape == want.shape and np.array_equal(got, want), start
        labels = np.array([part[i].clicked for i in got_at], dtype=bool)
        if len(got_at):
            fast_model.learn_many(got, np.ones(got.shape, dtype=np.float32), labels)
            slow_model.learn_many(want, np.ones(want.shape, dtype=np.float32), labels)
        rows += len(got_at)
    return fast, fast_context, slow_context, fast_model, slow_model, rows


@pytest.mark.parametrize(("block", "memo_size", "max_users"), [(1, 250_000, 100_000), (97, 50, 7), (2000, 300, 40)])
def test_native_block_equals_the_reference_on_a_hostile_stream(block, memo_size, max_users):
    events = hostile_stream(seed=block)
    fast, fast_context, slow_context, fast_model, slow_model, rows = run_both(events, block, memo_size, max_users)
    assert rows > 5000
    assert fast_context.state() == slow_context.state()
    assert all(len(m.recent) <= max_users for m in fast_context.merchants.values())
    for name in ("w", "z", "n"):
        assert np.array_equal(getattr(fast_model, name), getattr(slow_model, name)), name
    if memo_size < 100:  # the string table was reset between blocks: it holds far fewer strings than the stream
        distinct = {s for e in events if type(e) is Click for s in (e.merchant_id, e.user_id, e.item_id)}
        assert len(fast._strings) < len(distinct) / 2


def test_native_block_equals_the_reference_on_the_generated_stream():
    events = list(generate(GeneratorConfig(merchants=4, events=6000, seed=3)))
    _, fast_context, slow_context, fast_model, slow_model, _ = run_both(events, 500, 250_000, 100_000)
    assert fast_context.state() == slow_context.state()
    assert np.array_equal(fast_model.w, slow_model.w)


def test_featurizer_pickles_without_its_string_table_and_resumes_equal():
    events = hostile_stream(seed=9, n=2000)
    featurizer, context = Featurizer(BITS), FeatureContext()
    featurizer.featurize_block(events[:1000], context)
    blob = pickle.dumps(featurizer)
    assert len(blob) < 2000 and len(featurizer._strings) > 100
    restored = pickle.loads(blob)
    checkpoint = FeatureContext.from_state(context.state())  # new ItemInfo objects, as after a restart
    got, _ = restored.featurize_block(events[1000:], checkpoint)
    want, _ = reference_rows(Featurizer(BITS), events[1000:], FeatureContext.from_state(context.state()))
    assert np.array_equal(got, want)


def test_every_field_has_a_spelling_program():
    from streams.features import FIELDS
    from streams.slot_kernels import FIELD_ARGS, PROGRAMS

    assert list(FIELD_ARGS) == list(FIELDS)
    assert PROGRAMS.counts[0] == 0 and all(PROGRAMS.counts[1:] >= 1)  # "bias" is its literal alone
