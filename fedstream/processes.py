"""Child-process hygiene: TFF's ``worker_binary`` outlives Python and holds stdout pipes open.

Anything that runs TFF (tests, CLI commands, benchmarks, the demo) calls :func:`stop_tff_workers`
when done, or a CI run hangs waiting for pipes that never close.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (parent := _parent(int(entry.name))) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...); [] if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) PIDs in process group ``pgid``: what is left of a service started in its own session."""
    members = []
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else []
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def tff_workers(root_pid: int | None = None, children_only: bool = False) -> list[int]:
    """PIDs of the ``worker_binary`` processes descended from ``root_pid`` (default: this process), or only
    of its own children."""
    root = root_pid or os.getpid()
    candidates = _descendants(root)
    if children_only:
        candidates = [pid for pid in candidates if _parent(pid) == root]
    return [pid for pid in candidates if b"worker_binary" in _cmdline(pid)]


def _wait_until_gone(pids: list[int], timeout_s: float) -> None:
    """SIGKILL is delivered asynchronously: wait until each process has died (a zombie has no command line)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_cmdline(pid) for pid in pids):
        time.sleep(0.02)


def stop_tff_workers(root_pid: int | None = None, grace_s: float = 3.0, reap: bool = True,
                     children_only: bool = False, kill_wait_s: float = 10.0) -> list[int]:
    """Stop every ``worker_binary`` descended from ``root_pid`` (default: this process). Returns their PIDs
    once they have died (at most ``kill_wait_s`` after the SIGKILL).

    ``children_only`` spares the workers of child processes (e.g. merchants' ``federated join`` workers
    started by a test); ``reap=False`` leaves the dead workers to be reaped by whoever started them (TFF's
    own ``Popen``, whose finalizer signals and waits for its worker: it then returns at once instead of
    failing on a lost PID).
    """
    targets = tff_workers(root_pid, children_only)
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and _cmdline(pid) for pid in targets):
        time.sleep(0.05)
    for pid in targets:
        if _cmdline(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _wait_until_gone(targets, kill_wait_s)
    for pid in targets if reap else ():
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return targets


def terminate(pid: int, grace_s: float = 5.0) -> None:
    """Stop a child process by PID: SIGTERM, then SIGKILL after ``grace_s``; reaps it when it is ours."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                return
        except ChildProcessError:
            if not Path(f"/proc/{pid}").exists():
                return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
