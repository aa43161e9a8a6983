"""Where MLflow lives: a sqlite store plus local artifacts under the data dir, or a tracking server.

Plain functions over a tracking URI (as MLflow's own client API): nothing here keeps global state
except :func:`activate`, which points MLflow's fluent API at our store for the duration of a block.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from fedstream.settings import Settings
from registry.signing import signing_key, trusting


def tracking_uri(settings: Settings) -> str:
    """The configured tracking URI, or ``sqlite:////<abs data dir>/mlflow/mlflow.db`` (four slashes)."""
    if settings.mlflow_tracking_uri:
        return settings.mlflow_tracking_uri
    store = settings.data_path / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def is_tracking_server(settings: Settings) -> bool:
    """True when MLflow is a tracking server (``http(s)://``) rather than a store this process opens."""
    return (settings.mlflow_tracking_uri or "").startswith(("http://", "https://"))


def artifact_root(settings: Settings) -> str | None:
    """Local artifact root for the embedded store; a tracking server decides its own (S3/MinIO)."""
    if settings.mlflow_tracking_uri and not settings.mlflow_tracking_uri.startswith("sqlite:"):
        return None
    root = settings.data_path / "mlflow" / "artifacts"
    root.mkdir(parents=True, exist_ok=True)
    return root.as_uri()


def client(settings: Settings):
    """An ``MlflowClient`` bound to the platform's tracking and registry store."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(settings)
    if uri.startswith("sqlite:") and uri not in _READY_SQLITE_STORES:
        with _store_init_lock(settings):
            mlflow_client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            mlflow_client.search_registered_models(max_results=1)  # opens (and migrates) the registry too
        _READY_SQLITE_STORES.add(uri)
        return mlflow_client
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


_READY_SQLITE_STORES: set[str] = set()  # memo only: stores this process has already seen migrated


@contextlib.contextmanager
def _store_init_lock(settings: Settings) -> Iterator[None]:
    """Serialize the first opening of a sqlite store across processes.

    MLflow runs alembic migrations when it first opens a store; two workers opening the same new
    store at once race (``duplicate column name: step``). The first one migrates, the others wait.
    """
    import fcntl

    with (settings.data_path / "mlflow" / ".init.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def experiment_id(settings: Settings, name: str | None = None) -> str:
    """The id of experiment ``name`` (default: settings.mlflow_experiment), created if missing."""
    mlflow_client = client(settings)
    name = name or settings.mlflow_experiment
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=_experiment_artifacts(settings, name))
    except Exception:  # created concurrently by another worker
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _experiment_artifacts(settings: Settings, name: str) -> str | None:
    root = artifact_root(settings)
    return f"{root.rstrip('/')}/{name}" if root else None


@contextlib.contextmanager
def activate(settings: Settings) -> Iterator[str]:
    """Point MLflow's fluent API (``mlflow.start_run``, ``log_model``) at our store inside the block, and
    make pyfunc loads in it verify bundle signatures with these settings' key (:mod:`registry.signing`).

    MLflow keeps the URI in a module global *and* in ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI``;
    both are put back exactly as they were on exit, so one settings' store never leaks into the next.
    """
    import mlflow

    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    uri = tracking_uri(settings)
    exp_id = experiment_id(settings)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with trusting(signing_key(settings)):
            yield exp_id
    finally:
        mlflow.set_tracking_uri(saved_env["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved_env["MLFLOW_REGISTRY_URI"])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def server_command(settings: Settings, host: str, port: int) -> list[str]:
    """The ``mlflow server`` command line serving the UI on the platform's store."""
    import sys

    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri(settings),
               "--host", host, "--port", str(port), "--workers", "1"]
    root = artifact_root(settings)
    if root:
        command += ["--default-artifact-root", root, "--no-serve-artifacts"]
    return command


def artifacts_dir(settings: Settings) -> Path:
    """Local directory for platform files that are not MLflow artifacts (checkpoints, reports)."""
    path = settings.data_path / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path
