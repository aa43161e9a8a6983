"""New items (no interactions) ranked by catalog text alone: one ranking function, two data sets.

:func:`rank_new_items` is what both rows of the transfer table use: every user's taste is the mean text
embedding of the items they chose that are *not* new; every new item of the user's pool is scored by
cosine to it; for the users who choose new items, AUC (chosen vs not-chosen new items, chance 0.5) and
HitRate@10 (share of the chosen new items in the user's top 10 of the pool; chance 10 / pool size).

On the **generated stream** (:func:`generated_stream_scores`): a seeded fifth of every merchant's
catalog is new; the first ``PREFIX`` of the clicks and orders is the training prefix, where new items'
interactions are dropped; a user's taste is the mean embedding of the old items they clicked or bought
in the prefix, and the items to find are the new items they choose after it (the pool: their merchant's
new items; users and items of other merchants never mix). The catalog text is what the generator emits
(:mod:`streams.catalog_text`: category and quality words), embedded as the service embeds it
(:func:`streams.text.item_text` of title, brand and category). Arms: that text, the category name alone,
and random vectors (chance, same run). Generator seed ``CALIBRATION_SEEDS`` was looked at while writing
this; the ``REPORT_SEEDS`` are reported with their min-max spread.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

from streams.generator import GeneratorConfig, generate
from streams.schemas import CatalogItem, Click, Order
from streams.text import TextEncoder, item_text

QUICK = os.environ.get("BENCH_QUICK") == "1"
CALIBRATION_SEEDS = [1]
REPORT_SEEDS = [11, 12] if QUICK else [11, 12, 13, 14, 15]
NEW_SHARE = 0.2
PREFIX = 0.7
STREAM = {"merchants": 8, "events": 150_000 if QUICK else 300_000,
          "items_per_merchant": (40, 250) if QUICK else (60, 600)}
ARMS = ("text (title + brand + category)", "category name only", "random vectors (chance)")


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)


def rank_new_items(vectors: Mapping[Hashable, np.ndarray], taste: Mapping[Hashable, Sequence[Hashable]],
                   chosen_new: Mapping[Hashable, set], pools: Mapping[Hashable, Sequence[Hashable]],
                   pool_of: Mapping[Hashable, Hashable] | None = None, seed: int = 0) -> dict:
    """AUC and HitRate@10 of new items ranked by cosine to each user's taste (module docstring).

    ``taste[user]``: the old items the user chose; ``chosen_new[user]``: the new items to find;
    ``pools[group]``: the new items of a group; ``pool_of[user]``: the user's group (default: the only one).
    Ties (equal vectors, e.g. a category name shared by many items) count half in the AUC and are broken
    in a seeded random order for the top 10, never by the pool's order (item ids follow popularity).
    """
    rng = np.random.default_rng(seed)
    shuffled = {g: [items[j] for j in rng.permutation(len(items))] for g, items in pools.items()}
    unit_pools = {g: (items, _unit(np.stack([vectors[i] for i in items]))) for g, items in shuffled.items()}
    only = next(iter(pools)) if len(pools) == 1 else None
    aucs, chance, hits, total = [], [], 0, 0
    for user, chosen in chosen_new.items():
        pool, matrix = unit_pools[only if pool_of is None else pool_of[user]]
        is_chosen = np.array([item in chosen for item in pool])
        n_pos, n_neg = int(is_chosen.sum()), int((~is_chosen).sum())
        if not taste.get(user) or not n_pos or not n_neg:
            continue
        scores = matrix @ np.mean([vectors[i] for i in taste[user]], axis=0)
        ranks = rankdata(scores) - 1.0  # average ranks: ties count half
        aucs.append((ranks[is_chosen].sum() - n_pos * (n_pos - 1) / 2) / (n_pos * n_neg))
        top = np.argsort(-scores, kind="stable")[:10]
        hits += int(is_chosen[top].sum())
        total += n_pos
        chance.append(min(10, len(pool)) / len(pool))
    return {"auc": float(np.mean(aucs)), "hit_rate_at_10": hits / total, "users": len(aucs),
            "pool": int(np.mean([len(p) for p, _ in unit_pools.values()])),
            "chance_hit_rate_at_10": float(np.mean(chance))}


def generated_split(seed: int) -> tuple[dict, dict, dict, dict, dict]:
    """One generated stream: catalog texts, tastes, new items to find, new-item pools, users' merchants."""
    config = GeneratorConfig(seed=seed, **STREAM)
    catalog: dict[tuple[str, str], CatalogItem] = {}
    steps: list[tuple[tuple[str, str], tuple[str, str]]] = []  # (merchant, user), (merchant, item)
    for event in generate(config):
        if type(event) is CatalogItem:
            catalog[(event.merchant_id, event.item_id)] = event
        elif type(event) is Click and event.clicked:
            steps.append(((event.merchant_id, event.user_id), (event.merchant_id, event.item_id)))
        elif type(event) is Order:
            steps += [((event.merchant_id, event.user_id), (event.merchant_id, line.item_id)) for line in event.items]
    rng = np.random.default_rng(seed)
    by_merchant: dict[str, list] = defaultdict(list)
    for key in sorted(catalog):
        by_merchant[key[0]].append(key)
    new_pools = {}
    for merchant, items in sorted(by_merchant.items()):
        rows = rng.choice(len(items), size=max(2, int(NEW_SHARE * len(items))), replace=False)
        new_pools[merchant] = [items[j] for j in sorted(rows.tolist())]
    new = {key for keys in new_pools.values() for key in keys}
    cut = int(PREFIX * len(steps))
    taste: dict[tuple, list] = defaultdict(list)
    seen_new: dict[tuple, set] = defaultdict(set)
    for user, item in steps[:cut]:
        (seen_new[user].add(item) if item in new else taste[user].append(item))
    chosen: dict[tuple, set] = defaultdict(set)
    for user, item in steps[cut:]:
        if item in new and item not in seen_new[user]:
            chosen[user].add(item)
    return catalog, taste, chosen, new_pools, {user: user[0] for user in chosen}


def generated_arms(encoder: TextEncoder, catalog: Mapping[tuple, CatalogItem]) -> dict[str, dict]:
    """Each item's vector in every arm: its catalog text, its category name, a random vector."""
    keys = sorted(catalog)
    texts = encoder.encode([item_text(catalog[k].title, catalog[k].category, catalog[k].brand or "") for k in keys])
    names = sorted({catalog[k].category for k in keys})
    by_name = dict(zip(names, encoder.encode(names), strict=True))
    categories = np.stack([by_name[catalog[k].category] for k in keys])
    noise = np.random.default_rng(0).normal(size=texts.shape)
    return {name: dict(zip(keys, m, strict=True)) for name, m in zip(ARMS, (texts, categories, noise), strict=True)}


def generated_stream_scores(encoder: TextEncoder, seed: int) -> dict[str, dict]:
    """Per arm: :func:`rank_new_items` on the generated stream of ``seed``."""
    catalog, taste, chosen, pools, pool_of = generated_split(seed)
    vectors = generated_arms(encoder, catalog)
    return {arm: {**rank_new_items(v, taste, chosen, pools, pool_of, seed), "items": len(catalog)}
            for arm, v in vectors.items()}


def run(encoder: TextEncoder) -> dict:
    """Print the generated-stream new-items table; return figures and the README row."""
    results = {seed: generated_stream_scores(encoder, seed) for seed in CALIBRATION_SEEDS + REPORT_SEEDS}
    print(f"\nGenerated stream new items: {NEW_SHARE:.0%} of each merchant's catalog held out (no interactions in "
          f"the first {PREFIX:.0%} of the stream), {STREAM['merchants']} merchants, {STREAM['events']} events; "
          f"calibration seed {CALIBRATION_SEEDS}, report seeds {REPORT_SEEDS}")
    print(f"{'arm':32s} {'calib AUC':>9s} {'AUC mean':>9s} {'AUC range':>12s} {'HR@10':>7s} {'chance HR@10':>12s} "
          f"{'users':>6s} {'pool':>5s}")
    for arm in ARMS:
        report = [results[s][arm] for s in REPORT_SEEDS]
        auc = [r["auc"] for r in report]
        print(f"{arm:32s} {results[CALIBRATION_SEEDS[0]][arm]['auc']:9.3f} {np.mean(auc):9.3f} "
              f"{min(auc):.3f}-{max(auc):.3f} {np.mean([r['hit_rate_at_10'] for r in report]):7.3f} "
              f"{np.mean([r['chance_hit_rate_at_10'] for r in report]):12.3f} "
              f"{int(np.mean([r['users'] for r in report])):6d} {int(np.mean([r['pool'] for r in report])):5d}")
    text = [results[s][ARMS[0]] for s in REPORT_SEEDS]
    auc = [r["auc"] for r in text]
    return {"generated_new_item_auc": float(np.mean(auc)),
            "generated_new_item_auc_calibration": results[CALIBRATION_SEEDS[0]][ARMS[0]]["auc"],
            "generated_new_item_hit_rate_at_10": float(np.mean([r["hit_rate_at_10"] for r in text])),
            "generated_new_item_chance_hit_rate_at_10": float(np.mean([r["chance_hit_rate_at_10"] for r in text])),
            "generated_new_item_auc_category_only": float(np.mean([results[s][ARMS[1]]["auc"] for s in REPORT_SEEDS])),
            "generated_new_item_auc_chance_arm": float(np.mean([results[s][ARMS[2]]["auc"] for s in REPORT_SEEDS])),
            "readme": {"row": "transfer: new generated-stream items ranked by catalog text (AUC, chance 0.5)",
                       "value": round(float(np.mean(auc)), 3),
                       "spread": f"{min(auc):.3f}-{max(auc):.3f} (min-max, {len(auc)} seeds); HR@10 "
                                 f"{np.mean([r['hit_rate_at_10'] for r in text]):.3f} vs chance "
                                 f"{np.mean([r['chance_hit_rate_at_10'] for r in text]):.3f}",
                       "target": "> 0.5 (above chance)", "met": min(auc) > 0.5, "mode": "quick" if QUICK else "full",
                       "seeds": {"calibration": CALIBRATION_SEEDS, "report": REPORT_SEEDS},
                       "date": dt.date.today().isoformat()}}
