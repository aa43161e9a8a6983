"""The native link rows (``online.link_rows``) hold what rows as dicts held: the same counts, totals and row
orders through caps, growth, pruning and pickling, and the same merged scores, on seeded random steps."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from online.link_rows import ItemCodes, LinkRows, prune_rows


class DictRows:
    """The former rows as dicts (``CandidateState._link`` / ``_cap`` / ``related``), the reference."""

    def __init__(self, keep: int, both: bool) -> None:
        self.keep, self.both, self.rows, self.totals = keep, both, {}, {}

    def link(self, a: str, b: str) -> None:
        row = self.rows.setdefault(a, {})
        row[b] = row.get(b, 0.0) + 1.0
        self.totals[a] = self.totals.get(a, 0.0) + 1.0
        if len(row) > 2 * self.keep:
            kept = self.rows[a] = {i: row[i] for i in sorted(row, key=row.get, reverse=True)[: self.keep]}
            self.totals[a] = sum(kept.values())

    def step(self, item: str, sources: list[str]) -> None:
        for source in sources:
            self.link(source, item)
            if self.both:
                self.link(item, source)

    def related(self, sources: list[tuple[str, float]], limit: int) -> dict[str, float]:
        scores: dict[str, float] = {}
        for item, weight in sources:
            row = self.rows.get(item)
            if not row:
                continue
            scale = weight / self.totals[item]
            for other, value in row.items():
                scores[other] = scores.get(other, 0.0) + scale * value
        if len(scores) > limit:
            scores = {i: scores[i] for i in sorted(scores, key=scores.get, reverse=True)[:limit]}
        return scores

    def prune(self, kept: set[str]) -> None:
        self.rows = {i: row for i, row in self.rows.items() if i in kept}
        self.totals = {i: sum(row.values()) for i, row in self.rows.items()}


def steps(seed: int, n: int, items: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    names = [f"{rng.choice('xyz')}{k}" for k in range(items)]
    hot = names[: max(2, items // 10)]
    out = []
    for _ in range(n):
        pool = hot if rng.random() < 0.5 else names
        item = rng.choice(pool)
        sources = list(dict.fromkeys(rng.choice(pool) for _ in range(rng.choice([0, 1, 2, 5, 12]))))
        out.append((item, [s for s in sources if s != item]))
    return out


def assert_same(table: LinkRows, ref: DictRows) -> None:
    assert {a: list(row.items()) for a, row in table.as_dict().items()} == {a: list(row.items())
                                                                         for a, row in ref.rows.items() if row}
    assert table.totals() == {a: t for a, t in ref.totals.items() if ref.rows.get(a)}
    assert len(table) == sum(map(len, ref.rows.values()))


@pytest.mark.parametrize("both", [True, False])
@pytest.mark.parametrize("keep,items", [(1, 8), (2, 30), (4, 400), (50, 120)])
def test_steps_caps_growth_and_pickles_hold_the_dict_rows(both: bool, keep: int, items: int):
    table, ref = LinkRows(ItemCodes(), keep, both), DictRows(keep, both)
    rng = random.Random(keep * 1000 + items)
    for k, (item, sources) in enumerate(steps(keep + items + both, 2_000, items)):
        if sources:
            table.ops += (table.codes[item], len(sources))
            table.ops += map(table.codes.__getitem__, sources)
        ref.step(item, sources)
        if k % 97 == 0:  # reads flush the queue at any point
            assert_same(table, ref)
            asked = [(rng.choice(list(ref.rows) or ["none"]), rng.choice([1.0, 0.8, 0.64, 2.0])) for _ in range(6)]
            asked.append(("never seen", 1.0))
            for limit in (1, 3, 10, 400):
                assert list(table.related(asked, limit).items()) == list(ref.related(asked, limit).items())
            source = asked[0][0]
            for other in list(ref.rows.get(source, {}))[:3] + ["never seen"]:
                assert table.links_any([source, "never seen"], other) == (other in ref.rows.get(source, {}))
        if k == 1_000:
            table = pickle.loads(pickle.dumps(table))
    assert_same(table, ref)


def test_pruning_renumbers_the_codes_in_use_and_keeps_every_row_held():
    codes = ItemCodes()
    co, trans = LinkRows(codes, 3, True), LinkRows(codes, 3, False)
    ref_co, ref_trans = DictRows(3, True), DictRows(3, False)
    for k, (item, sources) in enumerate(steps(7, 3_000, 200)):
        for table, ref, given in ((co, ref_co, sources), (trans, ref_trans, sources[:2])):
            if given:
                table.ops += (table.codes[item], len(given))
                table.ops += map(table.codes.__getitem__, given)
            ref.step(item, given)
        if k % 500 == 499:
            kept = set(random.Random(k).sample(sorted(ref_co.rows), len(ref_co.rows) // 3))
            before = len(co.codes.ids)
            codes = prune_rows(co.codes, [co, trans], kept)
            ref_co.prune(kept)
            ref_trans.prune(kept)
            assert co.codes is codes and trans.codes is codes and len(codes.ids) < before
            in_use = {i for ref in (ref_co, ref_trans) for a, row in ref.rows.items() for i in (a, *row)}
            assert set(codes.ids) == in_use and all(codes[i] == c for c, i in enumerate(codes.ids))
            assert_same(co, ref_co)
            assert_same(trans, ref_trans)
    assert_same(co, ref_co)
    assert_same(trans, ref_trans)


def test_rows_as_dicts_convert_in_their_orders():
    ref = DictRows(4, True)
    for item, sources in steps(3, 800, 60):
        ref.step(item, sources)
    table = LinkRows.from_dicts(ItemCodes(), 4, True, ref.rows)
    assert_same(table, ref)
    assert list(table.related([(next(iter(ref.rows)), 1.0)], 5).items()) == list(
        ref.related([(next(iter(ref.rows)), 1.0)], 5).items())


def test_the_tables_of_a_merchant_share_its_codes_through_pickling():
    codes = ItemCodes()
    co, trans = LinkRows(codes, 5, True), LinkRows(codes, 5, False)
    co.ops += (codes["a"], 1, codes["b"])
    trans.ops += (codes["c"], 1, codes["a"])
    co2, trans2 = pickle.loads(pickle.dumps((co, trans)))
    assert co2.codes is trans2.codes and co2.codes.ids == ["a", "b", "c"] and co2.codes == {"a": 0, "b": 1, "c": 2}
    assert trans2.as_dict() == {"a": {"c": 1.0}} and co2.row("b") == {"a": 1.0}
    assert np.array_equal(co2.slot[:3], [-1, -1, -1])


def test_a_small_merchant_holds_small_tables():
    """A platform has many small merchants: a table starts with a few rows and doubles as codes come."""
    table = LinkRows(ItemCodes(), keep=50, both=True)
    table.ops += (table.codes["a"], 2, table.codes["b"], table.codes["c"])
    assert len(table) == 4
    held = sum(array.nbytes for array in (table.nbr, table.val, table.n, table.tot, table.slot))
    assert held < 12 * 101 * 8 + 1_000
    for k in range(100):
        table.ops += (table.codes[f"i{k}"], 1, table.codes["a"])
    table.flush()
    assert len(table.codes.ids) == 103 <= len(table.n) < 2 * 103  # grown to the codes (at least doubled), no further


def test_a_state_nobody_reads_keeps_its_queue_bounded(monkeypatch):
    """Steps only queued and never read (a candidate state fed without proposals) are counted once the queue
    passes its bound: memory stays bounded, and the counts are the same as counted at the end."""
    from online import link_rows
    from online.candidates import CandidateState
    from tests.test_recs_update_fast import CASES

    monkeypatch.setattr(link_rows, "MAX_QUEUED", 50)
    bounds, events = CASES["defaults, wide catalog"]
    bounded, unbounded = CandidateState(**bounds), CandidateState(**bounds)
    longest = 0
    for event in events:
        bounded.observe(event)
        longest = max([longest, *(len(t.ops) for s in bounded.shops.values() for t in (s.co, s.trans))])
    monkeypatch.setattr(link_rows, "MAX_QUEUED", 1 << 30)
    for event in events:
        unbounded.observe(event)
    assert longest <= 50 + 2 + bounds.get("history", 10) + 1
    assert max(len(t.ops) for s in unbounded.shops.values() for t in (s.co, s.trans)) > 1_000
    for merchant, shop in bounded.shops.items():
        assert shop.co == unbounded.shops[merchant].co and shop.trans == unbounded.shops[merchant].trans


def test_items_only_linked_to_hold_no_row():
    """Rows are made for the items that link to something: a transition table's targets, and after pruning
    the items kept rows still link to, cost a code (4 bytes in ``row_of``), not a row of 2 * keep + 1 links."""
    codes = ItemCodes()
    trans = LinkRows(codes, 50, both=False)
    for k in range(1_000):  # one source item followed by 1,000 distinct items: one row
        trans.ops += (codes[f"t{k}"], 1, codes["source"])
    assert len(trans) <= 101 and trans.used == 1 and len(codes.ids) == 1_001  # capped, refilled
    co = LinkRows(codes, 50, both=True)
    for k in range(1_000):
        co.ops += (codes[f"t{k}"], 1, codes["source"])
    co.flush()
    assert co.used == 1_001  # co-occurrence links both ways: every item a row
    codes = prune_rows(codes, [co, trans], {"source"})  # the long tail pruned; "source"'s rows still link to it
    assert co.used == trans.used == 1 and set(codes.ids) == {"source", *co.row("source"), *trans.row("source")}
    assert len(trans.nbr) < 64 and len(trans.row_of) >= len(codes.ids)


@pytest.mark.parametrize("module", ["online.link_rows", "online.candidates"])
def test_docstring_examples_run(module: str):
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(module)).failed == 0
