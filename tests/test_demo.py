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


def constant_rate_logloss(rate: float) -> float:
    """Logloss of always predicting the overall click rate: the bar a model must clear."""
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


@pytest.mark.slow
def test_quick_demo_runs_the_whole_platform_and_stops_everything(tmp_path: Path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FEDSTREAM_")},
           "FEDSTREAM_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "fedstream", "demo", "--quick"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
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
    # everything started was stopped: no broker record left, no tansu/uvicorn/worker children of ours
    assert not (tmp_path / "demo" / "broker.json").exists()
    assert (tmp_path / "demo" / "mlflow" / "mlflow.db").exists()
