"""Baseline recommenders for ``fedstream evaluate recs``, all fed the same events in the same order.

Each has ``observe(event)`` and ``recommend(merchant_id, user_id, k, when) -> {variant: [item, ...]}``:
a baseline answers in a few *variants* (e.g. with and without the user's already-chosen items, two
half-lives), and the evaluation keeps, per data set, the variant that is best on the validation targets
and reports it on the test targets. So every baseline is as strong as its own knobs allow, chosen the
same way fedstream's settings are.

* ``popularity`` — all-time counts; ``recent-popularity`` — decayed counts (half-life 1 or 7 days);
* ``user-frequent`` — the user's own most chosen items (recency breaks ties), then popular ones;
* ``item-knn`` — cosine item-to-item similarity over users' whole histories (dense counts per merchant);
* ``river-mf`` — River's ``reco.BiasedMF`` learned online on chosen items (1) and one sampled unchosen item
  (0), scoring every item the merchant has seen.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import defaultdict

import numpy as np

from online.candidates import CandidateState
from streams.schemas import Event


def _merge(first: list[str], fill: list[str], k: int, skip: set[str] | dict) -> list[str]:
    out: dict[str, None] = {}
    for item in (*first, *fill):
        if item not in skip and item not in out:
            out[item] = None
            if len(out) >= k:
                break
    return list(out)


class _Histories:
    """Per merchant, per user: item -> (count, last time) (shared by the baselines that filter seen items)."""

    def __init__(self) -> None:
        self.users: dict[tuple[str, str], dict[str, list]] = defaultdict(dict)

    def add(self, merchant_id: str, user_id: str, items: tuple[str, ...], when: float) -> dict[str, list]:
        seen = self.users[merchant_id, user_id]
        for item in items:
            entry = seen.setdefault(item, [0, when])
            entry[0] += 1
            entry[1] = when
        return seen

    def get(self, merchant_id: str, user_id: str) -> dict[str, list]:
        return self.users.get((merchant_id, user_id), {})


class Popularity:
    """All-time (``half_lives=()``) or decayed popularity."""

    def __init__(self, half_lives: tuple[float, ...] = ()) -> None:
        self.half_lives = half_lives
        self.counts: dict[tuple[str, float], dict[str, float]] = defaultdict(dict)
        self.landmarks: dict[tuple[str, float], float] = {}
        self.history = _Histories()

    def observe(self, event: Event) -> None:
        step = CandidateState.step_of(event)
        if step is None:
            return
        for half_life in self.half_lives or (0.0,):
            key = (event.merchant_id, half_life)
            value = self._weight(key, event.timestamp) if half_life else 1.0
            table = self.counts[key]
            for item in step[0]:
                table[item] = table.get(item, 0.0) + value
        self.history.add(event.merchant_id, event.user_id, step[0], event.timestamp)

    def _weight(self, key: tuple[str, float], when: float) -> float:
        """Forward decay: ``2^((t - landmark) / half-life)``, rescaled before it overflows."""
        landmark = self.landmarks.setdefault(key, when)
        exponent = (when - landmark) * math.log(2) / key[1]
        if exponent > 200:
            shift = math.exp(-exponent)
            self.counts[key] = {i: c * shift for i, c in self.counts[key].items()}
            self.landmarks[key], exponent = when, 0.0
        return math.exp(exponent)

    def recommend(self, merchant_id: str, user_id: str, k: int, when: float) -> dict[str, list[str]]:
        seen = self.history.get(merchant_id, user_id)
        out = {}
        for half_life in self.half_lives or (0.0,):
            table = self.counts.get((merchant_id, half_life), {})
            top = [i for i, _ in heapq.nlargest(k + len(seen), table.items(), key=lambda kv: kv[1])]
            name = f"half-life {half_life / 86_400:g} d" if half_life else "all-time"
            out[name] = top[:k]
            out[f"{name}, unseen"] = _merge(top, [], k, seen)
        return out


class UserFrequent:
    """The user's most frequently chosen items (recency breaks ties), filled with popular items."""

    def __init__(self) -> None:
        self.history = _Histories()
        self.popular = Popularity()

    def observe(self, event: Event) -> None:
        step = CandidateState.step_of(event)
        if step is not None:
            self.history.add(event.merchant_id, event.user_id, step[0], event.timestamp)
        self.popular.observe(event)

    def recommend(self, merchant_id: str, user_id: str, k: int, when: float) -> dict[str, list[str]]:
        seen = self.history.get(merchant_id, user_id)
        own = [i for i, _ in heapq.nlargest(k, seen.items(), key=lambda kv: (kv[1][0], kv[1][1]))]
        return {"frequent": _merge(own, self.popular.recommend(merchant_id, user_id, 2 * k, when)["all-time"], k, ())}


class ItemKNN:
    """Cosine item-item similarity from co-chosen counts over users' whole histories (dense per merchant)."""

    def __init__(self) -> None:
        self.index: dict[str, dict[str, int]] = defaultdict(dict)
        self.names: dict[str, list[str]] = defaultdict(list)
        self.co: dict[str, np.ndarray] = {}
        self.count: dict[str, np.ndarray] = {}
        self.users: dict[tuple[str, str], dict[int, None]] = defaultdict(dict)

    def _row(self, merchant_id: str, item: str) -> int:
        index = self.index[merchant_id]
        found = index.get(item)
        if found is None:
            found = index[item] = len(index)
            self.names[merchant_id].append(item)
            matrix = self.co.get(merchant_id)
            if matrix is None or found >= len(matrix):
                size = max(64, 2 * (found + 1))
                grown = np.zeros((size, size), dtype=np.float32)
                counts = np.zeros(size, dtype=np.float32)
                if matrix is not None:
                    grown[: len(matrix), : len(matrix)] = matrix
                    counts[: len(matrix)] = self.count[merchant_id]
                self.co[merchant_id], self.count[merchant_id] = grown, counts
        return found

    def observe(self, event: Event) -> None:
        step = CandidateState.step_of(event)
        if step is None:
            return
        merchant_id = event.merchant_id
        history = self.users[merchant_id, event.user_id]
        for item in step[0]:
            j = self._row(merchant_id, item)
            if j in history:
                continue
            if history:
                others = np.fromiter(history, dtype=np.int64, count=len(history))
                self.co[merchant_id][j, others] += 1.0
                self.co[merchant_id][others, j] += 1.0
            self.count[merchant_id][j] += 1.0
            history[j] = None

    def recommend(self, merchant_id: str, user_id: str, k: int, when: float) -> dict[str, list[str]]:
        history = self.users.get((merchant_id, user_id))
        if not history or merchant_id not in self.co:
            return {"cosine": [], "cosine, unseen": []}
        n = len(self.index[merchant_id])
        rows = np.fromiter(history, dtype=np.int64, count=len(history))
        counts = self.count[merchant_id][:n]
        norm = np.sqrt(np.maximum(counts, 1.0))
        scores = (self.co[merchant_id][rows, :n] / norm[rows, None]).sum(axis=0) / norm
        names = self.names[merchant_id]
        order = np.argsort(-scores, kind="stable")[: k + len(rows)]
        ranked = [names[i] for i in order.tolist() if scores[i] > 0]
        seen = {names[i] for i in rows.tolist()}
        return {"cosine": ranked[:k], "cosine, unseen": _merge(ranked, [], k, seen)}


class RiverMF:
    """River's ``reco.BiasedMF`` on implicit feedback: chosen items 1, one sampled unchosen item 0."""

    def __init__(self, n_factors: int = 16, seed: int = 0) -> None:
        from river import optim, reco

        self.models: dict[str, reco.BiasedMF] = {}
        self.make = lambda: reco.BiasedMF(n_factors=n_factors, bias_optimizer=optim.SGD(0.02),
                                          latent_optimizer=optim.SGD(0.05), l2_latent=0.01, seed=seed)
        self.items: dict[str, list[str]] = defaultdict(list)
        self.known: dict[str, set[str]] = defaultdict(set)
        self.history = _Histories()
        self.rng = random.Random(seed)

    def observe(self, event: Event) -> None:
        step = CandidateState.step_of(event)
        if step is None:
            return
        model = self.models.get(event.merchant_id)
        if model is None:
            model = self.models[event.merchant_id] = self.make()
        items, known = self.items[event.merchant_id], self.known[event.merchant_id]
        for item in step[0]:
            model.learn_one(event.user_id, item, 1.0)
            if items:
                model.learn_one(event.user_id, self.rng.choice(items), 0.0)
            if item not in known:
                known.add(item)
                items.append(item)
        self.history.add(event.merchant_id, event.user_id, step[0], event.timestamp)

    def recommend(self, merchant_id: str, user_id: str, k: int, when: float) -> dict[str, list[str]]:
        model = self.models.get(merchant_id)
        if model is None:
            return {"biased-mf": [], "biased-mf, unseen": []}
        items = self.items[merchant_id]
        user_vec = model.u_latents.get(user_id)
        scores = np.fromiter((model.i_biases.get(i, 0.0) for i in items), dtype=np.float64, count=len(items))
        if user_vec is not None:
            latents = np.stack([model.i_latents[i] for i in items])  # every known item was learned once
            scores += latents @ user_vec
        order = np.argsort(-scores, kind="stable")[: k + 200]
        ranked = [items[i] for i in order.tolist()]
        seen = self.history.get(merchant_id, user_id)
        return {"biased-mf": ranked[:k], "biased-mf, unseen": _merge(ranked, [], k, seen)}


def make_baselines(river: bool = True) -> dict[str, object]:
    """The baselines by name (``river``: include River's matrix factorization)."""
    out: dict[str, object] = {"popularity": Popularity(), "recent-popularity": Popularity((86_400.0, 7 * 86_400.0)),
                              "user-frequent": UserFrequent(), "item-knn": ItemKNN()}
    if river:
        out["river-mf"] = RiverMF()
    return out


__all__ = ["Popularity", "UserFrequent", "ItemKNN", "RiverMF", "make_baselines"]
