"""A weighted mean for sparse models: each coordinate averaged over the clients whose update touched it.

Design notes: `federated/README.md`, `federated/aggregators.py`.

Example (not run here: it takes TFF's ~11 s import):
    >>> aggregator = touched_mean_factory()                                # doctest: +SKIP
    >>> process = build_weighted_fed_avg(model_fn, model_aggregator=aggregator)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def touched_mean_factory():
    """A ``tff.aggregators.WeightedAggregationFactory`` computing the touched-coordinate weighted mean."""
    import tensorflow as tf
    import tensorflow_federated as tff

    class TouchedMeanFactory(tff.aggregators.WeightedAggregationFactory):
        """Per coordinate: Σ_k w_k·Δ_k / Σ_k w_k·[Δ_k ≠ 0] (0 where no client touched it)."""

        def create(self, value_type, weight_type):
            @tff.tensorflow.computation(value_type, weight_type)
            def client_terms(value, weight):
                def weighted(v):
                    return v * tf.cast(weight, v.dtype)

                def touched(v):
                    return tf.cast(tf.not_equal(v, 0), v.dtype) * tf.cast(weight, v.dtype)

                return tf.nest.map_structure(weighted, value), tf.nest.map_structure(touched, value)

            @tff.tensorflow.computation(client_terms.type_signature.result)
            def normalize(sums):
                total, touched = sums
                return tf.nest.map_structure(tf.math.divide_no_nan, total, touched)

            @tff.federated_computation()
            def init_fn():
                return tff.federated_value((), tff.SERVER)

            @tff.federated_computation(init_fn.type_signature.result, tff.FederatedType(value_type, tff.CLIENTS),
                                       tff.FederatedType(weight_type, tff.CLIENTS))
            def next_fn(state, value, weight):
                sums = tff.federated_sum(tff.federated_map(client_terms, (value, weight)))
                return tff.templates.MeasuredProcessOutput(
                    state=state, result=tff.federated_map(normalize, sums),
                    measurements=tff.federated_value((), tff.SERVER))

            return tff.templates.AggregationProcess(init_fn, next_fn)

    return TouchedMeanFactory()


def plain_mean_factory():
    """TFF's example-weighted mean over all clients of the round (plain FedAvg)."""
    import tensorflow_federated as tff

    return tff.aggregators.MeanFactory()


# The one aggregation registry: name -> factory of the model-update mean. FederatedConfig.aggregation's
# Literal, its validation and `fedstream federated run --aggregation` all read it; DP and secure
# aggregation replace the mean (federated.training.build_aggregator), clipping wraps it.
AGGREGATIONS: dict[str, Callable[[], Any]] = {
    "touched": touched_mean_factory,
    "mean": plain_mean_factory,
}
