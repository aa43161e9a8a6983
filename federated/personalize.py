"""Per-merchant comparison on held-out data: local-only, global federated, and global fine-tuned locally.

Design notes: `federated/README.md`, `federated/personalize.py`.

Example (not run here: it needs TensorFlow):
    >>> rows = compare_merchants(stores, ModelConfig(bits=14), global_weights)   # doctest: +SKIP
    >>> rows[0]["finetuned_auc"] >= rows[0]["local_auc"]                          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from federated.model import ModelConfig, NumpyScorer, build_keras_model
from fedstream.metrics import mean_logloss, roc_auc
from federated.stores import MerchantStore, StoreError


@dataclass(frozen=True)
class PersonalizationConfig:
    """Local training budgets: from scratch gets more epochs than a fine-tune, to be fair to it."""

    local_epochs: int = 5
    local_learning_rate: float = 0.5
    finetune_epochs: int = 2
    finetune_learning_rate: float = 0.2
    batch_size: int = 32
    seed: int = 7


def _inputs(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"indices": arrays["indices"], "values": arrays["values"]}


def fit_local(model_config: ModelConfig, arrays: Mapping[str, np.ndarray], *, epochs: int, learning_rate: float,
              batch_size: int, seed: int, initial: Mapping[str, np.ndarray] | None = None) -> NumpyScorer:
    """Train the Keras model on one merchant's arrays (from ``initial`` weights or from scratch)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    model = build_keras_model(model_config)
    if initial is not None:
        set_named_weights(model, initial)
    model.compile(optimizer=tf.keras.optimizers.SGD(learning_rate), loss=tf.keras.losses.BinaryCrossentropy())
    model.fit(_inputs(arrays), _targets(arrays["labels"], model_config.label_width), epochs=epochs,
              batch_size=batch_size, shuffle=True, verbose=0)
    return NumpyScorer.from_keras(model_config, model)


def _targets(labels: np.ndarray, width: int) -> np.ndarray:
    """``[n, width]`` training targets: a multi-task store's ``[clicked, ordered]`` (column 0 alone for a
    single-task model), a click-only store's ``[clicked]``."""
    return labels[:, :width] if labels.ndim == 2 else labels[:, None]


def clicked(labels: np.ndarray) -> np.ndarray:
    """The click labels (column 0 of a multi-task store's ``[clicked, ordered]``)."""
    return labels[:, 0] if labels.ndim == 2 else labels


def set_named_weights(model, weights: Mapping[str, np.ndarray]) -> None:
    """Assign ``{layer_weight: array}`` (as :func:`federated.model.named_weights` names them) to a Keras model."""
    for layer in model.layers:
        for variable in layer.weights:
            key = f"{layer.name}_{variable.name.split('/')[-1].split(':')[0]}"
            if key in weights:
                variable.assign(weights[key])


def score(scorer: NumpyScorer, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Click AUC and log loss (the model's click output against column 0); a multi-task model on a
    multi-task store also gets ``purchase_auc`` (P(order | impression) against ``clicked and ordered``)."""
    labels = arrays["labels"]
    p = scorer.predict_proba_many(arrays["indices"], arrays["values"])
    out = {"auc": roc_auc(clicked(labels), p), "logloss": mean_logloss(clicked(labels), p, clip=1e-7)}
    if scorer.config.multitask and labels.ndim == 2:
        out["purchase_auc"] = roc_auc(labels[:, 1], scorer.predict_purchase_many(arrays["indices"], arrays["values"]))
    return out


def compare_merchant(store: MerchantStore, model_config: ModelConfig, global_scorer: NumpyScorer,
                     config: PersonalizationConfig = PersonalizationConfig()) -> dict:
    """One merchant's row: held-out AUC/logloss of local-only, global and global+fine-tuned models."""
    train, heldout = store.load("train"), store.load("heldout")
    local = fit_local(model_config, train, epochs=config.local_epochs, learning_rate=config.local_learning_rate,
                      batch_size=config.batch_size, seed=config.seed)
    tuned = fit_local(model_config, train, epochs=config.finetune_epochs,
                      learning_rate=config.finetune_learning_rate, batch_size=config.batch_size, seed=config.seed,
                      initial=global_scorer.weights)
    row = {"merchant_id": store.merchant_id, "n_train": int(len(train["labels"])),  # rows: impressions
           "n_heldout": int(len(heldout["labels"]))}
    for name, scorer in (("local", local), ("global", global_scorer), ("finetuned", tuned)):
        row.update({f"{name}_{k}": v for k, v in score(scorer, heldout).items()})
    return row


def compare_merchants(stores: Mapping[str, MerchantStore], model_config: ModelConfig, global_scorer: NumpyScorer,
                      config: PersonalizationConfig = PersonalizationConfig()) -> list[dict]:
    """Rows of :func:`compare_merchant` for every merchant whose store can be read."""
    rows = []
    for store in stores.values():
        try:
            rows.append(compare_merchant(store, model_config, global_scorer, config))
        except StoreError:
            continue
    return rows


def summarize(rows: list[dict], small: int = 1000) -> dict[str, float]:
    """Mean held-out metrics per model, overall and over merchants with fewer than ``small`` train examples."""
    out: dict[str, float] = {"merchants": float(len(rows))}
    groups = {"all": rows, "small": [r for r in rows if r["n_train"] < small]}
    out["small_merchants"] = float(len(groups["small"]))
    for group, members in groups.items():
        for model in ("local", "global", "finetuned"):
            for metric in ("auc", "logloss", "purchase_auc"):  # purchase_auc: multi-task rows only
                key = f"{model}_{metric}"
                values = [r[key] for r in members if key in r and np.isfinite(r[key])]
                if values:
                    out[f"{group}_{model}_{metric}"] = float(np.mean(values))
    return out


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of :func:`compare_merchant` rows."""
    head = (f"{'merchant':<10}{'train':>7}{'heldout':>8}  {'local auc':>9} {'global auc':>10} {'tuned auc':>9}"
            f"  {'local ll':>8} {'global ll':>9} {'tuned ll':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['merchant_id']:<10}{r['n_train']:>7}{r['n_heldout']:>8}  {r['local_auc']:>9.4f} {r['global_auc']:>10.4f}"
            f" {r['finetuned_auc']:>9.4f}  {r['local_logloss']:>8.4f} {r['global_logloss']:>9.4f}"
            f" {r['finetuned_logloss']:>8.4f}")
    return "\n".join(lines)
