"""Federated averaging rounds across merchants with TFF: functional builders and explicit state.

Design notes: `federated/README.md`, `federated/training.py`.

Example (not run here: it takes TFF's ~11 s import):
    >>> import tensorflow_federated as tff                                    # doctest: +SKIP
    >>> process = build_process(tff_model_fn(ModelConfig(bits=14)), FederatedConfig(rounds=3))  # doctest: +SKIP
    >>> state = process.initialize()                                          # doctest: +SKIP
    >>> state, history = run_rounds(process, state, data, FederatedConfig(rounds=3))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from federated.aggregators import AGGREGATIONS
from federated.stores import MerchantStore, StoreError, dataset_from_folder, split_folder
from fedstream.logs import get_logger

log = get_logger("federated.training")

ServerOptimizer = Literal["adam", "yogi", "sgd"]
Aggregation = Literal[tuple(AGGREGATIONS)]  # type: ignore[valid-type]  # the names in AGGREGATIONS


@dataclass(frozen=True)
class FederatedConfig:
    """Everything that defines a federated training run (logged as lineage with every version)."""

    rounds: int = 20
    clients_per_round: int = 10
    client_learning_rate: float = 0.5
    client_epochs: int = 1
    batch_size: int = 32
    server_optimizer: ServerOptimizer = "sgd"  # plain FedAvg measured best on our sparse model (benchmark)
    server_learning_rate: float = 1.0
    aggregation: Aggregation = "touched"  # per-slot mean over the clients that touched it (federated.aggregators)
    prox_mu: float = 0.0
    clip: float | None = None
    dp: bool = False
    noise_multiplier: float = 0.0
    dp_delta: float = 1e-5
    secure_agg: bool = False
    dropout_rate: float = 0.0
    seed: int = 7
    eval_every: int = 1
    # TFF clients per round in simulation, each training a group of merchants (federated.groups); 0 or 1:
    # one TFF client per merchant. Same global model either way; secure aggregation and adaptive-clip DP
    # always run one client per merchant, joined workers too.
    client_groups: int = 2

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.clients_per_round < 1 or self.client_epochs < 1 or self.batch_size < 1:
            raise ValueError("rounds, clients_per_round, client_epochs and batch_size must be >= 1")
        if self.client_groups < 0:
            raise ValueError(f"client_groups must be >= 0 (0 or 1: one TFF client per merchant), got {self.client_groups}")
        if self.server_optimizer not in ("adam", "yogi", "sgd"):
            raise ValueError(f"server_optimizer must be adam, yogi or sgd, got {self.server_optimizer!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be {' or '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.prox_mu < 0 or self.noise_multiplier < 0 or not 0 <= self.dropout_rate < 1:
            raise ValueError("prox_mu and noise_multiplier must be >= 0 and dropout_rate in [0, 1)")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        if self.dp:
            if self.noise_multiplier <= 0:
                raise ValueError("--dp needs a noise multiplier > 0")
            if self.clip is None and self.noise_multiplier >= 0.1 * self.clients_per_round:
                raise ValueError(
                    f"adaptive-clipping DP needs noise_multiplier < 0.1 x clients_per_round "
                    f"(= {0.1 * self.clients_per_round:g}); raise --clients-per-round or give a fixed --clip")
            if self.secure_agg:
                raise ValueError("combine --dp with --secure-agg is not supported: choose one aggregator")
            if not 0 < self.dp_delta < 1:
                raise ValueError("dp_delta must be in (0, 1)")

    def lineage(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FederatedData:
    """Merchant id -> callables naming its train / held-out split directory, plus its example counts.

    Built from :class:`~federated.stores.MerchantStore` objects with :meth:`from_stores`. A callable
    raises :class:`~federated.stores.StoreError` when the split is gone (the merchant drops out); the
    path it returns is all the coordinator hands TFF for that merchant (read by the client computation).
    """

    train: dict[str, Callable[[], str]]
    heldout: dict[str, Callable[[], str]]
    counts: dict[str, int]

    @classmethod
    def from_stores(cls, stores: Mapping[str, MerchantStore]) -> FederatedData:
        def folder_of(store, split):
            return lambda: split_folder(store, split)

        counts = {}
        for merchant_id, store in stores.items():
            try:
                counts[merchant_id] = store.count("train")
            except StoreError:
                counts[merchant_id] = 0
        return cls(
            train={m: folder_of(s, "train") for m, s in stores.items()},
            heldout={m: folder_of(s, "heldout") for m, s in stores.items()},
            counts=counts,
        )

    @property
    def client_ids(self) -> list[str]:
        return sorted(self.train)


@dataclass
class RoundResult:
    """What the coordinator learns from one round: who took part and the aggregate metrics."""

    round: int
    sampled: list[str]
    participants: list[str]
    dropped: list[str]
    seconds: float
    train: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)
    skipped: bool = False

    def metrics(self) -> dict[str, float]:
        out = {f"train_{k}": v for k, v in self.train.items()}
        out.update({f"eval_{k}": v for k, v in self.evaluation.items()})
        out.update({"participants": float(len(self.participants)), "dropped": float(len(self.dropped)),
                    "round_seconds": self.seconds})
        return out


_INSTALLED: dict[str, Any] = {}  # the context this module last installed, by kind


def use_execution_context(config: FederatedConfig) -> str:
    """Install TFF's sync C++ context for ``config`` (secure aggregation needs the *test* context, whose
    secure-sum intrinsics are simulated); keep the current one when it is already the right kind.

    Replacing a context drops the old one, whose finalizer sends its ``worker_binary`` SIGINT and then
    *waits* for it: a worker that does not exit on SIGINT keeps that wait (and the caller) blocked for
    good, which hung a benchmark and once the test suite. So a context is only replaced when the kind
    changes, and this process's own workers are stopped first (SIGTERM, then SIGKILL) and left for the
    old context's finalizer to reap.
    """
    import tensorflow_federated as tff

    kind = "sync_test_cpp" if config.secure_agg else "sync_local_cpp"
    installed = _INSTALLED.get(kind)
    if installed is not None and tff.framework.get_context_stack().current is installed:
        return kind
    from fedstream.processes import stop_tff_workers

    stop_tff_workers(reap=False, children_only=True)
    if config.secure_agg:
        context = tff.backends.test.create_sync_test_cpp_execution_context()
    else:
        context = tff.backends.native.create_sync_local_cpp_execution_context()
    tff.framework.set_default_context(context)
    _INSTALLED.clear()
    _INSTALLED[kind] = context
    return kind


def build_aggregator(config: FederatedConfig):
    """The model-update aggregator: weighted (touched-slot) mean, or the weighted mean over secure sums,
    optionally clipped; or DP (uniform weights)."""
    import tensorflow_federated as tff

    if config.dp:
        if config.clip is not None:
            return tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
                noise_multiplier=config.noise_multiplier, clients_per_round=config.clients_per_round,
                clip=config.clip)
        return tff.learning.dp_aggregator(config.noise_multiplier, config.clients_per_round)
    if config.secure_agg:
        mean = secure_mean_factory()
    else:
        mean = AGGREGATIONS[config.aggregation]()
    if config.clip is not None:
        return tff.aggregators.clipping_factory(config.clip, mean)
    return mean


SECURE_BOUND = float(2**20)  # |weighted update coordinate| summed securely without clipping


def secure_mean_factory():
    """The plain example-weighted mean with both sums done by secure aggregation (``SecureSumFactory``).

    Each client's weighted update (update x example count) is clipped per coordinate to ±``SECURE_BOUND``
    and quantized to 32 bits before the secure sum (steps of 2**-11, far below float32 resolution after
    the division by the cohort's example count). ``tff.learning.secure_aggregator`` was used before: its
    adaptive L2 clipping starts at norm 1 and its secure sum at a bound of 50, so a round's result was
    *not* FedAvg's mean (our updates have norms well above 1); ``--clip`` adds clipping explicitly.
    """
    import tensorflow_federated as tff

    return tff.aggregators.MeanFactory(
        value_sum_factory=tff.aggregators.SecureSumFactory(SECURE_BOUND, -SECURE_BOUND),
        weight_sum_factory=tff.aggregators.SecureSumFactory(float(2**20 - 1), 0.0))


def client_optimizer(config: FederatedConfig):
    """Each merchant's local optimizer: plain SGD at ``client_learning_rate``."""
    import tensorflow_federated as tff

    return tff.learning.optimizers.build_sgdm(config.client_learning_rate)


def server_optimizer(config: FederatedConfig):
    """The server optimizer applied to the aggregated update (Adam, Yogi or SGD at ``server_learning_rate``)."""
    import tensorflow_federated as tff

    lr = config.server_learning_rate
    if config.server_optimizer == "adam":
        return tff.learning.optimizers.build_adam(lr)
    if config.server_optimizer == "yogi":
        return tff.learning.optimizers.build_yogi(lr)
    return tff.learning.optimizers.build_sgdm(lr)


EVAL_BATCH = 256


def train_dataset_computation(batch_size: int, epochs: int, label_width: int = 1):
    """TFF computation ``<folder=string, seed=int64> -> batches*``: a client's shuffled training data.

    Runs where the client's work runs (the local executor, or the merchant's own joined worker), so the
    examples are read there; traced once, whatever the number of clients.
    """
    import tensorflow_federated as tff

    @tff.tensorflow.computation(tff.types.StructType([("folder", np.str_), ("seed", np.int64)]))
    def client_train_data(folder, seed):
        return dataset_from_folder(folder, batch_size=batch_size, epochs=epochs, shuffle_seed=seed,
                                   label_width=label_width)

    return client_train_data


def eval_dataset_computation(batch_size: int = EVAL_BATCH, label_width: int = 1):
    """TFF computation ``folder -> batches*``: a client's held-out data, in time order."""
    import tensorflow_federated as tff

    @tff.tensorflow.computation(np.str_)
    def client_eval_data(folder):
        return dataset_from_folder(folder, batch_size=batch_size, label_width=label_width)

    return client_eval_data


def client_seed(seed: int, round_num: int, merchant_id: str) -> int:
    """Shuffle seed of one client in one round (a fresh example order every round, reproducible)."""
    return int(np.random.default_rng([seed, round_num, *merchant_id.encode()]).integers(2**31))


def build_process(model_fn: Callable[[], Any], config: FederatedConfig, label_width: int = 1):
    """FedAvg (or FedProx when ``prox_mu > 0``) learning process for ``config``.

    Its ``next`` takes ``(state, [(folder, seed), ...])``: one split directory and shuffle seed per client,
    turned into batches of ``config.batch_size`` for ``config.client_epochs`` epochs on the client side.
    """
    import tensorflow_federated as tff

    process = _fedavg_process(model_fn, config)
    return tff.simulation.compose_dataset_computation_with_learning_process(
        train_dataset_computation(config.batch_size, config.client_epochs, label_width), process)


def _fedavg_process(model_fn: Callable[[], Any], config: FederatedConfig):
    import tensorflow_federated as tff

    common = dict(
        client_optimizer_fn=client_optimizer(config),
        server_optimizer_fn=server_optimizer(config),
        model_aggregator=build_aggregator(config),
    )
    if config.prox_mu > 0:  # our FedProx: TFF 0.87's proximal term has the wrong sign (federated.proximal)
        from federated.proximal import build_fed_prox

        return build_fed_prox(model_fn, mu=config.prox_mu, client_optimizer=common["client_optimizer_fn"],
                              server_optimizer=common["server_optimizer_fn"],
                              model_aggregator=common["model_aggregator"], uniform=config.dp)
    algorithms = tff.learning.algorithms
    if config.dp:  # DP needs every client's update to count the same: unweighted mean of clipped updates
        return algorithms.build_unweighted_fed_avg(model_fn, **common)
    return algorithms.build_weighted_fed_avg(model_fn, client_weighting=tff.learning.ClientWeighting.NUM_EXAMPLES,
                                             **common)


def build_evaluation(model_fn: Callable[[], Any], label_width: int = 1):
    """Federated evaluation process: aggregate held-out metrics of the given model weights.

    Its ``next`` takes ``(state, [folder, ...])``: each client's held-out split directory.
    """
    import tensorflow_federated as tff

    return tff.simulation.compose_dataset_computation_with_learning_process(
        eval_dataset_computation(label_width=label_width), tff.learning.algorithms.build_fed_eval(model_fn))


def sample_clients(client_ids: list[str], k: int, round_num: int, seed: int) -> list[str]:
    """``k`` distinct clients for a round, uniformly, reproducible from ``(seed, round_num)``."""
    rng = np.random.default_rng([seed, round_num])
    chosen = rng.choice(len(client_ids), size=min(k, len(client_ids)), replace=False)
    return [client_ids[i] for i in sorted(chosen.tolist())]


def secret_poisson_cohort(client_ids: list[str], rate: float) -> list[str]:
    """Each client independently with probability ``rate``, drawn from the OS's entropy (DP runs).

    Not seeded and never logged: the amplification by sampling that the DP accountant counts
    (:func:`dp_epsilon`, Poisson-subsampled Gaussian) holds only when nobody who sees the released models
    can reproduce who was sampled, and only for Poisson sampling (this one), not a fixed-size cohort.
    """
    draw = secrets.SystemRandom()
    return [m for m in client_ids if draw.random() < rate]


def simulated_failures(sampled: list[str], rate: float, round_num: int, seed: int) -> set[str]:
    """Sampled clients that drop out mid-round (seeded coin flips)."""
    if rate <= 0:
        return set()
    rng = np.random.default_rng([seed, round_num, 1])
    return {m for m, fail in zip(sampled, rng.random(len(sampled)) < rate) if fail}


def _cohort(data: FederatedData, sampled: list[str], failing: set[str], *, seed: int,
            round_num: int) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """``(folder, seed)`` of the sampled clients that did not drop out; a client whose data is gone drops out."""
    participants, datasets, dropped = [], [], []
    for merchant_id in sampled:
        if merchant_id in failing:
            dropped.append(merchant_id)
            continue
        try:
            datasets.append((data.train[merchant_id](), client_seed(seed, round_num, merchant_id)))
            participants.append(merchant_id)
        except (StoreError, OSError) as exc:
            log.warning("client dropped out", extra={"merchant": merchant_id, "error": str(exc)})
            dropped.append(merchant_id)
    return participants, datasets, dropped


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            continue
        try:
            number = float(np.asarray(value))
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


def evaluate_federated(evaluation, eval_state, weights, data: FederatedData,
                       merchants: Iterable[str] | None = None) -> tuple[Any, dict[str, float]]:
    """Aggregate held-out AUC/logloss of ``weights`` over merchants' held-out data (federated eval)."""
    eval_state = evaluation.set_model_weights(eval_state, weights)
    datasets = []
    for merchant_id in merchants if merchants is not None else data.client_ids:
        try:
            datasets.append(data.heldout[merchant_id]())
        except (StoreError, OSError):
            continue
    if not datasets:
        return eval_state, {}
    output = evaluation.next(eval_state, datasets)
    return output.state, _scalars(output.metrics["client_work"]["eval"]["current_round_metrics"])


def run_rounds(process, state, data: FederatedData, config: FederatedConfig, *, start_round: int = 1,
               evaluation=None, eval_state=None, on_round: Callable[[int, Any, RoundResult], None] | None = None):
    """Run ``config.rounds`` rounds from ``state``; returns ``(state, [RoundResult, ...])``.

    Each round samples ``clients_per_round`` merchants (seeded; with DP, each merchant independently with
    probability ``clients_per_round / merchants`` from OS entropy: :func:`secret_poisson_cohort`), drops
    those that fail, and runs one ``process.next`` on the survivors. Without DP a round whose whole cohort
    dropped out leaves the state unchanged; with DP it still runs (the noise is released either way).
    With ``evaluation`` (from :func:`build_evaluation`, or ``federated.groups.build_round_evaluation``) the global model is evaluated on every merchant's
    held-out data every ``config.eval_every`` rounds. ``on_round(round, state, result)`` is called after
    each round (MLflow logging, progress bars, checkpoints).
    """
    history = []
    if evaluation is not None and eval_state is None:
        eval_state = evaluation.initialize()
    for round_num in range(start_round, start_round + config.rounds):
        if config.dp:
            sampled = secret_poisson_cohort(data.client_ids, dp_sampling_rate(config, len(data.client_ids)))
        else:
            sampled = sample_clients(data.client_ids, config.clients_per_round, round_num, config.seed)
        failing = simulated_failures(sampled, config.dropout_rate, round_num, config.seed)
        participants, datasets, dropped = _cohort(data, sampled, failing, seed=config.seed, round_num=round_num)
        started = time.perf_counter()
        result = RoundResult(round_num, sampled, participants, dropped, 0.0)
        if datasets or config.dp:  # a DP round releases its noise even when nobody was sampled
            output = process.next(state, datasets)
            state = output.state
            result.train = _scalars(output.metrics["client_work"]["train"])
        else:
            result.skipped = True
            log.warning("round skipped: every sampled client dropped out", extra={"round": round_num})
        result.seconds = time.perf_counter() - started
        if evaluation is not None and (round_num % config.eval_every == 0 or round_num == start_round + config.rounds - 1):
            eval_state, result.evaluation = evaluate_federated(evaluation, eval_state, process.get_model_weights(state), data)
        history.append(result)
        log.info("federated round", extra={"round": round_num, "participants": len(participants),
                                           "dropped": len(dropped), **result.metrics()})
        if on_round is not None:
            on_round(round_num, state, result)
    return state, history


def dp_sampling_rate(config: FederatedConfig, n_clients: int) -> float:
    """Poisson sampling probability of a DP run: ``clients_per_round / merchants`` (at most 1)."""
    return min(config.clients_per_round, n_clients) / max(n_clients, 1)


def dp_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """ε spent by ``rounds`` of the Poisson-subsampled Gaussian mechanism (RDP accountant, add/remove one
    merchant): what :func:`run_rounds` runs with DP (secret Poisson cohorts, :func:`secret_poisson_cohort`)."""
    import dp_accounting

    if noise_multiplier <= 0:
        return math.inf
    q = min(max(sampling_rate, 0.0), 1.0)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512]
    accountant = dp_accounting.rdp.RdpAccountant(orders)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))
