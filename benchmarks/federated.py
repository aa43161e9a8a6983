"""Federated training cost and quality: TFF round time vs merchants, TFF vs numpy FedAvg, federated vs pooled.

1. Scaling: seconds per TFF round (all sampled merchants train one local epoch, batch 32) for 10, 50 and
   100 merchants and a few example counts per merchant, on merchants generated with equal traffic shares;
   the same round in plain numpy (:mod:`federated.numpy_fedavg`, same wide model, same SGD, same data) gives
   TFF's overhead factor.
2. Quality on a Zipf marketplace (20 merchants, some with < 1k examples): pooled held-out AUC of the
   federated global model (``fedstream federated run``'s defaults: FedAvg with the touched-slot mean, 20
   rounds, 10 merchants per round, one local epoch of SGD lr 0.5) against centralized training of the same
   model on all merchants' pooled train data to convergence (the upper bound no merchant would accept), and the
   per-merchant table: local-only vs global vs global fine-tuned, with the cold-start comparison for
   merchants with < 1k examples (warm start from the global model vs training from scratch).

Targets: federated within 1% AUC of centralized; global+fine-tune beats local-only for merchants with
< 1k examples; a round of 100 merchants x 1k examples <= 10 s.

Run: ``.venv/bin/python -m benchmarks.federated`` (``BENCH_QUICK=1``: 1k examples per merchant only, a
60k-event marketplace instead of 150k; a few minutes on 2 cores). Prints tables, then one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from federated.model import ModelConfig, tff_model_fn  # noqa: E402
from online.prequential import mean_logloss, roc_auc  # noqa: E402
from federated.numpy_fedavg import NumpyWide, fedavg_round  # noqa: E402
from federated.personalize import PersonalizationConfig, format_table  # noqa: E402
from federated.stores import build_stores, open_stores, write_store  # noqa: E402
from federated.training import (  # noqa: E402
    FederatedConfig, FederatedData, build_process, client_seed, use_execution_context,
)
from fedstream.processes import stop_tff_workers  # noqa: E402
from fedstream.settings import load_settings  # noqa: E402
from streams.generator import GeneratorConfig, generate  # noqa: E402

QUICK = os.environ.get("BENCH_QUICK") == "1"
BITS = 16
MERCHANT_COUNTS = (10, 50, 100)
EXAMPLES = (1000,) if QUICK else (300, 1000, 3000)
TIMED_ROUNDS = 2 if QUICK else 3
DEFAULTS = FederatedConfig()  # the quality run uses `fedstream federated run`'s defaults (rounds, lr, aggregation)
ROUNDS, CLIENT_LR, BATCH = DEFAULTS.rounds, DEFAULTS.client_learning_rate, DEFAULTS.batch_size
CENTRAL_LRS, CENTRAL_EPOCHS = (0.1, 0.2, 0.5), 12
TARGET_ROUND_S, TARGET_AUC_GAP, SMALL = 10.0, 0.01, 1000


def _uniform_stores(root: Path, examples: int) -> dict:
    """100 merchants with equal traffic, each with exactly ``examples`` training rows (+ a held-out tail)."""
    per_merchant = int(examples * 1.9) + 60  # users' activity varies: enough clicks for all 100
    full = build_stores(generate(GeneratorConfig(merchants=100, events=per_merchant * 100, seed=1, merchant_zipf=0.0)),
                        root / "full", bits=BITS, holdout_fraction=0.2)
    stores = {}
    for merchant_id, store in full.items():
        arrays = {k: np.concatenate([store.load("train")[k], store.load("heldout")[k]]) for k in ("indices", "values", "labels", "timestamps")}
        if len(arrays["labels"]) < examples + 20:
            continue
        held = 20
        rows = {k: v[:examples + held] for k, v in arrays.items()}
        stores[merchant_id] = write_store(root / f"e{examples}", merchant_id, rows, holdout_fraction=held / (examples + held), bits=BITS)
    return stores


def _time_tff(process, stores: dict, n: int) -> float:
    """Median seconds of a TFF round over ``n`` merchants (the caller warmed the computation up once)."""
    chosen = dict(list(stores.items())[:n])
    data = FederatedData.from_stores(chosen)
    state = process.initialize()
    times = []
    for round_num in range(1, TIMED_ROUNDS + 1):
        started = time.perf_counter()  # the cohort's arguments are part of the round
        clients = [(data.train[m](), client_seed(7, round_num, m)) for m in data.client_ids]
        state = process.next(state, clients).state
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _time_numpy(stores: dict, n: int) -> float:
    clients = []
    for store in list(stores.values())[:n]:
        arrays = store.load("train")
        clients.append((arrays["indices"], arrays["values"], arrays["labels"]))
    model = NumpyWide(BITS)
    times = []
    for _ in range(TIMED_ROUNDS):
        started = time.perf_counter()
        model = fedavg_round(model, clients, client_learning_rate=CLIENT_LR, batch_size=BATCH)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def scaling(root: Path) -> list[dict]:
    config = dataclasses.replace(DEFAULTS, rounds=1, clients_per_round=100)
    process = build_process(tff_model_fn(ModelConfig(bits=BITS)), config)
    rows = []
    for examples in EXAMPLES:
        stores = _uniform_stores(root / "scaling", examples)
        warm = FederatedData.from_stores(dict(list(stores.items())[:3]))
        process.next(process.initialize(), [(warm.train[m](), 0) for m in warm.client_ids])  # trace once
        for n in MERCHANT_COUNTS:
            if len(stores) < n:
                continue
            tff_s, numpy_s = _time_tff(process, stores, n), _time_numpy(stores, n)
            rows.append({"merchants": n, "examples": examples, "tff_round_s": tff_s, "numpy_round_s": numpy_s,
                         "overhead": tff_s / numpy_s})
            print(f"  {n:>4} merchants x {examples:>5} examples: TFF {tff_s:7.2f} s/round   numpy {numpy_s:6.2f} s/round"
                  f"   overhead x{tff_s / numpy_s:5.1f}", flush=True)
    return rows


def _pooled(stores: dict, split: str) -> dict[str, np.ndarray]:
    parts = [s.load(split) for s in stores.values()]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def centralized_auc(stores: dict) -> dict:
    """Upper bound: the same wide model, same features, trained with SGD on all merchants' pooled train data
    to convergence, scored on the same pooled held-out rows. Learning rate and epoch count are picked *on the
    held-out set* (best of ``CENTRAL_LRS`` x up to ``CENTRAL_EPOCHS`` epochs), which flatters the upper bound:
    the federated model gets no such choice (its last round is scored)."""
    train, held = _pooled(stores, "train"), _pooled(stores, "heldout")
    best = {"centralized_auc": 0.0}
    for lr in CENTRAL_LRS:
        model, rng = NumpyWide(BITS), np.random.default_rng(0)
        for epoch in range(1, CENTRAL_EPOCHS + 1):
            model.sgd_epoch(train["indices"], train["values"], train["labels"], learning_rate=lr, batch_size=BATCH, rng=rng)
            p = model.predict_proba_many(held["indices"], held["values"])
            auc = roc_auc(held["labels"], p)
            if auc > best["centralized_auc"]:
                best = {"centralized_auc": auc, "centralized_logloss": mean_logloss(held["labels"], p, clip=1e-7),
                        "centralized_lr": lr, "centralized_epochs": epoch}
    return best


QUALITY_KEYS = ("rounds", "clients_per_round", "client_learning_rate", "client_epochs", "batch_size",
                "server_optimizer", "server_learning_rate", "aggregation")


def quality(root: Path, settings) -> dict:
    from federated.runner import run_federated

    events = 60_000 if QUICK else 150_000
    stores = build_stores(generate(GeneratorConfig(merchants=20, events=events, seed=7)), root / "zipf", bits=BITS)
    stores = open_stores(root / "zipf")
    config = dataclasses.replace(DEFAULTS, eval_every=5, seed=7)
    started = time.perf_counter()
    outcome = run_federated(settings, stores, config, ModelConfig(bits=BITS), personalize=True, track=False,
                            personalization=PersonalizationConfig(local_epochs=3 if QUICK else 5, finetune_epochs=2))
    federated_s = time.perf_counter() - started
    held = _pooled(stores, "heldout")
    p = outcome.scorer.predict_proba_many(held["indices"], held["values"])
    fed_auc, fed_ll = roc_auc(held["labels"], p), mean_logloss(held["labels"], p, clip=1e-7)
    central = centralized_auc(stores)
    print(format_table(outcome.personalization))
    s = outcome.summary
    curve = {r.round: round(r.evaluation["auc"], 4) for r in outcome.history if "auc" in r.evaluation}
    return {"merchants": len(stores), "federated_config": {k: v for k, v in config.lineage().items() if k in QUALITY_KEYS},
            "federated_seconds": federated_s, "federated_eval_auc_by_round": curve,
            "federated_auc": fed_auc, "federated_logloss": fed_ll, **central,
            "auc_gap": central["centralized_auc"] - fed_auc,
            "auc_gap_relative": (central["centralized_auc"] - fed_auc) / central["centralized_auc"],
            "small_merchants": int(s.get("small_merchants", 0)),
            "small_local_auc": s.get("small_local_auc"), "small_global_auc": s.get("small_global_auc"),
            "small_finetuned_auc": s.get("small_finetuned_auc"), "all_local_auc": s.get("all_local_auc"),
            "all_global_auc": s.get("all_global_auc"), "all_finetuned_auc": s.get("all_finetuned_auc"),
            "small_finetune_wins": sum(r["finetuned_auc"] > r["local_auc"] for r in outcome.personalization
                                       if r["n_train"] < SMALL)}


def main() -> int:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-federated-") as tmp:
        root = Path(tmp)
        settings = load_settings(data_dir=root / "data", feature_bits=BITS)
        try:
            import tensorflow_federated  # noqa: F401  (~11 s, once)

            use_execution_context(FederatedConfig())
            print(f"TFF round time vs merchants ({'quick' if QUICK else 'full'}; one local epoch, batch {BATCH}, 2**{BITS} slots)")
            rows = scaling(root)
            print("\nQuality on a 20-merchant Zipf marketplace (held-out, later in time)")
            result = quality(root, settings)
        finally:
            stopped = stop_tff_workers()
    target_row = next((r for r in rows if r["merchants"] == 100 and r["examples"] == 1000), None)
    print(f"\nfederated AUC {result['federated_auc']:.4f} vs centralized {result['centralized_auc']:.4f} "
          f"(lr {result['centralized_lr']}, {result['centralized_epochs']} epochs; gap {result['auc_gap']:+.4f} = "
          f"{100 * result['auc_gap_relative']:.2f}% relative, target <= 1 point and <= 1%)")
    print(f"federated settings: {result['federated_config']}")
    for group in ("small", "all"):
        if result[f"{group}_local_auc"] is None:
            print(f"no merchant with < {SMALL} examples in this stream")
            continue
        label = f"merchants < {SMALL} examples ({result['small_merchants']})" if group == "small" else "all merchants"
        print(f"{label}: mean AUC local {result[f'{group}_local_auc']:.4f}  global {result[f'{group}_global_auc']:.4f}  "
              f"global+fine-tune {result[f'{group}_finetuned_auc']:.4f}")
    print(f"fine-tune beats local-only for {result['small_finetune_wins']}/{result['small_merchants']} small merchants")
    figures = {
        "benchmark": "federated", "quick": QUICK, "scaling": rows,
        "round_s_100x1k": target_row["tff_round_s"] if target_row else None,
        "round_s_target_met": bool(target_row and target_row["tff_round_s"] <= TARGET_ROUND_S),
        "auc_gap_target_met": result["auc_gap"] <= TARGET_AUC_GAP and result["auc_gap_relative"] <= TARGET_AUC_GAP,
        "small_finetune_beats_local": (None if result["small_local_auc"] is None
                                       else result["small_finetuned_auc"] > result["small_local_auc"]),
        **result, "tff_workers_stopped": len(stopped), "seconds": time.perf_counter() - started,
    }
    print(json.dumps(figures, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
