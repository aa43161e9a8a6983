"""Model versions of the platform: register, promote, roll back, list, load — plain functions over settings.

One way for every room to put a model into MLflow: :func:`register_version` logs a
:class:`~registry.bundle.ModelBundle` with the fedstream pyfunc flavor into a run, registers it under a
name, points the ``challenger`` alias at it and tags the version with its lineage (stream offsets or
data period, events seen, rounds, merchants, DP settings...) and the metrics it had when registered
(``metric.<name>`` tags), so promotion decisions need nothing but the registry.

:func:`promote` moves the ``champion`` alias when a :class:`MetricPolicy` (or any callable policy) says
so; :func:`rollback` moves it back to the previous champion. Every alias move is appended to the
registered model's ``alias_history`` tag, and the chain of champions to ``champion_stack``, so the
history survives restarts and is visible in the MLflow UI.

Example (a real sqlite store under a temp dir)::

    version = register_version(settings, bundle, name="fedstream-ctr",
                               metrics={"prequential_logloss": 0.41, "window_events": 5000},
                               lineage={"offsets": {"clicks/0": 1234}, "events_seen": 5000})
    promote(settings, "fedstream-ctr")           # first version: becomes champion
    load_bundle(settings, "models:/fedstream-ctr@champion").recommend("m1", "u1", 10)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedstream.errors import ExpectedFailure
from fedstream.logs import get_logger
from fedstream.settings import RegistrySettings, Settings
from registry.bundle import ModelBundle
from registry.signing import signing_key
from registry.tracking import activate, client

log = get_logger("registry.models")

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_PREFIX, LINEAGE_PREFIX = "metric.", "lineage."
HISTORY_TAG, STACK_TAG = "alias_history", "champion_stack"


class RegistryError(ExpectedFailure, RuntimeError):
    """A registry operation that cannot be done as asked (unknown model or version, nothing to roll back to)."""


class AlreadyRegistered(RegistryError):
    """The model's latest version already has the lineage a registration asked to be new: none was made."""

    def __init__(self, version: Any) -> None:
        super().__init__(f"model {version.name!r} version {version.version} already holds this lineage")
        self.version = version


@dataclass(frozen=True)
class Decision:
    """A policy's verdict on a challenger, with the reason shown to operators."""

    promote: bool
    reason: str


@dataclass(frozen=True)
class AliasMove:
    """The outcome of :func:`promote` or :func:`rollback`."""

    name: str
    moved: bool
    version: str
    previous: str | None
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


Policy = Callable[[Any, Any], Decision]  # (candidate ModelVersion, champion ModelVersion | None) -> Decision


class MetricPolicy:
    """Promote when the challenger's registration metric beats the champion's, over enough events.

    The first version of a model always becomes champion. ``events_metric`` is looked up in the
    version's metrics, then in its lineage (``events_seen`` is a common lineage key).

    Example:
        >>> policy = MetricPolicy(metric="prequential_logloss", greater_is_better=False, min_events=100)
        >>> policy.decide({"prequential_logloss": 0.40, "window_events": 500}, {"prequential_logloss": 0.45}).promote
        True
        >>> policy.decide({"prequential_logloss": 0.40, "window_events": 50}, {"prequential_logloss": 0.45}).reason
        'challenger measured on 50 events < min_events 100'
    """

    def __init__(self, metric: str = "prequential_logloss", greater_is_better: bool = False,
                 min_improvement: float = 0.0, min_events: int = 0, events_metric: str = "window_events") -> None:
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.min_improvement = min_improvement
        self.min_events = min_events
        self.events_metric = events_metric

    @classmethod
    def from_settings(cls, config: RegistrySettings) -> MetricPolicy:
        return cls(config.promotion_metric, config.greater_is_better, config.min_improvement,
                   config.min_events, config.events_metric)

    def __call__(self, candidate: Any, champion: Any | None) -> Decision:
        values = {**version_lineage(candidate), **version_metrics(candidate)}
        return self.decide(values, version_metrics(champion) if champion is not None else None)

    def decide(self, candidate: Mapping[str, Any], champion: Mapping[str, Any] | None) -> Decision:
        if champion is None:
            return Decision(True, "no champion yet: the first version becomes champion")
        events = _number(candidate.get(self.events_metric, candidate.get("events_seen")))
        if self.min_events and (events is None or events < self.min_events):
            shown = "unknown" if events is None else f"{events:g}"
            return Decision(False, f"challenger measured on {shown} events < min_events {self.min_events}")
        mine, theirs = _number(candidate.get(self.metric)), _number(champion.get(self.metric))
        if mine is None:
            return Decision(False, f"challenger has no {self.metric} metric")
        if theirs is None:
            return Decision(True, f"champion has no {self.metric} metric")
        gain = (mine - theirs) if self.greater_is_better else (theirs - mine)
        verdict = gain > self.min_improvement or (self.min_improvement == 0 and gain > 0)
        relation = "better" if verdict else "not better"
        return Decision(verdict, f"{self.metric} {mine:.6g} vs champion {theirs:.6g}: {relation} "
                                 f"(gain {gain:.6g}, needed > {self.min_improvement:g})")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def version_metrics(version: Any) -> dict[str, float]:
    """Metrics recorded on a model version at registration (its ``metric.*`` tags)."""
    return {k[len(METRIC_PREFIX):]: float(v) for k, v in (version.tags or {}).items()
            if k.startswith(METRIC_PREFIX) and _number(v) is not None}


def version_lineage(version: Any) -> dict[str, Any]:
    """Lineage recorded on a model version (its ``lineage.*`` tags, JSON-decoded)."""
    out: dict[str, Any] = {}
    for key, value in (version.tags or {}).items():
        if key.startswith(LINEAGE_PREFIX):
            try:
                out[key[len(LINEAGE_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len(LINEAGE_PREFIX):]] = value
    return out


def without_user_state(bundle: ModelBundle) -> ModelBundle:
    """A copy of ``bundle`` with no per-user data: users' recent categories and the recommender's per-user
    histories (recent and bought items) are dropped; catalogs, weights and item-item links stay."""
    import copy

    from streams.features import FeatureContext

    state = bundle.context.state()
    for merchant in state["merchants"].values():
        merchant["recent"] = {}
    recommender = copy.deepcopy(bundle.recommender)
    for merchant in getattr(recommender, "merchants", {}).values():
        merchant.users.clear()
    return dataclasses.replace(bundle, context=FeatureContext.from_state(state), recommender=recommender)


def register_version(settings: Settings, bundle: ModelBundle, *, name: str, metrics: Mapping[str, float],
                     lineage: Mapping[str, Any], run_id: str | None = None, description: str | None = None,
                     user_state: bool | None = None, unless_latest: Mapping[str, Any] | None = None):
    """Log ``bundle`` (signed) in a run (new one in the platform experiment when ``run_id`` is None), register
    it under ``name``, point ``challenger`` at it and tag metrics and lineage. Returns the ``ModelVersion``.

    ``user_state`` (default ``settings.registry.user_state``) False logs :func:`without_user_state` of it.
    ``unless_latest``: lineage values; when the latest version's lineage has them all, :class:`AlreadyRegistered`
    is raised instead of creating a version (checked after the bundle is logged, just before the version is
    created: of two registrations of one state racing, the later loses its logged bundle, not the registry)."""
    import mlflow

    from registry.flavor import log_bundle

    keep_users = settings.registry.user_state if user_state is None else user_state
    if not keep_users:
        bundle = without_user_state(bundle)
    clean_metrics = {k: float(v) for k, v in metrics.items() if _number(v) is not None}
    mlflow_client = client(settings)
    tags = {"kind": bundle.kind, "user_state": str(keep_users).lower(),
            **{f"{METRIC_PREFIX}{k}": repr(v) for k, v in clean_metrics.items()},
            **{f"{LINEAGE_PREFIX}{k}": _tag_value(v) for k, v in lineage.items()}}
    # inside activate(): MLflow resolves a ``models:/m-...`` source through the *global* tracking URI
    with activate(settings) as exp_id:
        with _run(mlflow_client, exp_id, run_id, name) as run:
            mlflow.log_metrics(clean_metrics)
            mlflow.log_dict(dict(lineage), f"lineage/{int(time.time() * 1000)}.json")
            info = log_bundle(bundle, signing_key(settings), name="model")
            run_id = run.info.run_id
        _ensure_registered_model(mlflow_client, name)
        _raise_if_latest_has(settings, name, unless_latest)
        version = mlflow_client.create_model_version(
            name, source=info.model_uri, run_id=run_id, tags=tags,
            description=description or bundle.description or None, model_id=getattr(info, "model_id", None),
        )
    mlflow_client.set_registered_model_alias(name, CHALLENGER, version.version)
    _record(mlflow_client, name, {"alias": CHALLENGER, "version": str(version.version), "action": "register"}, settings)
    log.info("model version registered", extra={"model": name, "version": version.version, "run_id": run_id})
    return mlflow_client.get_model_version(name, version.version)


def _raise_if_latest_has(settings: Settings, name: str, lineage: Mapping[str, Any] | None) -> None:
    latest = latest_version(settings, name) if lineage else None
    if latest is not None and all(version_lineage(latest).get(k) == v for k, v in lineage.items()):
        raise AlreadyRegistered(latest)


@contextlib.contextmanager
def _run(mlflow_client, exp_id: str, run_id: str | None, name: str):
    """The run to log into: the caller's active run, an existing run (status restored after), or a new one."""
    import mlflow

    active = mlflow.active_run()
    if run_id is not None and active is not None and active.info.run_id == run_id:
        yield active
        return
    if run_id is None:
        with mlflow.start_run(experiment_id=exp_id, run_name=f"register-{name}", nested=active is not None) as run:
            yield run
        return
    status = mlflow_client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id, nested=active is not None) as run:
        yield run
    if status != "FINISHED":
        mlflow_client.update_run(run_id, status=status)  # a worker's long-lived run stays RUNNING


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:100_000]


def _ensure_registered_model(mlflow_client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        try:
            mlflow_client.create_registered_model(name, description="fedstream model (see alias_history tag)")
        except MlflowException:  # registered concurrently by another worker
            mlflow_client.get_registered_model(name)


def _get_model(mlflow_client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model named {name!r}") from None


def _get_version(mlflow_client, name: str, version: str | int):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"model {name!r} has no version {version}") from None


def _alias_version(mlflow_client, name: str, alias: str):
    model = _get_model(mlflow_client, name)
    version = (model.aliases or {}).get(alias)
    return _get_version(mlflow_client, name, version) if version is not None else None


def champion_version(settings: Settings, name: str):
    """The ``ModelVersion`` the ``champion`` alias points at, or None."""
    return _alias_version(client(settings), name, CHAMPION)


def promote(settings: Settings, name: str, version: str | int | None = None, policy: Policy | None = None,
            *, force: bool = False) -> AliasMove:
    """Move ``champion`` to ``version`` (default: the ``challenger``) if ``policy`` agrees, or if ``force``.

    ``policy`` defaults to :class:`MetricPolicy` from ``settings.registry``. Returns what happened.
    """
    mlflow_client = client(settings)
    if version is None:
        candidate = _alias_version(mlflow_client, name, CHALLENGER)
        if candidate is None:
            raise RegistryError(f"model {name!r} has no challenger to promote; pass a version")
    else:
        candidate = _get_version(mlflow_client, name, version)
    champion = _alias_version(mlflow_client, name, CHAMPION)
    wanted, previous = str(candidate.version), (str(champion.version) if champion is not None else None)
    if previous == wanted:
        return AliasMove(name, False, wanted, previous, "already champion")
    decision = (policy or MetricPolicy.from_settings(settings.registry))(candidate, champion)
    if force and not decision.promote:
        decision = Decision(True, f"forced ({decision.reason})")
    if not decision.promote:
        return AliasMove(name, False, wanted, previous, decision.reason)
    mlflow_client.set_registered_model_alias(name, CHAMPION, wanted)
    stack = _stack(mlflow_client, name) + [wanted]
    mlflow_client.set_registered_model_tag(name, STACK_TAG, json.dumps(stack[-settings.registry.history_limit:]))
    _record(mlflow_client, name, {"alias": CHAMPION, "version": wanted, "previous": previous,
                                  "action": "promote", "reason": decision.reason}, settings)
    log.info("champion promoted", extra={"model": name, "version": wanted, "previous": previous})
    return AliasMove(name, True, wanted, previous, decision.reason)


def rollback(settings: Settings, name: str) -> AliasMove:
    """Move ``champion`` back to the version that was champion before the current one."""
    mlflow_client = client(settings)
    champion = _alias_version(mlflow_client, name, CHAMPION)
    stack = _stack(mlflow_client, name)
    if champion is None:
        raise RegistryError(f"model {name!r} has no champion to roll back")
    current = str(champion.version)
    while stack and stack[-1] != current:  # alias moved by hand outside this module
        stack.pop()
    if len(stack) < 2:
        raise RegistryError(f"model {name!r} has no previous champion before version {current}")
    stack.pop()
    target = stack[-1]
    _get_version(mlflow_client, name, target)
    mlflow_client.set_registered_model_alias(name, CHAMPION, target)
    mlflow_client.set_registered_model_tag(name, STACK_TAG, json.dumps(stack))
    reason = f"rolled back from version {current}"
    _record(mlflow_client, name, {"alias": CHAMPION, "version": target, "previous": current,
                                  "action": "rollback", "reason": reason}, settings)
    log.info("champion rolled back", extra={"model": name, "version": target, "previous": current})
    return AliasMove(name, True, target, current, reason)


def _stack(mlflow_client, name: str) -> list[str]:
    raw = (_get_model(mlflow_client, name).tags or {}).get(STACK_TAG)
    return [str(v) for v in json.loads(raw)] if raw else []


def _record(mlflow_client, name: str, entry: dict, settings: Settings) -> None:
    history = alias_history_of(mlflow_client, name)
    history.append({**entry, "at": round(time.time(), 3)})
    value = json.dumps(history[-settings.registry.history_limit:])
    mlflow_client.set_registered_model_tag(name, HISTORY_TAG, value[-100_000:] if len(value) > 100_000 else value)


def alias_history_of(mlflow_client, name: str) -> list[dict]:
    raw = (_get_model(mlflow_client, name).tags or {}).get(HISTORY_TAG)
    try:
        return list(json.loads(raw)) if raw else []
    except json.JSONDecodeError:
        return []


def alias_history(settings: Settings, name: str) -> list[dict]:
    """Every recorded alias move of a model (oldest first): register, promote, rollback."""
    return alias_history_of(client(settings), name)


def list_models(settings: Settings) -> list[str]:
    """Names of all registered models."""
    return sorted(m.name for m in client(settings).search_registered_models())


def list_versions(settings: Settings, name: str) -> list[dict]:
    """Versions of a model, newest first, as plain dicts (version, aliases, run, kind, metrics, lineage)."""
    mlflow_client = client(settings)
    model = _get_model(mlflow_client, name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    versions = mlflow_client.search_model_versions(f"name = '{_quote(name)}'")
    rows = [{
        "name": name, "version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
        "created": v.creation_timestamp / 1000.0, "run_id": v.run_id, "status": v.status,
        "kind": (v.tags or {}).get("kind"), "metrics": version_metrics(v), "lineage": version_lineage(v),
    } for v in versions]
    return sorted(rows, key=lambda row: int(row["version"]), reverse=True)


def latest_version(settings: Settings, name: str):
    """The newest ``ModelVersion`` of ``name`` (highest number, tags included), or None (none registered)."""
    found = client(settings).search_model_versions(f"name = '{_quote(name)}'", max_results=1,
                                                   order_by=["version_number DESC"])
    return found[0] if found else None


def _quote(name: str) -> str:
    return name.replace("'", "''")


def resolve(settings: Settings, name: str, alias: str = CHAMPION) -> str | None:
    """The version number an alias points at (cheap: one registry read), or None."""
    model = _get_model(client(settings), name)
    version = (model.aliases or {}).get(alias)
    return str(version) if version is not None else None


def load_bundle(settings: Settings, uri: str) -> ModelBundle:
    """Load the :class:`ModelBundle` behind a model URI (``models:/NAME@champion``, ``models:/NAME/3``...).

    Only the signed ``bundle.pkl`` artifact is fetched and verified with these settings' key before it is
    unpickled (:class:`~registry.signing.UntrustedArtifact` otherwise); MLflow's own ``python_model.pkl``
    is never read here.
    """
    import tempfile

    from registry.flavor import read_bundle

    with tempfile.TemporaryDirectory() as scratch:
        return read_bundle(fetch_bundle(settings, uri, scratch), signing_key(settings))


def fetch_bundle(settings: Settings, uri: str, directory: str) -> Path:
    """Download the signed ``bundle.pkl`` artifact behind a model URI into ``directory`` (not verified yet:
    :func:`registry.flavor.read_bundle` verifies it before unpickling); returns its path."""
    import mlflow.artifacts

    from registry.flavor import BUNDLE_PATH

    with activate(settings):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/{BUNDLE_PATH}",
                                                        dst_path=directory))
