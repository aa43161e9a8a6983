"""A federated training run end to end: TFF rounds, MLflow logging every round, registered versions.

:func:`run_federated` is what ``fedstream federated run`` and the benchmark call. Every round logs its
aggregate metrics (train and federated-eval AUC/logloss, participants, dropouts, seconds) to one MLflow
run; every ``register_every`` rounds and at the end the global model is registered as a version of
``settings.federated.model_name`` (default ``fedstream-federated``; a TF-free :class:`~federated.model.NumpyScorer` inside a
:class:`~registry.bundle.ModelBundle`) with lineage tags, and the Keras model is logged with
``mlflow.tensorflow`` as an artifact of the run. The caller stops TFF's ``worker_binary`` afterwards
(:func:`fedstream.processes.stop_tff_workers`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from federated.groups import build_round_evaluation, build_round_process, per_merchant_reason
from federated.model import ModelConfig, NumpyScorer, assign_weights, build_keras_model, tff_model_fn
from federated.personalize import PersonalizationConfig, compare_merchants, summarize
from federated.stores import MerchantStore, StoreError
from federated.training import (
    FederatedConfig, FederatedData, RoundResult, build_evaluation, build_process, dp_epsilon, dp_sampling_rate,
    run_rounds, use_execution_context,
)
from fedstream.logs import get_logger
from fedstream.settings import FederatedSettings, Settings

log = get_logger("federated.runner")

MODEL_NAME = FederatedSettings.model_fields["model_name"].default  # the name unless settings or --register say


@dataclass
class RunOutcome:
    """What a run produced: per-round results, registered versions, final scorer and per-merchant table."""

    run_id: str | None
    history: list[RoundResult]
    scorer: NumpyScorer
    versions: list[str] = field(default_factory=list)
    personalization: list[dict] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, float] = field(default_factory=dict)
    privacy_notes: dict[str, str] = field(default_factory=dict)
    context: str = ""


def privacy_spent(config: FederatedConfig, n_clients: int, rounds: int) -> dict[str, float]:
    """(ε, δ) after ``rounds`` DP rounds, merchants Poisson-sampled with ``q = clients_per_round / n_clients``."""
    if not config.dp:
        return {}
    q = dp_sampling_rate(config, n_clients)
    return {"dp_epsilon": dp_epsilon(config.noise_multiplier, q, rounds, config.dp_delta), "dp_delta": config.dp_delta,
            "dp_noise_multiplier": config.noise_multiplier, "dp_sampling_rate": q}


def dp_verdict(epsilon: float, meaningful: float) -> str:
    """Plain words for an ε: what a reader of the run's tags and output needs to know first."""
    if epsilon > meaningful:
        return f"none: epsilon {epsilon:.3g} > {meaningful:g} gives no meaningful privacy guarantee"
    return f"epsilon {epsilon:.3g} <= {meaningful:g}"


def privacy_notes(config: FederatedConfig, privacy: Mapping[str, float], meaningful: float) -> dict[str, str]:
    """Run tags saying how a DP run sampled, how it accounted ε and whether that ε means anything."""
    if not config.dp:
        return {}
    return {
        "dp_sampling": "poisson: each merchant independently with probability dp_sampling_rate every round, "
                       "drawn from OS entropy (not seeded, not logged)",
        "dp_accounting": "RDP accountant, Poisson-subsampled Gaussian, add/remove one merchant: amplified by "
                         "the secret sampling; covers model updates only (not logged train/eval metrics)",
        "dp_guarantee": dp_verdict(privacy["dp_epsilon"], meaningful),
    }


def data_period(stores: Mapping[str, MerchantStore]) -> dict[str, float]:
    """Time span of the training data (from the stores' metadata: counts and timestamps, no events)."""
    starts, splits = [], []
    for store in stores.values():
        try:
            period = store.meta()["period"]
        except StoreError:
            continue
        starts.append(period["start"])
        splits.append(period["split"])
    return {"start": min(starts), "end": max(splits)} if starts else {}


def published_catalogs(stores: Mapping[str, MerchantStore]):
    """A :class:`~streams.features.FeatureContext` holding the merchants' published catalogs only.

    What the registered bundle needs to rank a merchant's items in serving. Users' recent categories are
    not in it (they live in the merchants' stores): the bundle ranks for a user as one with no known
    history (the user's own hashed slot still counts).
    """
    from streams.features import FeatureContext

    context = FeatureContext()
    for merchant_id, store in stores.items():
        try:
            catalog = store.catalog()
        except StoreError as exc:
            log.warning("catalog skipped", extra={"merchant": merchant_id, "error": str(exc)})
            continue
        for item_id, (category, price) in catalog.items():
            context.set_item(merchant_id, item_id, category, price)
    return context


def tff_clients(config: FederatedConfig, on_workers: bool) -> str:
    """What one TFF client of the run's rounds is: a merchant group, or one merchant (and why)."""
    if on_workers:
        return "one merchant per joined worker"
    reason = per_merchant_reason(config)
    return f"{config.client_groups} merchant groups" if reason is None else f"one per merchant ({reason})"


def scorer_from_state(process, state, model_config: ModelConfig) -> tuple[NumpyScorer, Any]:
    """The global model of ``state`` as a numpy scorer, and as a Keras model."""
    model = build_keras_model(model_config)
    assign_weights(model, process.get_model_weights(state))
    return NumpyScorer.from_keras(model_config, model), model


def extractor_lineage(model_config: ModelConfig) -> dict[str, str]:
    """How a learner can start from the version (``fedstream learn --warm-start ... --transfer METHOD``):
    the methods that work for this model, and what the frozen extractor hands the learner."""
    return {"transfer_methods": "features" if model_config.deep else "finetune,features",
            "extractor": f"global logit and the {model_config.hidden}-unit hidden layer (deep_hidden) of the wide & "
                         "deep model" if model_config.deep
            else "global logit of the wide model (a weight per hashed slot: the logit is the whole extractor)"}


def register_global(settings: Settings, scorer: NumpyScorer, keras_model, *, round_num: int,
                    config: FederatedConfig, model_config: ModelConfig, metrics: Mapping[str, float],
                    lineage: Mapping[str, Any], run_id: str | None, context=None, name: str | None = None) -> str:
    """Register the global model as a version (numpy scorer bundle) of ``name`` (default
    ``settings.federated.model_name``) and log the Keras model in the run. Its lineage tags say how a
    learner can use it as a start (:func:`extractor_lineage`).

    ``context``: the merchants' published catalogs (:func:`published_catalogs`), so serving can recommend.
    """
    import mlflow
    import mlflow.tensorflow

    from registry.bundle import ModelBundle
    from registry.models import register_version
    from streams.features import FeatureContext

    context = context if context is not None else FeatureContext()
    bundle = ModelBundle(model=scorer, feature_bits=model_config.bits, context=context, kind="federated",
                         description=f"federated global model after round {round_num}",
                         meta={"round": round_num, "model": asdict(model_config)})
    # run_id=None: a nested registration run per version, so its metrics (step 0) stay out of the round curves
    version = register_version(settings, bundle, name=name or settings.federated.model_name, metrics=metrics,
                               lineage={**lineage, **extractor_lineage(model_config), "rounds": round_num,
                                        "training_run_id": run_id}, run_id=None)
    import tensorflow as tf

    mlflow.tensorflow.log_model(keras_model, name=f"keras-round-{round_num:04d}",
                                pip_requirements=[f"tensorflow=={tf.__version__}"])
    return str(version.version)


def _on_workers(settings: Settings, stores, config: FederatedConfig, process, evaluation, workers: list):
    """Restrict the run to the joined merchants and run each round's client work on their workers."""
    import dataclasses

    from federated.remote import OnWorkers, channel_credentials, mergeable_context

    if config.dp or config.secure_agg:
        raise ValueError("rounds on joined workers support FedAvg/FedProx with clipping, not --dp or --secure-agg")
    ordered = sorted(workers, key=lambda w: w.merchant_id)  # cohort order == worker order (sorted ids)
    missing = [w.merchant_id for w in ordered if w.merchant_id not in stores]
    if missing:
        raise ValueError(f"joined merchants without a store: {missing}")
    credentials = channel_credentials(settings) if any(w.tls for w in ordered) else None
    context = mergeable_context(ordered, credentials)
    config = dataclasses.replace(config, clients_per_round=len(ordered), dropout_rate=0.0)
    chosen = {w.merchant_id: stores[w.merchant_id] for w in ordered}
    return chosen, config, OnWorkers(process, context), OnWorkers(evaluation, context), f"remote_workers[{len(ordered)}]"


def run_federated(settings: Settings, stores: Mapping[str, MerchantStore], config: FederatedConfig,
                  model_config: ModelConfig, *, register_every: int = 0, personalize: bool = True,
                  personalization: PersonalizationConfig = PersonalizationConfig(),
                  on_round: Callable[[int, RoundResult], None] | None = None, track: bool = True,
                  workers: list | None = None, model_name: str | None = None) -> RunOutcome:
    """Train ``config.rounds`` rounds over ``stores``; log, register and compare per merchant.

    With ``workers`` (:class:`federated.remote.WorkerRecord` of joined merchants), every round's client
    work runs in the joined merchants' own TFF workers (one merchant per worker, all of them every round).
    ``model_name``: the registered model the versions go to (default ``settings.federated.model_name``).
    """
    import contextlib

    import mlflow

    from registry.tracking import activate

    if not stores:
        raise ValueError("no merchant stores to train on")
    context_name = use_execution_context(config)
    model_fn = tff_model_fn(model_config)
    process = build_process(model_fn, config, model_config.label_width) if workers else (
        build_round_process(model_fn, config, model_config.label_width))  # merchant groups where they apply
    evaluation = build_evaluation(model_fn, model_config.label_width) if workers else (
        build_round_evaluation(model_fn, config, model_config.label_width))
    if workers:
        stores, config, process, evaluation, context_name = _on_workers(settings, stores, config, process, evaluation, workers)
    data = FederatedData.from_stores(stores)
    lineage = {**config.lineage(), "merchants": len(stores), "merchants_per_round": min(config.clients_per_round, len(stores)),
               "data_period": data_period(stores), "model": asdict(model_config), "execution_context": context_name,
               "tff_clients": tff_clients(config, bool(workers))}
    outcome = RunOutcome(run_id=None, history=[], scorer=None, context=context_name)  # type: ignore[arg-type]
    notes = outcome.privacy_notes = privacy_notes(config, privacy_spent(config, len(stores), config.rounds),
                                                  settings.federated.meaningful_epsilon)
    lineage.update(notes)
    catalogs = published_catalogs(stores) if track else None

    with contextlib.ExitStack() as stack:
        run = None
        if track:
            exp_id = stack.enter_context(activate(settings))
            run = stack.enter_context(mlflow.start_run(experiment_id=exp_id, run_name=f"federated-{config.rounds}r"))
            outcome.run_id = run.info.run_id
            mlflow.log_params({k: str(v) for k, v in {**config.lineage(), **asdict(model_config)}.items()})
            mlflow.set_tags({"room": "federated", "merchants": str(len(stores)), **notes})

        def after_round(round_num: int, state, result: RoundResult) -> None:
            privacy = privacy_spent(config, len(stores), round_num)
            if track:
                mlflow.log_metrics({**result.metrics(), **privacy}, step=round_num)
                if register_every and round_num % register_every == 0 and round_num != config.rounds:
                    scorer, keras_model = scorer_from_state(process, state, model_config)
                    outcome.versions.append(register_global(
                        settings, scorer, keras_model, round_num=round_num, config=config, model_config=model_config,
                        metrics={**result.metrics(), **privacy}, lineage={**lineage, **privacy}, run_id=outcome.run_id,
                        context=catalogs, name=model_name))
            if on_round is not None:
                on_round(round_num, result)

        state = process.initialize()
        state, outcome.history = run_rounds(process, state, data, config, evaluation=evaluation, on_round=after_round)
        outcome.scorer, keras_model = scorer_from_state(process, state, model_config)
        outcome.privacy = privacy_spent(config, len(stores), config.rounds)
        if personalize:
            outcome.personalization = compare_merchants(stores, model_config, outcome.scorer, personalization)
            outcome.summary = summarize(outcome.personalization)
        if track:
            final_metrics = {**outcome.history[-1].metrics(), **outcome.privacy,
                             **{f"merchant_{k}": v for k, v in outcome.summary.items()}}
            mlflow.log_metrics({k: v for k, v in final_metrics.items() if k.startswith("merchant_")})
            if outcome.personalization:
                mlflow.log_dict({"rows": outcome.personalization}, "personalization/merchants.json")
            outcome.versions.append(register_global(
                settings, outcome.scorer, keras_model, round_num=config.rounds, config=config, model_config=model_config,
                metrics=final_metrics, lineage={**lineage, **outcome.privacy}, run_id=outcome.run_id, context=catalogs,
                name=model_name))
    return outcome
