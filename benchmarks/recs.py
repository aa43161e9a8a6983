"""Recommendations against baselines: MovieLens-100K and generated merchants with and without consumables.

The evaluation of ``fedstream evaluate recs`` (:mod:`online.evaluate`: every method learns the same events in
time order and answers right before each target; baselines pick their variant on the validation targets):

* ``movielens-100k`` — the real ratings as one-line orders, leave-last-out next item (split ``last-order``);
* ``generated`` — the synthetic merchants' order history only (no clicks: "a real shop's order history"),
  next order (``last-order``);
* ``generated+consumables`` — the same with consumable categories re-bought on per-user cycles
  (:mod:`streams.consumables`).

Generated data sets run on the report seeds; fedstream's settings were fixed on the calibration seed (and
MovieLens' validation targets) before the report seeds were run. Target: fedstream's HitRate@10 and NDCG@10
above every baseline's on every data set (for generated ones: on every report seed).

Run: ``.venv/bin/python -m benchmarks.recs`` (``BENCH_QUICK=1``: fewer generated events, a few minutes).
Prints a table per data set, then one JSON line.
"""

from __future__ import annotations

import datetime
import json
import os
import time

from online.evaluate import all_methods, evaluate, format_table
from streams import datasets
from streams.consumables import with_consumables
from streams.generator import GeneratorConfig, generate
from streams.schemas import Click

QUICK = os.environ.get("BENCH_QUICK") == "1"
GENERATED_EVENTS = 150_000 if QUICK else 400_000
MERCHANTS = 5
CALIBRATION_SEEDS = [1]
REPORT_SEEDS = [2, 3, 4]
K = 10


def generated(seed: int, consumables: bool) -> list:
    """Orders and catalog of a generated stream (clicks dropped), optionally with consumables."""
    stream = generate(GeneratorConfig(merchants=MERCHANTS, events=GENERATED_EVENTS, seed=seed))
    if consumables:
        stream, _ = with_consumables(stream, seed=seed)
    return [event for event in stream if not isinstance(event, Click)]


def run(name: str, events: list) -> dict:
    started = time.perf_counter()
    report = evaluate(events, all_methods(river=True), split="last-order", k=K)
    print(f"== {name} ({time.perf_counter() - started:.0f} s)")
    print(format_table(report), flush=True)
    return report


def summarize(name: str, reports: list[dict]) -> dict:
    """Mean over the reports (seeds) of HitRate@10 / NDCG@10 per method, and the min-max spread."""
    def figures(method: str) -> dict:
        rows = [r["methods"][method] for r in reports]
        return {metric: sum(row[f"{metric}_at_{K}"] for row in rows) / len(rows) for metric in ("hit_rate", "ndcg")} | {
            "hit_rate_range": [min(row[f"hit_rate_at_{K}"] for row in rows), max(row[f"hit_rate_at_{K}"] for row in rows)],
            "ndcg_range": [min(row[f"ndcg_at_{K}"] for row in rows), max(row[f"ndcg_at_{K}"] for row in rows)]}

    methods = list(reports[0]["methods"])
    fed = figures("fedstream")
    baselines = {m: figures(m) for m in methods if m != "fedstream"}
    wins = all(r["methods"]["fedstream"][f"{metric}_at_{K}"] > row[f"{metric}_at_{K}"]
               for r in reports for m, row in r["methods"].items() if m != "fedstream" for metric in ("hit_rate", "ndcg"))
    return {"name": name, "fedstream": {"hit_rate_at_10": fed["hit_rate"], "ndcg_at_10": fed["ndcg"],
                                        "hit_rate_range": fed["hit_rate_range"], "ndcg_range": fed["ndcg_range"]},
            "baselines": {m: {"hit_rate_at_10": f["hit_rate"], "ndcg_at_10": f["ndcg"]} for m, f in baselines.items()},
            "beats_all": wins, "seeds": len(reports)}


def readme_rows(sets: list[dict]) -> list[dict]:
    today, mode = datetime.date.today().isoformat(), "quick" if QUICK else "full"
    rows = []
    for entry in sets:
        best = max(entry["baselines"].items(), key=lambda kv: kv[1]["ndcg_at_10"])
        low, high = entry["fedstream"]["ndcg_range"]
        spread = (f"{low:.3f}-{high:.3f} (min-max, {entry['seeds']} seeds)" if entry["seeds"] > 1
                  else "one data set (deterministic)")
        rows.append({"row": f"online: recs NDCG@10 on {entry['name']} (best baseline {best[0]} "
                            f"{best[1]['ndcg_at_10']:.3f})",
                     "value": round(entry["fedstream"]["ndcg_at_10"], 4), "spread": spread,
                     "target": "HitRate@10 and NDCG@10 above every baseline", "met": entry["beats_all"], "mode": mode,
                     "seeds": {"calibration": CALIBRATION_SEEDS if entry["seeds"] > 1 else [],
                               "report": REPORT_SEEDS if entry["seeds"] > 1 else []},
                     "date": today})
    return rows


def main() -> None:
    sets = [summarize("movielens-100k", [run("movielens-100k (leave-last-out)", list(datasets.load("movielens")))])]
    for consumables in (False, True):
        name = "generated+consumables" if consumables else "generated"
        reports = [run(f"{name} seed {seed} (orders only, next order)", generated(seed, consumables)) for seed in REPORT_SEEDS]
        sets.append(summarize(name, reports))
    print(f"{'data set':<24}{'fedstream HR@10':>17}{'NDCG@10':>9}   best baseline (NDCG@10)   beats all")
    for entry in sets:
        best = max(entry["baselines"].items(), key=lambda kv: kv[1]["ndcg_at_10"])
        print(f"{entry['name']:<24}{entry['fedstream']['hit_rate_at_10']:>17.4f}{entry['fedstream']['ndcg_at_10']:>9.4f}"
              f"   {best[0]} {best[1]['ndcg_at_10']:.4f}{'':>8}{entry['beats_all']}")
    print(json.dumps({"benchmark": "recs", "mode": "quick" if QUICK else "full", "k": K, "datasets": sets,
                      "readme": readme_rows(sets)}))


if __name__ == "__main__":
    main()
