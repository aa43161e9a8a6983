"""Where numba keeps the compiled kernels (``cache=True``): one rule for every kernel module.

Numba writes its cache next to the kernel's source file. An installed package's folder may be read-only;
then the cache goes to ``$NUMBA_CACHE_DIR`` when set, else to ``<tmp>/fedstream-numba``. Numba reads that
variable once, when it is first imported, so each kernel module calls :func:`use_writable_cache` before
its own ``from numba import ...``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def use_writable_cache(source_dir: str | Path) -> None:
    """Point numba's disk cache to ``<tmp>/fedstream-numba`` when ``source_dir`` (the kernels' folder) is not
    writable and ``NUMBA_CACHE_DIR`` is unset; otherwise change nothing."""
    if "NUMBA_CACHE_DIR" not in os.environ and not os.access(source_dir, os.W_OK):
        os.environ["NUMBA_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / "fedstream-numba")
