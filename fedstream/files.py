"""Crash-safe files: the one way checkpoints (learner worker, drift follower) reach the disk and come back."""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path
from typing import Any


def write_atomic(path: Path, payload: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``payload`` so that a crash leaves either the old or the new file, whole.

    Temp file in the same directory (named by process and thread, so concurrent writers never share
    one), fsync, ``os.replace``, then fsync of the directory so the rename itself survives a power loss.
    ``mode`` (e.g. ``0o600``) is set on the file before it gets its name, so it is never visible wider.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "state.bin"
    >>> write_atomic(target, b"one"); write_atomic(target, b"two"); target.read_bytes()
    b'two'
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    with os.fdopen(fd, "wb") as handle:
        if mode is not None:
            os.fchmod(handle.fileno(), mode)
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_versioned(path: Path, version: int, kind: str) -> dict[str, Any] | None:
    """The ``{"version": ..., ...}`` dict pickled at ``path`` (None when there is no file yet); a
    ``ValueError`` naming the file and the ``kind`` of checkpoint expected for anything else: one written
    in an older format, or a truncated or corrupt one. Only read your own files: this is pickle.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "state.ckpt"
    >>> read_versioned(target, 2, "demo") is None
    True
    >>> write_atomic(target, pickle.dumps({"version": 1}))
    >>> read_versioned(target, 2, "demo")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ... is not a demo checkpoint of version 2 (it holds version 1)
    >>> _ = target.write_bytes(b"\\x80\\x04")
    >>> read_versioned(target, 2, "demo")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ... is not a readable demo checkpoint (truncated or corrupt: EOFError: Ran out of input)
    """
    if not path.exists():
        return None
    return loads_versioned(path.read_bytes(), str(path), version, kind)


def loads_versioned(payload: bytes, origin: str, version: int, kind: str) -> dict[str, Any]:
    """:func:`read_versioned` of bytes read from ``origin`` (a path or URI, named in the errors)."""
    try:
        state = pickle.loads(payload)
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError, IndexError) as exc:
        raise ValueError(f"{origin} is not a readable {kind} checkpoint (truncated or corrupt: "
                         f"{type(exc).__name__}: {exc})") from None
    found = state.get("version") if isinstance(state, dict) else type(state).__name__
    if found != version:
        raise ValueError(f"{origin} is not a {kind} checkpoint of version {version} (it holds version {found!r})")
    return state
