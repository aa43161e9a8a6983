"""Peers and data sets for ``benchmarks/online.py``: Vowpal Wabbit's FTRL, River's LogisticRegression
on River's own data sets, and MovieLens-100K (the copy in the recbole wheel, read as files).

* VW 9.11.9 runs through its ``pylibvw`` driver, as its command line would: the rows are written once
  as VW text (one namespace, the hashed slots as integer feature names, no constant: the ``bias`` slot
  is a feature), a first untimed pass builds the binary cache, then each timed pass is one
  ``Workspace`` (construct + learn + progressive loss) reading that cache, no prediction file. VW's
  start-up (options, 2**bits weights allocated) is timed on an empty file and subtracted: its events/s
  are the learning pass alone, as ours (our learners are built outside the timed region); the wall
  figure is kept too. Its progressive loss is VW's own average logistic loss (natural log, as ours).
* River's data sets: ``Phishing`` (dense, 9 named numeric features, 1,250 rows) and ``Bananas`` (dense,
  2 features, 5,300 rows) ship in River's wheel. The sparse one is MovieLens-100K (below) as dicts.
  Every row gets a ``bias: 1.0`` feature and River's own intercept is off, so both models see the same
  features with the same optimizer settings.
* MovieLens-100K: 100,000 ratings in timestamp order; label: rating >= 4; features hashed like ours:
  ``user``, ``item``, each genre of the item, the user's age bucket, gender and occupation, ``bias``.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np

from online.learners import hash_key
from streams.datasets import movielens_table


def _vw_line(row: list[int], values: list[float], label: float) -> str:
    features = " ".join(f"{slot}:{value:.9g}" for slot, value in zip(row, values) if value != 0.0)
    return ("1 |f " if label else "-1 |f ") + features + "\n"


@contextlib.contextmanager
def vw_session(indices: np.ndarray, values: np.ndarray, labels: np.ndarray, bits: int, ftrl: dict):
    """VW FTRL ready to run over the rows: yields ``(run, p)``; ``run() -> {seconds, startup_s, logloss}``
    is one timed pass over the binary cache (then, timed apart, the same start-up over no examples);
    ``p`` are VW's per-example predictions (from the untimed pass that builds the cache, for AUC)."""
    from vowpalwabbit.pyvw import Workspace

    with tempfile.TemporaryDirectory() as tmp:
        data, cache, preds, empty = (Path(tmp) / name for name in ("rows.vw", "rows.cache", "p.txt", "empty.vw"))
        with open(data, "w") as out:
            for row, vals, label in zip(indices.tolist(), np.asarray(values).tolist(), labels.tolist()):
                out.write(_vw_line(row, vals, label))
        empty.write_text("")
        options = (f"--ftrl --ftrl_alpha {ftrl['alpha']} --ftrl_beta {ftrl['beta']} --l1 {ftrl['l1']} "
                   f"--l2 {ftrl['l2']} -b {bits} --loss_function logistic --link logistic --noconstant --quiet")
        args = f"{options} -d {data} --cache_file {cache}"
        Workspace(f"{args} -p {preds}").finish()  # writes the binary cache (and the predictions, untimed)

        def run() -> dict:
            started = time.perf_counter()
            vw = Workspace(args)  # builds the model, then runs the driver over the cache
            seconds = time.perf_counter() - started
            loss = vw.get_sum_loss() / vw.get_weighted_examples()
            vw.finish()
            started = time.perf_counter()
            Workspace(f"{options} -d {empty}").finish()  # the same start-up over no examples
            return {"seconds": seconds, "startup_s": time.perf_counter() - started, "logloss": loss}

        yield run, np.loadtxt(preds, usecols=0, ndmin=1)


def run_vw(indices: np.ndarray, values: np.ndarray, labels: np.ndarray, bits: int, ftrl: dict, repeats: int) -> dict:
    """``repeats`` timed VW passes: events/s net of start-up (and wall), progressive loss, predictions."""
    with vw_session(indices, values, labels, bits, ftrl) as (run, p):
        return vw_figures([run() for _ in range(repeats)], len(labels)) | {"p": p}


def vw_figures(runs: list[dict], events: int) -> dict:
    startup = min(r["startup_s"] for r in runs)
    return {"events_per_s": float(np.median([events / max(r["seconds"] - startup, 1e-9) for r in runs])),
            "wall_events_per_s": float(np.median([events / r["seconds"] for r in runs])),
            "startup_s": startup, "logloss": runs[-1]["logloss"]}


def river_dense_sets() -> dict[str, tuple[list[dict], np.ndarray]]:
    """River's shipped binary data sets as (dicts with a bias feature, labels)."""
    from river import datasets

    out = {}
    for name, dataset in (("phishing", datasets.Phishing()), ("bananas", datasets.Bananas())):
        rows = [({**{str(k): float(v) for k, v in x.items()}, "bias": 1.0}, bool(y)) for x, y in dataset]
        out[name] = ([x for x, _ in rows], np.array([y for _, y in rows], dtype=np.float64))
    return out






def movielens() -> tuple[list[dict], np.ndarray]:
    """MovieLens-100K ratings in time order as sparse named-feature dicts and labels (rating >= 4)."""
    genres = {row[0]: row[3].split() if len(row) > 3 else [] for row in movielens_table("movielens-items")}
    users = {row[0]: row[1:4] for row in movielens_table("movielens-users")}
    ratings = sorted(movielens_table("movielens"), key=lambda row: (float(row[3]), row[0], row[1]))
    dicts, labels = [], []
    for user, item, rating, _ in ratings:
        age, gender, occupation = users.get(user, ["0", "?", "?"])
        x = {"bias": 1.0, f"user={user}": 1.0, f"item={item}": 1.0, f"age={int(age) // 10}": 1.0,
             f"gender={gender}": 1.0, f"occupation={occupation}": 1.0}
        x.update({f"genre={g}": 1.0 for g in genres.get(item, [])})
        dicts.append(x)
        labels.append(float(rating) >= 4)
    return dicts, np.array(labels, dtype=np.float64)


def dicts_to_rows(dicts: list[dict], bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Named-feature dicts as padded ``(n, F)`` slot/value arrays. A short row is padded with its first
    slot at value 0: a repeated slot counts once with the values summed, so padding changes nothing."""
    mask, width = (1 << bits) - 1, max(len(x) for x in dicts)
    indices = np.zeros((len(dicts), width), dtype=np.int32)
    values = np.zeros((len(dicts), width), dtype=np.float64)
    for row, x in enumerate(dicts):
        slots = [hash_key(key, mask) for key in x]
        indices[row, :] = slots[0]
        indices[row, :len(slots)] = slots
        values[row, :len(slots)] = list(x.values())
    return indices, values
