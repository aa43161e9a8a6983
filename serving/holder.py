"""The model being served, swapped atomically when the registry's ``champion`` alias moves.

A background thread polls the alias every ``swap_poll_seconds`` (one registry read, skipped while an
embedded sqlite store's files are unchanged). When it points at a new version, the thread loads that
*fixed* version (``models:/NAME/7``, not the alias, which could move again meanwhile), warms its ranking
caches, and only then replaces the reference.
Request handlers read :attr:`ModelHolder.current` once and use that object to the end, so a request
in flight finishes on the model it started with and no request ever sees a half-loaded model. If
loading fails, the old model keeps serving and the failure is counted.

Where a version's rankings run is :class:`RankingPlacement`'s call: in the threadpool (off the event
loop) until enough consecutive rankings of that version measured cheap, then on the loop (no thread
hand-off per request), and back in the threadpool after any ranking over the budget.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from fedstream.logs import get_logger
from fedstream.settings import Settings
from registry.bundle import ModelBundle
from serving.metrics import ServingMetrics

log = get_logger("serving.holder")

INLINE_STREAK = 20  # consecutive cheap rankings before a version's rankings move onto the event loop
RELEASE_DEPTH = 5  # levels of a retired model freed part by part (deeper splits 10^4-entry dicts one entry at a time)


class RankingPlacement:
    """Whether one version's rankings run on the event loop or in the threadpool, from their measured CPU time.

    Starts in the threadpool. After ``streak`` consecutive rankings each under ``budget_s`` of CPU they run
    inline (a thread hand-off costs two thread wake-ups per request, which dominate a sub-millisecond
    ranking's latency on a busy machine); one ranking over the budget sends the next ones back to the
    threadpool until another streak. So the loop is held up at most ``budget_s`` per ranking, plus one
    ranking over it per streak. ``budget_s=0`` keeps every ranking in the threadpool.
    """

    def __init__(self, budget_s: float = 0.002, streak: int = INLINE_STREAK) -> None:
        self.budget_s, self.streak = budget_s, streak
        self.cheap = 0  # consecutive rankings under the budget

    @property
    def inline(self) -> bool:
        return self.budget_s > 0 and self.cheap >= self.streak

    def record(self, cpu_seconds: float) -> None:
        self.cheap = self.cheap + 1 if cpu_seconds < self.budget_s else 0

    def timed(self, rank: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``rank(*args, **kwargs)``, its CPU time recorded (in whichever thread runs it)."""
        start = time.thread_time()
        result = rank(*args, **kwargs)
        self.record(time.thread_time() - start)
        return result


@dataclass(frozen=True)
class ServedModel:
    """One loaded model version: immutable (but for where its rankings run), so swapping is a single
    reference assignment."""

    name: str
    version: str
    bundle: ModelBundle
    loaded_at: float
    placement: RankingPlacement = field(default_factory=RankingPlacement)

    async def recommend_items(self, merchant_id: str, user_id: str, k: int, item_id: str | None,
                              ranking: Any = None) -> list:
        """The bundle's ranking, on the loop or in the threadpool as :attr:`placement` says; ``ranking``: the
        serving settings that choose the score (``rank_by``, ``purchase_weight``, ``purchase_depth``)."""
        placement, rank = self.placement, self.bundle.recommend_items
        options = {"item_id": item_id}
        if ranking is not None:
            options.update(by=ranking.rank_by, purchase_weight=ranking.purchase_weight, depth=ranking.purchase_depth)
        if placement.inline:
            return placement.timed(rank, merchant_id, user_id, k, **options)
        return await run_in_threadpool(placement.timed, rank, merchant_id, user_id, k, **options)

    def info(self) -> dict:
        return {"name": self.name, "version": self.version, "kind": self.bundle.kind,
                "description": self.bundle.description, "loaded_at": self.loaded_at,
                "feature_bits": self.bundle.feature_bits, "merchants": len(self.bundle.merchants())}


def store_stamp(settings: Settings) -> tuple | None:
    """``(mtime_ns, size)`` of an embedded sqlite registry's database and write-ahead log, or None for any other
    store. Every alias move writes one of them, so an unchanged stamp means an unchanged alias: the poller
    skips the registry read (~10 ms of CPU in MLflow/SQLAlchemy, taken from the event loop's GIL share)."""
    from registry.tracking import tracking_uri

    uri = tracking_uri(settings)
    if not uri.startswith("sqlite:///") or "?" in uri:
        return None
    database = Path(uri[len("sqlite:///"):])
    stamp = []
    for path in (database, database.with_name(database.name + "-wal")):
        try:
            stat = path.stat()
            stamp.append((stat.st_mtime_ns, stat.st_size))
        except FileNotFoundError:
            stamp.append(None)
    return tuple(stamp)


@contextlib.contextmanager
def collections_paused() -> Iterator[None]:
    """No cyclic-GC collection inside the block (process-wide), then the collector as it was.

    Loading a version allocates ~10^5 container objects; each collection the allocations trigger scans every
    young one of them in one C call holding the GIL (a full one measured 210-280 ms on a loaded machine),
    so a request arriving then waits for all of it. Paused, the collection never runs: the block freezes
    (``gc.freeze``) what it keeps before the collector resumes, or its garbage waits for the next collection.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def release_in_parts(box: list, depth: int = RELEASE_DEPTH) -> None:
    """Free the object popped from ``box`` part by part: its attributes (a dict: its values), ``depth`` levels down.

    Dropping the last reference to a retired version frees its ~10^5 objects in one C cascade holding the GIL
    (2 ms on an idle machine, 4-8 ms on a loaded one); in parts (the largest about half of it) the interpreter
    can hand the GIL over in between. Only an object nothing else refers to is taken apart (its reference
    count is ours alone and no weak reference points at it): nothing anyone can still reach changes.
    """
    whole = box.pop()
    if depth == 0 or sys.getrefcount(whole) > 2 or not _separable(whole):
        return
    parts = whole if type(whole) is dict else vars(whole)
    while parts:
        box.append(parts.popitem()[1])
        release_in_parts(box, depth - 1)


def _separable(whole: Any) -> bool:
    """A dict, or a plain instance whose attributes can be dropped one by one (no class, finalizer or weakref)."""
    if type(whole) is dict:
        return True
    return (type(getattr(whole, "__dict__", None)) is dict and not isinstance(whole, type)
            and not hasattr(type(whole), "__del__") and weakref.getweakrefcount(whole) == 0)


class ModelHolder:
    """Holds the served model of ``name@alias`` and keeps it current."""

    def __init__(self, settings: Settings, name: str, metrics: ServingMetrics, *, alias: str = "champion",
                 poll_seconds: float | None = None) -> None:
        self.settings = settings
        self.name = name
        self.alias = alias
        self.metrics = metrics
        self.poll_seconds = settings.serving.swap_poll_seconds if poll_seconds is None else poll_seconds
        self.current: ServedModel | None = None
        self.swaps = 0
        self.last_error: str | None = None
        self._refresh_lock = threading.Lock()
        self._unchanged: tuple | None = None  # the store's stamp when the alias was last read (and acted on)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load and swap in the alias's version if it moved; True when a swap happened."""
        from registry.flavor import read_bundle
        from registry.models import RegistryError, fetch_bundle, resolve
        from registry.signing import signing_key

        with self._refresh_lock:
            stamp = store_stamp(self.settings)
            if stamp is not None and stamp == self._unchanged:
                return False  # the store has not been written since the alias was last read: skip the read
            try:
                version = resolve(self.settings, self.name, self.alias)
            except RegistryError:
                version = None  # nothing registered yet: keep waiting
            except Exception as exc:  # registry briefly unreachable/locked: keep serving
                self._failed(f"resolving {self.name}@{self.alias}: {exc}")
                return False
            if version is None or (self.current is not None and self.current.version == version):
                self._unchanged = stamp
                return False
            try:
                with tempfile.TemporaryDirectory() as scratch:
                    artifact = fetch_bundle(self.settings, f"models:/{self.name}/{version}", scratch)
                    gc.collect(1)  # the fetch's young garbage goes now, not frozen with the version below
                    with collections_paused():
                        bundle = read_bundle(artifact, signing_key(self.settings))
                        bundle.warm_up()
                        retired = self._swap_in(version, bundle)
            except Exception as exc:
                self._failed(f"loading {self.name} version {version}: {exc}")
                return False
            previous = retired[0].version if retired else None
            self._release(retired)
            self.swaps += 1
            self.last_error, self._unchanged = None, stamp
            self.metrics.swaps.labels(self.name).inc()
            self.metrics.model_version.labels(self.name).set(float(version))
            self.metrics.model_loaded_at.labels(self.name).set(self.current.loaded_at)
            log.info("model swapped", extra={"model": self.name, "version": version, "previous": previous})
            return True

    def _swap_in(self, version: str, bundle: ModelBundle) -> list[ServedModel]:
        """Serve ``bundle`` as ``version`` from now on (one reference assignment); the model it replaces, in a
        list (``[]`` if none) that holds the holder's reference to it."""
        retired = [] if self.current is None else [self.current]
        placement = RankingPlacement(self.settings.serving.inline_ranking_ms / 1000)
        self.current = ServedModel(self.name, version, bundle, time.time(), placement)  # the atomic swap
        gc.freeze()  # long-lived model objects leave the cyclic GC's scans (no multi-ms pauses per request)
        return retired

    @staticmethod
    def _release(retired: list[ServedModel], wait_s: float = 0.5) -> None:
        """Free the retired model part by part once no request in flight holds it (after ``wait_s``, as it is)."""
        deadline = time.monotonic() + wait_s
        while retired and sys.getrefcount(retired[0]) > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        if retired:
            release_in_parts(retired)

    def _failed(self, message: str) -> None:
        self.last_error = message
        self.metrics.swap_failures.labels(self.name).inc()
        log.warning("model refresh failed", extra={"model": self.name, "error": message[:500]})

    def start(self) -> None:
        """Poll the alias in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"model-poller-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
