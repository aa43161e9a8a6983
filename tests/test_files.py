"""Checkpoint files: a truncated or corrupt one is a clear error naming its path."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from fedstream.files import read_versioned, write_atomic
from online.worker import read_checkpoint


@pytest.mark.parametrize("payload", [b"", b"\x80\x04\x95", b"not a pickle at all", pickle.dumps({"version": 1})[:-3]])
def test_a_corrupt_checkpoint_names_its_path(tmp_path: Path, payload: bytes):
    path = tmp_path / "worker.ckpt"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=f"{path} is not a readable learner worker checkpoint"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match=str(path)):
        read_versioned(path, 1, "drift follower")


def test_write_atomic_sets_the_mode_before_the_file_is_visible(tmp_path: Path):
    path = tmp_path / "secret.json"
    write_atomic(path, b"{}", mode=0o600)
    assert oct(path.stat().st_mode & 0o777) == "0o600" and path.read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == ["secret.json"]
