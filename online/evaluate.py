"""Offline evaluation of recommendations: fedstream's served recommender against baselines, one pass.

Design notes: `online/README.md`, `online/evaluate.py`.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from online.candidates import CandidateState
from online.ranking import ShopRecommender
from streams.schemas import CatalogItem, Event, Order

SPLITS = ("last-order", "last-session", "time")
SESSION_GAP_S = 1800.0
METRICS = ("hit_rate", "ndcg", "recall", "mrr")


class Fedstream:
    """The served recommender (:class:`~online.ranking.ShopRecommender`) behind the evaluation interface."""

    def __init__(self, recommender: ShopRecommender | None = None) -> None:
        self.recommender = recommender or ShopRecommender()

    def observe(self, event: Event) -> None:
        self.recommender.observe(event)

    def recommend(self, merchant_id: str, user_id: str, k: int, when: float) -> dict[str, list[str]]:
        return {"two-stage": [r.item_id for r in self.recommender.rank(merchant_id, user_id, k, timestamp=when)]}


@dataclass
class Score:
    """Sums of the per-target metrics of one method variant on one role (validation or test)."""

    n: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRICS, 0.0))
    items: set = field(default_factory=set)

    def add(self, ranked: Sequence[str], target: frozenset, k: int) -> None:
        ranked = list(ranked)[:k]
        gains = [1.0 / math.log2(rank + 2) for rank, item in enumerate(ranked) if item in target]
        first = next((rank for rank, item in enumerate(ranked) if item in target), None)
        ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(target), k)))
        self.n += 1
        self.sums["hit_rate"] += first is not None
        self.sums["ndcg"] += sum(gains) / ideal
        self.sums["recall"] += len(gains) / len(target)
        self.sums["mrr"] += 1.0 / (first + 1) if first is not None else 0.0
        self.items.update(ranked)

    def mean(self, name: str) -> float:
        return self.sums[name] / self.n if self.n else 0.0


def _steps(events: Sequence[Event]) -> dict[tuple[str, str], list[tuple[int, tuple[str, ...], bool, float, str | None]]]:
    out: dict[tuple[str, str], list] = defaultdict(list)
    for index, event in enumerate(events):
        step = CandidateState.step_of(event)
        if step is not None:
            out[event.merchant_id, event.user_id].append((index, step[0], step[1], event.timestamp,
                                                          getattr(event, "session_id", None)))
    return out


def _sessions(steps: list) -> list[list]:
    sessions: list[list] = []
    for step in steps:
        last = sessions[-1][-1] if sessions else None
        if last is not None and ((step[4] is not None and step[4] == last[4]) or step[3] - last[3] <= SESSION_GAP_S):
            sessions[-1].append(step)
        else:
            sessions.append([step])
    return sessions


def split_targets(events: Sequence[Event], split: str) -> dict[int, tuple[str, frozenset]]:
    """``{event index: (role, target items)}`` for a split (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    by_user = _steps(events)
    out: dict[int, tuple[str, frozenset]] = {}
    if split == "time":
        stamps = np.array([s[3] for steps in by_user.values() for s in steps])
        if not len(stamps):
            return out
        valid_cut, test_cut = np.quantile(stamps, [0.6, 0.8])
        for steps in by_user.values():
            for role, lo, hi in (("validation", valid_cut, test_cut), ("test", test_cut, math.inf)):
                inside = [s for s in steps if lo <= s[3] < hi]
                if inside and steps[0][0] < inside[0][0]:
                    out[inside[0][0]] = (role, frozenset(i for s in inside for i in s[1]))
        return out
    has_orders = any(isinstance(e, Order) for e in events)
    for steps in by_user.values():
        if split == "last-order":
            units = [[s] for s in steps if s[2]] if has_orders else [[s] for s in steps]
        else:
            units = _sessions(steps)
        for role, unit in zip(("test", "validation"), reversed(units)):
            if steps[0][0] < unit[0][0]:
                out[unit[0][0]] = (role, frozenset(i for s in unit for i in s[1]))
    return out


def catalog_size(events: Iterable[Event]) -> int:
    """Distinct (merchant, item) pairs chosen or listed in the stream."""
    items = set()
    for event in events:
        if isinstance(event, CatalogItem):
            items.add((event.merchant_id, event.item_id))
        else:
            step = CandidateState.step_of(event)
            if step is not None:
                items.update((event.merchant_id, item) for item in step[0])
    return len(items)


def evaluate(events: Sequence[Event], methods: dict[str, object], *, split: str = "last-order", k: int = 10,
             progress: Callable[[int], None] | None = None) -> dict:
    """Run every method over the events (see the module docstring); returns the report dict."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    targets = split_targets(events, split)
    scores: dict[tuple[str, str, str], Score] = defaultdict(Score)
    seconds = dict.fromkeys(methods, 0.0)
    for index, event in enumerate(events):
        target = targets.get(index)
        for name, method in methods.items():
            started = time.perf_counter()
            if target is not None:
                for variant, ranked in method.recommend(event.merchant_id, event.user_id, k, event.timestamp).items():
                    scores[name, variant, target[0]].add(ranked, target[1], k)
            method.observe(event)
            seconds[name] += time.perf_counter() - started
        if progress is not None and index % 10_000 == 0:
            progress(index)
    return _report(methods, scores, seconds, len(events), catalog_size(events), split, k,
                   sum(1 for role, _ in targets.values() if role == "test"))


def _report(methods, scores, seconds, n_events, n_items, split, k, n_test) -> dict:
    out: dict = {"split": split, "k": k, "events": n_events, "test_targets": n_test, "catalog_items": n_items,
                 "methods": {}}
    for name in methods:
        variants = sorted({v for (m, v, _) in scores if m == name})
        if not variants:
            continue
        chosen = max(variants, key=lambda v: (scores[name, v, "validation"].mean("ndcg"), -variants.index(v)))
        test, valid = scores[name, chosen, "test"], scores[name, chosen, "validation"]
        row = {f"{metric}_at_{k}": test.mean(metric) for metric in METRICS}
        row["coverage"] = len(test.items) / n_items if n_items else 0.0
        row["events_per_s"] = n_events / seconds[name] if seconds[name] > 0 else None
        row["variant"] = chosen
        row["validation_ndcg_at_k"] = valid.mean("ndcg")
        out["methods"][name] = row
    return out


def format_table(report: dict) -> str:
    """The report as an aligned text table (best NDCG first, 3 decimals; the JSON line has full precision),
    then the variant each method answered with; fits 80 columns."""
    k = report["k"]
    rows = sorted(report["methods"].items(), key=lambda kv: -kv[1][f"ndcg_at_{k}"])
    metrics = [(f"HR@{k}", f"hit_rate_at_{k}"), (f"NDCG@{k}", f"ndcg_at_{k}"), (f"Recall@{k}", f"recall_at_{k}"),
               (f"MRR@{k}", f"mrr_at_{k}")]
    table = [["method", *(label for label, _ in metrics), "cover", "ev/s"]]
    for name, row in rows:
        table.append([name, *(f"{row[key]:.3f}" for _, key in metrics), f"{row['coverage']:.3f}",
                      f"{row['events_per_s'] or 0:.0f}"])
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    lines = [f"split {report['split']}: {report['events']} events, {report['test_targets']} test targets, "
             f"{report['catalog_items']} items"]
    lines += [" ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(line, widths))) for line in table]
    lines.append("cover: share of the items recommended; ev/s: events per second")
    lines.append("variant of each method (the best on validation NDCG):")
    lines += [f"  {name:<{widths[0]}} {row['variant']}" for name, row in rows]
    return "\n".join(lines)


def all_methods(river: bool = True, recommender: ShopRecommender | None = None) -> dict[str, object]:
    """fedstream first, then every baseline of :func:`online.baselines.make_baselines`."""
    from online.baselines import make_baselines

    return {"fedstream": Fedstream(recommender), **make_baselines(river=river)}


__all__ = ["evaluate", "split_targets", "format_table", "all_methods", "Fedstream", "SPLITS"]
