"""The candidate state's dataclasses (``Shop``, ``Shopper``, ``ItemStats``) pickle field by field
(``online.inline_fields.InlineFields``): the same bytes as Python's default state, and their instances keep their
attributes inline through a checkpoint or a resume (CPython 3.11's default turns them into a ``__dict__``,
after which every attribute access on them is slower)."""

from __future__ import annotations

import gc
import pickle

import pytest

from online.candidates import CandidateState, InlineFields, ItemStats, Shop, Shopper
from online.ranking import ShopRecommender
from tests.test_recs_update_fast import CASES, with_text


def recommender(case: str, text: bool = False) -> ShopRecommender:
    options, events = CASES[case]
    fed = ShopRecommender(candidates=CandidateState(**options), seed=3)
    if text:
        with_text(fed.state, events)
    fed.observe_block(events)
    return fed


def is_inline(instance: InlineFields) -> bool:
    """Whether the instance's attribute values are its direct referents (inline), not those of a ``__dict__``."""
    referents = gc.get_referents(instance)
    return all(any(value is r for r in referents) for value in map(instance.__getattribute__,
                                                                   instance.__dataclass_fields__))


def instances(state: CandidateState) -> list[InlineFields]:
    out = []
    for shop in state.shops.values():
        out += [shop, shop.totals, *shop.stats.values(), *shop.users.values()]
    return out


@pytest.mark.parametrize("case,text", [("tiny caps and bounds", False), ("defaults, wide catalog", True)])
def test_pickles_are_the_bytes_of_the_default_state(case: str, text: bool, monkeypatch):
    fed = recommender(case, text)
    ours = pickle.dumps(fed, protocol=pickle.HIGHEST_PROTOCOL)
    reloaded = pickle.dumps(pickle.loads(ours), protocol=pickle.HIGHEST_PROTOCOL)
    monkeypatch.delattr(InlineFields, "__getstate__")
    monkeypatch.delattr(InlineFields, "__setstate__")
    assert pickle.dumps(fed, protocol=pickle.HIGHEST_PROTOCOL) == ours
    assert pickle.dumps(pickle.loads(ours), protocol=pickle.HIGHEST_PROTOCOL) == reloaded  # loaded alike


def test_instances_keep_their_attributes_inline_through_pickling():
    fed = recommender("defaults, wide catalog")
    assert all(map(is_inline, instances(fed.state)))
    blob = pickle.dumps(fed, protocol=pickle.HIGHEST_PROTOCOL)  # a checkpoint: the live state goes on learning
    assert all(map(is_inline, instances(fed.state)))
    assert all(map(is_inline, instances(pickle.loads(blob).state)))  # a resume


def test_the_pickled_fields_are_the_dataclass_fields_in_order():
    for cls in (Shop, Shopper, ItemStats):
        assert cls._field_names == tuple(cls.__dataclass_fields__)


def test_a_field_an_older_pickle_lacks_takes_its_default():
    stats = ItemStats.__new__(ItemStats)
    stats.__setstate__({"count": 2.0, "repeats": 1.0})
    assert stats == ItemStats(count=2.0, repeats=1.0)
    older = {name: value for name, value in vars(Shop()).items() if name not in ("text", "text_open", "pending")}
    shops = [Shop.__new__(Shop) for _ in range(2)]
    for shop in shops:
        shop.__setstate__(dict(older))
    assert shops[0] == Shop() and shops[0].text is None
    assert shops[0].pending is not shops[1].pending and shops[0].text_open is not shops[1].text_open
    assert pickle.loads(pickle.dumps(Shopper(total=3))) == Shopper(total=3)


def test_unpickled_attribute_names_are_the_interned_ones():
    """An instance made by unpickling sets its attribute names interned, as ``setattr`` and ``__init__`` do: in
    CPython 3.11 the first instance of a class fixes the key objects all its instances share, so a first Shop
    unpickled from an older pickle gave every later Shop non-interned names (found as the pickle-bytes test
    above failing after such a load, in some test orders)."""
    import sys
    from dataclasses import dataclass

    @dataclass
    class Fresh(InlineFields):  # a class no instance of which exists yet
        alpha_field: float = 0.0
        beta_field: float = 0.0

    first = Fresh.__new__(Fresh)
    first.__setstate__({"".join(name): 1.0 for name in map(list, Fresh._field_names)})  # fresh, non-interned
    later = Fresh()
    assert all(name is sys.intern(name) for name in (*vars(first), *vars(later)))
