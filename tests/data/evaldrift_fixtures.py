"""How tests/data/evaluator_before_fastpath.pkl and drift_monitor_before_fastpath.pkl were written: by this
script run on the code of commit 23fa541 (before the evaluator's and the drift monitor's native path), as
``PYTHONPATH=<checkout of 23fa541> python tests/data/evaldrift_fixtures.py tests/data``."""
import pickle, sys, tempfile
import numpy as np
from online.prequential import PrequentialEvaluator
from drift.monitor import DriftMonitor
from fedstream.settings import load_settings

out = sys.argv[1]
rng = np.random.default_rng(2026)
ev = PrequentialEvaluator(window=50, bins=7, keep_errors=300)
merchants = np.array(["m1", "m2", "shop-é", "m4"])
for block in range(40):
    n = int(rng.integers(1, 90))
    ids = merchants[rng.integers(0, 4 if block % 5 else 1, n)].tolist()
    p = rng.random(n)
    p[rng.random(n) < 0.1] = 1.0
    y = rng.random(n) < p
    ev.update_many(ids, (1.7e9 + block * 100 + np.arange(n)).tolist(), y, p)
ev.observe_ranking("m1", ["a", "b", "c"], "b", k=2)
open(f"{out}/evaluator_before_fastpath.pkl", "wb").write(pickle.dumps(ev))

settings = load_settings(data_dir=tempfile.mkdtemp())
drift = settings.drift.model_copy(update={"warmup_events": 40, "ph_threshold": 25.0, "ph_min_instances": 64,
                                          "cooldown_events": 300, "disabled": ("label.ctr", "label.conversion")})
settings = settings.model_copy(update={"drift": drift})
monitor = DriftMonitor(settings)
t = 1.7e9
for block in range(60):
    n = int(rng.integers(1, 300))
    ids = ["a", "b", "c"]
    m = [ids[k] for k in rng.integers(0, 3, n)]
    p = np.clip(rng.beta(2, 8, n), 0, 1)
    rate = p if block < 30 else np.minimum(p * 2.5, 1)
    y = rng.random(n) < rate
    monitor.observe_predictions(m, (t + np.arange(n)).tolist(), y, p)
    t += n
print(len(monitor.events), {k: v["error.page_hinkley"]["pending"] for k, v in ((m, monitor.state(m)) for m in "abc")})
open(f"{out}/drift_monitor_before_fastpath.pkl", "wb").write(monitor.snapshot())
