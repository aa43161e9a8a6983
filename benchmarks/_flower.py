"""Flower, the federated peer: a venv of its own (built once, cached) and its simulation of our round.

``flwr[simulation]`` (Ray) does not belong in fedstream's environment, so :func:`flower_python` builds
``<cache>/flower-venv`` with ``python -m venv`` + pip (``FLWR_SPEC``), checks that ``flwr`` imports and
writes a marker; later runs reuse it. ``<cache>`` is ``$FEDSTREAM_BENCH_CACHE`` or
``~/.cache/fedstream-bench``. :func:`flower_round` runs ``benchmarks/_flower_peer.py`` with that python
on the merchants' split directories and returns its JSON, or ``{"unavailable": reason}`` when the venv
cannot be built (no network) or the simulation fails: the benchmark row then says "peer unavailable".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FLWR_SPEC = "flwr[simulation]==1.42.0"  # the release measured in issue #16; installs on Python 3.11
PEER = Path(__file__).resolve().parent / "_flower_peer.py"
REPO = PEER.parent.parent
INSTALL_TIMEOUT_S, RUN_TIMEOUT_S = 900, 900


def cache_dir() -> Path:
    return Path(os.environ.get("FEDSTREAM_BENCH_CACHE", Path.home() / ".cache" / "fedstream-bench"))


def flower_python(cache: Path | None = None) -> Path:
    """The Flower venv's python, building the venv first when it is missing; ``RuntimeError`` (one line)
    when it cannot be built."""
    venv = (cache or cache_dir()) / "flower-venv"
    python, marker = venv / "bin" / "python", venv / ".fedstream-ok"
    if marker.exists() and marker.read_text().strip() == FLWR_SPEC and python.exists():
        return python
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"building the Flower venv failed: cache {venv.parent}: {exc.strerror}") from None
    steps = ([sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", FLWR_SPEC],
             [str(python), "-c", "import flwr.simulation, ray"])
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"building the Flower venv failed: {exc}") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"building the Flower venv failed at {Path(step[0]).name} {step[1:3]}: {last}")
    marker.write_text(FLWR_SPEC + "\n")
    return python


def flower_round(folders: list[str], *, bits: int, lr: float, batch: int, rounds: int, actors: int = 2) -> dict:
    """Median seconds of a Flower simulation round over ``folders`` (one merchant each) after a warm-up round."""
    try:
        python = flower_python()
    except RuntimeError as exc:
        return {"unavailable": str(exc)}
    spec = {"folders": folders, "bits": bits, "lr": lr, "batch": batch, "rounds": rounds, "actors": actors}
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec))
        try:  # -P: the script's folder (benchmarks/, holding federated.py) must not shadow the federated package
            done = subprocess.run([str(python), "-P", str(PEER), str(path)], capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT_S, env=env, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"unavailable": f"Flower simulation took over {RUN_TIMEOUT_S} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"unavailable": f"Flower simulation failed (exit {done.returncode}): {last}"}
    return json.loads(lines[-1])
