"""Online learners side by side on one generated stream, and the Kafka worker end to end.

* predict+learn events/s on one core and prequential log loss of our SGD, Adam and FTRL one event at a
  time (``predict_proba_one`` + ``learn_one`` on River dicts) and in mini-batches (``learn_many`` on the
  ``(n, F)`` arrays), and of River's ``LogisticRegression`` with ``FTRLProximal`` (same hyper-parameters,
  no separate intercept). River is slow, so it runs on a prefix of the stream and every model's log loss
  is also reported on that same prefix (prequential predictions do not depend on what comes after);
* the worker end to end: events/s from the embedded broker through ``fedstream learn`` on a backlog
  (decode, featurize, learn, metrics, drift detectors, recommender, checkpoints; the worker's default
  options), and produced->learned latency (Kafka
  record timestamp to the moment the event's block was learned) while events are produced at a steady rate;
* peak memory: the benchmark process (learners, ``ru_maxrss``) and the worker process (its VmHWM), and the
  learners' state size, which is set by the hash space (``2**bits``).

Targets: our FTRL in mini-batches >= 100x River's events/s with log loss <= River's + 1%; worker >= 20k
events/s; p95 latency <= 2 s. Featurizing is not timed in the learner rows (it is the same for all).

Run: ``.venv/bin/python -m benchmarks.online`` (``BENCH_QUICK=1``: a 30k-event stream, under 3 minutes on
2 cores). Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from online.prequential import mean_logloss
from online.river_models import make_model
from streams.features import FeatureContext, Featurizer, as_dict
from streams.generator import GeneratorConfig, generate
from streams.schemas import Click

QUICK = os.environ.get("BENCH_QUICK") == "1"
EVENTS = 30_000 if QUICK else 200_000
RIVER_EVENTS = 3_000 if QUICK else 20_000
ONE_AT_A_TIME_EVENTS = 10_000 if QUICK else 50_000
BATCH = 1024
REPEATS = 3  # backlog worker runs; the median is reported
BITS = 20
FTRL = {"alpha": 0.1, "beta": 1.0, "l1": 0.0, "l2": 1.0}
PARAMS = {"ftrl": FTRL, "river-ftrl": FTRL, "adam": {"learning_rate": 0.005}, "sgd": {"learning_rate": 0.05}}


def featurize(events) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    featurizer, context = Featurizer(BITS), FeatureContext()
    rows, labels = [], []
    for event in events:
        if isinstance(event, Click):
            rows.append(featurizer.transform(event, context)[0])
            labels.append(event.clicked)
        context.observe(event)
    indices = np.array(rows)
    return indices, np.ones(indices.shape, dtype=np.float32), np.array(labels, dtype=np.float64)


def one_at_a_time(name: str, dicts: list[dict], labels: np.ndarray) -> dict:
    model = make_model(name, BITS, **PARAMS.get(name, {}))
    p = np.empty(len(dicts))
    started = time.perf_counter()
    for row, (x, y) in enumerate(zip(dicts, labels.tolist())):
        p[row] = model.predict_proba_one(x)[True]
        model.learn_one(x, bool(y))
    elapsed = time.perf_counter() - started
    return {"events": len(dicts), "events_per_s": len(dicts) / elapsed, "p": p}


def mini_batches(name: str, indices: np.ndarray, values: np.ndarray, labels: np.ndarray) -> dict:
    model = make_model(name, BITS, **PARAMS.get(name, {}))
    parts = []
    started = time.perf_counter()
    for start in range(0, len(labels), BATCH):
        stop = start + BATCH
        parts.append(model.learn_many(indices[start:stop], values[start:stop], labels[start:stop]))
    elapsed = time.perf_counter() - started
    state_bytes = sum(getattr(model, a).nbytes for a in getattr(model, "_arrays", ()))
    return {"events": len(labels), "events_per_s": len(labels) / elapsed, "p": np.concatenate(parts),
            "state_mb": state_bytes / 2**20}


def learner_rows(indices, values, labels) -> list[dict]:
    dicts = [as_dict(i, v) for i, v in zip(indices[:ONE_AT_A_TIME_EVENTS], values[:ONE_AT_A_TIME_EVENTS])]
    rows = []
    river = one_at_a_time("river-ftrl", dicts[:RIVER_EVENTS], labels[:RIVER_EVENTS])
    rows.append({"model": "river LogisticRegression+FTRLProximal", "mode": "learn_one", **river})
    for name in ("sgd", "adam", "ftrl"):
        rows.append({"model": f"ours {name}", "mode": "learn_one", **one_at_a_time(name, dicts, labels)})
        rows.append({"model": f"ours {name}", "mode": f"learn_many({BATCH})",
                     **mini_batches(name, indices, values, labels)})
    for row in rows:
        n = row["events"]
        row["logloss"] = mean_logloss(labels[:n], row["p"])
        row["logloss_prefix"] = mean_logloss(labels[:RIVER_EVENTS], row["p"][:RIVER_EVENTS])
        row.pop("p")
    return rows


def _env(settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSTREAM_")}
    env.update(FEDSTREAM_BOOTSTRAP_SERVERS=settings.bootstrap_servers, FEDSTREAM_DATA_DIR=str(settings.data_path),
               FEDSTREAM_FEATURE_BITS=str(BITS))
    for field in ("clicks", "orders", "catalog", "dead_letter"):
        topic = getattr(settings.topics, field)
        env[f"FEDSTREAM_TOPICS__{field.upper()}__NAME"] = topic.name
        env[f"FEDSTREAM_TOPICS__{field.upper()}__PARTITIONS"] = str(topic.partitions)
    return env


def _worker(settings, group: str, idle: float) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "fedstream"), "learn", "--model", "ftrl", "--group", group,
               "--no-publish", "--idle-timeout", str(idle)]
    return subprocess.Popen(command, env=_env(settings), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _summary(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"worker exited with {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def worker_figures(events: list) -> dict:
    """Backlog throughput and paced latency through the embedded broker and the real worker process."""
    from fedstream.settings import Topic, Topics, load_settings
    from fedstream.processes import terminate
    from streams.broker import start_broker_process
    from streams.kafka import ensure_topics
    from streams.producer import EventProducer

    with tempfile.TemporaryDirectory() as tmp:
        proc, record = start_broker_process(Path(tmp) / "broker")
        try:
            out = {}
            for phase in ("backlog", "paced"):
                tag = f"bench-{phase}-{uuid.uuid4().hex[:6]}"
                topics = Topics(clicks=Topic(name=f"{tag}.clicks", partitions=4),
                                orders=Topic(name=f"{tag}.orders", partitions=4),
                                catalog=Topic(name=f"{tag}.catalog", partitions=1),
                                dead_letter=Topic(name=f"{tag}.dlq", partitions=1), drift=Topic(name=f"{tag}.drift", partitions=1))
                settings = load_settings(data_dir=Path(tmp) / phase, feature_bits=BITS,
                                         bootstrap_servers=record.bootstrap, topics=topics)
                ensure_topics(settings)
                if phase == "backlog":
                    with EventProducer(settings, source="bench") as producer:
                        for event in events:
                            producer.send_event(event)
                    # this VM's speed varies ~30% from run to run: the median of REPEATS workers, each its own group
                    runs = [_summary(_worker(settings, f"bench-{k}", idle=3.0)) for k in range(REPEATS)]
                    runs.sort(key=lambda run: run["events_per_s"] or 0)
                    out["backlog"] = dict(runs[len(runs) // 2], runs_events_per_s=[r["events_per_s"] for r in runs])
                else:
                    worker = _worker(settings, "bench", idle=4.0)
                    time.sleep(3.0)  # the worker joins its group
                    rate = 2000.0  # below the worker's capacity on 2 shared cores, else latency is queueing
                    paced = events[: int(rate * (8 if QUICK else 30))]
                    with EventProducer(settings, source="bench") as producer:
                        started = time.perf_counter()
                        for i, event in enumerate(paced):
                            producer.send_event(event)
                            if i % 200 == 0:
                                producer.flush()
                                ahead = i / rate - (time.perf_counter() - started)
                                if ahead > 0:
                                    time.sleep(ahead)
                    out["paced"] = _summary(worker)
                    out["paced"]["rate"] = rate
            out["worker_peak_rss_mb"] = max(out["backlog"]["peak_rss_mb"] or 0, out["paced"]["peak_rss_mb"] or 0)
            return out
        finally:
            terminate(proc.pid)


def main() -> None:
    started = time.perf_counter()
    config = GeneratorConfig(merchants=10, events=EVENTS, seed=7)
    events = list(generate(config))
    indices, values, labels = featurize(events)
    rows = learner_rows(indices, values, labels)
    learners_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker = worker_figures(events)

    print(f"online learners, {len(labels)} clicks ({EVENTS} clicks+orders), bits={BITS}, click rate {labels.mean():.3f}")
    print(f"{'model':40s} {'mode':16s} {'events':>8s} {'events/s':>12s} {'logloss':>9s} {'ll@prefix':>10s}")
    for row in rows:
        print(f"{row['model']:40s} {row['mode']:16s} {row['events']:8d} {row['events_per_s']:12,.0f} "
              f"{row['logloss']:9.4f} {row['logloss_prefix']:10.4f}")
    river = rows[0]
    ftrl_batch = next(r for r in rows if r["model"] == "ours ftrl" and r["mode"].startswith("learn_many"))
    speedup = ftrl_batch["events_per_s"] / river["events_per_s"]
    ll_gap = ftrl_batch["logloss_prefix"] / river["logloss_prefix"] - 1
    backlog, paced = worker["backlog"], worker["paced"]
    print(f"worker backlog: {backlog['learned_this_run']} events at {backlog['events_per_s'] or 0:,.0f} events/s, median of "
          f"{REPEATS} runs ({', '.join(f'{r or 0:,.0f}' for r in backlog['runs_events_per_s'])}) "
          f"(rolling AUC {backlog.get('rolling_auc', float('nan')):.3f}, logloss {backlog.get('prequential_logloss', float('nan')):.4f})")
    print(f"worker paced at {paced['rate']:.0f} events/s: produced->learned latency p50 "
          f"{paced.get('latency_p50_s', float('nan')):.3f} s, p95 {paced.get('latency_p95_s', float('nan')):.3f} s, "
          f"p99 {paced.get('latency_p99_s', float('nan')):.3f} s, max {paced.get('latency_max_s', float('nan')):.3f} s")
    print(f"worker CPU on the backlog: {backlog['busy_cpu_us_per_event']:.1f} us/event from first record to last "
          f"learned (consume, decode, learn, drift, checkpoints; {1e6 / backlog['busy_cpu_us_per_event']:,.0f} "
          f"events per CPU second), {1e6 * backlog['cpu_s'] / max(backlog['learned_this_run'], 1):.1f} us/event "
          f"over the whole run (group join and idle end included)")
    print(f"our FTRL mini-batches vs River: {speedup:,.0f}x the events/s, log loss {100 * ll_gap:+.1f}% on River's "
          f"prefix" + (" (quick mode: River's 3k-event prefix is too short to judge the 100x / +1% targets; "
                       "run without BENCH_QUICK)" if QUICK else ""))
    print(f"peak RSS: benchmark {learners_rss:.0f} MB, worker {worker['worker_peak_rss_mb']:.0f} MB; "
          f"FTRL state {ftrl_batch['state_mb']:.0f} MB at bits={BITS}")
    figures = {
        "bench": "online", "quick": QUICK, "clicks": int(len(labels)), "bits": BITS,
        "river_ftrl_events_per_s": river["events_per_s"], "river_ftrl_logloss_prefix": river["logloss_prefix"],
        **{f"{r['model'].split()[-1] if r['model'].startswith('ours') else 'river'}_{'batch' if 'many' in r['mode'] else 'one'}"
           f"_events_per_s": r["events_per_s"] for r in rows},
        **{f"{r['model'].split()[-1] if r['model'].startswith('ours') else 'river'}_{'batch' if 'many' in r['mode'] else 'one'}"
           f"_logloss": r["logloss"] for r in rows},
        "ftrl_batch_logloss_prefix": ftrl_batch["logloss_prefix"],
        "ftrl_batch_speedup_vs_river": speedup, "ftrl_batch_logloss_gap_vs_river": ll_gap,
        "worker_events_per_s": backlog["events_per_s"], "worker_runs_events_per_s": backlog["runs_events_per_s"],
        "worker_rolling_auc": backlog.get("rolling_auc"),
        "latency_p50_s": paced.get("latency_p50_s"), "latency_p95_s": paced.get("latency_p95_s"),
        "latency_p99_s": paced.get("latency_p99_s"), "paced_rate": paced["rate"],
        "worker_busy_cpu_us_per_event": backlog["busy_cpu_us_per_event"],
        "peak_rss_mb": learners_rss, "worker_peak_rss_mb": worker["worker_peak_rss_mb"], "ftrl_state_mb": ftrl_batch["state_mb"],
        # quick mode runs River on 3k events, too short to judge our mini-batches against it: not judged
        "targets": {"speedup_100x": None if QUICK else speedup >= 100,
                    "logloss_within_1pct": None if QUICK else ll_gap <= 0.01,
                    "worker_20k": (backlog["events_per_s"] or 0) >= 20_000,
                    "p95_2s": (paced.get("latency_p95_s") or math.inf) <= 2.0},
        "elapsed_s": time.perf_counter() - started,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
