"""Transfer learning for online learners: start a merchant's learner from a registered (federated) model.

Design notes: `online/README.md`, `online/transfer.py`.
"""

from __future__ import annotations

import re
from typing import Any

import crc32c
import numpy as np

from fedstream.errors import ExpectedFailure
from online.learners import FTRLProximalClassifier, HashedLogisticRegression, hash_key, sigmoid

TRANSFER_METHODS = ("finetune", "features")
GLOBAL_LOGIT_KEY = "transfer:global_logit"
HIDDEN_KEY = "transfer:hidden:"  # + unit number: one reserved slot per hidden unit of a deep extractor
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


class TransferError(ExpectedFailure, ValueError):
    """A warm start that cannot be made (unknown version, other feature space, unsupported learner)."""


def bias_slot(bits: int) -> int:
    """The featurizer's ``bias`` slot (every event carries it with value 1)."""
    return crc32c.crc32c(b"bias") & ((1 << bits) - 1)


def global_terms(scorer: Any, bits: int) -> tuple[np.ndarray, float]:
    """``(weights float64[2**bits], bias)`` of a linear (wide) scorer; a deep one cannot seed weights."""
    linear = getattr(scorer, "linear_terms", None)
    if linear is None:
        raise TransferError(f"{type(scorer).__name__} is not linear in the hashed slots: use --transfer features")
    weights, bias = linear()
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if weights.shape != (1 << bits,):
        raise TransferError(f"source weights have {weights.shape[0]} slots, this learner {1 << bits}")
    return weights, float(bias)


def start_at(model: HashedLogisticRegression, weights: np.ndarray) -> HashedLogisticRegression:
    """Set ``model`` (fresh) so that its weights are ``weights`` (see the module docstring for FTRL)."""
    weights = np.asarray(weights, dtype=np.float64)
    if isinstance(model, FTRLProximalClassifier):
        model.n[:] = 0.0
        model.z[:] = -weights * (model.beta / model.alpha + model.l2) - np.sign(weights) * model.l1
        model.set_weights(model.closed_form(model.z, model.n))
    else:
        model.set_weights(weights)
    return model


def finetune(model: Any, scorer: Any, bits: int) -> HashedLogisticRegression:
    """``model`` started at ``scorer``'s weights (its bias folded into the ``bias`` slot)."""
    if not isinstance(model, HashedLogisticRegression):
        raise TransferError(f"--warm-start needs one of our learners (ftrl, adam, sgd), not {type(model).__name__}")
    weights, bias = global_terms(scorer, bits)
    weights = weights.copy()
    weights[bias_slot(bits)] += bias
    return start_at(model, weights)


class ResidualModel:
    """``p = σ(a·g(x) + u·h(x) + w·x)``: a frozen extractor's logit ``g`` and, for a deep extractor, its
    hidden-layer activations ``h`` (``hidden_many``) as learned dense inputs of a local learner; ``hidden``
    False keeps the logit alone. A wide extractor has no hidden layer: its logit is the whole extractor."""

    def __init__(self, head: HashedLogisticRegression, extractor: Any, hidden: bool = True) -> None:
        if not isinstance(head, HashedLogisticRegression):
            raise TransferError(f"--transfer features needs one of our learners as head, not {type(head).__name__}")
        if not hasattr(extractor, "decision_many"):
            raise TransferError(f"{type(extractor).__name__} gives no logits (decision_many) to use as a feature")
        self.head = head
        self.extractor = extractor
        self.bits = head.bits
        self.slot = hash_key(GLOBAL_LOGIT_KEY, head.n_features - 1)
        units = int(getattr(extractor, "hidden_units", 0)) if hidden else 0
        self.hidden_slots = np.array([hash_key(f"{HIDDEN_KEY}{k}", head.n_features - 1) for k in range(units)],
                                     dtype=np.int64)
        if self.slot in self.hidden_slots:
            raise TransferError(f"{head.bits} feature bits put a hidden unit on the global logit's slot; use more bits")
        start = np.zeros(head.n_features)
        start[self.slot] = 1.0
        start_at(head, start)

    @property
    def extractor_layer(self) -> str:
        """What the extractor hands the head (the ``extractor_layer`` lineage tag)."""
        units = len(getattr(self, "hidden_slots", ()))
        return f"logit+deep_hidden[{units}]" if units else "logit"

    @property
    def scale(self) -> float:
        """``a``: how much the local model trusts the global logit (1 at the start)."""
        return float(self.head.weights[self.slot])

    def _with_logit(self, indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows plus the extractor's outputs on their reserved slots: the logit, then the hidden units."""
        indices, values = np.asarray(indices), np.asarray(values)
        extracted = [np.asarray(self.extractor.decision_many(indices, values.astype(np.float32)), np.float64)[:, None]]
        slots = [self.slot]
        hidden_slots = getattr(self, "hidden_slots", ())  # absent in learners checkpointed before hidden inputs
        if len(hidden_slots):
            extracted.append(np.asarray(self.extractor.hidden_many(indices, values.astype(np.float32)), np.float64))
            slots.extend(hidden_slots.tolist())
        columns = np.broadcast_to(np.array(slots, dtype=indices.dtype), (indices.shape[0], len(slots)))
        return np.hstack([indices, columns]), np.hstack([values.astype(np.float64), *extracted])

    def decision_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        return self.head.decision_many(*self._with_logit(indices, values))

    def predict_proba_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        return sigmoid(self.decision_many(indices, values))

    def learn_many(self, indices: np.ndarray, values: np.ndarray, y: Any) -> np.ndarray:
        """Learn a mini-batch (the head only); returns the probabilities predicted before the update."""
        return self.head.learn_many(*self._with_logit(indices, values), y)

    def __getattr__(self, name: str) -> Any:
        if name == "linear_terms" and hasattr(self.__dict__.get("extractor"), "linear_terms"):
            return self._linear_terms
        raise AttributeError(name)

    def _linear_terms(self) -> tuple[np.ndarray, float]:
        """``(a·G + w, a·b)``: the same logit as one linear model over the slots (the reserved slot
        carries no serving feature, so its ``a`` is taken out)."""
        global_weights, global_bias = global_terms(self.extractor, self.bits)
        a = self.scale
        combined = self.head.weights + a * global_weights
        combined[self.slot] -= a
        return combined, a * global_bias


def parse_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``(name, alias, version)`` of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    match = _URI.match(uri)
    if match is None:
        raise TransferError(f"--warm-start expects models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}")
    return match["name"], match["alias"], match["version"]


def load_source(settings: Any, uri: str) -> tuple[Any, dict[str, Any]]:
    """The bundle behind ``uri`` (pinned to the version its alias points at now) and its lineage facts."""
    from mlflow.exceptions import MlflowException

    from registry.models import RegistryError, load_bundle, resolve

    name, alias, version = parse_uri(uri)
    try:
        version = version or resolve(settings, name, alias)
        if version is None:
            raise TransferError(f"model {name!r} has no alias {alias!r}")
        bundle = load_bundle(settings, f"models:/{name}/{version}")
    except (MlflowException, RegistryError, OSError) as exc:
        raise TransferError(f"cannot load {uri}: {str(exc).splitlines()[0]}") from exc
    if bundle.feature_bits != settings.feature_bits:
        raise TransferError(f"{uri} uses {bundle.feature_bits} feature bits, this learner {settings.feature_bits}")
    return bundle, {"warm_start": uri, "source_model": name, "source_version": str(version),
                    "source_kind": bundle.kind}


def warm_start(settings: Any, model: Any, uri: str | None, method: str) -> Any:
    """``model`` unchanged without ``uri``; else started from that version by ``method`` (module docstring)."""
    if uri is None:
        return model
    if method not in TRANSFER_METHODS:
        raise TransferError(f"unknown transfer method {method!r}; choose one of {', '.join(TRANSFER_METHODS)}")
    if not isinstance(model, HashedLogisticRegression):
        raise TransferError(f"--warm-start needs one of our learners (ftrl, adam, sgd), not {type(model).__name__}")
    bundle, source = load_source(settings, uri)
    bits = settings.feature_bits
    started = finetune(model, bundle.model, bits) if method == "finetune" else ResidualModel(model, bundle.model)
    started.transfer_source = {"transfer": method, **source}
    if method == "features":
        started.transfer_source["extractor_layer"] = started.extractor_layer
    return started


def transfer_lineage(model: Any) -> dict[str, Any]:
    """What a published version records about its start (empty for a learner started from nothing)."""
    return dict(getattr(model, "transfer_source", None) or {})


__all__ = ["TRANSFER_METHODS", "GLOBAL_LOGIT_KEY", "HIDDEN_KEY", "TransferError", "ResidualModel", "warm_start", "finetune",
           "start_at", "global_terms", "bias_slot", "transfer_lineage", "load_source", "parse_uri"]
