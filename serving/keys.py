"""API keys: one per merchant (reads only that merchant's data) plus admin keys for operations.

Design notes: `serving/README.md`, `serving/keys.py`.

Example:
    >>> import tempfile, pathlib
    >>> store = KeyStore(pathlib.Path(tempfile.mkdtemp()) / "api-keys.json")
    >>> token = store.issue(merchant_id="m1")
    >>> store.verify(token).merchant_id
    'm1'
    >>> store.verify(token + "x") is None
    True
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from fedstream.files import write_atomic
from fedstream.logs import get_logger
from fedstream.settings import Settings

log = get_logger("serving.keys")

PREFIX = "fsk_"
ADMIN, MERCHANT = "admin", "merchant"


@dataclass(frozen=True)
class Principal:
    """Who a verified key belongs to."""

    key_id: str
    role: str  # "admin" | "merchant"
    merchant_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def may_read(self, merchant_id: str) -> bool:
        return self.is_admin or self.merchant_id == merchant_id


@dataclass
class _StoredKey:
    key_id: str
    role: str
    merchant_id: str | None
    salt: str
    digest: str
    created: float
    revoked: bool = False


def keys_path(settings: Settings) -> Path:
    return settings.data_path / "api-keys.json"


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


class KeyStore:
    """The hashed keys of one file; re-reads the file when it changes so keys issued while serving work."""

    def __init__(self, path: Path, recheck_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.recheck_seconds = recheck_seconds
        self._keys: dict[str, _StoredKey] = {}
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._reload()

    @classmethod
    def for_settings(cls, settings: Settings) -> KeyStore:
        return cls(keys_path(settings))

    def _reload(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._keys, self._stamp = {}, None
            return
        stamp = (stat.st_mtime, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text() or "{}")
            keys = {k["key_id"]: _StoredKey(**k) for k in data.get("keys", [])}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # keep serving the keys we had
            log.error("unreadable API key file, keeping the keys read before",
                      extra={"path": str(self.path), "error": f"{type(exc).__name__}: {exc}"[:300]})
            return
        self._keys, self._stamp = keys, stamp

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked >= self.recheck_seconds:
            self._checked = now
            self._reload()

    def _write(self) -> None:
        """Atomically replace the file (unique temp, fsync, rename); call under :meth:`_exclusive`."""
        payload = json.dumps({"keys": [asdict(k) for k in self._keys.values()]}, indent=1).encode()
        write_atomic(self.path, payload, mode=0o600)
        self._stamp = None
        self._reload()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This process's threads and every other process changing the file take turns (``flock`` on a
        sidecar lock file), so each read-modify-write sees the previous one's keys."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._stamp = None  # re-read whatever the previous holder wrote
                self._reload()
                yield
            finally:
                os.close(fd)  # releases the lock

    def issue(self, merchant_id: str | None = None, *, admin: bool = False) -> str:
        """Create a key and return its token (the only time the secret is visible)."""
        if admin == (merchant_id is not None):
            raise ValueError("a key is either for one merchant (merchant_id=...) or admin=True")
        if merchant_id is not None and not (0 < len(merchant_id) <= 128):
            raise ValueError("merchant_id must be 1..128 characters")
        with self._exclusive():
            key_id = secrets.token_hex(6)
            secret = secrets.token_urlsafe(32)
            salt = secrets.token_hex(16)
            self._keys[key_id] = _StoredKey(key_id, ADMIN if admin else MERCHANT, merchant_id, salt,
                                            _digest(salt, secret), round(time.time(), 3))
            self._write()
        return f"{PREFIX}{key_id}.{secret}"

    def revoke(self, key_id: str) -> bool:
        with self._exclusive():
            key = self._keys.get(key_id)
            if key is None or key.revoked:
                return False
            key.revoked = True
            self._write()
            return True

    def list(self) -> list[dict]:
        """Key ids, roles, merchants and creation times (never secrets or hashes)."""
        self._reload()
        return [{"key_id": k.key_id, "role": k.role, "merchant_id": k.merchant_id, "created": k.created,
                 "revoked": k.revoked} for k in self._keys.values()]

    def verify(self, token: str | None) -> Principal | None:
        """The key's principal, or None for a missing, malformed, unknown, revoked or wrong token."""
        if not token or not token.startswith(PREFIX) or len(token) > 256:
            return None
        key_id, _, secret = token[len(PREFIX):].partition(".")
        self._maybe_reload()
        key = self._keys.get(key_id)
        if key is None or key.revoked or not secret:
            return None
        if not hmac.compare_digest(_digest(key.salt, secret), key.digest):
            return None
        return Principal(key.key_id, key.role, key.merchant_id)
