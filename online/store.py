"""Where a group's learner checkpoints live: a directory (shared file system) or an S3 prefix.

Both hold one object per worker, ``<worker id>.ckpt``, each written whole (a directory: temp file, fsync,
rename; S3: one PUT, which never shows a partial object), listed and read by every peer to adopt moved
partition slots and to assemble a version (``online/README.md``, "Scale-out"). ``open_store`` picks one
from ``--store``: ``s3://bucket/prefix`` or a directory path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from fedstream.files import write_atomic
from fedstream.settings import Settings

SUFFIX = ".ckpt"


class CheckpointStore(Protocol):
    """One whole object per worker checkpoint, listed and read by every peer."""

    def names(self) -> list[str]:
        """The checkpoint names in the store (``<worker id>.ckpt``), sorted."""

    def read(self, name: str) -> bytes | None:
        """A checkpoint's bytes (None when there is none)."""

    def write(self, name: str, payload: bytes) -> None:
        """Replace a checkpoint whole: a reader sees the old or the new one, never a part."""

    def where(self, name: str) -> str:
        """Where a checkpoint is, for messages (a path or an ``s3://`` URI)."""


class DirectoryStore:
    """Checkpoints as files in a directory (a volume every worker mounts, or a lone worker's own dir)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        return sorted(path.name for path in self.root.glob(f"*{SUFFIX}")) if self.root.is_dir() else []

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, payload: bytes) -> None:
        write_atomic(self.root / name, payload)

    def where(self, name: str) -> str:
        return str(self.root / name)

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.root)!r})"


class S3Store:
    """Checkpoints as objects under ``s3://bucket/prefix/`` (one PUT each: atomic per object)."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket, self.prefix, self.client = bucket, prefix.strip("/"), client

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def names(self) -> list[str]:
        start = f"{self.prefix}/" if self.prefix else ""
        found = []
        with _s3_errors(self.where("")):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    name = item["Key"][len(start):]
                    if name.endswith(SUFFIX) and "/" not in name:
                        found.append(name)
        return sorted(found)

    def read(self, name: str) -> bytes | None:
        with _s3_errors(self.where(name)):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
            except self.client.exceptions.NoSuchKey:
                return None

    def write(self, name: str, payload: bytes) -> None:
        with _s3_errors(self.where(name)):
            self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=payload)

    def where(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.bucket}/{self.prefix}')"


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """botocore's errors (no endpoint, no bucket, bad credentials) as one-line ``OSError``s naming ``uri``."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise OSError(f"checkpoint store {uri}: {exc}") from None


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client: endpoint ``settings.online.store_endpoint_url``, else ``MLFLOW_S3_ENDPOINT_URL``
    (the MLflow artifact store's, as deploy/ sets it), else boto3's own (``AWS_ENDPOINT_URL_S3``, AWS);
    credentials and region from boto3's usual chain (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``...)."""
    import boto3
    from botocore.config import Config

    endpoint = settings.online.store_endpoint_url or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return boto3.client("s3", endpoint_url=endpoint, region_name=region,
                        config=Config(retries={"max_attempts": 5, "mode": "standard"}))


def open_store(spec: str | Path, settings: Settings) -> CheckpointStore:
    """The store ``spec`` names: ``s3://bucket[/prefix]`` or a directory; one-line ``ValueError`` otherwise."""
    text = str(spec)
    if not text.startswith("s3://"):
        if "://" in text:
            raise ValueError(f"--store {text}: a directory or s3://bucket/prefix")
        return DirectoryStore(Path(text))
    bucket, _, prefix = text[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"--store {text}: no bucket (s3://bucket/prefix)")
    return S3Store(bucket, prefix, s3_client(settings))


__all__ = ["CheckpointStore", "DirectoryStore", "S3Store", "open_store", "s3_client"]
