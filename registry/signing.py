"""Model artifacts are code: only bundles fedstream signed are ever unpickled.

A bundle artifact is ``MAGIC + HMAC-SHA256(key, pickle) + pickle``. :func:`register_version` (through
:mod:`registry.flavor`) signs with the platform key; every loader (serving, the ``mlflow.pyfunc`` flavor,
the CLI) checks the tag with :func:`verified_payload` *before* a single byte reaches the unpickler, so an
artifact written by anyone without the key (swapped in the artifact store, an older unsigned version,
a tampered byte) is refused with :class:`UntrustedArtifact` instead of running its code.

The key is ``settings.registry.signing_key`` (``FEDSTREAM_REGISTRY__SIGNING_KEY``); unset, it is a random
256-bit key in ``<data_dir>/registry-signing.key``, created with mode 0600 on first use (the embedded
defaults). Every process that registers or serves models of one registry needs the same key.

Example:
    >>> blob = sign(b"payload", b"k" * 32)
    >>> bytes(verified_payload(blob, b"k" * 32, "demo"))
    b'payload'
    >>> verified_payload(blob[:-1] + b"X", b"k" * 32, "demo")
    Traceback (most recent call last):
    ...
    registry.signing.UntrustedArtifact: demo: signature does not match (tampered, or signed with another key); refusing to unpickle it
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from fedstream.settings import Settings

MAGIC = b"FEDSTREAM-BUNDLE-HMAC-SHA256\n"
TAG_BYTES = 32
KEY_FILE = "registry-signing.key"
MIN_KEY_CHARS = 16

_trusted_key: contextvars.ContextVar[bytes | None] = contextvars.ContextVar("fedstream_signing_key", default=None)


class UntrustedArtifact(ValueError):
    """A model artifact fedstream did not sign with this key: never unpickled."""


def sign(payload: bytes, key: bytes) -> bytes:
    """The signed artifact bytes of ``payload``."""
    return MAGIC + hmac.new(key, payload, hashlib.sha256).digest() + payload


def verified_payload(blob: bytes, key: bytes, where: str) -> memoryview:
    """The payload of a signed artifact, as a view into ``blob`` (copying a 5 MB payload holds the GIL for
    ms), or :class:`UntrustedArtifact` naming ``where``."""
    if not blob.startswith(MAGIC):
        raise UntrustedArtifact(f"{where}: not signed by fedstream (no signature header); refusing to unpickle it")
    tag, payload = blob[len(MAGIC):len(MAGIC) + TAG_BYTES], memoryview(blob)[len(MAGIC) + TAG_BYTES:]
    if not hmac.compare_digest(tag, hmac.new(key, payload, hashlib.sha256).digest()):
        raise UntrustedArtifact(f"{where}: signature does not match (tampered, or signed with another key); "
                                "refusing to unpickle it")
    return payload


def signing_key(settings: Settings) -> bytes:
    """The platform's signing key: the setting, else the key file in the data dir (created on first use)."""
    configured = settings.registry.signing_key
    if configured is not None:
        return configured.get_secret_value().encode()
    return _key_file(settings.data_path / KEY_FILE)


def _key_file(path: Path) -> bytes:
    """Read the key file, or create it atomically (0600) so concurrent first uses agree on one key."""
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    scratch = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(scratch, path)  # fails if another process created it first: then theirs is the key
    except FileExistsError:
        pass
    finally:
        scratch.unlink()
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    text = path.read_text().strip()
    if len(text) < MIN_KEY_CHARS:
        raise UntrustedArtifact(f"{path}: signing key file is shorter than {MIN_KEY_CHARS} characters")
    return text.encode()


@contextlib.contextmanager
def trusting(key: bytes) -> Iterator[None]:
    """Inside the block, pyfunc loads (``mlflow.pyfunc.load_model``) verify with ``key``."""
    token = _trusted_key.set(key)
    try:
        yield
    finally:
        _trusted_key.reset(token)


def loading_key() -> bytes:
    """The key a loader without settings verifies with: the one of the enclosing :func:`trusting` block
    (``registry.tracking.activate`` opens one), else the key of the settings from the environment."""
    key = _trusted_key.get()
    if key is not None:
        return key
    from fedstream.settings import load_settings

    return signing_key(load_settings())
