"""Per-merchant drift monitoring: feed events and predictions in, get :class:`DriftEvent` s out, publish them.

Design notes: `drift/README.md`, `drift/monitor.py`.

Example:
    >>> from fedstream.settings import load_settings
    >>> import tempfile
    >>> settings = load_settings(data_dir=tempfile.mkdtemp())
    >>> monitor = DriftMonitor(settings, sinks=[JsonlSink(drift_log_path(settings))])
    >>> for i in range(3000):
    ...     _ = monitor.observe_prediction("m1", 1.7e9 + i, y=i % 10 == 0, p=0.1)
    >>> monitor.state("m1")["error.page_hinkley"]["n_seen"]
    3000
    >>> latest_drift(settings, source="file")
    []
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from drift.detectors import (DETECTORS, Detector, Signal, build_detectors, prequential_error, prequential_errors,
                             watchers)
from drift.events import DriftEvent, decode_drift_event, encode_drift_event
from fedstream.logs import get_logger
from fedstream.settings import Settings
from online.prequential import group_positions
from online.slices import replace_merchants
from streams.features import FeatureContext
from streams.schemas import CatalogItem, Click, Event, Order

log = get_logger("drift.monitor")


class UnknownMerchant(KeyError):
    """A merchant the monitor (or the events read) does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown merchant"


class DriftSink(Protocol):
    def publish(self, event: DriftEvent) -> None: ...

    def close(self) -> None: ...


def drift_log_path(settings: Settings) -> Path:
    """The local JSONL log of drift events: ``<data_dir>/drift/events.jsonl``."""
    folder = settings.data_path / "drift"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "events.jsonl"


class JsonlSink:
    """Appends each drift event as one JSON line (flushed at once: drift events are rare and precious)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def publish(self, event: DriftEvent) -> None:
        with self.path.open("ab") as handle:
            handle.write(encode_drift_event(event) + b"\n")

    def close(self) -> None:
        """Nothing stays open between events."""


class KafkaSink:
    """Produces drift events to ``settings.topics.drift`` keyed by merchant (ordered per merchant)."""

    def __init__(self, settings: Settings) -> None:
        from streams.kafka import make_producer

        self.topic = settings.topics.drift.name
        self.producer = make_producer(settings)

    def publish(self, event: DriftEvent) -> None:
        self.producer.send(self.topic, key=event.merchant_id.encode(), value=encode_drift_event(event))
        self.producer.flush()

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()


def _metric_key(*parts: str) -> str:
    """MLflow keys allow letters, digits, ``_-./`` and spaces; anything else becomes ``_``."""
    return "/".join(re.sub(r"[^A-Za-z0-9_\-. ]", "_", part) for part in parts)


class MlflowSink:
    """Logs drift events to one MLflow run: a metric per (merchant, detector) and summary tags."""

    def __init__(self, settings: Settings, run_id: str) -> None:
        from registry.tracking import client

        self.client = client(settings)
        self.run_id = run_id
        self.counts: dict[str, int] = {}

    def publish(self, event: DriftEvent) -> None:
        step = event.event_index if event.event_index >= 0 else 0
        millis = int(event.detected_at * 1000)
        self.client.log_metric(self.run_id, _metric_key("drift", event.merchant_id, event.detector), event.value,
                               timestamp=millis, step=step)
        self.counts[event.merchant_id] = self.counts.get(event.merchant_id, 0) + 1
        summary = json.dumps({"detector": event.detector, "statistic": event.statistic, "value": event.value,
                              "event_index": event.event_index, "window_end_time": event.window_end_time})
        merchant = re.sub(r"[^A-Za-z0-9_\-. /]", "_", event.merchant_id)
        self.client.set_tag(self.run_id, f"drift.{merchant}.last", summary)
        self.client.set_tag(self.run_id, f"drift.{merchant}.count", str(self.counts[event.merchant_id]))
        self.client.set_tag(self.run_id, "drift.last", json.dumps({"merchant_id": event.merchant_id,
                                                                    "detector": event.detector}))

    def close(self) -> None:
        """The MLflow client holds no open resources."""


def serving_run_id(settings: Settings, run_id: str | None = None, model_name: str | None = None,
                   alias: str = "champion") -> str:
    """The run to log drift on: ``run_id`` if given, else the run of ``models:/NAME@champion``, else a
    ``drift-monitor`` run in the platform experiment (created once, reused after)."""
    from registry.tracking import client, experiment_id

    if run_id:
        return run_id
    mlflow_client = client(settings)
    name = model_name or settings.serving.model_name
    try:
        version = mlflow_client.get_model_version_by_alias(name, alias)
        if version.run_id:
            return version.run_id
    except Exception as exc:  # no registered model / alias yet: MLflow raises RestException
        log.info("no serving model run; using the drift-monitor run", extra={"model": name, "reason": str(exc)[:200]})
    exp_id = experiment_id(settings)
    found = mlflow_client.search_runs([exp_id], filter_string="tags.`mlflow.runName` = 'drift-monitor'",
                                      max_results=1)
    if found:
        return found[0].info.run_id
    return mlflow_client.create_run(exp_id, run_name="drift-monitor", tags={"fedstream.room": "drift"}).info.run_id


class DriftMonitor:
    """Detectors per merchant, fed with raw events (labels, features) and predictions (errors).

    ``merchants`` is an optional allow-list: events of any other merchant raise :class:`UnknownMerchant`.
    ``signals``: the signals the monitor is fed (default: all of them); only the detectors watching one of them
    are built, restored or adopted (the learner worker feeds :data:`PREDICTION_SIGNALS` only). Counters: ``global_index`` counts clicks + orders seen (platform-wide), ``merchant_index[m]`` per merchant.
    """

    def __init__(self, settings: Settings, *, sinks: Sequence[DriftSink] = (), model_version: str | None = None,
                 merchants: Iterable[str] | None = None, context: FeatureContext | None = None,
                 signals: Iterable[Signal] | None = None) -> None:
        self.config = settings.drift
        self.signals = frozenset(signals) if signals is not None else None
        self.sinks = list(sinks)
        self.model_version = model_version
        self.allowed = frozenset(merchants) if merchants is not None else None
        # a learner's own context (already observed by the learner) is read, never written
        self._owns_context = context is None
        self.context = context if context is not None else FeatureContext(max_users_per_merchant=1)
        self.detectors: dict[str, dict[str, Detector]] = {}
        self.merchant_index: dict[str, int] = {}
        self.global_index = 0
        self.events: list[DriftEvent] = []
        self._predictions: dict[str, int] = {}
        self._sessions: dict[str, OrderedDict[str, set]] = {}  # session -> categories of its current page view
        self.max_sessions = 20_000
        self._watched_by: dict[str, frozenset[Signal]] = {}  # merchant -> signals its detectors watch

    def _detectors_of(self, merchant_id: str) -> dict[str, Detector]:
        found = self.detectors.get(merchant_id)
        if found is None:
            if self.allowed is not None and merchant_id not in self.allowed:
                raise UnknownMerchant(f"merchant {merchant_id!r} is not monitored")
            found = self.detectors[merchant_id] = build_detectors(self.config, merchant_id, self.model_version,
                                                                  self.signals)
        return found

    def _fed_only(self, detectors: dict[str, dict[str, Detector]]) -> dict[str, dict[str, Detector]]:
        """``detectors`` (per merchant, as restored or adopted) without those watching a signal this monitor is
        not fed: a snapshot taken when every detector was built per merchant sheds the ones never fed."""
        if self.signals is None:
            return detectors
        fed = {name for signal in self.signals for name in watchers(signal)}
        return {merchant: {name: d for name, d in held.items() if name in fed or name not in DETECTORS}
                for merchant, held in detectors.items()}

    def observe(self, event: Event, p: float | None = None) -> list[DriftEvent]:
        """Feed one raw event; for a click, ``p`` is the model's click probability predicted before learning."""
        if isinstance(event, CatalogItem):
            if self._owns_context:
                self.context.observe(event)
            return []
        detectors = self._detectors_of(event.merchant_id)
        index = self.merchant_index.get(event.merchant_id, 0)
        self.merchant_index[event.merchant_id] = index + 1
        self.global_index += 1
        fired: list[DriftEvent] = []
        ts = event.timestamp
        for signal, value in self._signals(event, self._watched(event.merchant_id, detectors)):
            for name in watchers(signal):
                detector = detectors.get(name)
                found = detector.update(value, timestamp=ts, index=index) if detector is not None else None
                if found is not None:
                    fired.append(found)
        if p is not None and isinstance(event, Click):
            error = prequential_error(event.clicked, p, self.config.error_metric, self.config.error_clip)
            fired += self._feed_error(detectors, ts, error, index)
        if isinstance(event, Order) and self._owns_context:
            self.context.observe(event)  # orders of unseen items teach the catalog their price
        return self._emit(fired)

    def observe_prediction(self, merchant_id: str, timestamp: float, y: bool | int, p: float,
                           index: int | None = None) -> list[DriftEvent]:
        """Feed one prequential (y, p) pair to the error detectors of ``merchant_id``."""
        detectors = self._detectors_of(merchant_id)
        counted = self._count_predictions(merchant_id, 1)[0]
        error = prequential_error(y, p, self.config.error_metric, self.config.error_clip)
        return self._emit(self._feed_error(detectors, timestamp, error, counted if index is None else index))

    def observe_predictions(self, merchant_ids: Sequence[str], timestamps: Sequence[float], y: Sequence,
                            p: Sequence) -> list[DriftEvent]:
        """:meth:`observe_prediction` for a block of predictions in stream order (one call per learned block).

        The errors are computed at once and grouped by merchant once (:func:`online.prequential.group_positions`),
        then each merchant's detectors take that merchant's errors in one ``update_many`` call (natively for
        ``error.page_hinkley``); detections are emitted in stream order.
        """
        errors = prequential_errors(np.asarray(y), np.asarray(p), self.config.error_metric, self.config.error_clip)
        if len(errors) != len(merchant_ids) or len(errors) != len(timestamps):
            raise ValueError("merchant_ids, timestamps, y and p must have one length")
        stamps = np.asarray(timestamps, dtype=np.float64)
        fired: list[tuple[int, int, DriftEvent]] = []
        for merchant_id, positions in group_positions(merchant_ids):
            detectors = self._detectors_of(merchant_id)
            mine, when = (errors, stamps) if positions is None else (errors[positions], stamps[positions])
            indices = self._count_predictions(merchant_id, len(mine))
            for rank, name in enumerate(n for n in watchers(Signal.ERROR) if n in detectors):
                for position, event in detectors[name].update_many(mine, when, indices):
                    fired.append((position if positions is None else int(positions[position]), rank, event))
        if not fired:
            return []
        fired.sort(key=lambda found: found[:2])
        return self._emit([event for _, _, event in fired])

    def _count_predictions(self, merchant_id: str, n: int) -> Sequence[int]:
        """Count ``n`` predictions of ``merchant_id``; returns their event indices: the merchant's latest raw
        event when raw events are observed here too, else the number of its predictions before each."""
        seen = self._predictions.get(merchant_id, 0)
        self._predictions[merchant_id] = seen + n
        index = self.merchant_index.get(merchant_id)
        return range(seen, seen + n) if index is None else [max(index - 1, 0)] * n

    def _feed_error(self, detectors: dict[str, Detector], timestamp: float, error: float,
                    index: int) -> list[DriftEvent]:
        fired = (detectors[name].update(error, timestamp=timestamp, index=index)
                 for name in watchers(Signal.ERROR) if name in detectors)
        return [e for e in fired if e is not None]

    def _watched(self, merchant_id: str, detectors: dict[str, Detector]) -> frozenset[Signal]:
        """The signals some detector of the merchant watches (by the registry's declarations)."""
        found = self._watched_by.get(merchant_id)
        if found is None:
            found = self._watched_by[merchant_id] = frozenset(DETECTORS[n].watches for n in detectors if n in DETECTORS)
        return found

    def _signals(self, event: Click | Order, watched: frozenset[Signal]) -> list[tuple[Signal, object]]:
        """(signal, value) pairs a raw event gives, of the ``watched`` signals (see :class:`Signal`).

        Values are per event (traffic), per impression (click, price), per clicked or ordered item (category),
        per session (hour and device of the session's first click: the events of a session are not
        independent draws of them), per user's category choice (each category once per page view, on
        intent-driven pages or clicked).
        """
        values: list[tuple[Signal, object]] = [(Signal.EVENT, None)] if Signal.EVENT in watched else []

        def add(signal: Signal, value: object) -> None:
            if signal in watched:
                values.append((signal, value))

        if isinstance(event, Click):
            new_session, page_view = self._session(event.merchant_id, event.session_id)
            if new_session:  # one value per session: a session's events share their hour and device
                add(Signal.HOUR, time.gmtime(event.timestamp).tm_hour)
                add(Signal.DEVICE, event.device)
            add(Signal.CLICK, event.clicked)
            info = self.context.item(event.merchant_id, event.item_id)
            if info is not None:
                add(Signal.PRICE, info.price)
                add(Signal.ITEM_PRICE, (event.item_id, info.price))
                if event.clicked:
                    add(Signal.CATEGORY, info.category)
                if Signal.CATEGORY_CHOICE in watched:
                    self._category_choice(event, info.category, page_view, values)
            if event.clicked:
                add(Signal.CONVERSION, False)
        else:
            add(Signal.CONVERSION, True)
            for line in event.items:
                info = self.context.item(event.merchant_id, line.item_id)
                if info is not None:
                    add(Signal.CATEGORY, info.category)
        return values

    def _category_choice(self, event: Click, category: str, page_view: set, values: list) -> None:
        """A category the user chose, once per page view: what the page shows on intent-driven pages (search,
        category, product, cart, recommendations), what was clicked elsewhere (home pages show anything)."""
        if event.position == 0:
            page_view.clear()  # slot 0: a new page view
        if category in page_view or not (event.clicked or event.page in self.config.user_category_pages):
            return
        page_view.add(category)
        values.append((Signal.CATEGORY_CHOICE, (event.user_id, category, event.session_id)))

    def _session(self, merchant_id: str, session_id: str) -> tuple[bool, set]:
        """Whether the session is new, and the categories of its current page view (LRU-bounded)."""
        seen = self._sessions.setdefault(merchant_id, OrderedDict())
        page_view = seen.get(session_id)
        if page_view is not None:
            return False, page_view
        page_view = seen[session_id] = set()
        if len(seen) > self.max_sessions:
            seen.popitem(last=False)
        return True, page_view

    def _emit(self, fired: list[DriftEvent]) -> list[DriftEvent]:
        import msgspec

        out = []
        for event in fired:
            event = msgspec.structs.replace(event, global_index=self.global_index - 1)
            out.append(event)
            self.events.append(event)
            log.warning("drift detected", extra={"merchant_id": event.merchant_id, "detector": event.detector,
                                                 "statistic": event.statistic, "value": event.value,
                                                 "event_index": event.event_index})
            for sink in self.sinks:
                sink.publish(event)
        return out

    def state(self, merchant_id: str) -> dict[str, dict]:
        """Every detector's inspectable state for one merchant."""
        if merchant_id not in self.detectors:
            raise UnknownMerchant(f"merchant {merchant_id!r} has no detectors yet (no events seen)")
        return {name: detector.state() for name, detector in self.detectors[merchant_id].items()}

    SNAPSHOT_VERSION = 2  # 2: error detectors keep pending chunk values

    def snapshot(self) -> bytes:
        """Every detector's state, the counters, the open sessions and (when the monitor owns it) the context,
        as bytes for a checkpoint: a restarted worker that saved this resumes its detectors mid-window
        instead of re-learning references (and re-arming CUSUMs) from scratch. Sinks are not included."""
        import pickle

        state = {"version": self.SNAPSHOT_VERSION, **self._merchant_tables(), "global_index": self.global_index,
                 "context": self.context.state() if self._owns_context else None}
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    def _merchant_tables(self) -> dict[str, dict]:
        """The monitor's dicts keyed by merchant, by their names in :meth:`snapshot` (live objects)."""
        return {"detectors": self.detectors, "merchant_index": self.merchant_index, "predictions": self._predictions,
                "sessions": self._sessions}

    @classmethod
    def restore(cls, settings: Settings, snapshot: bytes, **options) -> DriftMonitor:
        """A monitor resumed from :meth:`snapshot` bytes (``options`` as for the constructor: sinks, model
        version, allow-list, the learner's context). Detectors keep the thresholds they were built with;
        a ``model_version`` given here is stamped on their future events. Only load your own checkpoints
        (pickle)."""
        state = cls._loads(snapshot)
        monitor = cls(settings, **options)
        monitor.detectors, monitor.merchant_index = monitor._fed_only(state["detectors"]), state["merchant_index"]
        monitor.global_index, monitor._predictions = state["global_index"], state["predictions"]
        monitor._sessions = state["sessions"]
        if state["context"] is not None and monitor._owns_context:
            monitor.context = FeatureContext.from_state(state["context"])
        monitor._stamp(monitor.detectors)
        return monitor

    def adopt_merchants(self, snapshot: bytes | None, owned: Callable[[str], bool]) -> None:
        """Make the state of every merchant ``owned`` says yes to exactly the one in ``snapshot`` (a peer's
        :meth:`snapshot`: the newest copy of a partition slot that moved here): detectors, counters, open
        sessions and, when the monitor owns its context, the merchant's context. A merchant the snapshot
        lacks, or every owned merchant when ``snapshot`` is None (the peer ran no monitor), starts from
        scratch; other merchants and the platform-wide counter are untouched. Only load your group's
        checkpoints (pickle)."""
        state = self._loads(snapshot) if snapshot is not None else {}
        mine = {**self._merchant_tables(), "watched": self._watched_by}  # the last one is derived: rebuilt
        theirs = {name: state.get(name, {}) for name in mine}
        theirs["detectors"] = self._fed_only(theirs["detectors"])
        if self._owns_context:
            mine["context"] = self.context.merchants
            saved = state.get("context")
            theirs["context"] = FeatureContext.from_state(saved).merchants if saved is not None else {}
        replace_merchants(mine, theirs, owned)
        self._stamp({m: detectors for m, detectors in self.detectors.items() if owned(m)})

    @classmethod
    def _loads(cls, snapshot: bytes) -> dict:
        """The state a :meth:`snapshot` holds (its version checked)."""
        import pickle

        state = pickle.loads(snapshot)
        if not isinstance(state, dict) or state.get("version") != cls.SNAPSHOT_VERSION:
            raise ValueError(f"not a drift monitor snapshot of version {cls.SNAPSHOT_VERSION}")
        return state

    def _stamp(self, detectors: dict[str, dict[str, Detector]]) -> None:
        """Stamp this monitor's model version (when it has one) on the future events of ``detectors``."""
        if self.model_version is not None:
            for detector in (d for merchant in detectors.values() for d in merchant.values()):
                detector.model_version = self.model_version

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def default_sinks(settings: Settings, *, kafka: bool = True, mlflow_run_id: str | None = None,
                  mlflow: bool = True) -> list[DriftSink]:
    """The JSONL log, plus the drift topic (when ``kafka``) and the serving model's MLflow run (when ``mlflow``)."""
    sinks: list[DriftSink] = [JsonlSink(drift_log_path(settings))]
    if kafka:
        sinks.append(KafkaSink(settings))
    if mlflow:
        sinks.append(MlflowSink(settings, serving_run_id(settings, mlflow_run_id)))
    return sinks


def latest_drift(settings: Settings, merchant_id: str | None = None, limit: int = 20, *,
                 source: str | None = None, poll_timeout_s: float = 0.5, max_wait_s: float = 15.0) -> list[dict]:
    """The newest drift events (oldest first, at most ``limit``), optionally of one merchant, as plain dicts.

    Where it reads (``source``):

    * ``"kafka"`` — the drift topic read to its end (:func:`streams.reading.read_to_end`: no group, nothing
      committed; the end is the fetched high watermark, or ``poll_timeout_s`` without a record, or
      ``max_wait_s``). Sees events from every monitor process in the platform.
    * ``"file"`` — the local JSONL log ``<data_dir>/drift/events.jsonl`` written by monitors on this host.
    * ``None`` (default) — Kafka when a broker is configured or recorded in the data dir, else the file.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if source is None:
        source = "kafka" if _broker_known(settings) else "file"
    if source == "kafka":
        raws = _read_topic(settings, poll_timeout_s, max_wait_s)
    elif source == "file":
        path = drift_log_path(settings)
        raws = path.read_bytes().splitlines() if path.exists() else []
    else:
        raise ValueError(f"unknown drift source {source!r}: use 'kafka' or 'file'")
    newest: deque[dict] = deque(maxlen=limit)
    for raw in raws:
        if not raw.strip():
            continue
        try:
            event = decode_drift_event(raw)
        except Exception as exc:  # a torn line or a foreign record must not hide the rest
            log.warning("skipping unreadable drift record", extra={"error": str(exc)[:200]})
            continue
        if merchant_id is None or event.merchant_id == merchant_id:
            newest.append(_as_dict(event))
    return list(newest)


def read_drift_events(settings: Settings, *, source: str | None = None, events_file: str | Path | None = None
                      ) -> list[DriftEvent]:
    """All drift events from a JSONL file, the drift topic or the local log (typed, in stored order)."""
    if events_file is not None:
        return [decode_drift_event(line) for line in Path(events_file).read_bytes().splitlines() if line.strip()]
    return [decode_drift_event(json.dumps(d)) for d in latest_drift(settings, limit=10**9, source=source)]


def _as_dict(event: DriftEvent) -> dict:
    from drift.events import to_dict

    return to_dict(event)


def _broker_known(settings: Settings) -> bool:
    if settings.bootstrap_servers:
        return True
    from streams.broker import read_broker_record

    return read_broker_record(settings.data_path) is not None


def _read_topic(settings: Settings, poll_timeout_s: float, max_wait_s: float) -> list[bytes]:
    from streams.reading import read_to_end

    records = read_to_end(settings, [settings.topics.drift], idle_timeout_s=poll_timeout_s, max_wait_s=max_wait_s)
    return [record.value for record in records]


def learner_monitor_factory(settings: Settings, publish_to_mlflow: bool):
    """Error-stream drift detectors per merchant (drift topic, drift log, MLflow), resumed from the worker's
    checkpoint when it holds their snapshot."""
    import river.drift  # noqa: F401  (the detectors' import costs seconds: pay it before the first record, not in it)

    def build(snapshot: bytes | None) -> DriftMonitor:
        return prediction_monitor(settings, snapshot, sinks=default_sinks(settings, mlflow=publish_to_mlflow))

    return build


#: what the learner worker feeds its monitor (:meth:`DriftMonitor.observe_predictions`): the prediction errors
PREDICTION_SIGNALS = frozenset({Signal.ERROR})


def prediction_monitor(settings: Settings, snapshot: bytes | None, sinks: Sequence[DriftSink] = ()) -> DriftMonitor:
    """The learner worker's monitor: the error detectors only (the only ones it feeds), resumed from
    ``snapshot`` when given (one written when every detector was built restores without the unfed ones)."""
    if snapshot is None:
        return DriftMonitor(settings, sinks=sinks, signals=PREDICTION_SIGNALS)
    return DriftMonitor.restore(settings, snapshot, sinks=sinks, signals=PREDICTION_SIGNALS)
