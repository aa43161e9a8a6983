"""The main job, small: `fedstream demo --quick` end to end in a fresh data dir (real broker, MLflow, TFF)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedstream.demo import BAD_EVENTS, DemoPlan
from streams.generator import GeneratorConfig, generate
from tests.test_cli_quiet import library_noise


def constant_rate_logloss(rate: float) -> float:
    """Logloss of always predicting the overall click rate: the bar a model must clear."""
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


# Runs the demo as the child of a process that is a *child subreaper* (prctl PR_SET_CHILD_SUBREAPER): every
# process the demo starts, at any depth, is reparented to it when its own parent exits (the broker that
# `fedstream broker start` detaches, TFF's worker_binary of `fedstream federated run`, uvicorn, ...) instead
# of to init, so after the demo exits whatever is still alive below it was left behind by the demo. It
# prints those PIDs with their command lines as JSON on its last line, then kills and reaps them.
REAPER = """
import ctypes, json, os, signal, subprocess, sys, time
from pathlib import Path
assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
code = subprocess.run(sys.argv[1:]).returncode
time.sleep(1.0)  # let just-orphaned processes be reparented
def reap():
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return
def left():
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            continue
        if entry.name.isdigit() and int(stat[1]) == os.getpid() and stat[0] != "Z":
            found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\\0", b" ").decode(errors="replace")))
    return found
reap()
leftover = left()
for pid, _ in leftover:
    os.kill(pid, signal.SIGKILL)
time.sleep(0.2)
reap()
print(json.dumps({"exit_code": code, "leftover": leftover}))
"""


def _alive(pid: int) -> bool:
    """Is ``pid`` still a live process (not a zombie)?"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_quick_demo_runs_the_whole_platform_and_stops_everything(tmp_path: Path):
    # as a user runs it: no FEDSTREAM_ settings, no TF_CPP_MIN_LOG_LEVEL (conftest sets one for the suite)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("FEDSTREAM_", "TF_CPP_"))},
           "FEDSTREAM_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", REAPER, sys.executable, "-m", "fedstream", "demo", "--quick"], env=env,
                          capture_output=True, text=True, timeout=900)
    reaper = json.loads(done.stdout.strip().splitlines()[-1])
    assert reaper["exit_code"] == 0, done.stderr[-3000:]
    # no child process left, at any depth (checked by PID, not by the broker record)
    assert reaper["leftover"] == [], reaper["leftover"]
    # the console (every step's stderr is shown live) carries no library line at WARNING or above
    assert library_noise(done.stderr + done.stdout) == [], library_noise(done.stderr + done.stdout)
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    plan = DemoPlan.quick()

    # every input accounted for: all generated events accepted, every bad one dead-lettered with a reason
    generated = sum(1 for _ in generate(GeneratorConfig(merchants=plan.merchants, events=plan.events, seed=plan.seed,
                                                        drifts=())))
    assert summary["ingest"]["accepted"] == generated
    assert summary["ingest"]["dead_lettered"] == len(BAD_EVENTS)
    assert sum(summary["ingest"]["reasons"].values()) == len(BAD_EVENTS)

    # online learners saw every event and learned something: both rank clicks well above chance over the
    # last window (AUC 0.5 = no skill), and FTRL beats the constant click-rate predictor over the whole
    # stream, cold start included. (Window logloss moves with how partitions interleave, so not used.)
    for model in ("ftrl", "adam"):
        online = summary["online"][model]
        assert online["events"] == generated
        assert online["rolling_auc"] > 0.6
        assert online["published_versions"], online.get("publish_errors")
    assert summary["online"]["ftrl"]["logloss"] < constant_rate_logloss(summary["online"]["ftrl"]["click_rate"])

    # federated rounds ran and registered a version; a champion is served
    assert summary["federated"]["versions"]
    assert 0.5 < summary["federated"]["final_eval"]["auc"] <= 1.0
    champions = [v for v in summary["versions"] if "champion" in v["aliases"]]
    assert len(champions) == 1
    assert [d["version"] for d in summary["promotion"]] == sorted((v["version"] for v in summary["versions"]), key=int)
    assert summary["promotion"][0]["moved"]  # the first version always becomes champion
    for answer in summary["recommendations"].values():
        assert len(answer["items"]) == 5 and answer["model_version"] == champions[0]["version"]
    assert summary["other_merchant_status"] == 403

    report = Path(summary["report"])
    assert report.exists() and list(report.parent.glob("*.png"))
    # everything started was stopped: the broker, the learners, the API (their PIDs), and its record
    started = summary["started_pids"]
    assert len(started) >= 4 and not [pid for pid in started if _alive(pid)]
    assert not (tmp_path / "demo" / "broker.json").exists()
    assert (tmp_path / "demo" / "mlflow" / "mlflow.db").exists()
