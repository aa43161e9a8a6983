"""One served version from N learners: the newest copy of every partition slot plus merged shared weights.

Per-merchant parts (feature context, candidate sources, per-merchant ranker weights, metrics) come from
the checkpoint holding the newest copy of the merchant's slot (:mod:`online.slices`). The shared parts,
learned by each worker on its own partitions, are merged:

* linear model weights, per hashed slot: ``w[s] = Σ_k a_k[s]·w_k[s] / Σ_k a_k[s]`` where ``a_k[s]`` is how
  much worker ``k``'s model learned at slot ``s`` (FTRL's ``n``, Adam's ``v``: their sums of squared
  gradients; for SGD, ``n_updates`` where ``w_k[s] != 0``). A slot only one worker touched (a merchant's
  own crosses) keeps that worker's weight; a slot all touch (bias, device, position) gets a weighted
  average, FedAvg's idea with per-slot example weights instead of one weight per client;
* the ranker's global weights: average weighted by each ranker's update count;
* a model without linear terms (River's) cannot be averaged: the largest worker's is served, and the
  lineage says so;
* the multi-task model (``settings.multitask.enabled``), served as :class:`online.multitask.MultiTaskScorer`:
  each of its vectors (shared, click head, conversion head) merged per hashed slot like the linear weights,
  with ``a_k`` that vector's AdaGrad ``n``; its delay calibrator's ``(a, b)`` averaged weighted by the
  clicks each worker resolved (lineage ``multitask``: ``single`` when one worker holds one, served exactly
  as its own, else ``slot-activity-weighted``; ``multitask_merged``: how many). The clicks a worker holds
  for attribution are per merchant and move with their slot (:func:`online.slices.adopt`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from online.slices import newest, replace_slot, saved_tables, tables


def activity(model: Any) -> np.ndarray | None:
    """How much ``model`` learned per hashed slot (None: no per-slot weights)."""
    for name in ("n", "v"):
        found = getattr(model, name, None)
        if isinstance(found, np.ndarray):
            return found.astype(np.float64)
    weights = getattr(model, "w", None)
    if isinstance(weights, np.ndarray):
        return (weights != 0).astype(np.float64) * max(getattr(model, "n_updates", 1), 1)
    return None


def average_by_activity(weights: list[np.ndarray], activities: list[np.ndarray]) -> np.ndarray:
    """Per hashed slot ``s``: ``Σ_k a_k[s]·w_k[s] / Σ_k a_k[s]`` over ``weights`` ``w_k`` and their
    ``activities`` ``a_k`` (float64; 0 where none learned)."""
    total = np.zeros(len(weights[0]))
    weight = np.zeros(len(weights[0]))
    for w, a in zip(weights, activities, strict=True):
        total += a * np.asarray(w, dtype=np.float64)
        weight += a
    return np.divide(total, weight, out=np.zeros_like(total), where=weight > 0)


def merge_linear(models: list[Any], bits: int) -> Any | None:
    """A float32 ``LinearScorer`` of the slot-activity-weighted average of ``models`` (None: not all linear)."""
    from registry.bundle import LinearScorer

    weights, activities = [], []
    for model in models:
        linear, a = getattr(model, "linear_terms", None), activity(model)
        if linear is None or a is None:
            return None
        weights.append(linear()[0])
        activities.append(a)
    merged = average_by_activity(weights, activities) if weights else np.zeros(1 << bits)
    return LinearScorer(bits, weights=merged.astype(np.float32), bias=0.0)


def merge_multitask(states: list[Any]) -> Any:
    """A :class:`online.multitask.MultiTaskScorer` of several workers' multi-task states: each vector (shared,
    click head, conversion head) averaged per hashed slot weighted by its own AdaGrad ``n`` (the squared
    gradients it learned there, as FTRL's ``n`` for :func:`merge_linear`), the calibrator's ``(a, b)``
    weighted by the clicks each resolved (:func:`merge_calibration`)."""
    from online.multitask import TASKS, MultiTaskScorer

    bits = {state.model.bits for state in states}
    if len(bits) != 1:
        raise ValueError(f"multi-task models of different sizes cannot be merged: {sorted(bits)} bits")
    w = {name: average_by_activity([s.model.w[name] for s in states], [s.model.n[name] for s in states])
         for name in ("shared", *TASKS)}
    return MultiTaskScorer(bits.pop(), w["shared"] + w["click"], w["shared"] + w["conversion"],
                           merge_calibration(states))


def merge_calibration(states: list[Any]) -> tuple[float, float] | None:
    """The delay calibrators' ``(a, b)`` averaged weighted by how many resolved clicks each learned from
    (None: no state calibrates; none resolved yet: all still at their start, a plain average)."""
    calibrated = [s for s in states if s.calibrator is not None]
    if not calibrated:
        return None
    counts = np.array([max(s.resolved, 0) for s in calibrated], dtype=np.float64)
    share = counts / counts.sum() if counts.sum() > 0 else np.full(len(calibrated), 1.0 / len(calibrated))
    return (float(sum(k * s.calibrator.a for k, s in zip(share, calibrated))),
            float(sum(k * s.calibrator.b for k, s in zip(share, calibrated))))


def _merge_ranker(recommenders: list[Any], base: Any) -> None:
    rankers = [r.ranker for r in recommenders if hasattr(r, "ranker")]
    updates = np.array([max(r.updates, 0) for r in rankers], dtype=np.float64)
    if not rankers or updates.sum() == 0:
        return
    share = updates / updates.sum()
    base.ranker.weights = sum(s * r.weights for s, r in zip(share, rankers))
    base.ranker.squares = sum(s * r.squares for s, r in zip(share, rankers))
    base.ranker.updates = int(updates.sum())


def _metrics(store: dict[str, dict[str, Any]], events: int) -> dict[str, float]:
    """Each worker's prequential metrics, averaged weighted by the clicks it evaluated."""
    summaries = [saved["evaluator"].summary() for saved in store.values()]
    weights = [s.get("events", 0.0) for s in summaries]
    total = sum(weights) or 1.0
    keys = set().union(*summaries)
    out = {k: sum(w * s.get(k, 0.0) for w, s in zip(weights, summaries) if k in s) / total for k in keys}
    out["clicks_evaluated"] = float(sum(weights))
    out.pop("events", None)
    out["events_seen"] = float(events)
    out["workers_merged"] = float(len(store))
    return out


def serving_model(model: Any, bits: int) -> Any:
    """What a registered version needs to score: a linear model's weights as a float32
    :class:`registry.bundle.LinearScorer` (4 MB at 20 bits instead of FTRL's 24 MB of w, z, n); other
    models (River's) as they are."""
    linear = getattr(model, "linear_terms", None)
    if linear is None:
        return model
    from registry.bundle import LinearScorer

    weights, intercept = linear()
    return LinearScorer(bits, weights=np.asarray(weights, dtype=np.float32), bias=float(intercept))


def serving_multitask(state: Any) -> Any | None:
    """A :class:`online.multitask.MultiTaskState`'s served form (None without one)."""
    if state is None:
        return None
    from online.multitask import MultiTaskScorer

    return MultiTaskScorer.from_state(state)


def _multitask(store: dict[str, dict[str, Any]]) -> tuple[Any | None, str | None, int]:
    """The served multi-task model, how it was made (lineage) and how many workers' it merged."""
    holding = [store[p]["multitask"] for p in sorted(store) if store[p].get("multitask") is not None]
    if not holding:
        return None, None, 0
    if len(holding) == 1:  # exactly that worker's (a one-worker average would round)
        return serving_multitask(holding[0]), "single", 1
    return merge_multitask(holding), "slot-activity-weighted", len(holding)


def assemble(store: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The parts of one version from every worker checkpoint in ``store``: ``model`` (served form),
    ``context``, ``recommender``, ``metrics``, ``offsets``, ``events``, ``clicks``, ``merge``, ``sources``,
    ``multitask`` (served form or None), ``multitask_from`` and ``multitask_merged`` (how many workers')."""
    from streams.features import FeatureContext

    if not store:
        raise ValueError("no learner checkpoint to assemble a version from")
    base_name = max(store, key=lambda p: (store[p]["events"], p))
    base = store[base_name]
    partitions = base.get("partitions", 1)
    owners = newest(store)
    context = FeatureContext.from_state(base["context"])
    merged = tables(context, base["recommender"], base["evaluator"], base.setdefault("merchant_events", {}))
    loaded: dict[str, dict[str, dict]] = {}
    for slot, name in sorted(owners.items()):
        if name != base_name:
            if name not in loaded:
                loaded[name] = saved_tables(store[name])
            replace_slot(merged, loaded[name], slot, partitions)
    recommender = base["recommender"]
    models = [saved["model"] for saved in store.values()]
    if len(store) == 1:
        model, merge = serving_model(base["model"], base["bits"]), "single"
    else:
        _merge_ranker([saved["recommender"] for saved in store.values()], recommender)
        model = merge_linear(models, base["bits"])
        merge = "slot-activity-weighted"
        if model is None:
            model, merge = serving_model(base["model"], base["bits"]), f"largest worker ({base_name})"
    offsets = {key: o for slot, name in owners.items() for key, o in store[name]["offsets"].items() if key[1] == slot}
    if not owners:  # checkpoints written before slots: one worker's own offsets
        offsets = dict(base["offsets"])
    # events: every slot's newest count, plus the catalog records (read whole by every worker, counted once each)
    catalog = max(sum(saved.get("catalog_offsets", {}).values()) for saved in store.values())
    events = sum(store[name]["slots"][slot] for slot, name in owners.items()) + catalog if owners else base["events"]
    multitask, multitask_from, multitask_merged = _multitask(store)
    return {"model": model, "context": context, "multitask": multitask, "multitask_from": multitask_from,
            "multitask_merged": multitask_merged,
            "recommender": recommender, "bits": base["bits"],
            "metrics": _metrics(store, events), "offsets": offsets, "events": events,
            "clicks": sum(saved["clicks"] for saved in store.values()), "merge": merge,
            "sources": {name: saved["events"] for name, saved in sorted(store.items())},
            "merchant_events": dict(merged["events"])}


__all__ = ["activity", "assemble", "average_by_activity", "merge_calibration", "merge_linear", "merge_multitask",
           "serving_model", "serving_multitask"]
