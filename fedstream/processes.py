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
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def stop_tff_workers(root_pid: int | None = None, grace_s: float = 3.0) -> list[int]:
    """Stop every ``worker_binary`` descended from ``root_pid`` (default: this process). Returns their PIDs."""
    targets = [pid for pid in _descendants(root_pid or os.getpid()) if b"worker_binary" in _cmdline(pid)]
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
    for pid in targets:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return targets
