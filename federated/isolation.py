"""A merchant's TFF worker, reachable only through mutually authenticated TLS.

TFF's ``worker_binary`` binds ``[::]:port`` with insecure gRPC credentials and has no flag to change that,
and it executes any TensorFlow computation it is sent (file reads and writes included). So
``fedstream federated join`` never exposes it:

* :func:`start_isolated_worker` runs the worker in a *network namespace of its own* holding only ``lo``
  (``unshare --net`` as root, ``unshare --user --map-root-user --net`` otherwise): nothing outside that
  namespace can reach its port. Inside, this module's ``main`` (``python -m federated.isolation``) brings
  ``lo`` up, starts the worker, checks that ``lo`` is the only interface, and relays a Unix socket (files
  are shared across network namespaces) to the worker's port.
* :class:`TlsGateway`, in the host's namespace, accepts TLS on the advertised address, requires a client
  certificate signed by the federation CA (``federated.certs.server_context``, ALPN ``h2`` for gRPC) and
  forwards the bytes to that Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from fedstream.logs import get_logger

log = get_logger("federated.isolation")
CHUNK = 1 << 16


def _libc_prctl():
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


# Resolved once, before any fork: a preexec_fn runs in the forked child of a process that may have threads,
# where loading a library (dlopen) can find its locks held by a thread that does not exist in the child.
_PRCTL = _libc_prctl()


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGKILL when the process that started it dies (no orphan workers)."""
    _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def isolation_command() -> list[str] | None:
    """The ``unshare`` prefix that gives a child a network namespace of its own here, or None if none works."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    candidates = [[unshare, "--net"]] if os.geteuid() == 0 else []
    candidates.append([unshare, "--user", "--map-root-user", "--net"])
    for prefix in candidates:
        try:
            done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    return None


def start_isolated_worker(prefix: list[str], timeout_s: float = 60.0) -> tuple[subprocess.Popen, dict, Path]:
    """Start the worker in its own network namespace; returns (relay process, its ready record, socket dir).

    The record holds the worker's PID and its port inside the namespace; the Unix socket is
    ``<socket dir>/worker.sock`` (a fresh 0700 directory). Stop it with :func:`stop_isolated_worker`.
    """
    socket_dir = Path(tempfile.mkdtemp(prefix="fedstream-worker-"))
    command = [*prefix, sys.executable, "-m", "federated.isolation", str(socket_dir / "worker.sock")]
    # Dies with its parent. setpriv sets that before exec, so no Python runs in the forked child (a preexec_fn
    # does, with the fork handlers of every library loaded here: under pytest-xdist that child crashed).
    setpriv = shutil.which("setpriv")
    options = {"preexec_fn": die_with_parent} if setpriv is None else {}
    if setpriv is not None:
        command = [setpriv, "--pdeathsig", "KILL", *command]
    with (socket_dir / "relay.log").open("w") as errors:  # a file, so a chatty relay can never block on a pipe
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL,
                                text=True, **options)
    line = _read_line(proc, timeout_s)
    if not line:
        stop_isolated_worker(proc, socket_dir, keep_dir=True)
        error = (socket_dir / "relay.log").read_text().strip().splitlines()
        shutil.rmtree(socket_dir, ignore_errors=True)
        raise RuntimeError(f"isolated worker did not start: {error[-1] if error else 'no output'}")
    return proc, json.loads(line), socket_dir


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            return ""
    return proc.stdout.readline().strip()


def stop_isolated_worker(proc: subprocess.Popen, socket_dir: Path, grace_s: float = 5.0,
                         keep_dir: bool = False) -> None:
    """SIGTERM the relay (it stops its worker by PID), SIGKILL after ``grace_s``; remove the socket dir."""
    from federated.remote import stop_worker

    stop_worker(proc, grace_s)
    if proc.stdout is not None:
        proc.stdout.close()
    if not keep_dir:
        shutil.rmtree(socket_dir, ignore_errors=True)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, other: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        for w in (writer, other):
            w.close()


async def _splice(reader, writer, up_reader, up_writer) -> None:
    await asyncio.gather(_copy(reader, up_writer, writer), _copy(up_reader, writer, up_writer))


class TlsGateway:
    """mTLS on ``host:port`` in front of the isolated worker's Unix socket (asyncio).

    The TLS handshake runs per connection (``start_tls``), so every refused client (no certificate, a
    foreign CA's, a worker's, plain text) is logged with its peer and reason and counted in ``refused``.
    """

    def __init__(self, host: str, port: int, ssl_context, socket_path: Path) -> None:
        self.host, self.port, self.ssl_context, self.socket_path = host, port, ssl_context, socket_path
        self.refused = 0

    async def _handle(self, reader, writer) -> None:
        import ssl

        peer = str(writer.get_extra_info("peername"))
        try:
            await writer.start_tls(self.ssl_context, ssl_handshake_timeout=10)
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
            self.refused += 1
            log.warning("connection refused", extra={"peer": peer, "reason": str(exc) or type(exc).__name__})
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(self.socket_path))
        except OSError as exc:
            log.warning("worker socket unavailable", extra={"error": str(exc)})
            writer.close()
            return
        subject = dict(pair[0] for pair in writer.get_extra_info("peercert", {}).get("subject", ()))
        log.info("coordinator connected", extra={"peer": peer, "subject": subject.get("commonName", "")})
        await _splice(reader, writer, up_reader, up_writer)

    async def serve(self, stop: asyncio.Event, ready=None) -> None:
        server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = server.sockets[0].getsockname()[1]
        if ready is not None:
            ready()
        async with server:
            await stop.wait()


def serve_isolated(prefix: list[str], ssl_context, host: str, port: int, on_ready,
                   stop_after_s: float | None = None) -> None:
    """Run the isolated worker behind a :class:`TlsGateway` until SIGTERM/SIGINT, ``stop_after_s`` or the
    worker's end. ``on_ready(gateway_port, worker_record)`` is called once the gateway listens."""
    proc, ready, socket_dir = start_isolated_worker(prefix)
    try:
        gateway = TlsGateway(host, port, ssl_context, socket_dir / "worker.sock")
        asyncio.run(_until_stopped(gateway, proc, lambda: on_ready(gateway.port, ready), stop_after_s))
    finally:
        stop_isolated_worker(proc, socket_dir)


async def _until_stopped(gateway: TlsGateway, relay: subprocess.Popen, ready, stop_after_s: float | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def watch() -> None:
        started = loop.time()
        while not stop.is_set():
            if relay.poll() is not None or (stop_after_s is not None and loop.time() - started > stop_after_s):
                stop.set()
            await asyncio.sleep(0.2)

    await asyncio.gather(gateway.serve(stop, ready), watch())


def _loopback_up() -> None:
    """Bring ``lo`` up in a fresh network namespace (SIOCGIFFLAGS / SIOCSIFFLAGS, no ``ip`` binary needed)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(sock, 0x8913, request))[1]
        fcntl.ioctl(sock, 0x8914, struct.pack("16sh22x", b"lo", flags | 0x1))


async def _relay(socket_path: str, worker: subprocess.Popen, port: int, stop: asyncio.Event) -> None:
    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await _splice(reader, writer, up_reader, up_writer)

    server = await asyncio.start_unix_server(handle, socket_path)
    os.chmod(socket_path, 0o600)
    print(json.dumps({"worker_pid": worker.pid, "port": port}), flush=True)
    async with server:
        while not stop.is_set() and worker.poll() is None:  # a worker that died ends the relay
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


def main(socket_path: str) -> int:
    """Inside the worker's own network namespace: lo up, start the worker, relay the Unix socket to it."""
    from federated.remote import start_worker, stop_worker

    _loopback_up()
    others = sorted(name for _, name in socket.if_nameindex() if name != "lo")
    if others:
        print(f"refusing: the worker's namespace has interfaces besides lo: {others}", file=sys.stderr)
        return 3
    proc, port = start_worker(0, preexec_fn=die_with_parent)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        loop.run_until_complete(_relay(socket_path, proc, port, stop))
    finally:
        stop_worker(proc)
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
