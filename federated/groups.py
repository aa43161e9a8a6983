"""Merchant groups: fewer TFF client calls than merchants in simulation, the same round as one client per merchant.

A *group* is one CLIENTS-placed value holding several merchants' ``(folder, seed)`` pairs. Its client work
trains, for each merchant in turn, a fresh copy of the broadcast global model on that merchant's batches
(same order, optimizer and FedProx term as the per-merchant client work), clips the merchant's update
when ``--clip`` is set, and adds it to the group's partial sums (what the aggregator needs: Σ w·Δ and
Σ w·[Δ ≠ 0] for the touched mean, Σ w·Δ and Σ w for the plain mean, Σ clip(Δ) for fixed-clip DP) and
the merchant's unfinalized metrics to the group's. The server sums the groups' sums, divides as the
per-merchant aggregators do (fixed-clip DP adds its Gaussian noise to the sum first) and applies the
server optimizer with TFF's own finalizer. Federated evaluation runs in groups the same way
(:class:`GroupedEvaluation`: each merchant's held-out metrics summed, then TFF's ``sum_then_finalize``).
Design notes: `federated/README.md`, "Merchant groups".

Example (not run here: it takes TFF's ~11 s import):
    >>> process = build_round_process(tff_model_fn(ModelConfig(bits=14)), FederatedConfig(client_groups=2))  # doctest: +SKIP
    >>> output = process.next(process.initialize(), [(folder, seed), ...])  # doctest: +SKIP
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from federated.model import initial_weights_computation
from federated.proximal import local_step
from federated.stores import batch_at, column_paths, epoch_order, read_columns
from federated.training import (
    EVAL_BATCH, FederatedConfig, build_evaluation, build_process, client_optimizer, server_optimizer,
)
from fedstream.logs import get_logger

log = get_logger("federated.groups")

GROUPED_AGGREGATIONS = ("touched", "mean")  # the means whose per-merchant terms a group can sum


def per_merchant_reason(config: FederatedConfig) -> str | None:
    """Why ``config``'s rounds must keep one TFF client per merchant, or None when groups apply."""
    if config.client_groups <= 1:
        return "client_groups <= 1"
    if config.secure_agg:
        return "secure aggregation sums each merchant's update itself"
    if config.dp and config.clip is None:
        return "adaptive-clip DP estimates its clip from each merchant's update norm"
    if not config.dp and config.aggregation not in GROUPED_AGGREGATIONS:
        return f"aggregation {config.aggregation!r} has no group sums (only {', '.join(GROUPED_AGGREGATIONS)})"
    return None


def build_round_process(model_fn: Callable[[], Any], config: FederatedConfig, label_width: int = 1):
    """The training process of a simulated run: merchant groups where they apply, else :func:`build_process`."""
    reason = per_merchant_reason(config)
    if reason is not None:
        if config.client_groups > 1:
            log.info("one TFF client per merchant", extra={"reason": reason})
        return build_process(model_fn, config, label_width)
    return GroupedProcess(model_fn, config, label_width)


def build_round_evaluation(model_fn: Callable[[], Any], config: FederatedConfig, label_width: int = 1):
    """The federated evaluation of a simulated run: merchant groups unless ``client_groups <= 1``, else
    :func:`build_evaluation`. Evaluation sums plain metrics (no secure aggregation, no DP), so it is grouped
    also where training keeps one client per merchant."""
    if config.client_groups <= 1:
        return build_evaluation(model_fn, label_width)
    return GroupedEvaluation(model_fn, config.client_groups, label_width)


def split_groups(clients: Sequence[tuple[str, int]], groups: int) -> list[tuple[list[str], list[int]]]:
    """``clients`` in at most ``groups`` contiguous groups of near-equal size (one empty group when none)."""
    count = max(1, min(groups, len(clients)))
    bounds = np.linspace(0, len(clients), count + 1).round().astype(int)
    return [([f for f, _ in clients[a:b]], [int(s) for _, s in clients[a:b]]) for a, b in zip(bounds, bounds[1:])]


@dataclass
class RoundOutput:
    """What :meth:`GroupedProcess.next` returns: the new state and metrics shaped as TFF's learning process's."""

    state: Any
    metrics: dict


class GroupedProcess:
    """FedAvg / FedProx (optionally clipped, or fixed-clip DP) over merchant groups, in TFF's functional style:
    ``initialize()``, ``next(state, [(folder, seed), ...])``, ``get_model_weights`` / ``set_model_weights``."""

    def __init__(self, model_fn: Callable[[], Any], config: FederatedConfig, label_width: int = 1) -> None:
        import tensorflow_federated as tff

        self.groups = config.client_groups
        weights_type = tff.learning.models.weights_type_from_model(model_fn)

        initial_weights = initial_weights_computation(model_fn)

        finalizer = tff.learning.templates.build_apply_optimizer_finalizer(server_optimizer(config), weights_type)
        group_work = _group_work(model_fn, config, label_width, weights_type)
        server_result = _server_result(config, group_work.type_signature.result[0])
        metrics_sum = _metrics_aggregation(model_fn)

        @tff.federated_computation()
        def init_fn():
            return tff.federated_zip(collections.OrderedDict(
                global_model_weights=tff.federated_eval(initial_weights, tff.SERVER),
                finalizer=finalizer.initialize()))

        state_type = init_fn.type_signature.result
        group_type = tff.FederatedType(_group_type(), tff.CLIENTS)

        @tff.federated_computation(state_type, group_type)
        def next_fn(state, groups):
            sums, metrics = tff.federated_map(
                group_work, (tff.federated_broadcast(state.global_model_weights), groups))
            update = tff.federated_map(server_result, tff.federated_sum(sums))
            final = finalizer.next(state.finalizer, state.global_model_weights, update)
            new_state = tff.federated_zip(collections.OrderedDict(global_model_weights=final.result,
                                                                  finalizer=final.state))
            return new_state, metrics_sum(metrics)

        @tff.tensorflow.computation(state_type.member)
        def get_weights(state):
            return state["global_model_weights"]

        @tff.tensorflow.computation(state_type.member, state_type.member.global_model_weights)
        def set_weights(state, weights):
            return collections.OrderedDict(global_model_weights=weights, finalizer=state["finalizer"])

        self.initialize, self._next = init_fn, next_fn
        self.get_model_weights, self.set_model_weights = get_weights, set_weights

    def next(self, state, clients: Sequence[tuple[str, int]]) -> RoundOutput:
        """One round over ``clients`` (one ``(folder, seed)`` per merchant), run as ``self.groups`` TFF clients."""
        groups = [collections.OrderedDict(folders=np.array(f, dtype=object), seeds=np.array(s, np.int64))
                  for f, s in split_groups(list(clients), self.groups)]
        state, train = self._next(state, groups)
        return RoundOutput(state, {"client_work": {"train": train}})


class GroupedEvaluation:
    """TFF's federated evaluation (``build_fed_eval``: held-out batches of ``EVAL_BATCH`` in time order, metrics
    summed then finalized) over merchant groups: ``initialize()``, ``set_model_weights(state, weights)``,
    ``next(state, [folder, ...])``, whose metrics sit where ``build_fed_eval`` puts them."""

    def __init__(self, model_fn: Callable[[], Any], groups: int, label_width: int = 1) -> None:
        import tensorflow_federated as tff

        self.groups = groups
        weights_type = tff.learning.models.weights_type_from_model(model_fn)
        metrics_sum = _metrics_aggregation(model_fn)

        initial_weights = initial_weights_computation(model_fn)

        @tff.tensorflow.computation(weights_type, tff.types.StructType([("folders", tff.TensorType(np.str_, [None]))]))
        def group_eval(weights, group):
            return _evaluate_group(model_fn(), label_width)(weights, group.folders)

        @tff.federated_computation(tff.FederatedType(weights_type, tff.SERVER),
                                   tff.FederatedType(group_eval.type_signature.parameter[1], tff.CLIENTS))
        def next_fn(weights, groups):
            return metrics_sum(tff.federated_map(group_eval, (tff.federated_broadcast(weights), groups)))

        @tff.tensorflow.computation(weights_type, weights_type)
        def set_weights(state, weights):
            return weights

        self._initial, self._next, self.set_model_weights = initial_weights, next_fn, set_weights

    def initialize(self):
        """The evaluation's state: the weights it evaluates (the model's initial weights until set)."""
        return self._initial()

    def get_model_weights(self, state):
        return state

    def next(self, state, folders: Sequence[str]) -> RoundOutput:
        """Metrics of the weights in ``state`` on the merchants' held-out ``folders``, as ``self.groups`` clients."""
        groups = [collections.OrderedDict(folders=np.array(f, dtype=object))
                  for f, _ in split_groups([(f, 0) for f in folders], self.groups)]
        metrics = self._next(state, groups)
        return RoundOutput(state, {"client_work": {"eval": {"current_round_metrics": metrics}}})


def _evaluate_group(model, label_width: int):
    """A ``tf.function``: the summed unfinalized metrics of ``model`` at the given weights on each merchant's
    held-out batches (``EVAL_BATCH`` rows in file order, as ``eval_dataset_computation``'s dataset)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    weights = tff.learning.models.ModelWeights.from_model(model)

    def merchant_metrics(folder):
        model.reset_metrics()  # a fresh model per merchant, as build_fed_eval's client
        columns = read_columns(column_paths(folder), label_width)
        order = epoch_order(tf.shape(columns[2])[0], 1)
        total = tf.size(order, out_type=tf.int64)

        def step(start, count):
            output = model.forward_pass(batch_at(columns, order, start, EVAL_BATCH), training=False)
            return start + EVAL_BATCH, count + tf.cast(output.num_examples, tf.int64)

        zero = tf.constant(0, tf.int64)
        _, count = tf.while_loop(lambda start, _: start < total, step, (zero, zero))
        with tf.control_dependencies([count]):
            return tf.nest.map_structure(tf.identity, model.report_local_unfinalized_metrics())

    @tf.function
    def evaluate(initial, folders):
        tf.nest.map_structure(lambda v, t: v.assign(t), weights, initial)
        zero = tf.nest.map_structure(tf.zeros_like, model.report_local_unfinalized_metrics())

        def body(i, sums):
            return i + 1, tf.nest.map_structure(tf.add, sums, merchant_metrics(folders[i]))

        _, sums = tf.while_loop(lambda i, _: i < tf.size(folders), body, (tf.constant(0), zero))
        return sums

    return evaluate


def _group_type():
    import tensorflow_federated as tff

    return tff.types.StructType([("folders", tff.TensorType(np.str_, [None])),
                                 ("seeds", tff.TensorType(np.int64, [None]))])


def _metrics_aggregation(model_fn):
    """TFF's ``sum_then_finalize`` over the model's metrics (what its FedAvg client work uses)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    with tf.Graph().as_default():
        return tff.learning.metrics.sum_then_finalize(model_fn().metric_finalizers())


def _group_work(model_fn, config: FederatedConfig, label_width: int, weights_type):
    """TFF computation ``(global weights, group) -> (the group's partial sums, its unfinalized metrics)``."""
    import tensorflow_federated as tff

    @tff.tensorflow.computation(weights_type, _group_type())
    def group_work(initial, group):
        model = model_fn()
        return _train_group(model, config, label_width)(initial, group.folders, group.seeds)

    return group_work


def _terms(config: FederatedConfig, delta, weight):
    """One merchant's contribution to the group's sums (``delta`` already clipped when clipping is on)."""
    import tensorflow as tf

    if config.dp:
        return (delta,)
    weighted = [d * weight for d in delta]
    if config.aggregation == "touched":
        return (weighted, [tf.cast(tf.not_equal(d, 0), d.dtype) * weight for d in delta])
    return (weighted, weight)


def _clip(config: FederatedConfig, delta):
    """``delta`` clipped to L2 norm ``config.clip`` as TFF's DP query (DP) or ``clipping_factory`` does it."""
    import tensorflow as tf

    if config.clip is None:
        return delta
    if config.dp:
        return tf.clip_by_global_norm(delta, config.clip)[0]
    norm = tf.math.sqrt(tf.reduce_sum(tf.stack([tf.norm(d, ord=2) ** 2 for d in delta])))
    clip = tf.constant(config.clip, tf.float32)
    return tf.cond(norm > clip, lambda: [d / (norm / clip) for d in delta], lambda: list(delta))


def _train_group(model, config: FederatedConfig, label_width: int):
    """A ``tf.function`` training ``model`` from the global weights on each merchant of a group in turn."""
    import tensorflow as tf
    import tensorflow_federated as tff

    optimizer = client_optimizer(config)
    weights = tff.learning.models.ModelWeights.from_model(model)
    mu = config.prox_mu

    def merchant_update(initial, folder, seed):
        tf.nest.map_structure(lambda v, t: v.assign(t), weights, initial)
        model.reset_metrics()
        specs = tuple(tf.TensorSpec(v.shape, v.dtype) for v in weights.trainable)
        columns = read_columns(column_paths(folder), label_width)  # the batches dataset_from_folder makes, without tf.data
        order = epoch_order(tf.shape(columns[2])[0], config.client_epochs, seed)

        def step(start, count, opt_state):
            batch = batch_at(columns, order, start, config.batch_size)
            examples, opt_state, assigned = local_step(model, weights, optimizer, initial, mu)(batch, opt_state)
            with tf.control_dependencies(assigned):
                return start + config.batch_size, count + examples, opt_state

        total = tf.size(order, out_type=tf.int64)
        _, count, _ = tf.while_loop(lambda start, *_: start < total, step,
                                    (tf.constant(0, tf.int64), tf.constant(0, tf.int64), optimizer.initialize(specs)))
        with tf.control_dependencies([count]):
            delta = [a - b for a, b in zip(initial.trainable, weights.trainable)]
        delta, non_finite = tff.learning.tensor_utils.zero_all_if_any_non_finite(delta)  # as TFF's client work ...
        finite = tf.equal(non_finite, 0)
        weight = tf.where(finite, 1.0 if config.dp else tf.cast(count, tf.float32), 0.0)  # ... and its weight
        metrics = tf.nest.map_structure(lambda m: tf.where(finite, m, tf.zeros_like(m)),
                                        model.report_local_unfinalized_metrics())  # ... and its metrics
        return _terms(config, _clip(config, delta), weight), metrics

    @tf.function
    def train(initial, folders, seeds):
        zero_terms = _terms(config, [tf.zeros_like(t) for t in initial.trainable], tf.constant(0.0))
        zero_metrics = tf.nest.map_structure(tf.zeros_like, model.report_local_unfinalized_metrics())

        def body(i, sums, metrics):
            terms, merchant_metrics = merchant_update(initial, folders[i], seeds[i])
            return (i + 1, tf.nest.map_structure(tf.add, sums, terms),
                    tf.nest.map_structure(tf.add, metrics, merchant_metrics))

        _, sums, metrics = tf.while_loop(lambda i, *_: i < tf.size(folders), body,
                                         (tf.constant(0), zero_terms, zero_metrics))
        return sums, metrics

    return train


def _server_result(config: FederatedConfig, sums_type):
    """TFF computation ``summed group sums -> the model update`` (the division each aggregator does)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    @tff.tensorflow.computation(sums_type)
    def server_result(sums):
        if config.dp:  # DifferentiallyPrivateFactory.gaussian_fixed: noise of stddev z*C on the sum, / cohort size
            stddev = config.noise_multiplier * config.clip
            total = sums[0]
            return [(t + tf.random.normal(tf.shape(t), stddev=stddev, dtype=t.dtype)) / float(config.clients_per_round)
                    for t in total]
        if config.aggregation == "touched":  # touched_mean_factory: per coordinate over who moved it
            total, touched = sums
            return [tf.math.divide_no_nan(t, w) for t, w in zip(total, touched)]
        total, weight = sums  # MeanFactory: the weighted sum over the weight sum
        return [tf.math.divide(t, weight) for t in total]

    return server_result
