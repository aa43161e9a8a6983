"""Crash-safe files: the one way checkpoints (learner worker, drift follower) reach the disk."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, payload: bytes) -> None:
    """Replace ``path`` with ``payload`` so that a crash leaves either the old or the new file, whole.

    Temp file in the same directory, fsync, ``os.replace``, then fsync of the directory so the rename
    itself survives a power loss.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "state.bin"
    >>> write_atomic(target, b"one"); write_atomic(target, b"two"); target.read_bytes()
    b'two'
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
