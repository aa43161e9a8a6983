"""The shared featurizer: stable hashing, fixed width, bounded space, no label leakage, checkpointable."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from streams.features import FIELDS, FeatureContext, Featurizer, as_dict, price_bucket
from streams.schemas import CatalogItem, Click, LineItem, Order


def click(user="u1", item="i1", clicked=True, position=2, ts=1_700_000_000.0) -> Click:
    return Click(event_id=f"e-{user}-{item}", merchant_id="m1", user_id=user, item_id=item, session_id="s",
                 timestamp=ts, position=position, page="search", device="mobile", clicked=clicked)


def test_every_event_has_one_slot_per_field_inside_the_hash_space():
    featurizer = Featurizer(bits=10)
    indices, values = featurizer.transform_many([click(item=f"i{k}") for k in range(50)], FeatureContext())
    assert indices.shape == values.shape == (50, len(FIELDS))
    assert indices.min() >= 0 and indices.max() < 2**10
    assert np.all(values == 1.0)


def test_hashing_is_stable_across_processes():
    """Online workers, federated clients and serving run in different processes: slots must agree."""
    here = Featurizer(bits=20).hash_names(Featurizer(20).names(click(), FeatureContext())).tolist()
    code = ("from streams.features import Featurizer, FeatureContext;"
            "from tests.test_features import click;"
            "print(Featurizer(20).hash_names(Featurizer(20).names(click(), FeatureContext())).tolist())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert str(here) == there.strip()


# Slots in a 2**20 space, pinned: checkpoints, registered models and federated stores written by an
# earlier version must keep meaning the same features. A change of hash, seed, mask or name format
# shows up here (the cross-process test above compares the code with itself only).
PINNED_SLOTS_20 = {"bias": 323284, "merchant=m1": 756467, "item=m1/i1": 654419, "user=m1/u1": 237125,
                   "user×item=m1/u1|i1": 768827, "page×position=search|2": 509848, "category×hour=?|22": 1034414}


def test_slot_values_are_pinned():
    import crc32c

    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the CRC-32C (Castagnoli) check value
    featurizer = Featurizer(bits=20)
    slots = featurizer.hash_names(list(PINNED_SLOTS_20) + ["bias"] * (featurizer.n_fields - len(PINNED_SLOTS_20)))
    assert dict(zip(PINNED_SLOTS_20, slots[:len(PINNED_SLOTS_20)].tolist())) == PINNED_SLOTS_20
    assert Featurizer(bits=14).hash_names(["bias"] * featurizer.n_fields)[0] == 323284 % 2**14
    names = featurizer.names(click(), FeatureContext())  # the names a click yields are pinned too
    assert {n: s for n, s in zip(names, featurizer.hash_names(names).tolist()) if n in PINNED_SLOTS_20} == PINNED_SLOTS_20


def test_context_is_read_before_the_event_is_observed():
    featurizer, context = Featurizer(bits=16), FeatureContext()
    context.observe(CatalogItem(event_id="c", merchant_id="m1", item_id="i1", category="shoes", price=50.0,
                                title="t", timestamp=1.0))
    first = featurizer.names(click(), context)
    assert "user_affinity=new" in first and "category=shoes" in first
    context.observe(click())
    assert "user_affinity=match" in featurizer.names(click(), context)


def test_orders_teach_prices_of_items_missing_from_the_catalog():
    context = FeatureContext()
    context.observe(Order(event_id="o", order_id="o", merchant_id="m1", user_id="u1", timestamp=1.0,
                          currency="EUR", items=[LineItem(item_id="i9", quantity=2, unit_price=19.0)]))
    assert context.item("m1", "i9").price == 19.0
    assert f"price_bucket={price_bucket(19.0)}" in Featurizer(12).names(click(item="i9"), context)


def test_user_memory_is_bounded_per_merchant():
    context = FeatureContext(max_users_per_merchant=100)
    for user in range(1000):
        context.observe(click(user=f"u{user}"))
    assert len(context.merchant("m1").recent) == 100


def test_context_state_round_trips():
    context = FeatureContext()
    context.set_item("m1", "i1", "shoes", 10.0)
    context.observe(click())
    restored = FeatureContext.from_state(context.state())
    featurizer = Featurizer(14)
    assert featurizer.names(click(), restored) == featurizer.names(click(), context)


def test_as_dict_adds_colliding_slots():
    assert as_dict(np.array([3, 3, 5]), np.array([1.0, 1.0, 2.0])) == {3: 2.0, 5: 2.0}


def test_bits_are_validated():
    with pytest.raises(ValueError, match="bits"):
        Featurizer(bits=40)


def test_memoized_slots_equal_hashing_the_names():
    """The fast path must be bit-identical to hashing the documented feature names."""
    from streams.generator import GeneratorConfig, generate

    featurizer, context = Featurizer(bits=18, memo_size=500), FeatureContext()  # small memo: clears too
    clicks = []
    for event in generate(GeneratorConfig(merchants=4, events=3000, seed=11)):
        if isinstance(event, Click):
            clicks.append(event)
            fast, _ = featurizer.transform(event, context)
            assert fast.tolist() == featurizer.hash_names(featurizer.names(event, context)).tolist()
        context.observe(event)
    many, _ = featurizer.transform_many(clicks[:50], context)
    assert many.tolist() == [featurizer.hash_names(featurizer.names(c, context)).tolist() for c in clicks[:50]]


def test_candidate_rows_equal_the_names_of_showing_each_item():
    """Ranking shares the item-free and per-category fields across candidates; rows must not change."""
    from streams.generator import GeneratorConfig, generate

    featurizer, context = Featurizer(bits=18, memo_size=300), FeatureContext()
    events = list(generate(GeneratorConfig(merchants=3, events=4000, seed=5)))
    for event in events:
        context.observe(event)
    clicks = [e for e in events if isinstance(e, Click)]
    items = {m: sorted(context.merchant(m).catalog) for m in context.merchants}
    rng = np.random.default_rng(2)
    for user_click in clicks[::97]:
        merchant = user_click.merchant_id
        pool = items[merchant] + ["never-seen-item"]
        chosen = [pool[k] for k in rng.choice(len(pool), size=min(40, len(pool)), replace=False)]
        for shown in (chosen, chosen[:1], []):
            rows, values = featurizer.candidates(merchant, user_click.user_id, shown, context,
                                                 timestamp=user_click.timestamp, device="tablet", page="cart")
            assert rows.shape == values.shape == (len(shown), len(FIELDS)) and rows.dtype == np.int32
            expected = [featurizer.hash_names(featurizer.names_for(merchant, user_click.user_id, item,
                                                                   user_click.timestamp, "tablet", "cart", 0,
                                                                   context)).tolist() for item in shown]
            assert rows.tolist() == expected


def test_memos_stay_bounded_and_are_never_pickled():
    import pickle

    featurizer, context = Featurizer(bits=16, memo_size=50), FeatureContext()
    clicks = [click(user=f"u{k}", item=f"i{k % 7}") for k in range(400)]
    before, _ = featurizer.transform_many(clicks, context)
    assert max(len(memo) for memo in featurizer._memos) <= 50
    copy = pickle.loads(pickle.dumps(featurizer))
    assert all(len(memo) == 0 for memo in copy._memos) and len(pickle.dumps(featurizer)) < 1000
    after, _ = copy.transform_many(clicks, context)
    assert after.tolist() == before.tolist()
