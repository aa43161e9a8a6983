"""How the generator's drifts change its arrays (``streams.generator`` calls these; see its Drift section).

Each function changes the simulated world or impressions of one merchant from the drift on, in place,
with the generator's drift random stream, so events before a drift stay identical.
"""

from __future__ import annotations

import math

import numpy as np


def shift_devices(imp, rows: np.ndarray, magnitude: float, rng: np.random.Generator, device_effect: np.ndarray,
                  app: int) -> None:
    """device_mix: a share of the sessions at ``rows`` moves to the app (context logits follow)."""
    sessions = np.unique(imp.session[rows])
    moved = sessions[rng.random(len(sessions)) < 0.6 * min(magnitude, 1.0)]
    hit = rows[np.isin(imp.session[rows], moved)]
    imp.context_logit[hit] += device_effect[app] - device_effect[imp.device[hit]]
    imp.device[hit] = app


def add_popular_item(world, imp, rows: np.ndarray, merchant: int, magnitude: float, rng: np.random.Generator,
                     brands: int) -> tuple[int, float]:
    """popular_item: append a new, better item to the world; it takes a share of the impressions at ``rows``."""
    lo, hi = int(world.mcat_offset[merchant]), int(world.mcat_offset[merchant + 1])
    mcat = int(rng.integers(lo, hi))
    own = world.item_merchant == merchant
    j = len(world.item_price)
    price = round(float(world.mcat_level[mcat] * rng.lognormal(0.0, 0.45)), 2)
    world.item_merchant = np.append(world.item_merchant, merchant)
    world.item_mcat = np.append(world.item_mcat, mcat)
    world.item_local = np.append(world.item_local, int(world.item_local[own].max()) + 1)
    world.item_price = np.append(world.item_price, price)
    world.item_quality = np.append(world.item_quality, float(world.item_quality[own].max()) + 0.5)
    world.item_brand = np.append(world.item_brand, int(rng.integers(brands)))
    world.item_cum = np.append(world.item_cum, np.inf)  # never drawn by the categories' samplers
    shown = rows[rng.random(len(rows)) < 0.3 * min(magnitude, 1.0)]
    imp.item[shown] = j
    imp.local_cat[shown] = mcat - lo
    imp.mcat[shown] = mcat
    return j, price


def drifted_pref(pref: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Tastes after a preferences drift: categories permuted, mixed in with weight min(magnitude, 1)."""
    ncat = pref.shape[1]
    perm = np.empty(ncat, dtype=int)
    order = rng.permutation(ncat)
    perm[order] = np.roll(order, 1)  # a cycle through a random order: no category keeps its own taste
    weight = min(magnitude, 1.0)
    mixed = (1.0 - weight) * pref + weight * pref[:, perm]
    return mixed / math.sqrt((1.0 - weight) ** 2 + weight**2)  # keep the tastes' spread
