"""Cold-start merchants on MovieLens-100K: learning curves of five starts (``online.transfer``).

Users grouped by occupation are the *merchants* (21 groups). Each seed holds out ``HELD_OUT`` groups with
at least ``max(POINTS) + WINDOW`` ratings as new merchants; the *global* model is plain-numpy FedAvg
(``federated.numpy_fedavg``, the wide model, one client per remaining group) over the other groups'
ratings. Label: rating ≥ 4. Hashed features (``2**BITS`` slots): bias, user, movie, genres, age bucket,
gender, gender × genre, merchant. Each new merchant's ratings are replayed in time order and every one is
scored *before* it is learned (prequential, blocks of ``BLOCK``); a curve point ``k`` is the AUC and
logloss of the ``WINDOW`` ratings that follow its first ``k``. Arms (all FTRL-Proximal, one setting, not
tuned per arm):

* local: a learner from nothing,
* global: the frozen global model (never learns),
* finetune: ``online.transfer.finetune`` (starts at the global weights, keeps learning),
* features: ``online.transfer.ResidualModel`` (global logit as a frozen input + local head),
* text: a local learner whose features add all-MiniLM-L6-v2 title features: 16 random-projection sign
  bits of the movie's embedding and the cosine of the movie to the user's taste (mean embedding of the
  movies that user rated 4+ earlier in this merchant's stream; 0 before any).
"""

from __future__ import annotations

import datetime as dt
import os
from collections import defaultdict

import numpy as np

from federated.numpy_fedavg import NumpyWide, fedavg_round
from fedstream.metrics import logloss, roc_auc
from online.learners import FTRLProximalClassifier, hash_key
from online.transfer import ResidualModel, finetune
from registry.bundle import LinearScorer
from streams.datasets import movielens_table

QUICK = os.environ.get("BENCH_QUICK") == "1"
BITS = 18
POINTS = (0, 100, 300, 1000)
WINDOW = 200
BLOCK = 10
HELD_OUT = 3
ROUNDS = 4 if QUICK else 10
CALIBRATION_SEEDS = [1]  # looked at while writing this benchmark; never reported
REPORT_SEEDS = [11, 12] if QUICK else [11, 12, 13, 14, 15]
FTRL = {"alpha": 0.1, "beta": 1.0, "l1": 0.0, "l2": 1.0}
PROJECTIONS = 16
ARMS = ("local", "global", "finetune", "features", "text")


def ratings() -> list[tuple[int, int, float, float, str, int, str, list[str]]]:
    """(user, movie, rating, time, occupation, age, gender, genres) rows in time order."""
    users = {}
    for user, age, gender, occupation, _ in movielens_table("movielens-users"):
        users[int(user)] = (occupation, int(age), gender)
    genres = {}
    for row in movielens_table("movielens-items"):
        fields = (row + ["", "", ""])[:4]
        genres[int(fields[0])] = fields[3].split()[:4]
    rows = []
    for user, item, rating, when in movielens_table("movielens"):
        rows.append((int(user), int(item), float(rating), float(when), *users[int(user)], genres[int(item)]))
    rows.sort(key=lambda r: r[3])
    return rows


def featurize(rows: list, extra: list[list[tuple[str, float]]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense ``(n, F)`` slots and values; missing genres are padded with value 0."""
    mask = (1 << BITS) - 1
    out = []
    for k, (user, item, _, _, occupation, age, gender, movie_genres) in enumerate(rows):
        keys = [("bias", 1.0), (f"user={user}", 1.0), (f"item={item}", 1.0), (f"age={age // 10}", 1.0),
                (f"gender={gender}", 1.0), (f"merchant={occupation}", 1.0)]
        padded = movie_genres + [""] * (4 - len(movie_genres))
        keys += [(f"genre={g}", 1.0 if g else 0.0) for g in padded]
        keys += [(f"gender={gender}&genre={g}", 1.0 if g else 0.0) for g in padded]
        keys += extra[k] if extra is not None else []
        out.append([(hash_key(key, mask), value) for key, value in keys])
    indices = np.array([[s for s, _ in row] for row in out], dtype=np.int32)
    values = np.array([[v for _, v in row] for row in out], dtype=np.float32)
    return indices, values


def labels(rows: list) -> np.ndarray:
    return np.array([r[2] >= 4 for r in rows], dtype=np.float32)


def global_model(groups: dict[str, list], train: list[str], seed: int) -> LinearScorer:
    """Numpy FedAvg of the wide model over the training groups (one client each)."""
    clients = [(*featurize(groups[g]), labels(groups[g])) for g in train]
    model = NumpyWide(BITS)
    for round_num in range(ROUNDS):
        model = fedavg_round(model, clients, client_learning_rate=0.5, batch_size=32, seed=seed * 1000 + round_num)
    return LinearScorer(BITS, weights=model.weights, bias=model.bias)


def text_features(rows: list, vectors: dict[int, np.ndarray], seed: int) -> list[list[tuple[str, float]]]:
    """Per row: sign bits of a random projection of the movie's title embedding, and the cosine of the
    movie to the user's taste so far (movies that user rated 4+ earlier in this stream)."""
    dim = len(next(iter(vectors.values())))
    planes = np.random.default_rng(seed).normal(size=(PROJECTIONS, dim))
    taste: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(dim))
    out = []
    for user, item, rating, *_ in rows:
        vector = vectors[item]
        bits = [(f"text{k}={int(s > 0)}", 1.0) for k, s in enumerate(planes @ vector)]
        norm = np.linalg.norm(taste[user])
        similarity = float(taste[user] @ vector / norm) if norm > 0 else 0.0
        out.append(bits + [("text_taste", similarity)])
        if rating >= 4:
            taste[user] = taste[user] + vector
    return out


def prequential(model, indices: np.ndarray, values: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Every row scored before it is learned (blocks of BLOCK rows)."""
    return np.concatenate([model.learn_many(indices[s:s + BLOCK], values[s:s + BLOCK], y[s:s + BLOCK])
                           for s in range(0, len(y), BLOCK)])


def fresh() -> FTRLProximalClassifier:
    """A learner from nothing, with the one FTRL setting every arm uses."""
    return FTRLProximalClassifier(bits=BITS, **FTRL)


def arm_predictions(rows: list, scorer: LinearScorer, vectors: dict[int, np.ndarray], seed: int) -> dict:
    """Prequential predictions of each arm over one new merchant's first rows."""
    indices, values = featurize(rows)
    y = labels(rows)
    text_indices, text_values = featurize(rows, text_features(rows, vectors, seed))
    return {"local": prequential(fresh(), indices, values, y),
            "global": scorer.predict_proba_many(indices, values).astype(np.float64),
            "finetune": prequential(finetune(fresh(), scorer, BITS), indices, values, y),
            "features": prequential(ResidualModel(fresh(), scorer), indices, values, y),
            "text": prequential(fresh(), text_indices, text_values, y)}, y


def held_out_groups(seed: int, groups: dict[str, list]) -> list[str]:
    """``HELD_OUT`` groups (seeded) among those with rows enough for the whole curve."""
    eligible = sorted(g for g, rows in groups.items() if len(rows) >= max(POINTS) + WINDOW)
    return sorted(np.random.default_rng(seed).choice(eligible, size=HELD_OUT, replace=False).tolist())


def curve(seed: int, groups: dict[str, list], vectors: dict[int, np.ndarray]) -> list[dict]:
    """One seed: hold out groups, train the global model on the rest, a curve per held-out group and arm."""
    needed = max(POINTS) + WINDOW
    held = held_out_groups(seed, groups)
    scorer = global_model(groups, [g for g in groups if g not in held], seed)
    results = []
    for group in held:
        predictions, y = arm_predictions(groups[group][:needed], scorer, vectors, seed)
        results.extend(curve_points(seed, group, predictions, y))
    return results


def curve_points(seed: int, merchant: str, predictions: dict[str, np.ndarray], y: np.ndarray) -> list[dict]:
    """One row per arm and point of the curve: AUC and logloss over the WINDOW events from that point."""
    rows = []
    for arm, p in predictions.items():
        for point in POINTS:
            window = slice(point, point + WINDOW)
            rows.append({"seed": seed, "merchant": merchant, "arm": arm, "events": point,
                         "auc": roc_auc(y[window], p[window]),
                         "logloss": float(np.mean(logloss(y[window], p[window])))})
    return rows


def summary(results: list[dict]) -> dict:
    """Per arm and point: mean and min-max AUC and logloss; per point: transfer arms' wins over local."""
    table = {}
    for arm in ARMS:
        for point in POINTS:
            runs = [r for r in results if r["arm"] == arm and r["events"] == point]
            auc = [r["auc"] for r in runs]
            table[f"{arm}@{point}"] = {"auc": float(np.mean(auc)), "auc_min": min(auc), "auc_max": max(auc),
                                       "logloss": float(np.mean([r["logloss"] for r in runs])), "runs": len(runs)}
    return table


def wins(results: list[dict], arm: str, point: int) -> float:
    """Share of (seed, merchant) runs where ``arm`` has a higher AUC than local at ``point``."""
    key = {(r["seed"], r["merchant"]): r["auc"] for r in results if r["arm"] == "local" and r["events"] == point}
    mine = [(r["auc"] > key[(r["seed"], r["merchant"])]) for r in results if r["arm"] == arm and r["events"] == point]
    return float(np.mean(mine))


def run(vectors: dict[int, np.ndarray]) -> dict:
    """Print the learning-curve table; return figures and the README row."""
    groups: dict[str, list] = defaultdict(list)
    for row in ratings():
        groups[row[4]].append(row)
    results = [r for seed in REPORT_SEEDS for r in curve(seed, groups, vectors)]
    table = summary(results)
    merchants = len({(r["seed"], r["merchant"]) for r in results})
    print(f"\nCold-start merchants (MovieLens-100K occupations): {HELD_OUT} held out per seed, seeds {REPORT_SEEDS} "
          f"({merchants} merchant runs); global = numpy FedAvg, {ROUNDS} rounds over the other groups; "
          f"AUC / logloss of the {WINDOW} ratings after the first k, prequential")
    print(f"{'arm':10s} " + " ".join(f"{'AUC@' + str(p):>17s} {'LL':>6s}" for p in POINTS))
    for arm in ARMS:
        cells = [table[f"{arm}@{p}"] for p in POINTS]
        print(f"{arm:10s} " + " ".join(f"{c['auc']:.3f} ({c['auc_min']:.2f}-{c['auc_max']:.2f}) {c['logloss']:6.3f}"
                                       for c in cells))
    transfer_arms = ("global", "finetune", "features", "text")
    best = max(transfer_arms, key=lambda a: min(table[f"{a}@{p}"]["auc"] - table[f"local@{p}"]["auc"] for p in POINTS))
    margins = [table[f"{best}@{p}"]["auc"] - table[f"local@{p}"]["auc"] for p in POINTS]
    shares = {arm: {p: wins(results, arm, p) for p in POINTS} for arm in transfer_arms}
    win_share = shares[best]
    for arm in transfer_arms:
        print(f"{arm:10s} beats local (AUC) in {[round(w, 2) for w in shares[arm].values()]} of {merchants} "
              f"merchant runs at {list(POINTS)}")
    print(f"best transfer arm: {best}; AUC minus local at {list(POINTS)}: {[round(m, 3) for m in margins]}")
    return {"cold_start": table, "cold_start_best_arm": best, "cold_start_auc_margin": margins,
            "cold_start_win_share": {arm: {str(p): w for p, w in by.items()} for arm, by in shares.items()},
            "readme": {"row": f"transfer: cold-start merchant AUC, {best} vs local at {list(POINTS)} events",
                       "value": [round(table[f"{best}@{p}"]["auc"], 3) for p in POINTS],
                       "spread": f"local {[round(table[f'local@{p}']['auc'], 3) for p in POINTS]}; "
                                 f"{best} beats local in {[round(w, 2) for w in win_share.values()]} "
                                 f"of {merchants} runs",
                       "target": "a transfer arm above local-only at every point", "met": min(margins) > 0,
                       "mode": "quick" if QUICK else "full",
                       "seeds": {"calibration": CALIBRATION_SEEDS, "report": REPORT_SEEDS},
                       "date": dt.date.today().isoformat()}}
