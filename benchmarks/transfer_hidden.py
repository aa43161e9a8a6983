"""Feature extraction from a wide & deep global model: its logit alone vs its logit and hidden layer.

The cold-start setting of :mod:`benchmarks._transfer_curve` (MovieLens-100K, occupations as merchants,
held-out groups replayed prequentially, same features, points and FTRL setting), with a *wide & deep*
global model (``federated.model``, ``ModelConfig(deep=True)``: 8-dim embedding bag, 16 ReLU units)
trained by FedAvg (Keras, one client per training group, one local epoch of SGD per round, example-weighted
mean of the weights) over the other groups. Arms:

* local: FTRL from nothing,
* global: the frozen deep model,
* logit: ``online.transfer.ResidualModel(hidden=False)`` (the global logit as one learned input),
* hidden: ``ResidualModel`` (the logit and the 16 hidden activations as learned inputs).

Run: ``BENCH_QUICK=1 python -m benchmarks.transfer_hidden`` (2 seeds, 3 rounds) or without for 5 seeds.
Prints the table and a final JSON line.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

from benchmarks._transfer_curve import (BITS, HELD_OUT, POINTS, QUICK, WINDOW, curve_points, featurize, fresh,
                                        held_out_groups, labels, prequential, ratings)
from online.transfer import ResidualModel

ROUNDS = 3 if QUICK else 6
REPORT_SEEDS = [11, 12] if QUICK else [11, 12, 13, 14, 15]
ARMS = ("local", "global", "logit", "hidden")


def _padded(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Keras model's fixed field count: extra columns on slot 0 with value 0 (they add nothing)."""
    from federated.model import N_FIELDS

    extra = N_FIELDS - indices.shape[1]
    return (np.hstack([indices, np.zeros((len(indices), extra), indices.dtype)]),
            np.hstack([values, np.zeros((len(values), extra), values.dtype)]))


def deep_global(groups: dict[str, list], train: list[str], seed: int):
    """FedAvg (plain example-weighted mean) of the Keras wide & deep model; its NumpyScorer."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from federated.model import ModelConfig, NumpyScorer, build_keras_model

    config = ModelConfig(bits=BITS, deep=True, seed=seed)
    tf.keras.utils.set_random_seed(seed)
    model = build_keras_model(config)
    model.compile(optimizer=tf.keras.optimizers.SGD(0.5), loss=tf.keras.losses.BinaryCrossentropy())
    clients = [(*_padded(*featurize(groups[g])), labels(groups[g])) for g in train]
    weights = model.get_weights()
    for _ in range(ROUNDS):
        total, summed = 0, [np.zeros_like(w) for w in weights]
        for indices, values, y in clients:
            model.set_weights(weights)
            model.fit({"indices": indices, "values": values}, y[:, None], epochs=1, batch_size=32, verbose=0)
            summed = [s + len(y) * w for s, w in zip(summed, model.get_weights())]
            total += len(y)
        weights = [s / total for s in summed]
    model.set_weights(weights)
    return NumpyScorer.from_keras(config, model)


def curve(seed: int, groups: dict[str, list]) -> list[dict]:
    needed = max(POINTS) + WINDOW
    held = held_out_groups(seed, groups)
    scorer = deep_global(groups, [g for g in groups if g not in held], seed)
    results = []
    for group in held:
        rows = groups[group][:needed]
        indices, values = featurize(rows)
        y = labels(rows)
        predictions = {"local": prequential(fresh(), indices, values, y),
                       "global": scorer.predict_proba_many(indices, values).astype(np.float64),
                       "logit": prequential(ResidualModel(fresh(), scorer, hidden=False), indices, values, y),
                       "hidden": prequential(ResidualModel(fresh(), scorer), indices, values, y)}
        results.extend(curve_points(seed, group, predictions, y))
    return results


def main() -> None:
    groups: dict[str, list] = defaultdict(list)
    for row in ratings():
        groups[row[4]].append(row)
    results = [r for seed in REPORT_SEEDS for r in curve(seed, groups)]
    runs = len({(r["seed"], r["merchant"]) for r in results})
    print(f"Deep extractor, MovieLens-100K occupations: {HELD_OUT} held out per seed, seeds {REPORT_SEEDS} ({runs} "
          f"merchant runs), global = Keras wide & deep FedAvg, {ROUNDS} rounds; AUC / logloss of the {WINDOW} "
          "ratings after the first k, prequential")
    print(f"{'arm':8s} " + " ".join(f"{'AUC@' + str(p):>9s} {'LL':>6s}" for p in POINTS))
    table = {}
    for arm in ARMS:
        cells = []
        for point in POINTS:
            chosen = [r for r in results if r["arm"] == arm and r["events"] == point]
            cell = {"auc": float(np.mean([r["auc"] for r in chosen])),
                    "logloss": float(np.mean([r["logloss"] for r in chosen]))}
            table[f"{arm}@{point}"] = cell
            cells.append(cell)
        print(f"{arm:8s} " + " ".join(f"{c['auc']:9.3f} {c['logloss']:6.3f}" for c in cells))
    print(json.dumps({"benchmark": "transfer_hidden", "quick": QUICK, "seeds": REPORT_SEEDS, "rounds": ROUNDS,
                      "merchant_runs": runs, "table": table}))


if __name__ == "__main__":
    main()
