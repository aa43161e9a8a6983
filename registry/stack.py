"""The production MLflow stack on one machine: PostgreSQL, an S3 server and ``mlflow server``.

The same design as ``deploy/docker-compose.yml``'s ``postgres``, ``minio`` + ``minio-init`` and
``mlflow`` services, run as local processes on free loopback ports in one temp dir: Debian's PostgreSQL
server holds MLflow's metadata, moto's S3 server (installs from the package index; MinIO does not) holds
the artifacts in a bucket, and ``mlflow server --serve-artifacts --artifacts-destination s3://BUCKET``
proxies them, so clients get only ``FEDSTREAM_MLFLOW_TRACKING_URI=http://...`` and need no S3
credentials. Used by ``tests/test_production_stack.py`` and by ``make prod-stack`` (``python -m
registry.stack``), which prints the ``FEDSTREAM_*`` settings to use and runs until interrupted.

Everything is ephemeral (moto keeps objects in memory): stopping the stack stops every process by PID
and deletes its temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import click

from fedstream.host import free_port
from fedstream.logs import configure_logging, get_logger
from fedstream.processes import group_members
from fedstream.settings import MlflowStackSettings, load_settings

log = get_logger("registry.stack")

POSTGRES_PACKAGE = "postgresql-15"  # Debian bookworm's server package (`make postgres-tools` installs it)


class StackError(RuntimeError):
    """A service of the stack could not be started (the message names it and quotes its log)."""


@dataclass
class _Service:
    name: str
    process: subprocess.Popen
    log_path: Path
    stop_signal: int = signal.SIGTERM


def postgres_bindir() -> Path | None:
    """Directory of PostgreSQL's server binaries (``initdb``, ``postgres``): PATH, then Debian's layout."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # /usr/local/bin/initdb may be a symlink into Debian's layout
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return candidates[-1].parent if candidates else None


@dataclass
class ProductionStack:
    """PostgreSQL + S3 + MLflow tracking server in a fresh temp dir; a context manager that stops
    everything (and deletes the dir) on exit."""

    config: MlflowStackSettings = field(default_factory=MlflowStackSettings)
    workdir: Path | None = field(default=None, init=False)
    ports: dict[str, int] = field(default_factory=dict, init=False)
    _services: list[_Service] = field(default_factory=list, init=False)

    def __enter__(self) -> ProductionStack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- addresses and settings ----

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def backend_store_uri(self) -> str:
        c = self.config
        return f"postgresql+psycopg2://{c.db_user}:{c.db_password}@127.0.0.1:{self.ports['postgres']}/{c.database}"

    def client_env(self) -> dict[str, str]:
        """What ``deploy/docker-compose.yml`` gives the fedstream services (``x-fedstream.environment``).

        Only ``FEDSTREAM_MLFLOW_TRACKING_URI`` is needed: artifacts go through the server's proxy. The S3
        variables are for tools that read ``s3://`` URIs directly, as in the compose file.
        """
        return {"FEDSTREAM_MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
                "AWS_ACCESS_KEY_ID": self.config.s3_access_key, "AWS_SECRET_ACCESS_KEY": self.config.s3_secret_key}

    def describe(self) -> dict:
        """Everything a caller needs: client env, server-side addresses, PIDs, the temp dir."""
        return {"env": self.client_env(), "backend_store_uri": self.backend_store_uri,
                "artifacts_destination": f"s3://{self.config.bucket}", "s3_endpoint": self.s3_endpoint,
                "pids": {s.name: s.process.pid for s in self._services}, "workdir": str(self.workdir)}

    # ---- lifecycle ----

    def start(self) -> None:
        """Start PostgreSQL, the S3 server (bucket created), then MLflow; stop what started on failure."""
        self.workdir = Path(tempfile.mkdtemp(prefix="fedstream-stack-"))
        self.workdir.chmod(0o711)  # PostgreSQL's own user must reach its data dir inside
        self.ports = {"postgres": free_port(), "s3": free_port(), "mlflow": free_port()}
        try:
            self._spawn_s3()  # starts while PostgreSQL initializes
            self._start_postgres()
            self._wait("s3", self._create_bucket)
            self._start_mlflow()
        except BaseException:
            self.stop()
            raise
        log.info("production stack ready", extra={"tracking_uri": self.tracking_uri, "workdir": str(self.workdir)})

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop every service by PID (newest first), then delete the temp dir."""
        while self._services:
            service = self._services.pop()
            _stop_group(service.process, service.stop_signal, grace_s)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def failed_service(self) -> str | None:
        """Name of a service whose process has exited, or None while all run."""
        return next((s.name for s in self._services if s.process.poll() is not None), None)

    # ---- services ----

    def _start_postgres(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise StackError(f"PostgreSQL server binaries not found (install Debian's {POSTGRES_PACKAGE}: "
                             "`make postgres-tools` as root)")
        pgdir = self.workdir / "postgres"
        pgdir.mkdir()
        as_user = _postgres_user(pgdir)
        password_file = pgdir / "pwfile"
        password_file.write_text(self.config.db_password + "\n")
        _chown(password_file, as_user)
        initdb = [str(bindir / "initdb"), "-D", str(pgdir / "data"), "-U", self.config.db_user,
                  f"--pwfile={password_file}", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8",
                  "--no-instructions"]
        done = subprocess.run(initdb, user=as_user, cwd=pgdir, capture_output=True, text=True, check=False)
        password_file.unlink()
        if done.returncode != 0:
            raise StackError(f"initdb failed: {(done.stderr or done.stdout).strip()[-800:]}")
        command = [str(bindir / "postgres"), "-D", str(pgdir / "data"), "-p", str(self.ports["postgres"]),
                   "-k", str(pgdir), "-c", "listen_addresses=127.0.0.1"]
        # SIGINT is PostgreSQL's "fast" shutdown: sessions are ended, data flushed, then the postmaster exits
        self._spawn("postgres", command, cwd=pgdir, user=as_user, stop_signal=signal.SIGINT)
        self._wait("postgres", self._create_database)

    def _create_database(self) -> bool:
        import psycopg2

        c = self.config
        try:
            connection = psycopg2.connect(host="127.0.0.1", port=self.ports["postgres"], user=c.db_user,
                                          password=c.db_password, dbname="postgres", connect_timeout=3)
        except psycopg2.OperationalError:
            return False
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{c.database}"')
        finally:
            connection.close()
        return True

    def _spawn_s3(self) -> None:
        self._spawn("s3", s3_server_command(self.ports["s3"]), cwd=self.workdir,
                    env={**os.environ, "TMPDIR": str(self._scratch())})

    def _create_bucket(self) -> bool:
        c = self.config
        return create_bucket(self.s3_endpoint, c.bucket, c.s3_access_key, c.s3_secret_key)

    def mlflow_server_args(self) -> list[str]:
        """``mlflow server`` arguments: the compose file's ``mlflow`` command on this stack's port and bucket."""
        return ["--host=127.0.0.1", f"--port={self.ports['mlflow']}", f"--workers={self.config.workers}",
                "--serve-artifacts", f"--artifacts-destination=s3://{self.config.bucket}"]

    def mlflow_server_env(self) -> dict[str, str]:
        """The MLflow server's own settings (the compose file's ``mlflow.environment``, same names)."""
        c = self.config
        return {"MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": c.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": c.s3_secret_key,
                # in the environment, not on the command line, so the password is not in `ps` (as in compose)
                "MLFLOW_BACKEND_STORE_URI": self.backend_store_uri,
                # no GenAI job runner: it forks 8 more processes (~0.7 GB) that a model registry never uses
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def _start_mlflow(self) -> None:
        env = {**os.environ, **self.mlflow_server_env(), "AWS_DEFAULT_REGION": "us-east-1",
               "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",  # loopback only
               "TMPDIR": str(self._scratch())}  # MLflow's db_init_lock file goes there, not in /tmp
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            env.pop(key, None)
        command = [sys.executable, "-m", "mlflow", "server", *self.mlflow_server_args()]
        self._spawn("mlflow", command, cwd=self.workdir, env=env)
        self._wait("mlflow", lambda: _http_ok(f"{self.tracking_uri}/health"))

    def _scratch(self) -> Path:
        path = self.workdir / "tmp"
        path.mkdir(exist_ok=True)
        return path

    def _spawn(self, name: str, command: list[str], *, cwd: Path, env: dict | None = None, user: str | None = None,
               stop_signal: int = signal.SIGTERM) -> None:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log_file:
            # own session: the service and any children it forks form one process group, stopped together
            process = subprocess.Popen(command, cwd=cwd, env=env, user=user, stdin=subprocess.DEVNULL,
                                       stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self._services.append(_Service(name, process, log_path, stop_signal))

    def _wait(self, name: str, ready) -> None:  # noqa: ANN001 (a () -> bool probe)
        service = next(s for s in self._services if s.name == name)
        started = time.monotonic()
        deadline = started + self.config.start_timeout_s
        while not ready():
            if service.process.poll() is not None:
                raise StackError(f"{name} exited with code {service.process.returncode}: {_tail(service.log_path)}")
            if time.monotonic() > deadline:
                raise StackError(f"{name} not ready after {self.config.start_timeout_s:.0f} s: {_tail(service.log_path)}")
            time.sleep(0.25)
        log.info("service ready", extra={"service": name, "pid": service.process.pid,
                                         "waited_s": round(time.monotonic() - started, 2)})


def s3_server_command(port: int) -> list[str]:
    """moto's S3 server on ``127.0.0.1:port`` (objects in memory): the stack's stand-in for MinIO."""
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def create_bucket(endpoint: str, bucket: str, access_key: str, secret_key: str) -> bool:
    """Create ``bucket`` on the S3 server at ``endpoint``; False while the server does not answer yet."""
    import boto3
    import botocore.exceptions

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=access_key,
                      aws_secret_access_key=secret_key)
    try:
        s3.create_bucket(Bucket=bucket)
    except botocore.exceptions.EndpointConnectionError:
        return False
    return True


def _postgres_user(pgdir: Path) -> str | None:
    """``initdb`` refuses root: as root, run PostgreSQL as the ``postgres`` system user in a dir it owns."""
    if os.geteuid() != 0:
        return None
    _chown(pgdir, "postgres")
    return "postgres"


def _chown(path: Path, user: str | None) -> None:
    if user is not None:
        shutil.chown(path, user=user, group=user)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip() or "(empty log)"
    except OSError:
        return "(no log)"


def _stop_group(process: subprocess.Popen, stop_signal: int, grace_s: float) -> None:
    """Signal the service's process group, wait, then SIGKILL the group if it lingers; reap the leader."""
    for sig in (stop_signal, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + (grace_s if sig != signal.SIGKILL else 5.0)
        while time.monotonic() < deadline:
            process.poll()
            if process.returncode is not None and not group_members(process.pid):
                return
            time.sleep(0.1)
    log.warning("service did not stop", extra={"pid": process.pid})


@click.command("prod-stack", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workers", default=None, type=click.IntRange(1, 16),
              help="MLflow server worker processes [default: settings.mlflow_stack.workers, 1].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line (env, addresses, PIDs) once ready.")
def main(workers: int | None, as_json: bool) -> None:
    """Run MLflow on PostgreSQL with S3 artifacts locally (deploy/'s design) until Ctrl-C or SIGTERM.

    Prints the FEDSTREAM_* settings that point every `fedstream` command at it. Ephemeral: stopping
    deletes the database and the artifacts. Names and secrets: FEDSTREAM_MLFLOW_STACK__* (settings).
    """
    configure_logging()
    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: a background job starts with it ignored
        signal.signal(sig, _raise_interrupt)  # both stop like Ctrl-C: the finally below runs
    config = load_settings().mlflow_stack
    stack = ProductionStack(config.model_copy(update={"workers": workers}) if workers else config)
    try:
        try:
            stack.start()
        except StackError as exc:
            raise click.ClickException(str(exc)) from None
        _announce(stack, as_json)
        while (failed := stack.failed_service()) is None:
            time.sleep(0.5)
        raise click.ClickException(f"{failed} exited; stopping the stack")
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second Ctrl-C must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _announce(stack: ProductionStack, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(stack.describe()), nl=True)
        sys.stdout.flush()
        return
    described = stack.describe()
    click.echo(f"MLflow tracking server  {stack.tracking_uri}  (UI and registry)")
    click.echo(f"  metadata   {described['backend_store_uri']}")
    click.echo(f"  artifacts  {described['artifacts_destination']} on {stack.s3_endpoint} (proxied by the server)")
    click.echo("Point fedstream at it (only the first line is needed; the S3 ones are for direct s3:// readers):")
    for key, value in stack.client_env().items():
        click.echo(f"  export {key}={value}")
    click.echo("Ctrl-C stops every process and deletes the stack's data.")


if __name__ == "__main__":
    main()
