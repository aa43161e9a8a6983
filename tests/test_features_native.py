"""``Featurizer.featurize_block`` (interned codes, numba slot hashing) equals the Python reference value for value.

The reference is ``Featurizer.slots_for`` then ``FeatureContext.observe`` per event. The streams here are
built to hit every branch of the native path: items of one id in several merchants with different
categories, catalog re-issues mid-stream, clicks on unknown items, orders teaching unknown items, non-ASCII
ids and categories, positions past the cap, timestamps on hour and day boundaries, more users than the
context keeps (LRU eviction) and more strings than the featurizer's memos hold (tables reset between blocks).
Beyond the slots: the context after the blocks (LRU order and deque bounds included), a context pickled by the
code before this path changed, and the serving side (``Featurizer.candidates``) reading the contexts.
"""

from __future__ import annotations

import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from online.river_models import make_model
from streams.features import FeatureContext, Featurizer
from streams.generator import GeneratorConfig, generate
from streams.schemas import CatalogItem, Click, LineItem, Order
from tests.test_online_batch_path import reference_rows

BITS = 18
PICKLED_CONTEXT = Path(__file__).parent / "data" / "feature_context_before_ctxfast.pkl"
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


def snapshot(context: FeatureContext) -> list:
    """Everything a context holds, in its order: catalog entries, users' recent categories and their LRU order."""
    return [(merchant_id, merchant.max_users, merchant.history,
             [(item, info.category, info.price) for item, info in merchant.catalog.items()],
             [(user, list(seen), seen.maxlen) for user, seen in merchant.recent.items()])
            for merchant_id, merchant in context.merchants.items()]


def assert_serving_equal(fast_context: FeatureContext, slow_context: FeatureContext, events: list) -> None:
    """``candidates`` (serving's rows) read from both contexts: equal, and row by row equal to ``slots_for``."""
    featurizer = Featurizer(BITS)
    clicks = [e for e in events if type(e) is Click][:: max(1, len(events) // 40)]
    for click in clicks:
        items = [f"i{k}" for k in range(0, 80, 7)] + [click.item_id]
        got, _ = featurizer.candidates(click.merchant_id, click.user_id, items, fast_context, timestamp=click.timestamp)
        want, _ = featurizer.candidates(click.merchant_id, click.user_id, items, slow_context, timestamp=click.timestamp)
        assert np.array_equal(got, want)
        row = featurizer.slots_for(click.merchant_id, click.user_id, items[3], click.timestamp, "desktop",
                                   "recommendation", 0, fast_context)
        assert got[3].tolist() == row


def run_both(events: list, block: int, memo_size: int, max_users: int, contexts: tuple | None = None) -> tuple:
    fast, slow = Featurizer(BITS, memo_size=memo_size), Featurizer(BITS, memo_size=memo_size)
    fast_context, slow_context = contexts or (FeatureContext(max_users), FeatureContext(max_users))
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
    assert snapshot(fast_context) == snapshot(slow_context)
    assert_serving_equal(fast_context, slow_context, events)
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


def session_stream(seed: int, n: int = 6000, users: int = 30, items: int = 40) -> list:
    """Runs of clicks by one user (as sessions come), broken by what may change the run's context under it: the
    run's items re-issued with other categories, orders by the run's user or another, a merchant seen for the
    first time (made by a clicked click), the same user id in another merchant, clicked clicks that make the
    user's deque (or have it evicted at once when the context keeps no users)."""
    rng = random.Random(seed)
    out: list = []
    while len(out) < n:
        merchant, user = rng.choice((*MERCHANTS, f"new{len(out)}")), f"u{rng.randrange(users)}"
        for k in range(rng.randrange(1, 15)):
            item, stamp = f"i{rng.randrange(items)}", 1_700_000_000.0 + len(out)
            draw = rng.random()
            if draw < 0.05:
                out.append(CatalogItem(event_id=f"k{len(out)}", merchant_id=merchant, item_id=item, title=item,
                                       timestamp=stamp, category=rng.choice(CATEGORIES), price=rng.uniform(0, 99)))
            elif draw < 0.08:
                lines = [LineItem(item_id=f"i{rng.randrange(items + 10)}", quantity=1, unit_price=rng.uniform(0, 99))]
                out.append(Order(event_id=f"o{len(out)}", order_id=f"o{len(out)}", merchant_id=merchant,
                                 timestamp=stamp, user_id=rng.choice((user, f"u{rng.randrange(users)}")),
                                 currency="EUR", items=lines))
            else:
                out.append(Click(event_id=f"c{len(out)}", merchant_id=merchant, user_id=user,
                                 item_id=f"i{rng.randrange(items + 10)}", session_id="s", timestamp=stamp,
                                 position=k, page="search", device="app", clicked=rng.random() < 0.3))
    return out


@pytest.mark.parametrize(("block", "max_users"), [(1, 100_000), (64, 0), (256, 1), (2000, 3)])
def test_runs_of_one_user_equal_the_reference(block, max_users):
    """The loop keeps the merchant and the user's recent categories in hand while one user's clicks follow each
    other: whatever ends or changes the run must be read afresh, as the reference reads it."""
    events = session_stream(seed=block)
    _, fast_context, slow_context, fast_model, slow_model, rows = run_both(events, block, 250_000, max_users)
    assert rows > 5000
    assert snapshot(fast_context) == snapshot(slow_context)
    assert np.array_equal(fast_model.w, slow_model.w)


def hostile_stamps(seed: int, n: int = 3000) -> list[float]:
    """Timestamps on hour, day and week boundaries and one ulp either side, over a wide range (the kernel makes
    hour and weekday from them, as the numpy assembly before it and ``slots_for`` did), a few negative."""
    rng = random.Random(seed)
    out = [0.0, 5e-324, 3599.999999, 3600.0, 86_399.0, 86_400.0, 2.0**53, 2.0**62, 1e18]
    while len(out) < n:
        edge = rng.choice((3600.0, 86_400.0, 604_800.0)) * rng.randrange(1, 10**rng.randrange(1, 12))
        stamp = rng.choice((edge, math.nextafter(edge, 0.0), math.nextafter(edge, math.inf),
                            rng.uniform(0.0, 4e9), rng.uniform(0.0, 10.0**rng.randrange(3, 19))))
        out.append(-stamp if rng.random() < 0.02 else stamp)
    return out


def test_hour_and_weekday_of_hostile_timestamps_equal_the_reference():
    stamps = hostile_stamps(seed=4)
    events = [Click(event_id=f"c{k}", merchant_id="m0", user_id=f"u{k % 7}", item_id="i1", session_id="s",
                    timestamp=stamp, position=k % 23, page="home", device="app", clicked=k % 3 == 0)
              for k, stamp in enumerate(stamps)]
    for block in (1, 256, len(events)):
        fast, slow, fast_context, slow_context = Featurizer(BITS), Featurizer(BITS), FeatureContext(), FeatureContext()
        for start in range(0, len(events), block):
            got, _ = fast.featurize_block(events[start:start + block], fast_context)
            want, _ = reference_rows(slow, events[start:start + block], slow_context)
            assert np.array_equal(got, want), (block, start)


def test_long_ids_and_integers_past_the_kept_registers_equal_the_reference():
    """Pieces longer than ``slot_kernels.MAX_SHIFT`` bytes (folded in several shifts), empty ids, and integers
    outside ``SMALL_INTEGERS`` (spelled digit by digit): price buckets past 1023, negative positions."""
    from streams.slot_kernels import MAX_SHIFT

    rng = random.Random(3)
    ids = ["", "x", "é" * (MAX_SHIFT // 2), "a" * MAX_SHIFT, "店" * MAX_SHIFT, "b" * (3 * MAX_SHIFT + 1)]
    events: list = [CatalogItem(event_id=f"k{k}", merchant_id=merchant, item_id=item, title="t", timestamp=1.7e9,
                                category=rng.choice(ids), price=rng.choice((0.0, 1e306, 1e307 * rng.random(), 9.0)))
                    for k, (merchant, item) in enumerate((m, i) for m in ids for i in ids)]
    for k in range(3000):
        events.append(Click(event_id=f"c{k}", merchant_id=rng.choice(ids), user_id=rng.choice(ids),
                            item_id=rng.choice(ids), session_id="s", timestamp=1.7e9 + k, page="home", device="app",
                            position=rng.choice((0, -1, -2, -11, 1023, 1024, -(2**40))),
                            clicked=rng.random() < 0.5))
    run_both(events, 256, 250_000, 100_000)


def test_a_position_of_int64s_least_is_spelled_as_the_reference_spells_it():
    """The kernel spelled a negative integer by negating it: int64's least stays negative, and its digit loop
    wrote past its buffer (a segmentation fault of the process before this fix)."""
    events = [Click(event_id=f"c{k}", merchant_id="m0", user_id="u1", item_id="i1", session_id="s", timestamp=1.7e9,
                    position=position, page="home", device="app")
              for k, position in enumerate((-(2**63), -(2**63) + 1, -(2**63) + 10, -10, -9, 2**63 - 1))]
    run_both(events, 4, 250_000, 100_000)


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


def test_the_block_path_reads_a_plain_dict_and_keeps_it_bounded():
    """The loop subscripts ``strings.codes``: a plain dict (CPython subscripts any dict subclass through a
    Python-level ``__getitem__`` lookup, ~2.5x the cost), bounded by ``memo_size`` between blocks."""
    events = hostile_stream(seed=11, n=6000)
    featurizer, context = Featurizer(BITS, memo_size=64), FeatureContext()
    for start in range(0, len(events), 500):
        featurizer.featurize_block(events[start:start + 500], context)
        strings = featurizer._strings
        assert type(strings.codes) is dict
        assert len(strings) <= 64 + 6 * 500


def hostile_prices(seed: int, n: int = 4000) -> list[float]:
    """Prices on and one to three ulps either side of every bucket boundary (``1 + price`` a power of
    ``sqrt(2)``), tiny, huge, negative and signed zeros, and ints (``set_item`` in process takes any number)."""
    rng = random.Random(seed)
    out: list[float] = [0.0, -0.0, -1.0, -1e300, 5e-324, 1e-300, 1.7e308, 0, 7, 10**300]
    for k in range(2046):
        edge = 2.0 ** (k / 2) - 1.0
        for start in (edge, math.nextafter(edge, 0.0), math.nextafter(edge, math.inf)):
            out += [start, math.nextafter(start, 0.0), math.nextafter(math.nextafter(start, 0.0), 0.0),
                    math.nextafter(start, math.inf)]
    out += [rng.lognormvariate(3, 3) for _ in range(n)]
    return out


def test_price_buckets_made_by_the_kernel_equal_the_reference_at_every_boundary():
    """The kernel makes the bucket from the entry's price (numba's ``log2`` is libm's, as ``math.log2``): equal
    to ``price_bucket`` on and around every boundary, for every price an entry may hold."""
    prices = hostile_prices(seed=5)
    events: list = []
    for k, price in enumerate(prices):
        item = f"i{k % 500}"
        context_item = CatalogItem(event_id=f"k{k}", merchant_id="m0", item_id=item, title="t", timestamp=1.7e9,
                                   category="c", price=price)
        events += [context_item, Click(event_id=f"c{k}", merchant_id="m0", user_id=f"u{k % 7}", item_id=item,
                                       session_id="s", timestamp=1.7e9 + k, page="home", device="app", position=1)]
    events += [Click(event_id="none", merchant_id="m0", user_id="u1", item_id="unknown", session_id="s",
                     timestamp=1.7e9, page="home", device="app", position=1)]
    run_both(events, 512, 250_000, 100_000)


@pytest.mark.parametrize(("price", "error"), [(math.nan, ValueError), (math.inf, OverflowError)])
def test_a_price_without_a_bucket_raises_as_the_reference_raises(price, error):
    """``price_bucket`` raises on a price that is not finite (decoded events cannot carry one; ``set_item`` in
    process can): the block path raises the same error, with the same message."""
    def context() -> FeatureContext:
        made = FeatureContext()
        made.set_item("m0", "i1", "c", 5.0)
        made.set_item("m0", "i2", "c", price)
        return made

    clicks = [Click(event_id=f"c{k}", merchant_id="m0", user_id="u1", item_id=item, session_id="s",
                    timestamp=1.7e9, page="home", device="app", position=1) for k, item in enumerate(("i1", "i2"))]
    with pytest.raises(error) as want:
        reference_rows(Featurizer(BITS), clicks, context())
    with pytest.raises(error) as got:
        Featurizer(BITS).featurize_block(clicks, context())
    assert str(got.value) == str(want.value)


def test_every_field_has_a_spelling_program():
    from streams.features import FIELDS
    from streams.slot_kernels import FIELD_ARGS, PROGRAMS

    assert list(FIELD_ARGS) == list(FIELDS)
    assert PROGRAMS.counts[0] == 0 and all(PROGRAMS.counts[1:] >= 1)  # "bias" is its literal alone


def test_an_entry_changed_in_place_is_read_as_the_reference_reads_it():
    """``ItemInfo`` is a mutable dataclass: an entry changed in place between blocks is what ``slots_for`` reads
    (the block path once memoized category and bucket by the entry's identity and kept the old ones)."""
    events = hostile_stream(seed=5, n=3000)
    fast, slow = Featurizer(BITS), Featurizer(BITS)
    fast_context, slow_context = FeatureContext(), FeatureContext()
    for start in range(0, len(events), 1000):
        part = events[start:start + 1000]
        got, _ = fast.featurize_block(part, fast_context)
        want, _ = reference_rows(slow, part, slow_context)
        assert np.array_equal(got, want), start
        for context in (fast_context, slow_context):
            for merchant in context.merchants.values():
                for item, info in merchant.catalog.items():
                    if item.endswith("1"):
                        info.category, info.price = f"{info.category}+", info.price * 3 + 1
    assert snapshot(fast_context) == snapshot(slow_context)


def test_a_context_pickled_before_this_path_loads_and_continues_equal():
    """``tests/data/feature_context_before_ctxfast.pkl``: the context of ``hostile_stream(seed=11, n=1500,
    users=60, items=40)`` folded by ``observe`` (max 50 users per merchant), pickled by the code before this
    path changed (a checkpoint's or bundle's context). It loads as that context, and the block path and the
    reference continue from it equal (slots, context, serving rows)."""
    blob = PICKLED_CONTEXT.read_bytes()
    rebuilt = FeatureContext(max_users_per_merchant=50)
    for event in hostile_stream(seed=11, n=1500, users=60, items=40):
        rebuilt.observe(event)
    assert snapshot(pickle.loads(blob)) == snapshot(rebuilt)
    events = hostile_stream(seed=12, n=3000, users=60, items=40)
    _, fast_context, slow_context, fast_model, slow_model, _ = run_both(
        events, 250, 250_000, 50, contexts=(pickle.loads(blob), pickle.loads(blob)))
    assert snapshot(fast_context) == snapshot(slow_context)
    assert np.array_equal(fast_model.w, slow_model.w)
    assert_serving_equal(fast_context, slow_context, events)
    restored = FeatureContext.from_state(pickle.loads(pickle.dumps(fast_context.state())))  # a checkpoint's path
    assert snapshot(restored) == snapshot(fast_context)


def frozen_observe(context: FeatureContext, event) -> None:
    """``FeatureContext.observe`` as first written (frozen: the reference of the one that inlines its order path)."""
    from streams.features import UNKNOWN, ItemInfo

    def remember(merchant_id: str, user_id: str, item_id: str) -> None:
        info = context.item(merchant_id, item_id)
        context.merchant(merchant_id).remember(user_id, info.category if info else UNKNOWN)

    if isinstance(event, Click):
        if event.clicked:
            remember(event.merchant_id, event.user_id, event.item_id)
    elif isinstance(event, CatalogItem):
        context.set_item(event.merchant_id, event.item_id, event.category, event.price)
    elif isinstance(event, Order):
        merchant = context.merchant(event.merchant_id)
        for line in event.items:
            if line.item_id not in merchant.catalog:
                merchant.catalog[line.item_id] = ItemInfo(UNKNOWN, line.unit_price)
            remember(event.merchant_id, event.user_id, line.item_id)


@pytest.mark.parametrize("max_users", [7, 100_000])
def test_observe_folds_as_first_written(max_users):
    events = hostile_stream(seed=21, n=4000, users=200, items=40)
    events += [Order(event_id="o-dup", order_id="o-dup", merchant_id="new-shop", timestamp=1.7e9, user_id="u1",
                     currency="EUR", items=[LineItem(item_id="x", quantity=1, unit_price=5.0)] * 3)]
    now, before = FeatureContext(max_users), FeatureContext(max_users)
    for event in events:
        now.observe(event)
        frozen_observe(before, event)
    assert snapshot(now) == snapshot(before)
