"""What a learner worker checkpoints and how it is configured: :class:`LearnerState`, :class:`WorkerConfig`,
the group's checkpoint store, and the :class:`PredictionMonitor` protocol (the worker never imports drift)."""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedstream.files import loads_versioned, read_versioned
from fedstream.logs import get_logger
from fedstream.settings import Settings
from online.candidates import CandidateState
from online.multitask import MultiTaskState
from online.prequential import PrequentialEvaluator
from online.ranking import ShopRecommender
from online.store import CheckpointStore, DirectoryStore, open_store
from streams.features import FeatureContext

log = get_logger("online.worker")

CHECKPOINT_VERSION = 1


@dataclass
class WorkerConfig:
    """How a worker learns, checkpoints and publishes (the ``fedstream learn`` options)."""

    model: str = "ftrl"
    params: dict[str, Any] = field(default_factory=dict)
    group: str | None = None  # default: fedstream-learn-<model>
    topics: list[str] | None = None  # default: clicks, orders, catalog
    worker_id: str = "0"
    block: int = 2048  # per partition; 256 cost ~18% more CPU per event in per-block overhead (online/README.md)
    flush_after_s: float = 1.0
    checkpoint_every: int = 100_000  # ~90 ms each at 20 bits (pickle + fsync of 25 MB): every 5 s at 20k events/s
    checkpoint_seconds: float = 30.0
    checkpoint_path: Path | None = None
    store: Path | str | None = None  # the group's shared store: a directory or s3://bucket/prefix (default:
    # <artifacts>/online/<group>)
    publish_every_s: float | None = 300.0
    publish_at_end: bool = True
    max_events: int | None = None
    idle_timeout_s: float | None = None
    rank_every: int = 50
    rank_k: int = 10
    metrics_window: int = 5000
    max_records: int = 8000  # per poll; each poll makes blocking calls into kafka-python's network thread:
    # 2000 -> 8000 gave ~+10% events/s end to end (online/README.md, "Records per poll")
    poll_timeout_ms: int = 200
    fetch_max_wait_ms: int = 100
    flush_when_caught_up: bool = True
    warm_start: str | None = None  # models:/NAME@ALIAS to start a fresh learner from (online.transfer)
    transfer: str = "finetune"  # how: finetune | features
    text_candidates: bool = False  # cold-start items by catalog-text similarity (online.candidates)
    settle_heap: bool = False  # the process is the worker's own (the CLI): fedstream.heap's policy before the first poll

    def __post_init__(self) -> None:
        if self.block < 1 or self.checkpoint_every < 1 or self.rank_every < 0 or self.rank_k < 1:
            raise ValueError("block, checkpoint_every and rank_k must be >= 1, rank_every >= 0")
        self.group = self.group or f"fedstream-learn-{self.model}"


class PredictionMonitor(Protocol):
    """What watches a worker's predictions block by block, with state saved in the worker's checkpoint and
    kept per merchant, so that a merchant's part moves with its partition slot (:func:`online.slices.adopt`)."""

    def observe_predictions(self, merchant_ids: Sequence[str], timestamps: Sequence[float], y: np.ndarray,
                            p: np.ndarray) -> Any: ...

    def snapshot(self) -> bytes: ...

    def adopt_merchants(self, snapshot: bytes | None, owned: Callable[[str], bool]) -> None:
        """Replace the state of the merchants ``owned`` says yes to by theirs in a peer's ``snapshot`` (None:
        the peer ran no such monitor; a merchant it lacks starts from scratch)."""

    def close(self) -> None: ...


def default_checkpoint_path(settings: Settings, config: WorkerConfig) -> Path:
    """``<default store>/<worker_id>.ckpt``; a checkpoint at the pre-store default path is moved there once."""
    from registry.tracking import artifacts_dir

    path = artifacts_dir(settings) / "online" / str(config.group) / f"{config.worker_id}.ckpt"
    legacy = artifacts_dir(settings) / "online" / f"{config.group}-{config.worker_id}.ckpt"
    if legacy.exists() and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(legacy, path)
        log.info("checkpoint moved into the group's store", extra={"from": str(legacy), "to": str(path)})
    return path


def group_store(settings: Settings, config: WorkerConfig) -> CheckpointStore:
    """Where the group's workers keep their checkpoints (one each), read by every peer: ``--store`` (a
    directory or ``s3://bucket/prefix``), by default ``<artifacts>/online/<group>/``."""
    if config.store:
        return open_store(config.store, settings)
    return DirectoryStore(default_checkpoint_path(settings, config).parent)


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """A worker checkpoint file (None when there is none yet)."""
    return read_versioned(path, CHECKPOINT_VERSION, "learner worker")


def load_checkpoint(store: CheckpointStore, name: str) -> dict[str, Any] | None:
    """The worker checkpoint ``name`` in ``store`` (None when there is none yet)."""
    payload = store.read(name)
    return None if payload is None else loads_versioned(payload, store.where(name), CHECKPOINT_VERSION, "learner worker")


class LearnerState:
    """Everything that is checkpointed together: model, context, recommender, metrics, offsets."""

    def __init__(self, model: Any, bits: int, model_name: str, metrics_window: int = 5000,
                 text_candidates: bool = False, partitions: int = 1) -> None:
        self.model = model
        self.bits = bits
        self.model_name = model_name
        self.partitions = partitions  # of the group's topics: a merchant's slot is its partition (online.slices)
        self.slots: dict[int, int] = {}  # events learned into each slot, by every owner it had: its generation
        self.epochs: dict[int, int] = {}  # fencing epoch per slot: taken at assignment, above any copy's (online.slices)
        self.merchant_events: dict[str, int] = {}  # events learned per merchant (clicks, orders: slotted topics)
        self.catalog_offsets: dict[int, int] = {}  # catalog read outside the group: next offset not yet counted
        self.context = FeatureContext()
        self.recommender = ShopRecommender(candidates=CandidateState(text=text_candidates))
        self.evaluator = PrequentialEvaluator(window=metrics_window)
        self.offsets: dict[tuple[str, int], int] = {}  # next offset to learn, per (topic, partition)
        self.events = 0  # records learned (all types)
        self.clicks = 0
        self.ranked = 0  # clicks/orders seen, for rank_every sampling
        # prediction monitors (drift detectors) learn from the same blocks, so their state is checkpointed
        # with the model: live objects by name, and the snapshots a checkpoint held for them
        self.monitors: dict[str, PredictionMonitor] = {}
        self.saved_monitors: dict[str, bytes] = {}
        self.multitask: MultiTaskState | None = None  # click + purchase learner (settings.multitask.enabled)

    def to_bytes(self) -> bytes:
        state = {"version": CHECKPOINT_VERSION, "model": self.model, "bits": self.bits, "model_name": self.model_name,
                 "context": self.context.state(), "recommender": self.recommender, "evaluator": self.evaluator,
                 "offsets": dict(self.offsets), "events": self.events, "clicks": self.clicks, "ranked": self.ranked,
                 "partitions": self.partitions, "slots": dict(self.slots), "epochs": dict(self.epochs), "merchant_events": dict(self.merchant_events),
                 "catalog_offsets": dict(self.catalog_offsets),
                 "monitors": {name: monitor.snapshot() for name, monitor in self.monitors.items()},
                 "multitask": self.multitask, "written_at": time.time()}
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> LearnerState:
        learner = cls(state["model"], state["bits"], state["model_name"])
        learner.context = FeatureContext.from_state(state["context"])
        learner.recommender = state["recommender"]
        learner.evaluator = state["evaluator"]
        learner.offsets = dict(state["offsets"])
        learner.events, learner.clicks, learner.ranked = state["events"], state["clicks"], state["ranked"]
        learner.saved_monitors = dict(state.get("monitors", {}))  # absent in checkpoints written before monitors
        learner.multitask = state.get("multitask")
        learner.partitions = state.get("partitions", 1)  # absent before slots: a checkpoint of one worker alone
        learner.slots, learner.merchant_events = dict(state.get("slots", {})), dict(state.get("merchant_events", {}))
        learner.catalog_offsets = dict(state.get("catalog_offsets", {}))
        learner.epochs = dict(state.get("epochs", {}))  # absent before fencing: epoch 0 everywhere
        return learner
