"""The production stack for real: an MLflow server on PostgreSQL with S3 artifacts (``registry/stack.py``,
the very command ``make prod-stack`` runs), driven register → promote → serve → hot swap → rollback.

The platform's side gets only ``FEDSTREAM_MLFLOW_TRACKING_URI`` (as the compose file's services do) and no
S3 credentials: artifacts go through the server's proxy. PostgreSQL and the bucket are then read directly
to check that the metadata and the model files really live there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest

from fedstream.host import free_port
from fedstream.settings import load_settings
from registry.flavor import BUNDLE_FILE, read_bundle
from registry.signing import signing_key
from registry.models import alias_history, register_version
from fedstream.processes import group_members
from registry.stack import ProductionStack, StackError, postgres_bindir
from serving.keys import KeyStore
from tests.test_registry_bundle import make_bundle, make_clicks

NAME = "fedstream-ctr"
S3_CLIENT_VARS = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prod_stack(tmp_path_factory: pytest.TempPathFactory):
    """`python -m registry.stack --json` started as a shell's background job would be (SIGINT ignored), stopped
    with SIGINT at the end (what `kill -INT` or Ctrl-C sends); then nothing may be left."""
    if postgres_bindir() is None and os.environ.get("CI") != "true":
        pytest.skip("PostgreSQL server binaries not installed (`make postgres-tools` installs postgresql-15)")
    log_path = tmp_path_factory.mktemp("prod-stack") / "stack.log"
    env = {k: v for k, v in os.environ.items() if k not in S3_CLIENT_VARS}
    with log_path.open("w") as log_file:
        command = f"trap '' INT; exec {shlex.quote(sys.executable)} -m registry.stack --json"
        process = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE,
                                   stderr=log_file, stdin=subprocess.DEVNULL, text=True, env=env)
    described = None
    try:
        line = process.stdout.readline()
        if not line:
            pytest.fail(f"the stack did not start: {log_path.read_text()[-2000:]}")
        described = json.loads(line)
        yield described
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            for pid in (described or {}).get("pids", {}).values():  # its services run in their own sessions
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            if described:
                shutil.rmtree(described["workdir"], ignore_errors=True)
    assert process.returncode == 0, log_path.read_text()[-2000:]
    assert {name: group_members(pid) for name, pid in described["pids"].items()} == {
        "postgres": [], "s3": [], "mlflow": []}
    assert not Path(described["workdir"]).exists()


def fedstream(env: dict, *args: str) -> dict:
    """Run `fedstream ... --json` with ``env`` (in this process: a new one would spend ~5-18 s importing)."""
    from click.testing import CliRunner

    from fedstream.cli import main

    result = CliRunner().invoke(main, [*args, "--json"], env=env)
    assert result.exit_code == 0, result.output[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def register(settings, logloss: float, scale: float):
    return register_version(settings, make_bundle(f"scale {scale}", scale=scale), name=NAME,
                            metrics={"prequential_logloss": logloss, "window_events": 5000},
                            lineage={"events_seen": 5000, "merchants": ["m1", "m2"]})


class Api:
    """HTTP to the `fedstream serve` subprocess, with a merchant key."""

    def __init__(self, port: int, key: str, log_path: Path) -> None:
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}, timeout=30)
        self.log_path = log_path
        clicks = [c for c in make_clicks(24, seed=5) if c.merchant_id == "m1"][:8]
        self.clicks, self.body = clicks, {"clicks": [msgspec.to_builtins(c) for c in clicks]}

    def served_version(self) -> str | None:
        try:
            answer = self.http.get("/readyz")
        except httpx.TransportError:
            return None
        return answer.json().get("model_version") if answer.status_code == 200 else None

    def wait_for_version(self, version: str, timeout_s: float = 120.0) -> float:
        """Seconds until /readyz reports ``version``."""
        start = time.monotonic()
        while self.served_version() != version:
            if time.monotonic() - start > timeout_s:
                pytest.fail(f"serve never reported version {version}: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        return time.monotonic() - start

    def predictions(self) -> tuple[int, str | None, list[float]]:
        answer = self.http.post("/v1/merchants/m1/predictions", json=self.body)
        payload = answer.json() if answer.status_code == 200 else {}
        return answer.status_code, payload.get("model_version"), payload.get("probabilities", [])


def expected(api: Api, scale: float) -> np.ndarray:
    return make_bundle(scale=scale).predict(api.clicks)


@pytest.fixture
def client_env(prod_stack, tmp_path, monkeypatch) -> dict:
    """The environment of a fedstream service pointed at the stack: the tracking URI, no S3 credentials."""
    for key in S3_CLIENT_VARS:
        monkeypatch.delenv(key, raising=False)
    return {**os.environ, "FEDSTREAM_MLFLOW_TRACKING_URI": prod_stack["env"]["FEDSTREAM_MLFLOW_TRACKING_URI"],
            "FEDSTREAM_DATA_DIR": str(tmp_path / "data"), "FEDSTREAM_SERVING__SWAP_POLL_SECONDS": "0.5"}


def test_register_promote_serve_hot_swap_rollback_on_postgres_and_s3(prod_stack, client_env, tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", mlflow_tracking_uri=client_env["FEDSTREAM_MLFLOW_TRACKING_URI"])
    assert str(register(settings, 0.45, scale=1.0).version) == "1"
    assert fedstream(client_env, "models", "promote")["version"] == "1"
    store = KeyStore.for_settings(settings)
    key = store.issue("m1")

    port, log_path = free_port(), tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        serve = subprocess.Popen([sys.executable, "-m", "fedstream", "serve", "--port", str(port)], env=client_env,
                                 stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    api = Api(port, key, log_path)
    try:
        api.wait_for_version("1", timeout_s=180)
        status, version, probabilities = api.predictions()
        assert (status, version) == (200, "1")
        np.testing.assert_allclose(probabilities, expected(api, 1.0), rtol=1e-6)

        seen, stop = _hammer(api)
        try:
            register(settings, 0.40, scale=2.0)
            promote_s, moved = _timed(fedstream, client_env, "models", "promote")
            assert moved["version"] == "2"
            swap_s = promote_s + api.wait_for_version("2")
            np.testing.assert_allclose(api.predictions()[2], expected(api, 2.0), rtol=1e-6)
            _wait_until(lambda: ("2" in {v for _, v in seen}), "the load thread never saw version 2")
            rollback_s, back = _timed(fedstream, client_env, "models", "rollback")
            assert (back["version"], back["previous"]) == ("1", "2")
            rollback_s += api.wait_for_version("1")
            np.testing.assert_allclose(api.predictions()[2], expected(api, 1.0), rtol=1e-6)
        finally:
            stop()
        assert {status for status, _ in seen} == {200} and {v for _, v in seen} == {"1", "2"}
        metrics = api.http.get("/metrics").text
        assert f'fedstream_model_swaps_total{{model="{NAME}"}} 3.0' in metrics
        print(f"served over HTTP {swap_s:.1f} s after `fedstream models promote` started ({promote_s:.1f} s "
              f"command), rollback {rollback_s:.1f} s; {len(seen)} requests during them, none failed")
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()

    actions = [(h["action"], h["version"]) for h in alias_history(settings, NAME)]
    assert actions == [("register", "1"), ("promote", "1"), ("register", "2"), ("promote", "2"), ("rollback", "1")]
    _assert_metadata_in_postgres(prod_stack["backend_store_uri"])
    _assert_bundles_in_s3(prod_stack, api, signing_key(settings))


def test_mlflow_ui_on_a_tracking_server_shows_the_server_instead_of_starting_one(prod_stack, monkeypatch):
    from click.testing import CliRunner

    from fedstream.cli import main

    uri = prod_stack["env"]["FEDSTREAM_MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("FEDSTREAM_MLFLOW_TRACKING_URI", uri)
    result = CliRunner().invoke(main, ["mlflow-ui", "--port", str(free_port())])
    assert result.exit_code == 0 and f"MLflow UI: {uri}" in result.output
    assert httpx.get(f"{uri}/", timeout=30).headers["content-type"].startswith("text/html")


def _wait_until(condition, message: str, timeout_s: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(message)
        time.sleep(0.05)


def _timed(function, *args):  # noqa: ANN001, ANN202
    start = time.monotonic()
    result = function(*args)
    return time.monotonic() - start, result


def _hammer(api: Api):
    """Predictions in a loop on a thread; returns the (status, version) seen and a stop function."""
    seen: list[tuple[int, str | None]] = []
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            status, version, _ = api.predictions()
            seen.append((status, version))
            time.sleep(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join(timeout=60)

    return seen, stop


def _assert_metadata_in_postgres(backend_store_uri: str) -> None:
    import psycopg2

    with psycopg2.connect(backend_store_uri.replace("postgresql+psycopg2://", "postgresql://")) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (NAME,))
            assert dict(cursor.fetchall()) == {"champion": 1, "challenger": 2}
            cursor.execute("SELECT count(*) FROM model_versions WHERE name = %s", (NAME,))
            assert cursor.fetchone()[0] == 2
    connection.close()


def _assert_bundles_in_s3(prod_stack: dict, api: Api, signing: bytes) -> None:
    """The two bundles are objects in the bucket (read with S3 credentials, as a direct s3:// reader would)."""
    import boto3

    env = prod_stack["env"]
    s3 = boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    bucket = prod_stack["artifacts_destination"].removeprefix("s3://")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"] if o["Key"].endswith(f"/{BUNDLE_FILE}")]
    assert len(keys) == 2
    scales = set()
    for key in keys:
        local = Path(api.log_path.parent) / key.replace("/", "_")
        s3.download_file(bucket, key, str(local))
        probabilities = read_bundle(local, signing).predict(api.clicks)  # signed by the registering process
        scales |= {scale for scale in (1.0, 2.0) if np.allclose(probabilities, expected(api, scale), rtol=1e-6)}
    assert scales == {1.0, 2.0}


def _compose_default(text: str) -> str:
    """``${VAR:-default}`` -> ``default``: the value compose uses without a .env."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def test_compose_runs_the_mlflow_server_this_file_tests():
    """deploy/docker-compose.yml's mlflow, postgres and clients are the design the stack above runs."""
    import yaml

    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    stack = ProductionStack()
    stack.ports = {"postgres": 5432, "s3": 9000, "mlflow": 5000}
    service = compose["services"]["mlflow"]

    def flags(args: list[str]) -> dict[str, str]:
        return {arg.split("=", 1)[0]: _compose_default(arg.split("=", 1)[-1]) for arg in args if arg.startswith("--")}

    theirs, ours = flags(service["command"]), flags(stack.mlflow_server_args())
    assert theirs.keys() == ours.keys()
    assert [theirs[f] for f in ("--serve-artifacts", "--artifacts-destination")] == [
        ours[f] for f in ("--serve-artifacts", "--artifacts-destination")]
    env = {key: _compose_default(str(value)) for key, value in service["environment"].items()}
    assert set(stack.mlflow_server_env()) <= set(env)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == stack.mlflow_server_env()["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]
    assert env["MLFLOW_BACKEND_STORE_URI"].replace("@postgres:", "@127.0.0.1:") == stack.backend_store_uri
    assert _compose_default(compose["services"]["minio-init"]["environment"]["MLFLOW_BUCKET"]) == stack.config.bucket
    clients = compose["x-fedstream"]["environment"]
    assert set(stack.client_env()) <= set(clients) and clients["FEDSTREAM_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    example = dict(line.split("=", 1) for line in (REPO / "deploy" / ".env.example").read_text().splitlines()
                   if "=" in line and not line.startswith("#"))
    c = stack.config
    assert [example[k] for k in ("POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD", "MINIO_ROOT_USER",
                                 "MINIO_ROOT_PASSWORD", "MLFLOW_BUCKET")] == [
        c.database, c.db_user, c.db_password, c.s3_access_key, c.s3_secret_key, c.bucket]
    bindir = postgres_bindir()
    if bindir is not None:
        version = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True)
        major = re.search(r"(\d+)\.\d+", version.stdout).group(1)
        assert compose["services"]["postgres"]["image"] == f"postgres:{major}-alpine"


def test_a_stack_that_cannot_start_says_why_and_leaves_nothing_behind(monkeypatch):
    import registry.stack

    monkeypatch.setattr(registry.stack, "postgres_bindir", lambda: None)
    started, spawn = [], ProductionStack._spawn

    def spawn_and_record(self, name, command, **kwargs):  # noqa: ANN001, ANN202
        spawn(self, name, command, **kwargs)
        started.append(self._services[-1].process.pid)

    monkeypatch.setattr(ProductionStack, "_spawn", spawn_and_record)
    stack = ProductionStack()
    with pytest.raises(StackError, match="PostgreSQL server binaries not found.*postgres-tools"):
        stack.start()
    assert len(started) == 1 and group_members(started[0]) == []  # the S3 server had started: stopped
    assert stack.describe()["pids"] == {} and not stack.workdir.exists()
