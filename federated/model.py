"""The federated click model over the shared hashed features, in Keras (for TFF) and in numpy (for serving).

Wide part: a logistic embedding bag, ``logit = b + Σ_f w[slot_f]·value_f`` (``Embedding(2**bits, 1)``).
Optional deep part: an 8-dim embedding bag of the same slots, then a small ReLU MLP, whose output is
added to the wide logit. :class:`NumpyScorer` is the same function over the Keras weights in plain
numpy: what registered versions carry, so serving never imports TensorFlow.

Multi-task (``ModelConfig(multitask=True)``, off by default): a purchase head shares the whole body (wide
and deep logit) and adds its own wide bag, ``P(order | click) = sigmoid(body + conversion bag)``; the model
outputs ``[P(click), P(order | impression) = P(click) P(order | click)]`` per row, trained against the
store's two label columns ``[clicked, ordered]`` (orders attributed to clicks by user, item and window:
``federated.stores.build_stores(attribution_window_s=...)``). One loss (the mean binary cross-entropy of the
two columns), so any aggregator averages it as it averages the single-task model.

Example:
    >>> config = ModelConfig(bits=10, deep=True)
    >>> scorer = NumpyScorer.initial(config)
    >>> indices = np.zeros((2, len(FIELDS)), np.int32); values = np.ones((2, len(FIELDS)), np.float32)
    >>> scorer.predict_proba_many(indices, values).shape
    (2,)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from streams.features import FIELDS

N_FIELDS = len(FIELDS)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the federated model. Keep ``bits`` small in tests (Embedding is 2**bits rows)."""

    bits: int = 16
    deep: bool = False
    embedding_dim: int = 8
    hidden: int = 16
    seed: int = 7
    multitask: bool = False

    @property
    def label_width(self) -> int:
        """Label columns per example: [clicked] or [clicked, ordered]."""
        return 2 if self.multitask else 1

    def __post_init__(self) -> None:
        if not 4 <= self.bits <= 24:
            raise ValueError(f"bits must be in [4, 24] for the Keras embedding, got {self.bits}")
        if self.embedding_dim < 1 or self.hidden < 1:
            raise ValueError("embedding_dim and hidden must be >= 1")

    @property
    def n_slots(self) -> int:
        return 1 << self.bits


def _layers():
    import tensorflow as tf

    @tf.keras.utils.register_keras_serializable(package="fedstream")
    class HashedEmbeddingBag(tf.keras.layers.Layer):
        """``Σ_f E[indices_f]·values_f (+ bias)``: an embedding bag over the (n, F) hashed slots."""

        def __init__(self, n_slots: int, dim: int, use_bias: bool = False, init_scale: float = 0.0,
                     seed: int = 0, **kwargs):
            super().__init__(**kwargs)
            self.n_slots, self.dim, self.use_bias = n_slots, dim, use_bias
            self.init_scale, self.seed = init_scale, seed

        def build(self, input_shape):
            init = (tf.keras.initializers.Zeros() if self.init_scale == 0 else
                    tf.keras.initializers.RandomUniform(-self.init_scale, self.init_scale, seed=self.seed))
            self.embeddings = self.add_weight(name="embeddings", shape=(self.n_slots, self.dim), initializer=init)
            self.bias = self.add_weight(name="bias", shape=(self.dim,), initializer="zeros") if self.use_bias else None
            super().build(input_shape)

        def call(self, inputs):
            indices, values = inputs
            rows = tf.gather(self.embeddings, indices)  # (b, F, dim)
            out = tf.reduce_sum(rows * tf.expand_dims(values, -1), axis=1)
            return out + self.bias if self.use_bias else out

        def get_config(self):
            return {**super().get_config(), "n_slots": self.n_slots, "dim": self.dim, "use_bias": self.use_bias,
                    "init_scale": self.init_scale, "seed": self.seed}

    return HashedEmbeddingBag


_BAG = None


def embedding_bag_layer():
    """The (registered once) Keras embedding-bag layer class."""
    global _BAG
    if _BAG is None:
        _BAG = _layers()
    return _BAG


def build_keras_model(config: ModelConfig):
    """An uncompiled Keras model: inputs ``{"indices": int32[·,F], "values": float32[·,F]}`` -> p(click)."""
    import tensorflow as tf

    bag = embedding_bag_layer()
    indices = tf.keras.Input(shape=(N_FIELDS,), dtype=tf.int32, name="indices")
    values = tf.keras.Input(shape=(N_FIELDS,), dtype=tf.float32, name="values")
    logit = bag(config.n_slots, 1, use_bias=True, name="wide")([indices, values])
    if config.deep:
        dense = bag(config.n_slots, config.embedding_dim, init_scale=0.05, seed=config.seed, name="deep_bag")
        hidden = tf.keras.layers.Dense(
            config.hidden, activation="relu", name="deep_hidden",
            kernel_initializer=tf.keras.initializers.GlorotUniform(seed=config.seed))(dense([indices, values]))
        deep_logit = tf.keras.layers.Dense(
            1, name="deep_out", kernel_initializer=tf.keras.initializers.GlorotUniform(seed=config.seed + 1))(hidden)
        logit = tf.keras.layers.Add(name="logit")([logit, deep_logit])
    prob = tf.keras.layers.Activation("sigmoid", name="p_click")(logit)
    if config.multitask:
        head = bag(config.n_slots, 1, use_bias=True, name="conversion")([indices, values])
        conversion = tf.keras.layers.Activation("sigmoid", name="p_conversion")(
            tf.keras.layers.Add(name="conversion_logit")([logit, head]))
        purchase = tf.keras.layers.Multiply(name="p_purchase")([prob, conversion])
        prob = tf.keras.layers.Concatenate(name="p_click_purchase")([prob, purchase])
    return tf.keras.Model(inputs={"indices": indices, "values": values}, outputs=prob, name="fedstream_ctr")


def input_spec(label_width: int = 1):
    """The element spec of a client dataset (see :func:`federated.stores.dataset_from_folder`)."""
    import tensorflow as tf

    features = {"indices": tf.TensorSpec([None, N_FIELDS], tf.int32),
                "values": tf.TensorSpec([None, N_FIELDS], tf.float32)}
    return features, tf.TensorSpec([None, label_width], tf.float32)


def keras_metrics(multitask: bool = False):
    """AUC and log loss of the click column; with ``multitask`` also of the purchase column."""
    import tensorflow as tf

    if not multitask:
        return [tf.keras.metrics.AUC(name="auc", num_thresholds=200),
                tf.keras.metrics.BinaryCrossentropy(name="logloss")]
    return [functools.partial(_column_metric, base, column, f"{prefix}{name}", **kwargs)
            for column, prefix in ((0, ""), (1, "purchase_")) for base, name, kwargs in
            ((tf.keras.metrics.AUC, "auc", {"num_thresholds": 200}),
             (tf.keras.metrics.BinaryCrossentropy, "logloss", {}))]


def _column_metric(base, column: int, name: str, **kwargs):
    """A Keras metric of one output/label column (TFF passes metrics the whole [n, 2] tensors; it gets
    constructors, as these metrics' configs do not rebuild them)."""

    class ColumnMetric(base):
        def update_state(self, y_true, y_pred, sample_weight=None):
            super().update_state(y_true[:, column:column + 1], y_pred[:, column:column + 1], sample_weight)

    return ColumnMetric(name=name, **kwargs)


def tff_model_fn(config: ModelConfig):
    """A no-argument ``model_fn`` building a fresh TFF model (TFF calls it inside its computations)."""

    def model_fn():
        import tensorflow as tf
        import tensorflow_federated as tff

        return tff.learning.models.from_keras_model(
            build_keras_model(config), input_spec=input_spec(config.label_width),
            loss=tf.keras.losses.BinaryCrossentropy(), metrics=keras_metrics(config.multitask))

    return model_fn


def initial_weights_computation(model_fn):
    """TFF computation ``() -> ModelWeights`` of a fresh model from ``model_fn``: a learning process's initial state."""
    import tensorflow_federated as tff

    @tff.tensorflow.computation()
    def initial_weights():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    return initial_weights


class NumpyScorer:
    """The federated model as numpy: ``predict_proba_many(indices, values)`` from the Keras weights.

    Picklable and TF-free, so a registered version can be served by the registry's pyfunc flavor. A
    wide-only model also exposes ``linear_terms()`` so :class:`registry.bundle.ModelBundle` ranks a whole
    catalog with its fast linear path.
    """

    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray]) -> None:
        self.config = config
        self.weights = {name: np.asarray(value, np.float32) for name, value in weights.items()}
        if self.weights["wide_embeddings"].shape != (config.n_slots, 1):
            raise ValueError(f"wide embeddings must be ({config.n_slots}, 1), got {self.weights['wide_embeddings'].shape}")
        if not config.deep:
            self.linear_terms = self._linear_terms  # only a wide model is linear in the slots

    @classmethod
    def from_keras(cls, config: ModelConfig, model) -> NumpyScorer:
        return cls(config, named_weights(model))

    @classmethod
    def initial(cls, config: ModelConfig) -> NumpyScorer:
        return cls.from_keras(config, build_keras_model(config))

    def _linear_terms(self) -> tuple[np.ndarray, float]:
        return self.weights["wide_embeddings"][:, 0], float(self.weights["wide_bias"][0])

    def decision_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        w = self.weights
        logit = (w["wide_embeddings"][indices, 0] * values).sum(axis=1) + w["wide_bias"][0]
        if self.config.deep:
            hidden = self.hidden_many(indices, values)
            logit = logit + (hidden @ w["deep_out_kernel"] + w["deep_out_bias"])[:, 0]
        return logit

    @property
    def hidden_units(self) -> int:
        """Width of the hidden layer (``deep_hidden``) a frozen extractor can hand a learner; 0: wide model."""
        return int(self.weights["deep_hidden_kernel"].shape[1]) if self.config.deep else 0

    def hidden_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        """The deep part's hidden-layer activations ``float32[n, hidden]`` (ReLU of ``deep_hidden``)."""
        if not self.config.deep:
            raise ValueError("a wide model has no hidden layer: its logit is the whole extractor")
        w, values = self.weights, np.asarray(values, np.float32)
        bag = (w["deep_bag_embeddings"][np.asarray(indices)] * values[..., None]).sum(axis=1)
        return np.maximum(bag @ w["deep_hidden_kernel"] + w["deep_hidden_bias"], 0.0)

    def predict_proba_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        z = np.clip(self.decision_many(np.asarray(indices), np.asarray(values, np.float32)), -35.0, 35.0)
        return 1.0 / (1.0 + np.exp(-z))

    def predict_purchase_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        """P(order | impression) = P(click) P(order | click) of a multi-task model."""
        if not self.config.multitask:
            raise ValueError("predict_purchase_many needs a multi-task model (ModelConfig(multitask=True))")
        indices, values = np.asarray(indices), np.asarray(values, np.float32)
        w = self.weights
        head = (w["conversion_embeddings"][indices, 0] * values).sum(axis=1) + w["conversion_bias"][0]
        z = np.clip(self.decision_many(indices, values) + head, -35.0, 35.0)
        return self.predict_proba_many(indices, values) / (1.0 + np.exp(-z))


def named_weights(model) -> dict[str, np.ndarray]:
    """``{"wide_embeddings": ..., "wide_bias": ..., "deep_hidden_kernel": ...}`` from a Keras model."""
    out = {}
    for layer in model.layers:
        for variable in layer.weights:
            short = variable.name.split("/")[-1].split(":")[0]
            out[f"{layer.name}_{short}"] = variable.numpy()
    return out


def assign_weights(model, weights) -> None:
    """Load TFF ``ModelWeights`` (trainable + non-trainable lists) into a Keras model, in place."""
    trainable = [np.asarray(w) for w in weights.trainable]
    non_trainable = [np.asarray(w) for w in weights.non_trainable]
    for variable, value in zip(model.trainable_weights, trainable):
        variable.assign(value)
    for variable, value in zip(model.non_trainable_weights, non_trainable):
        variable.assign(value)
