"""Transfer benchmark: cold-start items from catalog text, and cold-start merchants from the global model.

Three parts, one run. **New items** on MovieLens (below) and on the generated stream
(:mod:`benchmarks._transfer_items`, the same ranking function). **New merchants**: learning curves of local-only, global,
finetune, features and text starts for held-out MovieLens occupations, see :mod:`benchmarks._transfer_curve`
(it reuses the title embeddings computed here for its text arm). **Multi-task** (arm f, on the generated
stream, which has clicks and late orders): calibration of P(order | click) and cold-start curves, see
:mod:`benchmarks._transfer_multitask`.

MovieLens-100K (the recbole wheel's ``ml-100k``): a seeded fifth of the movies is held out as *new items*:
none of their ratings is seen. Each user's taste is the mean text embedding of the seen movies they rated
4 or 5 ("Title (year) | genres"); every new movie is scored by cosine to it. For each user who rated new
movies 4+, the benchmark reports how the movies they chose rank among all new movies:

* AUC (chosen vs not-chosen new movies; chance 0.5),
* HitRate@10 (a chosen new movie in the user's top 10 of the new pool; chance 10 / pool size),

against the same ranking with text replaced by a random vector per movie (a chance arm computed in the
same run) and by genre words alone (what the catalog's category field gives without titles). Nothing is
tuned: every seed is a report seed. ``BENCH_QUICK=1`` uses 2 splits instead of 5 (and 2 seeds, 4 FedAvg
rounds for the merchant curves: a few minutes; the multi-task section 3 seeds of 120k generated events:
about 5 minutes more on the shared machine, 10 in all).

    .venv/bin/python -m benchmarks.transfer
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections import defaultdict

import numpy as np

from benchmarks import _transfer_curve, _transfer_items, _transfer_multitask
from benchmarks._transfer_items import rank_new_items
from streams.datasets import movielens_table
from streams.text import TextEncoder, item_text

QUICK = os.environ.get("BENCH_QUICK") == "1"
SEEDS = [11, 12] if QUICK else [11, 12, 13, 14, 15]
NEW_SHARE = 0.2
LIKED = 4.0


def movielens() -> tuple[dict[int, tuple[str, str]], list[tuple[int, int, float]]]:
    """Titles (title with year, genres) per movie and (user, movie, rating) rows, from the recbole wheel."""
    movies = {}
    for row in movielens_table("movielens-items"):
        item, title, year, genres = (row + ["", "", ""])[:4]
        movies[int(item)] = (f"{title} ({year})" if year else title, genres)
    rows = []
    for user, item, rating, _ in movielens_table("movielens"):
        rows.append((int(user), int(item), float(rating)))
    return movies, rows


def cold_start_scores(vectors: dict[int, np.ndarray], rows: list[tuple[int, int, float]], seed: int) -> dict:
    """AUC and HitRate@10 of new (unseen) movies ranked by cosine to each user's liked seen movies
    (:func:`benchmarks._transfer_items.rank_new_items`, the function the generated stream's row uses)."""
    rng = np.random.default_rng(seed)
    items = np.array(sorted(vectors))
    new = set(rng.choice(items, size=int(NEW_SHARE * len(items)), replace=False).tolist())
    liked_seen: dict[int, list[int]] = defaultdict(list)
    chosen_new: dict[int, set[int]] = defaultdict(set)
    for user, item, rating in rows:
        if rating >= LIKED:
            (chosen_new[user].add(item) if item in new else liked_seen[user].append(item))
    return rank_new_items(vectors, liked_seen, chosen_new, {"all": sorted(new)}, seed=seed)


def arms(encoder: TextEncoder, movies: dict[int, tuple[str, str]]) -> dict[str, dict[int, np.ndarray]]:
    ids = sorted(movies)
    titles = encoder.encode([item_text(movies[i][0], movies[i][1]) for i in ids])
    kinds = sorted({movies[i][1] or "unknown" for i in ids})
    by_kind = dict(zip(kinds, encoder.encode(kinds), strict=True))
    genres = np.stack([by_kind[movies[i][1] or "unknown"] for i in ids])
    noise = np.random.default_rng(0).normal(size=titles.shape)
    return {name: dict(zip(ids, m, strict=True)) for name, m in
            {"text (title + genres)": titles, "genre words only": genres, "random vectors (chance)": noise}.items()}


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f} (min-max, {len(values)} splits)"


def main() -> dict:
    movies, rows = movielens()
    started = time.perf_counter()
    encoder = TextEncoder.load()
    vectors = arms(encoder, movies)
    embed_s = time.perf_counter() - started
    results = {name: [cold_start_scores(v, rows, seed) for seed in SEEDS] for name, v in vectors.items()}
    print(f"MovieLens-100K new items: {NEW_SHARE:.0%} of {len(movies)} movies held out, seeds {SEEDS}; "
          f"{len(movies)} titles (and their genre lists) embedded in {embed_s:.1f} s")
    print(f"{'arm':28s} {'AUC mean':>9s} {'AUC range':>14s} {'HR@10':>7s} {'chance HR@10':>12s} {'users':>6s}")
    for name, runs in results.items():
        auc = [r["auc"] for r in runs]
        hr = [r["hit_rate_at_10"] for r in runs]
        print(f"{name:28s} {np.mean(auc):9.3f} {min(auc):6.3f}-{max(auc):.3f} {np.mean(hr):7.3f} "
              f"{np.mean([r['chance_hit_rate_at_10'] for r in runs]):12.3f} {runs[0]['users']:6d}")
    text = results["text (title + genres)"]
    figures = {
        "movielens_new_item_auc": float(np.mean([r["auc"] for r in text])),
        "movielens_new_item_hit_rate_at_10": float(np.mean([r["hit_rate_at_10"] for r in text])),
        "movielens_new_item_auc_chance_arm": float(np.mean([r["auc"] for r in results["random vectors (chance)"]])),
        "movielens_new_item_auc_genres_only": float(np.mean([r["auc"] for r in results["genre words only"]])),
        "embed_items_per_s": len(movies) / embed_s,
        "readme": [{"row": "transfer: new MovieLens items ranked by title text (AUC, chance 0.5)",
                    "value": round(float(np.mean([r["auc"] for r in text])), 3),
                    "spread": _spread([r["auc"] for r in text]), "target": "> 0.5 (above chance)",
                    "met": min(r["auc"] for r in text) > 0.5, "mode": "quick" if QUICK else "full",
                    "seeds": {"calibration": [], "report": SEEDS}, "date": dt.date.today().isoformat()}],
    }
    generated = _transfer_items.run(encoder)
    figures["readme"].append(generated.pop("readme"))
    figures.update(generated)
    cold = _transfer_curve.run(vectors["text (title + genres)"])
    figures["readme"].append(cold.pop("readme"))
    figures.update(cold)
    multitask = _transfer_multitask.main()  # arm (f) and the calibration table, on the generated stream
    figures["readme"] += multitask.pop("readme")
    figures.update(multitask)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
