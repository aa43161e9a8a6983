"""Rounds across separate TFF worker processes over gRPC: what ``fedstream federated join`` sets up.

Design notes: `federated/README.md`, `federated/remote.py`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedstream.host import MissingPackageFile, free_port, package_file
from fedstream.logs import get_logger

log = get_logger("federated.remote")


def worker_binary() -> Path:
    """Path of the C++ executor service shipped inside the TFF wheel."""
    try:
        return package_file("tensorflow_federated", "data/worker_binary")
    except MissingPackageFile as exc:
        raise RuntimeError(f"TFF worker binary unavailable: {exc}") from None


def start_worker(port: int = 0, timeout_s: float = 30.0, preexec_fn=None) -> tuple[subprocess.Popen, int]:
    """Start a ``worker_binary`` serving on ``port`` (0: a free one); returns once it accepts connections.

    Its stdout/stderr go to /dev/null so it can never hold a parent's pipes; stop it with :func:`stop_worker`.
    """
    port = port or free_port()
    proc = subprocess.Popen([str(worker_binary()), f"--port={port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, preexec_fn=preexec_fn)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker_binary exited with {proc.returncode} (port {port} taken?)")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return proc, port
        time.sleep(0.1)
    stop_worker(proc)
    raise RuntimeError(f"worker_binary did not listen on port {port} within {timeout_s} s")


def stop_worker(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Stop one worker we started, by its PID (SIGTERM, then SIGKILL)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace_s)


def channel_credentials(settings):
    """The coordinator's mTLS credentials (federation CA, its client certificate and key) for gRPC."""
    import grpc

    from federated.certs import tls_files

    files = tls_files(settings, "coordinator")
    if missing := files.missing():
        raise ValueError(f"no coordinator TLS material: {', '.join(map(str, missing))} missing (fedstream federated "
                         "certs, or FEDSTREAM_FEDERATED__COORDINATOR_CERT_FILE / __COORDINATOR_KEY_FILE / __TLS_CA_FILE)")
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def remote_context(address: str, credentials=None):
    """An async TFF execution context whose executor is the worker service at ``host:port``.

    With ``credentials`` (:func:`channel_credentials`) the channel is TLS with the coordinator's client
    certificate, checked by the worker's gateway; without, plain gRPC (an ``--insecure-bind-all`` worker).
    """
    import grpc
    import tensorflow_federated as tff
    from tensorflow_federated.python.core.backends.native import compiler
    from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
    from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context
    from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
    from tensorflow_federated.python.core.impl.types import placements

    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    if credentials is not None:
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        log.warning("plain gRPC to a worker (no TLS)", extra={"address": address})
        channel = grpc.insecure_channel(address, options=options)
    stub = tff.framework.RemoteExecutorGrpcStub(channel)

    def stack_fn(cardinalities):
        if cardinalities.get(placements.CLIENTS) is None:
            cardinalities[placements.CLIENTS] = 0  # the merge and after-merge steps run without clients
        executor = tff.framework.RemoteExecutor(stub)
        executor.set_cardinalities(cardinalities)
        return executor

    return async_execution_context.AsyncExecutionContext(
        executor_fn=python_executor_stacks.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn),
        compiler_fn=compiler.desugar_and_transform_to_native,
        transform_args=tensorflow_computation.transform_args,
        transform_result=tensorflow_computation.transform_result,
    )


def mergeable_context(workers: list[WorkerRecord], credentials=None):
    """One context over the workers: client work split across them in order, partial aggregates merged.

    Workers that joined with TLS (the default) are dialled with ``credentials``; a TLS worker without
    credentials is an error, never a silent downgrade.
    """
    import tensorflow_federated as tff

    if credentials is None and any(w.tls for w in workers):
        raise ValueError("joined workers require TLS: the coordinator needs its client certificate")
    contexts = [remote_context(w.address, credentials if w.tls else None) for w in workers]
    return tff.backends.native.create_mergeable_comp_execution_context(contexts)


@dataclass
class OnWorkers:
    """Runs ``process.next`` on the workers' mergeable context; other members run in the default context.

    With one merchant per worker, the cohort list must be in worker order (the mergeable context gives
    the k-th slice of the CLIENTS-placed arguments to the k-th worker).
    """

    process: Any
    context: Any

    def next(self, *args):
        import tensorflow_federated as tff

        with tff.framework.get_context_stack().install(self.context):
            return self.process.next(*args)

    def __getattr__(self, name: str):
        return getattr(self.process, name)


@dataclass(frozen=True)
class WorkerRecord:
    """What a joined merchant publishes for the coordinator: its id and its worker's address."""

    merchant_id: str
    address: str
    pid: int
    tls: bool = True  # False only for `join --insecure-bind-all`


def workers_dir(settings) -> Path:
    path = settings.data_path / "federated" / "workers"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_record(settings, record: WorkerRecord) -> Path:
    import json

    path = workers_dir(settings) / f"{record.merchant_id}.json"
    path.write_text(json.dumps(record.__dict__))
    return path


def joined_workers(settings) -> list[WorkerRecord]:
    """Records of joined merchants whose worker process is still alive, sorted by merchant id."""
    import json

    found = []
    for path in sorted(workers_dir(settings).glob("*.json")):
        try:
            record = WorkerRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if _reachable(record.address):
            found.append(record)
    return found


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except (OSError, ValueError):
        return False


def serve_until_stopped(proc: subprocess.Popen, stop_after_s: float | None = None) -> int:
    """Block while the worker runs; SIGTERM/SIGINT (or ``stop_after_s``) stop it. Returns its exit code."""
    import signal

    stopping = {"now": False}

    def request_stop(signum, frame):
        stopping["now"] = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    started = time.monotonic()
    try:
        while proc.poll() is None and not stopping["now"]:
            if stop_after_s is not None and time.monotonic() - started > stop_after_s:
                break
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_worker(proc)
    return proc.returncode if proc.returncode is not None else 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
