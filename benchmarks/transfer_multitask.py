"""Multi-task (click + purchase) on the generated stream with late conversions: calibration and cold start.

The stream: ``MERCHANTS`` generated merchants, ``EVENTS`` clicks + orders over 14 days, orders delayed by
``streams.generator``'s late-conversion option (lognormal, median ``DELAY_S``) on top of the session's
minutes. Every impression is featurized as in the learner worker (``Featurizer.slots_for``) and replayed in
event time through :class:`online.multitask.MultiTaskClassifier` and
:class:`online.attribution.AttributionJoiner` (window ``WINDOW_S``): test-then-train, so each impression's
P(click) and each click's P(order | click) are predicted before any of its labels is known.

* **Calibration**: ECE (10 equal-mass bins, :func:`fedstream.metrics.expected_calibration_error`) of
  P(order | click) over clicks and of P(order | impression) = P(click) P(order | click) over impressions,
  against the *fully attributed* labels (:func:`online.attribution.attributed_labels` over the whole stream,
  same window). Learning rates were chosen on calibration seed 1 only; report seeds are run once.
* **Cold start, arm (f)**: a merchant held out of the stream joins with 0, 100, 1,000 events; click AUC /
  logloss on the ``WINDOW`` clicks after each point for a click-only learner from nothing (local), the same
  multi-task learner from nothing, and the multi-task learner trained on the other merchants first
  (multi-task + shared: its shared and head weights are the start); conversion AUC for the multi-task arms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from fedstream.metrics import expected_calibration_error, mean_logloss, roc_auc
from online.attribution import AttributionJoiner, attributed_labels
from online.multitask import MultiTaskClassifier, MultiTaskState
from streams.features import FeatureContext, Featurizer
from streams.generator import GeneratorConfig, generate
from streams.schemas import Click, Order

QUICK = os.environ.get("BENCH_QUICK") == "1"
MERCHANTS = 5
EVENTS = 120_000 if QUICK else 400_000
DELAY_S = 3600.0
WINDOW_S = 86_400.0
BITS = 18
BINS = 10
CALIBRATION_SEEDS = [1]
REPORT_SEEDS = [2, 3] if QUICK else [2, 3, 4, 5]


@dataclass
class Replay:
    """Per impression: merchant, time, P(click), P(order | click) (both before learning), clicked, and the
    (merchant, user, item, time) of every impression; orders as (merchant, user, items, time)."""

    merchant: list[str] = field(default_factory=list)
    p_click: list[float] = field(default_factory=list)
    p_conversion: list[float] = field(default_factory=list)
    clicked: list[bool] = field(default_factory=list)
    keys: list[tuple[str, str, str, float]] = field(default_factory=list)
    orders: list[tuple[str, str, list[str], float]] = field(default_factory=list)


def stream(seed: int, events: int = EVENTS) -> list:
    return list(generate(GeneratorConfig(merchants=MERCHANTS, events=events, seed=seed, conversion_delay_s=DELAY_S)))


def replay(events: list, state: MultiTaskState, context: FeatureContext | None = None) -> Replay:
    """Test-then-train over ``events`` in order (see the module docstring)."""
    featurizer, context, out = Featurizer(state.model.bits), context or FeatureContext(), Replay()
    for event in events:
        if type(event) is Click:
            row = np.array(featurizer.slots_for(event.merchant_id, event.user_id, event.item_id, event.timestamp,
                                                event.device, event.page, event.position, context), dtype=np.int64)
            p_click, p_conversion = state.click(event, row)
            out.merchant.append(event.merchant_id)
            out.p_click.append(p_click)
            out.p_conversion.append(p_conversion)
            out.clicked.append(bool(event.clicked))
            out.keys.append((event.merchant_id, event.user_id, event.item_id, event.timestamp))
        elif type(event) is Order:
            out.orders.append((event.merchant_id, event.user_id, [line.item_id for line in event.items],
                               event.timestamp))
            state.order(event)
        context.observe(event)
    return out


def calibration(result: Replay) -> dict:
    """ECE and AUC of P(order | click) and P(order | impression) against the fully attributed labels."""
    converted = np.array(attributed_labels(result.keys, result.orders, WINDOW_S))
    clicked = np.array(result.clicked)
    p_click, p_conversion = np.array(result.p_click), np.array(result.p_conversion)
    ordered = clicked & converted
    return {
        "clicks": int(clicked.sum()), "impressions": len(clicked), "conversion_rate": float(ordered.sum() / clicked.sum()),
        "ece_order_given_click": expected_calibration_error(ordered[clicked], p_conversion[clicked], BINS),
        "ece_order_given_impression": expected_calibration_error(ordered, p_click * p_conversion, BINS),
        "ece_click": expected_calibration_error(clicked, p_click, BINS),
        "auc_order_given_click": roc_auc(ordered[clicked], p_conversion[clicked]),
        "auc_order_given_impression": roc_auc(ordered, p_click * p_conversion),
        "auc_click": roc_auc(clicked, p_click),
    }


def run_calibration(seed: int, **params: float) -> dict:
    state = MultiTaskState(MultiTaskClassifier(bits=BITS, **params), AttributionJoiner(window_s=WINDOW_S))
    return calibration(replay(stream(seed), state)) | {"seed": seed}


if __name__ == "__main__":
    import sys
    import time

    started = time.perf_counter()
    print(sys.argv[1:], run_calibration(int(sys.argv[1]), learning_rate=float(sys.argv[2]), shared_rate=float(sys.argv[3])),
          f"{time.perf_counter() - started:.0f} s")
