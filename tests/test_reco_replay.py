"""``benchmarks._reco_replay``: its digest, what an A/B of two checkouts compares, is the same in another
process with another string hash seed (the recommender's tables are insertion-ordered dicts, no sets), and
it changes when what the recommender computes changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks._reco_replay import replay
from streams.generator import GeneratorConfig, generate
from streams.schemas import Click

ROOT = Path(__file__).resolve().parent.parent
SMALL = GeneratorConfig(merchants=3, events=3_000, seed=11, items_per_merchant=(30, 200))


def test_digest_is_the_same_in_another_process_with_another_hash_seed() -> None:
    here = replay(list(generate(SMALL)))
    code = ("import json; from benchmarks._reco_replay import replay; from streams.generator import generate; "
            "from tests.test_reco_replay import SMALL; print(json.dumps(replay(list(generate(SMALL)))))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    there = json.loads(subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                                      text=True, check=True).stdout.strip().splitlines()[-1])
    assert here["rankings"] == there["rankings"] > 10
    assert here["digest"] == there["digest"]


def test_digest_changes_when_one_click_is_left_out() -> None:
    events = list(generate(SMALL))
    late = max(i for i, event in enumerate(events) if type(event) is Click and event.clicked)  # after the last ranking
    whole, without = replay(events), replay(events[:late] + events[late + 1:])
    assert whole["rankings"] == without["rankings"] and whole["digest"] != without["digest"]
