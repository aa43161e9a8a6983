"""API key store under concurrency: several processes issuing keys at once lose none; a torn file is survivable."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from serving.keys import KeyStore

ISSUER = """
import sys, time
from pathlib import Path
from serving.keys import KeyStore
path, go, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
store = KeyStore(path)
while not go.exists():
    time.sleep(0.002)
print("\\n".join(store.issue(merchant_id=f"m{i}") for i in range(count)))
"""


def test_concurrent_key_issuing_in_several_processes_loses_no_key(tmp_path: Path):
    path, go = tmp_path / "api-keys.json", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", ISSUER, str(path), str(go), "25"], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    time.sleep(1.5)  # every process imported and is waiting at the start line
    go.touch()
    tokens = [t for proc in procs for t in proc.communicate(timeout=60)[0].split()]
    assert all(proc.returncode == 0 for proc in procs)
    assert len(tokens) == 100
    store = KeyStore(path)
    assert all(store.verify(token) is not None for token in tokens)
    assert len(json.loads(path.read_text())["keys"]) == 100
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_torn_key_file_keeps_the_keys_already_read(tmp_path: Path):
    path = tmp_path / "api-keys.json"
    store = KeyStore(path, recheck_seconds=0)
    token = store.issue(admin=True)
    path.write_text(path.read_text()[:40])  # what a writer killed mid-write used to leave behind
    assert store.verify(token) is not None
    fresh = KeyStore(path)
    assert fresh.verify(token) is None  # nothing readable on disk, and nothing crashes
    assert fresh.issue(merchant_id="m1").startswith("fsk_")
