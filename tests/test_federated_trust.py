"""A merchant's worker as two hosts meet it: network namespaces made here joined by a veth pair
(10.231.0.1 merchant <-> 10.231.0.2 coordinator; no other address is ever dialled). Right certificate: an
executor call and a federated round work; no certificate, a foreign CA's or a worker's own: refused; the
worker's raw gRPC port cannot be reached from either namespace. Needs root and `ip netns` (CI runs as
root): it fails, never skips, where they are missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from federated.stores import build_stores
from fedstream.cli import main
from streams.generator import GeneratorConfig, generate

MERCHANT_IP, COORDINATOR_IP = "10.231.0.1", "10.231.0.2"
BITS = 12

PROBE = r'''
import json, socket, sys, grpc
# GetExecutorRequest{cardinalities: [{placement: {uri: "clients"}, cardinality: 1}]}, encoded by hand
REQUEST = b"\x0a\x0d\x0a\x09\x0a\x07clients\x10\x01"
address, raw_port, tls, other = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

def call(cert_dir=None, role=None, plain=False):
    ca = open(f"{tls}/ca.pem", "rb").read()
    if plain:
        channel = grpc.insecure_channel(address)
    elif role is None:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))
    else:
        key, chain = (open(f"{cert_dir}/{role}.{ext}", "rb").read() for ext in ("key", "pem"))
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, chain))
    try:
        reply = channel.unary_unary("/tensorflow_federated.v0.ExecutorGroup/GetExecutor")(REQUEST, timeout=15)
        return {"ok": True, "reply": reply.decode("latin-1")}
    except grpc.RpcError as exc:
        return {"ok": False, "code": exc.code().name}
    finally:
        channel.close()

def raw(host):
    try:
        socket.create_connection((host, raw_port), timeout=3).close()
        return "open"
    except OSError as exc:
        return type(exc).__name__

print(json.dumps({"right": call(tls, "coordinator"), "no_cert": call(), "foreign_ca": call(other, "coordinator"),
                  "worker_cert": call(tls, "worker"), "plain": call(plain=True),
                  "raw_worker_port": raw(address.rsplit(":", 1)[0]), "raw_loopback": raw("127.0.0.1")}))
'''


def _sh(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr.strip()} (this test needs root and ip netns)"


def _make_namespaces(merchant_ns: str, coordinator_ns: str, veth: str) -> None:
    _sh("ip", "netns", "add", merchant_ns)
    _sh("ip", "netns", "add", coordinator_ns)
    _sh("ip", "link", "add", f"{veth}a", "type", "veth", "peer", "name", f"{veth}b")
    for ns, end, ip in ((merchant_ns, "a", MERCHANT_IP), (coordinator_ns, "b", COORDINATOR_IP)):
        _sh("ip", "link", "set", f"{veth}{end}", "netns", ns)
        _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", f"{veth}{end}")
        _sh("ip", "-n", ns, "link", "set", f"{veth}{end}", "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")


def _alive(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def test_worker_is_reached_across_hosts_only_through_mutual_tls(tmp_path):
    data = tmp_path / "data"
    build_stores(generate(GeneratorConfig(merchants=1, events=1500, seed=4)), data / "federated", bits=BITS)
    runner = CliRunner()
    env = {**os.environ, "FEDSTREAM_DATA_DIR": str(data), "FEDSTREAM_FEATURE_BITS": str(BITS),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    made = runner.invoke(main, ["federated", "certs", "--worker-host", MERCHANT_IP], env=env)
    assert made.exit_code == 0, made.output
    foreign = runner.invoke(main, ["federated", "certs", "--out", str(tmp_path / "other"), "--name", "rogue"], env=env)
    assert foreign.exit_code == 0, foreign.output
    tag = f"{os.getpid() % 100000}"
    merchant_ns, coordinator_ns = f"fsm{tag}", f"fsc{tag}"
    join, worker_pid, join_log = None, None, ""
    try:
        _make_namespaces(merchant_ns, coordinator_ns, f"fsv{tag}")
        join = subprocess.Popen(["ip", "netns", "exec", merchant_ns, sys.executable, "-m", "fedstream", "federated",
                                 "join", "--merchant", "m00", "--host", MERCHANT_IP, "--port", "7443"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        record = json.loads(join.stdout.readline() or "{}")
        assert record.get("address") == f"{MERCHANT_IP}:7443", join.stderr.read() if join.poll() is not None else record
        worker_pid = record["pid"]
        raw_port = Path(f"/proc/{worker_pid}/cmdline").read_bytes().split(b"--port=")[1].split(b"\0")[0].decode()
        probe = subprocess.run(["ip", "netns", "exec", coordinator_ns, sys.executable, "-c", PROBE, record["address"],
                                raw_port, str(data / "federated" / "tls"), str(tmp_path / "other")],
                               env=env, capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr[-2000:]
        seen = json.loads(probe.stdout)
        assert seen["right"]["ok"] and "clients=1" in seen["right"]["reply"]  # the C++ executor answered
        for refused in ("no_cert", "foreign_ca", "worker_cert", "plain"):
            assert seen[refused] == {"ok": False, "code": "UNAVAILABLE"}, (refused, seen[refused])
        assert seen["raw_worker_port"] == "ConnectionRefusedError"  # from the coordinator's host
        inside = subprocess.run(["ip", "netns", "exec", merchant_ns, sys.executable, "-c", PROBE, record["address"],
                                 raw_port, str(data / "federated" / "tls"), str(tmp_path / "other")],
                                env=env, capture_output=True, text=True, timeout=120)
        assert json.loads(inside.stdout)["raw_loopback"] == "ConnectionRefusedError"  # nor on the merchant's own host
        round_run = subprocess.run(["ip", "netns", "exec", coordinator_ns, sys.executable, "-m", "fedstream",
                                    "federated", "run", "--workers", "--rounds", "1", "--no-personalize"],
                                   env=env, capture_output=True, text=True, timeout=600)
        assert round_run.returncode == 0, round_run.stderr[-3000:]
        summary = json.loads(round_run.stdout.strip().splitlines()[-1])
        assert summary["execution_context"] == "remote_workers[1]" and summary["versions"] == ["1"]
    finally:
        if join is not None:
            join.terminate()
            assert join.wait(timeout=30) == 0
            join_log = join.stderr.read()
            join.stdout.close()
            join.stderr.close()
        for ns in (merchant_ns, coordinator_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    assert worker_pid is not None
    refusals = [json.loads(line) for line in join_log.splitlines() if '"connection refused"' in line]
    reasons = " ".join(r["reason"] for r in refusals)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reasons and "unsuitable certificate purpose" in reasons
    assert "certificate verify failed" in reasons and all(r["peer"].startswith(f"('{COORDINATOR_IP}'") or
                                                          r["peer"].startswith(f"('{MERCHANT_IP}'") for r in refusals)
    deadline = time.monotonic() + 10
    while _alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker_pid)
    assert not list((data / "federated" / "workers").glob("*.json"))


def test_join_refuses_without_tls_material_and_warns_when_insecure(tmp_path):
    data = tmp_path / "data"
    build_stores(generate(GeneratorConfig(merchants=1, events=600, seed=4)), data / "federated", bits=BITS)
    env = {"FEDSTREAM_DATA_DIR": str(data)}
    refused = CliRunner().invoke(main, ["federated", "join", "--merchant", "m00"], env=env)
    assert refused.exit_code == 1 and "no worker TLS material" in refused.output and "federated certs" in refused.output
    bare = subprocess.run([sys.executable, "-m", "fedstream", "federated", "join", "--merchant", "m00",
                           "--insecure-bind-all", "--stop-after", "1"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0, bare.stderr[-2000:]
    assert "ALL interfaces with NO authentication" in bare.stderr
    assert json.loads(bare.stdout.splitlines()[0])["tls"] is False
    help_text = CliRunner().invoke(main, ["federated", "join", "--help"]).output
    assert "--insecure-bind-all" in help_text and "--host" in help_text


@pytest.mark.parametrize("role", ["worker", "coordinator"])
def test_certificates_carry_one_usage_each(tmp_path, role):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from federated.certs import make_federation

    written = make_federation(tmp_path, ["127.0.0.1", "merchant.example"], days=2)
    cert = x509.load_pem_x509_certificate(written[f"{role}_cert"].read_bytes())
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH if role == "worker" else ExtendedKeyUsageOID.CLIENT_AUTH]
    assert oct(written[f"{role}_key"].stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("prefix", [["unshare", "--net"], ["unshare", "--user", "--map-root-user", "--net"]])
def test_isolated_worker_has_only_loopback_and_answers_through_its_socket(prefix):
    """Both isolation modes (root; unprivileged user namespace): the worker's namespace holds only lo, its port
    is closed in ours, its Unix socket reaches the real executor, and stopping the relay stops the worker."""
    import socket

    import grpc

    from federated.isolation import start_isolated_worker, stop_isolated_worker

    proc, ready, socket_dir = start_isolated_worker(prefix)
    try:
        interfaces = [line.split(":")[0].strip()
                      for line in Path(f"/proc/{ready['worker_pid']}/net/dev").read_text().splitlines()[2:]]
        assert interfaces == ["lo"]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", ready["port"]), timeout=3)
        with grpc.insecure_channel(f"unix:{socket_dir / 'worker.sock'}") as channel:
            reply = channel.unary_unary("/tensorflow_federated.v0.ExecutorGroup/GetExecutor")(
                b"\x0a\x0d\x0a\x09\x0a\x07clients\x10\x01", timeout=15)
        assert b"clients=1" in reply
    finally:
        stop_isolated_worker(proc, socket_dir)
    assert proc.returncode == 0 and not _alive(ready["worker_pid"]) and not socket_dir.exists()


def test_worker_refuses_a_namespace_with_more_than_loopback(tmp_path):
    """If the namespace it is given has another interface, the relay refuses before starting the worker."""
    from federated.isolation import start_isolated_worker

    ns = f"fsd{os.getpid() % 100000}"
    try:
        _sh("ip", "netns", "add", ns)
        _sh("ip", "-n", ns, "link", "add", "fsx0", "type", "veth", "peer", "name", "fsx1")
        with pytest.raises(RuntimeError, match=r"interfaces besides lo: \['fsx0', 'fsx1'\]"):
            start_isolated_worker(["ip", "netns", "exec", ns], timeout_s=30)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
