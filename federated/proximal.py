"""FedProx with the proximal term of Li et al. 2020, built from TFF's public learning-process pieces.

TFF 0.87's proximal client work (``build_weighted_fed_prox`` / ``build_unweighted_fed_prox``) adds
``mu * (w_global - w)`` to each local gradient: the gradient of ``-(mu/2)||w - w_global||^2``, which pushes
every local model *away* from the broadcast global model. FedProx's local objective is
``F_k(w) + (mu/2)||w - w_global||^2``, gradient ``grad F_k(w) + mu * (w - w_global)``. :func:`build_fed_prox`
composes TFF's broadcast, our model-delta client work with that term, the caller's aggregator and TFF's
apply-optimizer finalizer, exactly as TFF's builder does otherwise (same state, so the same
``get_model_weights`` / ``set_model_weights``). The merchant groups (``federated.groups``) use
:func:`proximal_gradients` too. Design notes: ``federated/README.md``, "FedProx's sign".
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from federated.model import initial_weights_computation


def proximal_gradients(grads: Sequence[Any], weights: Sequence[Any], initial: Sequence[Any], mu: float) -> list:
    """``grads`` of the local loss plus ``mu * (w - w_global)``, the gradient of ``(mu/2)||w - w_global||^2``."""
    import tensorflow as tf

    return [tf.add(g, mu * (w - w0)) for g, w, w0 in zip(grads, weights, initial)]


def local_step(model, weights, optimizer, initial, mu: float):
    """One local optimizer step ``(batch, optimizer state) -> (examples, optimizer state, assignments)`` on
    ``weights`` (the model's), with FedProx's term when ``mu > 0``; the caller orders its next op after the
    returned assignments. Shared by the per-merchant client work here and the merchant groups."""
    import tensorflow as tf

    def step(batch, opt_state):
        with tf.GradientTape() as tape:
            output = model.forward_pass(batch, training=True)
        grads = tape.gradient(output.loss, weights.trainable)
        if mu > 0:
            grads = proximal_gradients(grads, weights.trainable, initial.trainable, mu)
        opt_state, updated = optimizer.next(opt_state, tuple(weights.trainable), tuple(grads))
        assigned = [v.assign(u) for v, u in zip(weights.trainable, updated)]
        return tf.cast(output.num_examples, tf.int64), opt_state, assigned

    return step


def _local_training(model, optimizer, mu: float, uniform: bool):
    """A ``tf.function`` ``(global weights, batches) -> (ClientResult, unfinalized metrics)``: TFF's model-delta
    client update (dataset reduce, non-finite updates zeroed with their weight) with the proximal term above."""
    import tensorflow as tf
    import tensorflow_federated as tff

    weights = tff.learning.models.ModelWeights.from_model(model)

    @tf.function
    def train(initial, data):
        tf.nest.map_structure(lambda v, t: v.assign(t), weights, initial)

        def step(state, batch):
            count, opt_state = state
            examples, opt_state, assigned = local_step(model, weights, optimizer, initial, mu)(batch, opt_state)
            with tf.control_dependencies(assigned):
                return count + examples, opt_state

        specs = tuple(tf.TensorSpec(v.shape, v.dtype) for v in weights.trainable)
        count, _ = data.reduce((tf.constant(0, tf.int64), optimizer.initialize(specs)), step)
        delta = tf.nest.map_structure(tf.subtract, initial.trainable, weights.trainable)
        delta, non_finite = tff.learning.tensor_utils.zero_all_if_any_non_finite(delta)
        weight = 1.0 if uniform else tf.cast(count, tf.float32)
        weight = tf.where(non_finite > 0, tf.constant(0.0), weight)
        return (tff.learning.templates.ClientResult(update=delta, update_weight=weight),
                model.report_local_unfinalized_metrics())

    return train


def build_proximal_client_work(model_fn: Callable[[], Any], optimizer, mu: float, uniform: bool):
    """TFF ``ClientWorkProcess``: each client trains the broadcast weights on its batches with FedProx's term and
    returns its model delta, weighted by its example count (or 1 when ``uniform``), plus summed metrics."""
    import tensorflow as tf
    import tensorflow_federated as tff

    with tf.Graph().as_default():
        model = model_fn()
        metrics_aggregation = tff.learning.metrics.sum_then_finalize(model.metric_finalizers())
        data_type = tff.types.SequenceType(tff.types.tensorflow_to_type(model.input_spec))
    weights_type = tff.learning.models.weights_type_from_model(model_fn)

    @tff.tensorflow.computation(weights_type, data_type)
    def client_update(initial, data):
        return _local_training(model_fn(), optimizer, mu, uniform)(initial, data)

    @tff.federated_computation()
    def init_fn():
        return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(init_fn.type_signature.result, tff.FederatedType(weights_type, tff.CLIENTS),
                               tff.FederatedType(data_type, tff.CLIENTS))
    def next_fn(state, weights, data):
        result, outputs = tff.federated_map(client_update, (weights, data))
        measurements = tff.federated_zip(collections.OrderedDict(train=metrics_aggregation(outputs)))
        return tff.templates.MeasuredProcessOutput(state, result, measurements)

    return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)


def build_fed_prox(model_fn: Callable[[], Any], *, mu: float, client_optimizer, server_optimizer, model_aggregator,
                   uniform: bool):
    """FedProx learning process: TFF's broadcast, :func:`build_proximal_client_work`, ``model_aggregator`` (a
    weighted factory, or an unweighted one with ``uniform``, as TFF's unweighted FedProx takes it) and TFF's
    apply-optimizer finalizer, composed as ``tff.learning.algorithms.build_weighted_fed_prox`` does."""
    import tensorflow_federated as tff

    weights_type = tff.learning.models.weights_type_from_model(model_fn)

    initial_weights = initial_weights_computation(model_fn)
    if uniform:
        model_aggregator = tff.aggregators.as_weighted_aggregator(model_aggregator)
    aggregator = model_aggregator.create(weights_type.trainable, tff.TensorType(np.float32))
    return tff.learning.templates.compose_learning_process(
        initial_weights,
        tff.learning.templates.build_broadcast_process(weights_type),
        build_proximal_client_work(model_fn, client_optimizer, mu, uniform),
        aggregator,
        tff.learning.templates.build_apply_optimizer_finalizer(server_optimizer, weights_type))
