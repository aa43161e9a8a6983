"""Federated training cost and quality: TFF round time vs merchants, TFF vs numpy FedAvg, and a fair
comparison of federated, centralized, local-only and fine-tuned models, calibrated and reported on
different seeds.

1. Scaling: seconds per TFF round (all sampled merchants train one local epoch, batch 32) for 10, 50 and
   100 merchants, on merchants generated with equal traffic shares, with merchant groups (what
   ``fedstream federated run`` uses: :mod:`federated.groups`, ``client_groups`` TFF clients per round;
   ``BENCH_CLIENT_GROUPS`` sets the count) and with one TFF client per merchant (``tff_per_merchant_round_s``,
   ``BENCH_PER_MERCHANT=0`` skips it); the same round in plain numpy
   (:mod:`federated.numpy_fedavg`) gives TFF's overhead factor, and Flower's simulation of it
   (:mod:`benchmarks._flower`: flwr 1.42 in a cached venv of its own, Ray with 2 client actors, the same
   numpy wide model, data, batch and learning rate per client, FedAvg) gives ``flower_round_s`` ("peer
   unavailable" when its venv cannot be built). A round of 1,000 clients follows (the 100 stores' data, each
   read by 10 clients with their own shuffle seeds; ``BENCH_LARGE_ROUND`` sets the count, 0 skips it),
   grouped; full runs also time it with one TFF client per merchant (one round).
2. Calibration on its own seeds (Zipf marketplaces ``CAL_SEEDS``, 20 merchants each; their later 20% per
   merchant is the *validation* split): the federated client learning rate and round count (the numpy
   FedAvg peer, same arithmetic and cohorts as TFF's process, every ``EVAL_EVERY`` rounds), the centralized learning rate and epochs (SGD on the pooled train data,
   epochs grown until the validation AUC has fallen ``PATIENCE`` epochs in a row), the local-only
   learning rate and epochs (same rule, mean per-merchant AUC) and the fine-tune learning rate and epochs
   (0 epochs = the global model as is). Every choice is the best mean over the calibration seeds.
3. Report on other seeds (``REPORT_SEEDS``, fresh marketplaces; their later 20% is the *test* split): the
   calibrated settings, no picking; mean, standard deviation and range over the report seeds.
4. Real data: MovieLens-100K with users grouped by occupation as merchants (:mod:`benchmarks._movielens`),
   rating >= 4; calibrated on a validation split inside the first 80% of each group's ratings, reported on
   the last 20% over ``REPORT_SEEDS`` (client sampling and shuffling seeds): federated vs centralized vs
   local-only vs fine-tuned pooled test AUC (federated rounds in TFF; with ``BENCH_QUICK=1`` in the numpy
   peer, as a MovieLens round is ~30k ratings).

Targets: federated within 1% AUC of centralized; global+fine-tune beats local-only for merchants with
< 1k examples; a round of 100 merchants x 1k examples <= 10 s.

Run: ``.venv/bin/python -m benchmarks.federated scaling`` for the round times alone (a few minutes; saved to
``benchmarks/results/federated_scaling.json``), ``.venv/bin/python -m benchmarks.federated`` for all (``BENCH_QUICK=1``: 60k-event marketplaces, shorter
grids, ~15 min on 2 busy cores). Prints tables, then one JSON line (saved to
``benchmarks/results/federated.json``) whose ``readme`` list is the README's rows.
"""


from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from federated.model import ModelConfig, tff_model_fn  # noqa: E402
from online.prequential import roc_auc  # noqa: E402
from federated.numpy_fedavg import NumpyWide, fedavg_round  # noqa: E402
from federated.stores import build_stores, open_stores, split_folder, write_store  # noqa: E402
from federated.training import (  # noqa: E402
    FederatedConfig, FederatedData, build_process, client_seed, sample_clients, use_execution_context,
)
from fedstream.processes import stop_tff_workers  # noqa: E402
from fedstream.settings import load_settings  # noqa: E402
from streams.generator import GeneratorConfig, generate  # noqa: E402
from benchmarks import emit, save_result  # noqa: E402
from benchmarks._flower import flower_round  # noqa: E402
from federated.groups import build_round_process  # noqa: E402

QUICK = os.environ.get("BENCH_QUICK") == "1"
BITS = 16
MERCHANT_COUNTS = (10, 50, 100)
EXAMPLES = (1000,) if QUICK else (300, 1000, 3000)
TIMED_ROUNDS = 3  # median of 3 rounds after a warm-up round
DEFAULTS = FederatedConfig()  # `fedstream federated run`'s defaults; the quality runs calibrate lr and rounds
CLIENT_LR, BATCH = DEFAULTS.client_learning_rate, DEFAULTS.batch_size
TARGET_ROUND_S, TARGET_AUC_GAP, SMALL = 10.0, 0.01, 1000
LARGE_ROUND = int(os.environ.get("BENCH_LARGE_ROUND", "1000"))  # clients of the large round (grouped)
GROUPS = int(os.environ.get("BENCH_CLIENT_GROUPS", str(DEFAULTS.client_groups)))
PER_MERCHANT = os.environ.get("BENCH_PER_MERCHANT", "1") == "1"  # also time one TFF client per merchant
TARGET_LARGE_ROUND_S = 30.0
CAL_SEEDS = (101, 102)  # marketplaces the settings are chosen on (validation split)
REPORT_SEEDS = (7, 8, 9) if QUICK else (7, 8, 9, 10, 11)  # marketplaces the figures come from (test split)
EVENTS = 60_000 if QUICK else 150_000
FED_LRS = (0.2, 0.5, 1.0) if QUICK else (0.1, 0.2, 0.5, 1.0)
MAX_ROUNDS, EVAL_EVERY = (40 if QUICK else 60), 5
CENTRAL_LRS = (0.05, 0.1, 0.2, 0.5, 1.0)
LOCAL_LRS = (0.1, 0.2, 0.5, 1.0, 2.0)
FINETUNE_LRS = (0.05, 0.1, 0.2, 0.5, 1.0)
MAX_EPOCHS, FINETUNE_MAX_EPOCHS, PATIENCE = 60, 10, 3
ML_LRS, ML_MAX_ROUNDS = ((0.2, 0.5, 1.0), 40) if QUICK else ((0.1, 0.2, 0.5, 1.0), 60)
ML_ENGINE = "numpy" if QUICK else "tff"  # quick: MovieLens rounds (~30k ratings each) in the numpy peer


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


def _time_tff_clients(process, stores: dict, n: int, rounds: int = TIMED_ROUNDS) -> float:
    """Median seconds of a TFF round of ``n`` clients when there are fewer stores than ``n``: client ``k``
    trains on store ``k mod len(stores)`` with its own shuffle seed (the 1,000-merchant round: same
    per-client work as 1,000 merchants of 1,000 examples, without generating 2M events)."""
    folders = [split_folder(store, "train") for store in stores.values()]
    state, times = process.initialize(), []
    for round_num in range(1, rounds + 1):
        started = time.perf_counter()
        clients = [(folders[k % len(folders)], client_seed(7, round_num, f"c{k}")) for k in range(n)]
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


def _time_flower(stores: dict, n: int) -> dict:
    """Flower's simulation of the same round (:mod:`benchmarks._flower`): ``{"round_s": ...}`` or
    ``{"unavailable": reason}``."""
    folders = [split_folder(store, "train") for store in list(stores.values())[:n]]
    return flower_round(folders, bits=BITS, lr=CLIENT_LR, batch=BATCH, rounds=TIMED_ROUNDS)


def _warm(process, stores: dict) -> None:
    """One untimed round over 3 merchants: traces the computations and starts TFF's executor."""
    warm = FederatedData.from_stores(dict(list(stores.items())[:3]))
    process.next(process.initialize(), [(warm.train[m](), 0) for m in warm.client_ids])


def _scaling_row(processes: dict, stores: dict, n: int, examples: int) -> dict:
    """TFF grouped (and per merchant), numpy and Flower seconds per round of ``n`` merchants, printed."""
    tff_s = _time_tff(processes["grouped"], stores, n)
    single_s = _time_tff(processes["per_merchant"], stores, n) if "per_merchant" in processes else None
    numpy_s, flower = _time_numpy(stores, n), _time_flower(stores, n)
    flower_s = flower.get("round_s")
    row = {"merchants": n, "examples": examples, "tff_round_s": tff_s, "client_groups": GROUPS,
           "tff_per_merchant_round_s": single_s, "numpy_round_s": numpy_s, "overhead": tff_s / numpy_s,
           "flower_round_s": flower_s, "tff_vs_flower": tff_s / flower_s if flower_s else None,
           "flower": flower.get("unavailable") or f"flwr {flower['flwr']}, {flower['actors']} Ray actors"}
    peer = f"Flower {flower_s:6.2f}" if flower_s else "Flower: peer unavailable"
    single = f"per merchant {single_s:6.2f}   " if single_s is not None else ""
    print(f"  {n:>4} merchants x {examples:>5} examples: TFF {tff_s:7.2f} ({GROUPS} groups)   {single}"
          f"numpy {numpy_s:6.2f}   {peer}   s/round   overhead x{tff_s / numpy_s:5.1f}", flush=True)
    return row


def _large_row(processes: dict, stores: dict, examples: int) -> dict:
    """The ``LARGE_ROUND``-client round, grouped (median of ``TIMED_ROUNDS``) and, in full runs, per merchant."""
    large_s = _time_tff_clients(processes["grouped"], stores, LARGE_ROUND)
    single_s = (_time_tff_clients(processes["per_merchant"], stores, LARGE_ROUND, rounds=1)
                if "per_merchant" in processes and not QUICK else None)
    single = f"   per merchant {single_s:7.2f} (one round)" if single_s is not None else ""
    print(f"  {LARGE_ROUND:>4} clients x {examples:>5} examples ({len(stores)} stores): TFF {large_s:7.2f} s/round "
          f"({GROUPS} groups, median of {TIMED_ROUNDS}){single}   (target <= {TARGET_LARGE_ROUND_S:g} s)", flush=True)
    return {"merchants": LARGE_ROUND, "examples": examples, "tff_round_s": large_s, "client_groups": GROUPS,
            "tff_per_merchant_round_s": single_s, "clients_share_stores": len(stores),
            "target_s": TARGET_LARGE_ROUND_S}


def scaling(root: Path) -> list[dict]:
    config = dataclasses.replace(DEFAULTS, rounds=1, clients_per_round=100, client_groups=GROUPS)
    model_fn = tff_model_fn(ModelConfig(bits=BITS))
    processes = {"grouped": build_round_process(model_fn, config)}
    if PER_MERCHANT:
        processes["per_merchant"] = build_process(model_fn, config)
    rows = []
    for examples in EXAMPLES:
        stores = _uniform_stores(root / "scaling", examples)
        for process in processes.values():
            _warm(process, stores)
        rows.extend(_scaling_row(processes, stores, n, examples) for n in MERCHANT_COUNTS if len(stores) >= n)
        if examples == 1000 and LARGE_ROUND:
            rows.append(_large_row(processes, stores, examples))
    return rows


def _pooled(stores: dict, split: str) -> dict[str, np.ndarray]:
    parts = [s.load(split) for s in stores.values()]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _marketplace(root: Path, seed: int) -> dict:
    build_stores(generate(GeneratorConfig(merchants=20, events=EVENTS, seed=seed)), root / f"zipf-{seed}", bits=BITS)
    return open_stores(root / f"zipf-{seed}")


def _auc(model, arrays: dict) -> float:
    return roc_auc(arrays["labels"], model.predict_proba_many(arrays["indices"], arrays["values"]))


def _mean_auc(models: list, pairs: list) -> float:
    return float(np.nanmean([_auc(m, held) for m, (_, held) in zip(models, pairs)]))


def _wide(scorer) -> NumpyWide:
    """The federated Keras wide model as a :class:`NumpyWide` (same function, for SGD fine-tuning)."""
    return NumpyWide(BITS, scorer.weights["wide_embeddings"][:, 0].astype(np.float32).copy(),
                     float(scorer.weights["wide_bias"][0]))


def sgd_curve(pairs: list, lr: float, max_epochs: int, *, starts: list | None = None, seed: int = 0) -> list[float]:
    """Mean held-out AUC over ``(train, held)`` pairs after 0, 1, 2, ... epochs of SGD (from ``starts`` or
    from zero), until it has fallen below its best for ``PATIENCE`` epochs in a row or ``max_epochs``."""
    models = [s.copy() for s in starts] if starts else [NumpyWide(BITS) for _ in pairs]
    rngs = [np.random.default_rng([seed, k]) for k in range(len(pairs))]
    values = [_mean_auc(models, pairs)]
    while len(values) <= max_epochs:
        for model, rng, (train, _) in zip(models, rngs, pairs):
            model.sgd_epoch(train["indices"], train["values"], train["labels"], learning_rate=lr, batch_size=BATCH, rng=rng)
        values.append(_mean_auc(models, pairs))
        if len(values) - 1 - int(np.argmax(values)) >= PATIENCE:
            break
    return values


def sgd_fit(train: dict, lr: float, epochs: int, *, start: NumpyWide | None = None, seed: int = 0) -> NumpyWide:
    model = start.copy() if start is not None else NumpyWide(BITS)
    rng = np.random.default_rng([seed, 0])
    for _ in range(epochs):
        model.sgd_epoch(train["indices"], train["values"], train["labels"], learning_rate=lr, batch_size=BATCH, rng=rng)
    return model


def pick(curves: dict[float, list[float]], *, max_steps: int, min_step: int = 1, step: int = 1) -> dict:
    """The (learning rate, steps) with the best mean validation AUC; ``at_edge`` when the curve never fell
    before ``max_steps``, ``lr_at_edge`` when the best rate is the grid's smallest or largest."""
    lr, k = max(((lr, k) for lr, c in curves.items() for k in range(min_step, len(c))), key=lambda t: curves[t[0]][t[1]])
    return {"lr": lr, "steps": k * step, "validation_auc": curves[lr][k], "at_edge": k * step >= max_steps,
            "lr_at_edge": len(curves) > 1 and lr in (min(curves), max(curves)),
            "curves": {str(lr): [round(v, 4) for v in c] for lr, c in curves.items()}}


def _clients(stores: dict) -> dict[str, tuple]:
    return {m: (a["indices"], a["values"], a["labels"]) for m, a in ((m, s.load("train")) for m, s in stores.items())}


def fedavg_models(stores: dict, lr: float, rounds: int, seed: int, every: int = 0):
    """The numpy FedAvg peer (:mod:`federated.numpy_fedavg`: the same wide model, client SGD, example-count
    weights and touched-slot mean as ``fedstream federated run``, the same seeded cohorts of
    ``clients_per_round``): yields ``(round, model)`` every ``every`` rounds and after the last."""
    clients, ids = _clients(stores), sorted(stores)
    model = NumpyWide(BITS)
    for round_num in range(1, rounds + 1):
        cohort = sample_clients(ids, DEFAULTS.clients_per_round, round_num, seed)
        model = fedavg_round(model, [clients[m] for m in cohort], client_learning_rate=lr, batch_size=BATCH,
                             seed=seed * 100_003 + round_num)
        if round_num == rounds or (every and round_num % every == 0):
            yield round_num, model


def federated_model(settings, stores: dict, lr: float, rounds: int, seed: int, engine: str) -> NumpyWide:
    """The global model after ``rounds`` rounds: TFF (``run_federated``, the platform's code path) or the numpy peer."""
    if engine == "numpy":
        return list(fedavg_models(stores, lr, rounds, seed))[-1][1]
    from federated.runner import run_federated

    config = dataclasses.replace(DEFAULTS, rounds=rounds, client_learning_rate=lr, seed=seed, eval_every=rounds)
    return _wide(run_federated(settings, stores, config, ModelConfig(bits=BITS), personalize=False, track=False).scorer)


def calibrate(sets: list[dict], lrs: tuple, max_rounds: int) -> dict:
    """Every setting of every model, chosen on the validation split of ``sets`` (stores per calibration seed).
    Federated rounds and lr are chosen with the numpy peer (TFF's ~10x overhead goes to the reported runs)."""
    fed_curves, held = {}, [_pooled(stores, "heldout") for stores in sets]
    for lr in lrs:
        runs = [[_auc(m, held[k]) for _, m in fedavg_models(stores, lr, max_rounds, 1000 + k, EVAL_EVERY)]
                for k, stores in enumerate(sets)]
        fed_curves[lr] = [0.5] + [float(np.mean(aucs)) for aucs in zip(*runs)]
        print(f"  federated lr {lr}: validation AUC every {EVAL_EVERY} rounds {[round(v, 4) for v in fed_curves[lr][1:]]}", flush=True)
    fed = pick(fed_curves, max_steps=max_rounds, step=EVAL_EVERY)
    fed["rounds"] = fed.pop("steps")
    pooled = [(_pooled(s, "train"), held[k]) for k, s in enumerate(sets)]
    central = pick({lr: sgd_curve(pooled, lr, MAX_EPOCHS) for lr in CENTRAL_LRS}, max_steps=MAX_EPOCHS)
    merchants = [(s.load("train"), s.load("heldout")) for stores in sets for s in stores.values()]
    local = pick({lr: sgd_curve(merchants, lr, MAX_EPOCHS) for lr in LOCAL_LRS}, max_steps=MAX_EPOCHS)
    starts = []  # fine-tuning starts from the global model of the chosen lr and round count
    for k, stores in enumerate(sets):
        starts += [list(fedavg_models(stores, fed["lr"], fed["rounds"], 1000 + k))[-1][1]] * len(stores)
    finetune = pick({lr: sgd_curve(merchants, lr, FINETUNE_MAX_EPOCHS, starts=starts) for lr in FINETUNE_LRS},
                    max_steps=FINETUNE_MAX_EPOCHS, min_step=0)
    for name, choice in (("federated", fed), ("centralized", central), ("local-only", local), ("fine-tune", finetune)):
        steps = choice.get("rounds", choice.get("steps"))
        print(f"  {name:<12} lr {choice['lr']:<5} {'rounds' if name == 'federated' else 'epochs'} {steps:>3}  "
              f"validation AUC {choice['validation_auc']:.4f}{'  (steps at the grid edge)' if choice['at_edge'] else ''}"
              f"{'  (lr at the grid edge)' if choice['lr_at_edge'] else ''}", flush=True)
    return {"federated": fed, "centralized": central, "local": local, "finetune": finetune}


def evaluate(settings, stores: dict, cal: dict, seed: int, engine: str = "tff") -> dict:
    """Held-out (test) figures of the calibrated settings on one report seed: pooled AUC of the federated and
    centralized models, per-merchant AUC of local-only, global and fine-tuned, and pooled AUC of each
    merchant scored by its own local-only / fine-tuned model."""
    fed, central, local, tune = cal["federated"], cal["centralized"], cal["local"], cal["finetune"]
    start = federated_model(settings, stores, fed["lr"], fed["rounds"], seed, engine)
    train, test = _pooled(stores, "train"), _pooled(stores, "heldout")
    row = {"seed": seed, "engine": engine, "federated_auc": _auc(start, test),
           "centralized_auc": _auc(sgd_fit(train, central["lr"], central["steps"], seed=seed), test)}
    merchants, pooled = [], {"local": [], "finetuned": [], "labels": []}
    for store in stores.values():
        own_train, own_test = store.load("train"), store.load("heldout")
        models = {"local": sgd_fit(own_train, local["lr"], local["steps"], seed=seed), "global": start,
                  "finetuned": sgd_fit(own_train, tune["lr"], tune["steps"], start=start, seed=seed)}
        merchants.append({"n_train": len(own_train["labels"]), **{f"{k}_auc": _auc(m, own_test) for k, m in models.items()}})
        for k in ("local", "finetuned"):
            pooled[k].append(models[k].predict_proba_many(own_test["indices"], own_test["values"]))
        pooled["labels"].append(own_test["labels"])
    labels = np.concatenate(pooled["labels"])
    row.update({f"pooled_{k}_auc": roc_auc(labels, np.concatenate(pooled[k])) for k in ("local", "finetuned")})
    for group, members in (("all", merchants), ("small", [m for m in merchants if m["n_train"] < SMALL])):
        row[f"{group}_merchants"] = len(members)
        for k in ("local", "global", "finetuned"):
            row[f"{group}_{k}_auc"] = float(np.nanmean([m[f"{k}_auc"] for m in members])) if members else None
    row["small_finetune_wins"] = sum(m["finetuned_auc"] > m["local_auc"] for m in merchants if m["n_train"] < SMALL)
    row["auc_gap_relative"] = (row["centralized_auc"] - row["federated_auc"]) / row["centralized_auc"]
    print(f"  seed {seed}: federated ({engine}) {row['federated_auc']:.4f}  centralized {row['centralized_auc']:.4f}  "
          f"local-only {row['pooled_local_auc']:.4f}  fine-tuned {row['pooled_finetuned_auc']:.4f} (pooled test AUC)",
          flush=True)
    return row


def spread(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "min": float(min(values)), "max": float(max(values)), "n": len(values)}


REPORT_KEYS = ("federated_auc", "centralized_auc", "auc_gap_relative", "pooled_local_auc", "pooled_finetuned_auc",
               "all_local_auc", "all_global_auc", "all_finetuned_auc", "small_local_auc", "small_global_auc",
               "small_finetuned_auc", "small_finetune_wins", "small_merchants")


def _summary(rows: list[dict]) -> dict:
    return {key: spread(rows, key) for key in REPORT_KEYS}


def synthetic_quality(root: Path, settings) -> dict:
    print(f"\nCalibration on marketplaces {CAL_SEEDS} (validation = each merchant's later 20%)", flush=True)
    cal = calibrate([_marketplace(root, seed) for seed in CAL_SEEDS], FED_LRS, MAX_ROUNDS)
    print(f"\nReport on marketplaces {REPORT_SEEDS} (test = each merchant's later 20%)", flush=True)
    rows = [evaluate(settings, _marketplace(root, seed), cal, seed) for seed in REPORT_SEEDS]
    return {"calibration": cal, "per_seed": rows, "summary": _summary(rows)}


def movielens_quality(root: Path, settings) -> dict:
    from benchmarks._movielens import movielens_stores

    validation, test = movielens_stores(root / "ml-100k", BITS)
    print(f"\nMovieLens-100K, {len(test)} occupation groups as merchants: calibration on the validation split", flush=True)
    cal = calibrate([validation], ML_LRS, ML_MAX_ROUNDS)
    print(f"MovieLens-100K report on the test split, seeds {REPORT_SEEDS} (federated: {ML_ENGINE})", flush=True)
    rows = [evaluate(settings, test, cal, seed, ML_ENGINE) for seed in REPORT_SEEDS]
    return {"groups": len(test), "engine": ML_ENGINE, "calibration": cal, "per_seed": rows, "summary": _summary(rows)}


def _fmt(stat: dict, digits: int = 4) -> str:
    return "–" if stat["mean"] is None else f"{stat['mean']:.{digits}f}"


def _sd(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    return f"sd {stat['sd']:.4f}, range {stat['min']:.4f}-{stat['max']:.4f} ({stat['n']} seeds)"


def readme_rows(synthetic: dict, movielens: dict, round_s: float | None, mode: str, date: str) -> list[dict]:
    """The README's rows (read by ``benchmarks/readme_table.py``), misses included."""
    seeds = {"calibration": list(CAL_SEEDS), "report": list(REPORT_SEEDS)}
    ml_seeds = {"calibration": "validation split", "report": list(REPORT_SEEDS)}
    s, m = synthetic["summary"], movielens["summary"]
    cal = synthetic["calibration"]
    gap = s["auc_gap_relative"]
    rows = [
        {"row": "TFF round, 100 merchants x 1k examples", "value": f"{round_s:.2f} s" if round_s else None,
         "spread": f"median of {TIMED_ROUNDS} rounds", "target": f"<= {TARGET_ROUND_S:g} s",
         "met": bool(round_s and round_s <= TARGET_ROUND_S), "seeds": None},
        {"row": (f"federated vs centralized AUC, Zipf marketplaces (fed lr {cal['federated']['lr']}, "
                 f"{cal['federated']['rounds']} rounds; central lr {cal['centralized']['lr']}, {cal['centralized']['steps']} epochs)"),
         "value": f"{_fmt(s['federated_auc'])} vs {_fmt(s['centralized_auc'])} (gap {100 * gap['mean']:.2f}%)",
         "spread": f"gap {_sd(gap)}", "target": "gap <= 1%", "met": gap["mean"] <= TARGET_AUC_GAP, "seeds": seeds},
        {"row": f"merchants < {SMALL} examples: fine-tuned vs local-only (global-only alongside)",
         "value": (f"{_fmt(s['small_finetuned_auc'])} vs {_fmt(s['small_local_auc'])} "
                   f"(global-only {_fmt(s['small_global_auc'])}; wins {_fmt(s['small_finetune_wins'], 1)} of "
                   f"{_fmt(s['small_merchants'], 1)})"),
         "spread": f"fine-tuned {_sd(s['small_finetuned_auc'])}", "target": "fine-tuned > local-only",
         "met": (s["small_finetuned_auc"]["mean"] or 0) > (s["small_local_auc"]["mean"] or 1), "seeds": seeds},
        {"row": f"MovieLens-100K, {movielens['groups']} occupation groups: federated ({movielens['engine']} FedAvg) vs "
                "centralized vs local-only (fine-tuned) pooled AUC",
         "value": (f"{_fmt(m['federated_auc'])} vs {_fmt(m['centralized_auc'])} vs {_fmt(m['pooled_local_auc'])} "
                   f"({_fmt(m['pooled_finetuned_auc'])})"),
         "spread": f"federated {_sd(m['federated_auc'])}", "target": "gap <= 1%, > local-only",
         "met": m["auc_gap_relative"]["mean"] <= TARGET_AUC_GAP and m["federated_auc"]["mean"] > m["pooled_local_auc"]["mean"],
         "seeds": ml_seeds},
    ]
    return [{**r, "mode": mode, "date": date} for r in rows]


def scaling_rows(rows: list[dict], mode: str, date: str) -> list[dict]:
    """README rows of the round-time comparison with Flower (issue #16 target 4) and the 1,000-client round."""
    out = []
    for r in rows:
        if "flower_round_s" in r and r["examples"] == 1000:
            ratio = r["tff_vs_flower"]
            single = r.get("tff_per_merchant_round_s")
            before = f"; one TFF client per merchant {single:.2f} s" if single is not None else ""
            out.append({"row": f"TFF round ({r.get('client_groups', 1)} merchant groups) / Flower 1.42 simulation round, "
                               f"{r['merchants']} merchants x 1k examples",
                        "value": f"{ratio:.2f}x ({r['tff_round_s']:.2f} s vs {r['flower_round_s']:.2f} s{before})" if ratio
                        else "peer unavailable", "spread": f"median of {TIMED_ROUNDS} rounds, same run",
                        "target": "<= 1x", "met": bool(ratio and ratio <= 1), "seeds": None})
        elif "clients_share_stores" in r:
            out.append({"row": f"TFF round ({r.get('client_groups', 1)} merchant groups), {r['merchants']} clients x 1k examples",
                        "value": f"{r['tff_round_s']:.1f} s", "spread": f"median of {TIMED_ROUNDS} rounds",
                        "target": f"<= {TARGET_LARGE_ROUND_S:g} s",
                        "met": r["tff_round_s"] <= TARGET_LARGE_ROUND_S, "seeds": None})
    return [{**r, "mode": mode, "date": date} for r in out]


def _print_summary(name: str, summary: dict) -> None:
    print(f"\n{name}: mean over report seeds (sd)")
    for key in REPORT_KEYS:
        stat = summary[key]
        if stat["mean"] is not None:
            print(f"  {key:<22} {stat['mean']:.4f}  ({stat['sd']:.4f}; {stat['min']:.4f}-{stat['max']:.4f})")


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def scaling_only(started: float) -> int:
    """``python -m benchmarks.federated scaling``: the round-time table alone and its JSON line."""
    with tempfile.TemporaryDirectory(prefix="bench-federated-") as tmp:
        try:
            import tensorflow_federated  # noqa: F401  (~11 s, once)

            use_execution_context(FederatedConfig())
            load_before = _load_average()
            print(f"TFF round time vs merchants ({'quick' if QUICK else 'full'}; one local epoch, batch {BATCH}, "
                  f"2**{BITS} slots; load average {load_before})", flush=True)
            rows = scaling(Path(tmp))
        finally:
            stopped = stop_tff_workers()
    emit("federated_scaling", scaling_result(rows, load_before, len(stopped), started))
    return 0


def scaling_result(rows: list[dict], load_before: list[float], stopped: int, started: float) -> dict:
    """The round-time figures as ``results/federated_scaling.json`` holds them: the one source of the README's
    round-time rows, whether the scaling part ran alone or inside the whole benchmark."""
    import datetime as dt

    mode, date = ("quick" if QUICK else "full"), dt.date.today().isoformat()
    return {"benchmark": "federated_scaling", "quick": QUICK, "mode": mode, "date": date, "scaling": rows,
            "client_groups": GROUPS, "timed_rounds": TIMED_ROUNDS, "load_average_before": load_before,
            "load_average_after": _load_average(), "readme": scaling_rows(rows, mode, date),
            "tff_workers_stopped": stopped, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    import datetime as dt

    parser = argparse.ArgumentParser(prog="python -m benchmarks.federated",
                                     description="Federated round times (TFF, numpy, Flower) and quality.")
    parser.add_argument("part", nargs="?", choices=("all", "scaling"), default="all",
                        help="scaling: only the round times (TFF grouped and per merchant, numpy, Flower, the "
                             "1,000-client round), saved to results/federated_scaling.json; all: everything")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.part == "scaling":
        return scaling_only(started)
    with tempfile.TemporaryDirectory(prefix="bench-federated-") as tmp:
        root = Path(tmp)
        settings = load_settings(data_dir=root / "data", feature_bits=BITS)
        try:
            import tensorflow_federated  # noqa: F401  (~11 s, once)

            use_execution_context(FederatedConfig())
            load_before = _load_average()
            print(f"TFF round time vs merchants ({'quick' if QUICK else 'full'}; one local epoch, batch {BATCH}, 2**{BITS} slots)")
            rows = scaling(root)
            save_result("federated_scaling", scaling_result(rows, load_before, 0, started))
            synthetic = synthetic_quality(root, settings)
            movielens = movielens_quality(root, settings)
        finally:
            stopped = stop_tff_workers()
    target_row = next((r for r in rows if r["merchants"] == 100 and r["examples"] == 1000), None)
    round_s = target_row["tff_round_s"] if target_row else None
    _print_summary("Zipf marketplaces", synthetic["summary"])
    _print_summary("MovieLens-100K", movielens["summary"])
    mode, date = ("quick" if QUICK else "full"), dt.date.today().isoformat()
    readme = readme_rows(synthetic, movielens, round_s, mode, date)  # round-time rows: federated_scaling.json
    s = synthetic["summary"]
    figures = {
        "benchmark": "federated", "quick": QUICK, "mode": mode, "date": date,
        "seeds": {"calibration": list(CAL_SEEDS), "report": list(REPORT_SEEDS)}, "scaling": rows,
        "round_s_100x1k": round_s, "round_s_target_met": readme[0]["met"],
        "federated_auc": s["federated_auc"]["mean"], "centralized_auc": s["centralized_auc"]["mean"],
        "auc_gap_relative": s["auc_gap_relative"]["mean"], "auc_gap_target_met": readme[1]["met"],
        "small_finetune_beats_local": readme[2]["met"], "movielens_target_met": readme[3]["met"],
        "synthetic": synthetic, "movielens": movielens, "readme": readme,
        "tff_workers_stopped": len(stopped), "seconds": time.perf_counter() - started,
    }
    emit("federated", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
