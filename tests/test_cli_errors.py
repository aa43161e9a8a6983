"""Expected failures end the ``fedstream`` command with one clear line and exit code 1, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedstream.host import free_port

FEDSTREAM = str(Path(sys.executable).parent / "fedstream")


@pytest.mark.parametrize("args", [
    ["learn", "--model", "ftrl"],
    ["drift", "report", "--merchant", "m01", "--out", "report"],
])
def test_no_broker_is_one_line_not_a_traceback(tmp_path: Path, args: list[str]) -> None:
    env = {**os.environ, "FEDSTREAM_DATA_DIR": str(tmp_path / "data"),
           "FEDSTREAM_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    done = subprocess.run([FEDSTREAM, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("Error: no Kafka broker reachable at 127.0.0.1:")
    assert not [line for line in done.stderr.splitlines() if "cuda" in line.lower() or "tensorflow" in line.lower()]
