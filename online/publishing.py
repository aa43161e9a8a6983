"""The learner worker's publisher: scheduled background registration of snapshots in MLflow."""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


from fedstream.logs import get_logger
from fedstream.settings import Settings
from online.assembly import assemble, serving_model, serving_multitask
from online.slices import newest, read_store
from online.state import CHECKPOINT_VERSION, LearnerState, WorkerConfig
from online.store import CheckpointStore, DirectoryStore
from online.transfer import transfer_lineage


log = get_logger("online.worker")


def snapshot(state: LearnerState, config: WorkerConfig, metrics: dict[str, float]) -> dict[str, Any]:
    """What a publication needs, copied now (the live state keeps changing while it is registered). Catalog
    texts still waiting for their embedding are embedded first (here, between blocks: never in serving)."""
    from registry.bundle import ModelBundle

    candidates = getattr(state.recommender, "state", None)
    if candidates is not None and hasattr(candidates, "embed_pending"):
        candidates.embed_pending()

    bundle = ModelBundle(model=serving_model(state.model, state.bits), feature_bits=state.bits,
                         context=state.context, recommender=state.recommender, kind="online",
                         description=f"online {config.model} learner, group {config.group}",
                         meta={"learner": config.model, "params": dict(config.params)},
                         multitask=serving_multitask(state.multitask))
    lineage = {"offsets": {f"{t}:{p}": o for (t, p), o in sorted(state.offsets.items())},
               "events_seen": state.events, "clicks_seen": state.clicks, "model": config.model,
               "group": config.group, "worker_id": config.worker_id, **transfer_lineage(state.model)}
    if state.multitask is not None:
        lineage.update(multitask="single", multitask_merged=1)
    return {"bundle": pickle.loads(pickle.dumps(bundle, protocol=pickle.HIGHEST_PROTOCOL)),
            "metrics": metrics, "lineage": lineage, "step": state.events}


def generation(peers: dict[str, dict[str, Any]], config: WorkerConfig) -> dict[str, Any]:
    """What a version assembled from the checkpoints ``peers`` of ``config``'s group is made of: the group and
    its learner (another group, e.g. another learner on the same stream under the same model name, holds other
    weights), the events each checkpoint learned (its shared model, ranker and metrics change only by learning)
    and the events in each slot's newest copy (its merchants' parts). Equal generations assemble the same
    version; a slot adopted by a new owner (a new epoch, the same events) leaves it equal."""
    owners = newest(peers)
    return {"group": config.group, "model": config.model,
            "checkpoints": {name: peers[name]["events"] for name in sorted(peers)},
            "slots": {str(slot): peers[name]["slots"][slot] for slot, name in sorted(owners.items())}}


def assembled_snapshot(store: CheckpointStore | Path, config: WorkerConfig, live: dict[str, float]) -> dict[str, Any]:
    """One version from every worker checkpoint in ``store`` (:func:`online.assembly.assemble`; a path: a
    directory store); ``live``: the publishing worker's metrics (its latency figures are kept)."""
    store = DirectoryStore(store) if isinstance(store, Path) else store
    return assembled_from(read_store(store, CHECKPOINT_VERSION), config, live)


def assembled_from(peers: dict[str, dict[str, Any]], config: WorkerConfig, live: dict[str, float]) -> dict[str, Any]:
    """:func:`assembled_snapshot` of checkpoints already read; its lineage's ``generation`` says what it holds."""
    from registry.bundle import ModelBundle

    stamp = generation(peers, config)  # before assembling, which changes the checkpoints it reads
    parts = assemble(peers)
    bundle = ModelBundle(model=parts["model"], feature_bits=parts["bits"], context=parts["context"],
                         recommender=parts["recommender"], kind="online",
                         description=f"online {config.model} learners, group {config.group}",
                         meta={"learner": config.model, "params": dict(config.params)}, multitask=parts["multitask"])
    metrics = {**parts["metrics"], **{k: v for k, v in live.items() if k.startswith("latency_")}}
    lineage = {"offsets": {f"{t}:{p}": o for (t, p), o in sorted(parts["offsets"].items())},
               "events_seen": parts["events"], "clicks_seen": parts["clicks"], "model": config.model,
               "group": config.group, "worker_id": config.worker_id, "assembled_from": parts["sources"],
               "shared_weights": parts["merge"], "generation": stamp}
    if parts["multitask_from"] is not None:
        lineage.update(multitask=parts["multitask_from"], multitask_merged=parts["multitask_merged"])
    return {"bundle": bundle, "metrics": metrics, "lineage": lineage, "step": parts["events"]}


class Publisher:
    """Registers snapshots of a worker's state as ``challenger`` versions, one MLflow run per worker.

    Every ``publish_every_s`` a snapshot is taken (between blocks) and registered in a background thread
    while learning goes on; at the end of a run it is registered in the caller's thread. A registry that is
    down never stops learning: the error is logged and kept, and the next schedule retries.

    With a store (N workers of a group) only the group's publisher (``scheduled``, set by the worker while it
    holds slot 0) publishes on schedule, every worker at its end; an assembly whose ``generation`` the
    model's latest version already holds is not registered again (its number goes to ``unchanged``).
    """

    def __init__(self, settings: Settings, config: WorkerConfig) -> None:
        self.settings = settings
        self.config = config
        self.last_publish = time.monotonic()
        self.thread: threading.Thread | None = None
        self.run_id: str | None = None
        self.published: list[str] = []
        self.unchanged: list[str] = []  # publications skipped: the latest version already held their generation
        self.scheduled = True  # publishes on schedule (with a store: while this worker holds slot 0)
        self.errors: list[str] = []
        self.store: CheckpointStore | None = None
        self.before: Callable[[], None] | None = None

    def assemble_from(self, store: CheckpointStore, before: Callable[[], None]) -> None:
        """Publish versions assembled from every checkpoint in ``store`` (``before``: write ours first)."""
        self.store, self.before = store, before

    def _take(self, state: LearnerState, metrics: dict[str, float]) -> Callable[[], dict[str, Any]]:
        """What to register: a snapshot of the live state now, or (with a store) an assembly of the
        checkpoints, ours just written, built when called (in the background thread)."""
        if self.store is None:
            taken = snapshot(state, self.config, metrics)
            return lambda: taken
        self.before()
        return lambda: self._assembled(metrics)

    def _assembled(self, metrics: dict[str, float]) -> dict[str, Any]:
        """An assembly of the store, or only ``{"same_as": version}`` when the latest version holds its
        generation (then nothing is assembled)."""
        peers = read_store(self.store, CHECKPOINT_VERSION)
        held = self._holding(generation(peers, self.config))
        return {"same_as": held} if held is not None else assembled_from(peers, self.config, metrics)

    def _holding(self, stamp: dict[str, Any]) -> str | None:
        """The number of the model's latest version if it was assembled from generation ``stamp``."""
        from registry.models import latest_version, version_lineage

        latest = latest_version(self.settings, self.settings.serving.model_name)
        return str(latest.version) if latest is not None and version_lineage(latest).get("generation") == stamp else None

    def prepare(self) -> None:
        """Import MLflow and open the tracking store before the first record: the first publication
        otherwise spends seconds of CPU on imports and store set-up while records wait."""
        try:
            from registry.models import register_version  # noqa: F401
            from registry.tracking import experiment_id

            experiment_id(self.settings)
        except Exception as exc:
            self._failed(exc)

    def maybe_publish(self, state: LearnerState, metrics: Callable[[], dict[str, float]], force: bool = False) -> None:
        """Publish on schedule in a background thread; ``force`` (the end of the run) waits for a
        publication in flight, then publishes in this thread."""
        every = self.config.publish_every_s
        if not force and (not every or not self.scheduled or time.monotonic() - self.last_publish < every):
            return
        if state.clicks == 0 and not getattr(state.recommender, "n_observed", 0):
            return  # nothing learned yet (an orders-only stream publishes once its recommender learned orders)
        in_flight = self.thread is not None and self.thread.is_alive()
        if in_flight and not force:
            return  # one publication at a time; the next loop iteration tries again
        if in_flight:
            self.thread.join()
        self.last_publish = time.monotonic()
        try:
            take = self._take(state, metrics())
        except Exception as exc:
            self._failed(exc)
            return
        if force:
            self._register_logged(take)
        else:
            self.thread = threading.Thread(target=self._register_logged, args=(take,), name="online-publish",
                                           daemon=True)
            self.thread.start()

    def publish(self, state: LearnerState, metrics: dict[str, float]) -> str:
        """Register ``state`` now as a new ``challenger`` version; returns the version number."""
        return self.register(self._take(state, metrics)())

    def register(self, taken: dict[str, Any]) -> str:
        """Register ``taken`` (unless the latest version holds its generation); returns the version number."""
        from registry.models import AlreadyRegistered

        stamp = taken.get("lineage", {}).get("generation")
        try:
            if taken.get("same_as") is not None:
                return self._unchanged(taken["same_as"])
            return self._register_new(taken, None if stamp is None else {"generation": stamp})
        except AlreadyRegistered as registered:  # another worker registered it while we assembled and logged
            return self._unchanged(str(registered.version.version))

    def _unchanged(self, version: str) -> str:
        self.unchanged.append(version)
        log.info("publication skipped: the latest version holds the same checkpoints", extra={"version": version})
        return version

    def _register_new(self, taken: dict[str, Any], unless_latest: dict[str, Any] | None) -> str:
        from registry.models import register_version
        from registry.tracking import client, experiment_id

        mlflow_client = client(self.settings)
        if self.run_id is None:
            run = mlflow_client.create_run(experiment_id(self.settings),
                                           run_name=f"learn-{self.config.group}-{self.config.worker_id}",
                                           tags={"room": "online", "model": self.config.model})
            self.run_id = run.info.run_id
        for key, value in taken["metrics"].items():
            mlflow_client.log_metric(self.run_id, key, value, step=taken["step"])
        version = register_version(self.settings, taken["bundle"], name=self.settings.serving.model_name,
                                   metrics=taken["metrics"], lineage=taken["lineage"], run_id=self.run_id,
                                   unless_latest=unless_latest)
        self.published.append(str(version.version))
        return str(version.version)

    def join(self, timeout: float | None = None) -> None:
        """Wait for a scheduled publication still registering."""
        if self.thread is not None:
            self.thread.join(timeout=timeout)

    def _register_logged(self, take: Callable[[], dict[str, Any]]) -> None:
        try:
            self.register(take())
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        # the registry being down must not stop learning; the next schedule retries
        self.errors.append(f"{type(exc).__name__}: {exc}"[:500])
        log.warning("publishing to the registry failed", extra={"error": self.errors[-1]}, exc_info=True)


__all__ = ["Publisher", "assembled_from", "assembled_snapshot", "generation", "serving_model", "snapshot"]
