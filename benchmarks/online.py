"""Online learners against their peers (Vowpal Wabbit, River) on generated and real streams, and the
Kafka worker end to end.

* mini-batches (issue #16 target 1): our SGD, Adam and FTRL ``learn_many`` (exact: rows one after the
  other, numba kernels, blocks of 1024) against VW 9.11.9's FTRL (``pylibvw`` driver over its binary
  cache, same hashed slots, same alpha/beta/l1/l2, no constant): events/s on one core (median of 3
  runs per seed) and progressive log loss, on held-out seeds;
* same API (issue #16 target 2, #18): ours ``predict_proba_one`` + ``learn_one`` against River's
  ``LogisticRegression`` with the same optimizer and settings, on a prefix of the generated stream, on
  River's own data sets (Phishing, Bananas: dense) and on MovieLens-100K (sparse, real);
* MovieLens-100K (real data): rating >= 4 predicted prequentially from hashed user / item / genre /
  demographic features: ours, River and VW, log loss and AUC;
* memory (target 5): optimizer state bytes per slot, the log loss cost of float32 state and of 16-bit q2.13 weights;
* the worker end to end: events/s from the embedded broker through ``fedstream learn`` on a backlog (the
  generated stream, and MovieLens-100K's real history replayed as orders: every event a recommender step), and
  produced->learned latency while events are produced at a steady rate; peak memory; where its CPU goes
  (``benchmarks._worker_stages``: the hot path's stages in-process, and polling + decoding alone).

Calibration: the learning rates (FTRL alpha) are picked on the calibration seed from a small grid by
our exact learners' log loss; every figure is then measured on the report seeds with those settings,
the same for every peer. Numba kernels are compiled (or loaded from their cache) when
``online.learners`` is imported, before any timed region; each learner also learns one warm-up block
outside the timed region. Featurizing and VW's text parsing are not timed (VW reads its binary cache).

Run: ``.venv/bin/python -m benchmarks.online`` (``BENCH_QUICK=1``: 30k events per seed, 3 report seeds).
Prints a table, then one JSON line (``readme`` rows as in the benchmark convention).
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks import _online_peers as peers
from benchmarks._worker_stages import consumer_cost, print_stages, stage_costs
from online.learners import LEARNERS
from online.prequential import mean_logloss, roc_auc
from online.river_models import RiverClassifier, make_model
from streams.features import FeatureContext, Featurizer, as_dict
from streams.generator import GeneratorConfig, generate
from streams.schemas import EVENT_KINDS, CatalogItem, Click

QUICK = os.environ.get("BENCH_QUICK") == "1"
MODE = "quick" if QUICK else "full"
EVENTS = 30_000 if QUICK else 200_000
RIVER_EVENTS = 3_000 if QUICK else 20_000
MOVIELENS_EVENTS = 20_000 if QUICK else 100_000
CALIBRATION_SEEDS = [7]
REPORT_SEEDS = [8, 9, 10] if QUICK else [8, 9, 10, 11, 12]
BATCH = 1024
REPEATS = 3  # timed runs per seed (and backlog worker runs); medians are reported
WORKER_TARGET = 100_000.0  # events/s end to end from Kafka, drift detectors on (issue #16, target 3)
BITS = 20
FTRL = {"beta": 1.0, "l1": 0.0, "l2": 1.0}
GRID = {"ftrl": [{"alpha": a, **FTRL} for a in (0.05, 0.1, 0.2)],
        "sgd": [{"learning_rate": r} for r in (0.02, 0.05, 0.1)],
        "adam": [{"learning_rate": r} for r in (0.002, 0.005, 0.01)]}


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


def stream(seed: int) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    events = list(generate(GeneratorConfig(merchants=10, events=EVENTS, seed=seed)))
    return (events, *featurize(events))


def batches(model, indices, values, labels) -> tuple[float, np.ndarray]:
    """Seconds to learn the rows in blocks of BATCH (predicting each before learning it), and those p."""
    parts = []
    started = time.perf_counter()
    for start in range(0, len(labels), BATCH):
        stop = start + BATCH
        parts.append(model.learn_many(indices[start:stop], values[start:stop], labels[start:stop]))
    return time.perf_counter() - started, np.concatenate(parts)


def warm_up(params: dict[str, dict], indices, values, labels) -> None:
    """One block per learner outside the timed regions (the kernels are compiled at import already)."""
    for name in LEARNERS:
        make_model(name, BITS, **params[name]).learn_many(indices[:BATCH], values[:BATCH], labels[:BATCH])


def timed_runs(params: dict[str, dict], variants: dict[str, tuple[str, dict]], indices, values, labels) -> dict:
    """VW and our variants, timed in turn REPEATS times (interleaved: load changes hit all alike)."""
    seconds: dict[str, list[float]] = {key: [] for key in variants}
    loss: dict[str, float] = {}
    vw_runs = []
    with peers.vw_session(indices, values, labels, BITS, params["ftrl"]) as (run_vw, _):
        for _ in range(REPEATS):
            vw_runs.append(run_vw())
            for key, (name, options) in variants.items():
                elapsed, p = batches(make_model(name, BITS, **options), indices, values, labels)
                seconds[key].append(elapsed)
                loss[key] = mean_logloss(labels, p)
    vw = peers.vw_figures(vw_runs, len(labels))
    out = {"vw ftrl": {"events_per_s": vw["events_per_s"], "logloss": vw["logloss"]},
           "vw ftrl wall (start-up incl.)": {"events_per_s": vw["wall_events_per_s"], "logloss": vw["logloss"]}}
    for key in variants:
        out[key] = {"events_per_s": float(np.median([len(labels) / s for s in seconds[key]])), "logloss": loss[key]}
    return out


def one_at_a_time(model, dicts: list[dict], labels: np.ndarray) -> tuple[float, np.ndarray]:
    """events/s of ``predict_proba_one`` + ``learn_one`` over the dicts, and the predictions. A River model
    is timed bare, as a River user calls it: our adapter's extra calls per event are not River's cost."""
    if isinstance(model, RiverClassifier):
        model = model.model
    p = np.empty(len(dicts))
    started = time.perf_counter()
    for row, (x, y) in enumerate(zip(dicts, labels.tolist())):
        p[row] = model.predict_proba_one(x)[True]
        model.learn_one(x, bool(y))
    return len(dicts) / (time.perf_counter() - started), p


def calibrate() -> dict[str, dict]:
    """Per learner, the grid point with the lowest exact log loss on the calibration seeds."""
    data = [stream(seed)[1:] for seed in CALIBRATION_SEEDS]
    best = {}
    for name, grid in GRID.items():
        scores = [np.mean([mean_logloss(y, batches(make_model(name, BITS, **params), i, v, y)[1]) for i, v, y in data])
                  for params in grid]
        best[name] = grid[int(np.argmin(scores))]
    return best


def seed_figures(seed: int, params: dict[str, dict]) -> dict:
    """One report seed: mini-batches against VW, float32 and delayed FTRL, same-API against River."""
    _, indices, values, labels = stream(seed)
    out: dict = {"clicks": int(len(labels))}
    warm_up(params, indices, values, labels)
    variants = {**{f"ours {name}": (name, params[name]) for name in LEARNERS},
                "ours ftrl float32": ("ftrl", {**params["ftrl"], "dtype": "float32"}),
                "ours ftrl q2.13": ("ftrl", {**params["ftrl"], "dtype": "q2.13", "seed": seed}),
                "ours ftrl delayed 64": ("ftrl", {**params["ftrl"], "max_delay": 64})}
    out.update(timed_runs(params, variants, indices, values, labels))
    dicts = [as_dict(i, v) for i, v in zip(indices[:RIVER_EVENTS], values[:RIVER_EVENTS])]
    for name in ("ftrl", "river-ftrl"):
        rate, p = one_at_a_time(make_model(name, BITS, **params["ftrl"]), dicts, labels[:RIVER_EVENTS])
        out[f"{name} learn_one"] = {"events_per_s": rate, "logloss": mean_logloss(labels[:RIVER_EVENTS], p)}
    return out


def river_set_figures(params: dict[str, dict]) -> dict[str, dict]:
    """Same API on River's shipped data sets: ours vs River's LogisticRegression, each optimizer, their runs
    interleaved (ours, River, ours, ...: a change of this VM's speed hits both alike)."""
    out = {}
    for set_name, (dicts, labels) in peers.river_dense_sets().items():
        for name in LEARNERS:
            runs: dict[str, list] = {name: [], f"river-{name}": []}
            for _ in range(REPEATS):
                for who in runs:
                    runs[who].append(one_at_a_time(make_model(who, BITS, **params[name]), dicts, labels))
            for who, timed in runs.items():
                out[f"{set_name} {who}"] = {"events": len(labels), "events_per_s": float(np.median([r for r, _ in timed])),
                                            "logloss": mean_logloss(labels, timed[0][1])}
    return out


def movielens_figures(params: dict[str, dict]) -> dict[str, dict]:
    """MovieLens-100K, rating >= 4, prequential: ours (both APIs), River and VW with the same FTRL settings."""
    dicts, labels = peers.movielens()
    dicts, labels = dicts[:MOVIELENS_EVENTS], labels[:MOVIELENS_EVENTS]
    indices, values = peers.dicts_to_rows(dicts, BITS)
    out = {}
    for name in LEARNERS:
        seconds, p = batches(make_model(name, BITS, **params[name]), indices, values, labels)
        out[f"ours {name}"] = {"events_per_s": len(labels) / seconds, "p": p}
    for name in ("ftrl", "river-ftrl"):
        rate, p = one_at_a_time(make_model(name, BITS, **params["ftrl"]), dicts, labels)
        out[f"{name} learn_one"] = {"events_per_s": rate, "p": p}
    vw = peers.run_vw(indices, values, labels, BITS, params["ftrl"], REPEATS)
    out["vw ftrl"] = {"events_per_s": float(np.median(vw["events_per_s"])), "p": vw["p"], "vw_logloss": vw["logloss"]}
    for row in out.values():
        p = row.pop("p")
        row.update(events=len(labels), logloss=mean_logloss(labels, p), auc=roc_auc(labels, p))
    return out


def _env(settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSTREAM_")}
    env.update(FEDSTREAM_BOOTSTRAP_SERVERS=settings.bootstrap_servers, FEDSTREAM_DATA_DIR=str(settings.data_path),
               FEDSTREAM_FEATURE_BITS=str(BITS))
    for field in (*(kind.topic for kind in EVENT_KINDS), "dead_letter"):
        topic = getattr(settings.topics, field)
        env[f"FEDSTREAM_TOPICS__{field.upper()}__NAME"] = topic.name
        env[f"FEDSTREAM_TOPICS__{field.upper()}__PARTITIONS"] = str(topic.partitions)
    return env


def _worker(settings, group: str, idle: float) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "fedstream"), "learn", "--model", "ftrl", "--group", group,
               "--no-publish", "--idle-timeout", str(idle)]
    return subprocess.Popen(command, env=_env(settings), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _process_costs(settings, learned: int) -> dict:
    """The worker process's CPU per learned event by activity (``benchmarks._worker_process``), its own group."""
    command = [sys.executable, "-m", "benchmarks._worker_process", "learn", "--model", "ftrl", "--group",
               f"bench-process-{uuid.uuid4().hex[:6]}", "--no-publish", "--idle-timeout", "3", "--max-events", str(learned)]
    env = dict(_env(settings), PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return _summary(proc)


def _summary(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"worker exited with {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def _backlog_runs(settings, events: list, group: str) -> dict:
    """``events`` produced as a backlog, then learned by REPEATS workers, each its own group: the median run
    (this VM's speed varies ~30% from run to run) with every run's events/s."""
    from streams.producer import EventProducer

    with EventProducer(settings, source="bench") as producer:
        for event in events:
            producer.send_event(event)
    runs = [_summary(_worker(settings, f"{group}-{k}", idle=3.0)) for k in range(REPEATS)]
    runs.sort(key=lambda run: run["events_per_s"] or 0)
    return dict(runs[len(runs) // 2], runs_events_per_s=[r["events_per_s"] for r in runs])


def worker_figures(events: list) -> dict:
    """Backlog throughput (the generated stream, and MovieLens-100K's real history replayed) and paced latency
    through the embedded broker and the real worker process."""
    from fedstream.settings import Topic, Topics, load_settings
    from fedstream.processes import terminate
    from streams.broker import start_broker_process
    from streams.datasets import load
    from streams.kafka import ensure_topics
    from streams.producer import EventProducer

    with tempfile.TemporaryDirectory() as tmp:
        proc, record = start_broker_process(Path(tmp) / "broker")
        try:
            out = {}
            for phase in ("backlog", "movielens", "paced"):
                tag = f"bench-{phase}-{uuid.uuid4().hex[:6]}"
                topics = Topics(clicks=Topic(name=f"{tag}.clicks", partitions=4),
                                orders=Topic(name=f"{tag}.orders", partitions=4),
                                catalog=Topic(name=f"{tag}.catalog", partitions=1),
                                dead_letter=Topic(name=f"{tag}.dlq", partitions=1), drift=Topic(name=f"{tag}.drift", partitions=1))
                settings = load_settings(data_dir=Path(tmp) / phase, feature_bits=BITS,
                                         bootstrap_servers=record.bootstrap, topics=topics)
                ensure_topics(settings)
                if phase == "backlog":
                    out["backlog"] = _backlog_runs(settings, events, "bench")
                    learned = sum(type(event) is not CatalogItem for event in events)
                    out["consumer"] = consumer_cost(settings, learned)  # poll + decode alone, same backlog
                    out["process"] = _process_costs(settings, learned)  # the worker process by activity
                elif phase == "movielens":  # a real shop's history: every event an order, i.e. a recommender step
                    out["movielens"] = _backlog_runs(settings, list(load("movielens")), "bench-movielens")
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


def spread(values: list[float], what: str = "seeds", digits: int = 4) -> str:
    return f"{min(values):.{digits}g}-{max(values):.{digits}g} (min-max, {len(values)} {what})"


def readme_row(row: str, value: float, spread_text: str | None, target: str | None, met: bool | None) -> dict:
    return {"row": f"online: {row}", "value": value, "spread": spread_text, "target": target, "met": met,
            "mode": MODE, "seeds": {"calibration": CALIBRATION_SEEDS, "report": REPORT_SEEDS},
            "date": datetime.date.today().isoformat()}


def seed_rows(seeds: list[dict]) -> list[dict]:
    """README rows from the report seeds: same API first, then mini-batches against VW, then memory."""
    def per_seed(f) -> list[float]:
        return [float(f(s)) for s in seeds]

    one = per_seed(lambda s: s["ftrl learn_one"]["events_per_s"] / s["river-ftrl learn_one"]["events_per_s"])
    one_gap = per_seed(lambda s: s["ftrl learn_one"]["logloss"] / s["river-ftrl learn_one"]["logloss"] - 1)
    rows = [readme_row("FTRL learn_one events/s vs River LogisticRegression+FTRLProximal learn_one (same API, "
                       f"generated stream, {RIVER_EVENTS} events)", float(np.median(one)), spread(one), ">= 1x",
                       min(one) >= 1),
            readme_row("FTRL learn_one log loss vs River's, same settings (relative gap)", float(np.median(one_gap)),
                       spread(one_gap), "<= +1% on every seed", max(one_gap) <= 0.01)]
    for name in LEARNERS:
        ratio = per_seed(lambda s: s[f"ours {name}"]["events_per_s"] / s["vw ftrl"]["events_per_s"])
        rows.append(readme_row(f"{name.upper()} learn_many (exact, blocks of {BATCH}) events/s vs VW 9.11.9 FTRL",
                               float(np.median(ratio)), spread(ratio), ">= 1x", min(ratio) >= 1))
    diff = per_seed(lambda s: s["ours ftrl"]["logloss"] - s["vw ftrl"]["logloss"])
    rows.append(readme_row("FTRL learn_many log loss minus VW FTRL's", float(np.median(diff)), spread(diff, digits=3),
                           "<= 1e-6 on every seed (VW keeps float32 weights)", max(diff) <= 1e-6))
    ll = per_seed(lambda s: s["ours ftrl"]["logloss"])
    rows.append(readme_row("FTRL learn_many progressive log loss", float(np.median(ll)), spread(ll), None, None))
    delayed = per_seed(lambda s: s["ours ftrl delayed 64"]["logloss"] / s["ours ftrl"]["logloss"] - 1)
    rows.append(readme_row("FTRL 64-row delayed updates (old default) log loss vs exact", float(np.median(delayed)),
                           spread(delayed), None, None))
    cost = per_seed(lambda s: s["ours ftrl float32"]["logloss"] / s["ours ftrl"]["logloss"] - 1)
    rows.append(readme_row("FTRL float32 state (12 bytes/slot vs 24) log loss cost", float(np.median(cost)),
                           spread(cost, digits=3), None, None))
    cost16 = per_seed(lambda s: s["ours ftrl q2.13"]["logloss"] / s["ours ftrl"]["logloss"] - 1)
    rows.append(readme_row("FTRL 16-bit q2.13 weights, randomized rounding (10 bytes/slot vs 24) log loss cost",
                           float(np.median(cost16)), spread(cost16, digits=3), None, None))
    return rows


def dataset_rows(river_sets: dict, ml: dict) -> list[dict]:
    rows = []
    for set_name in sorted({key.split()[0] for key in river_sets}):
        ratio = [river_sets[f"{set_name} {n}"]["events_per_s"] / river_sets[f"{set_name} river-{n}"]["events_per_s"]
                 for n in LEARNERS]
        gap = [river_sets[f"{set_name} {n}"]["logloss"] / river_sets[f"{set_name} river-{n}"]["logloss"] - 1
               for n in LEARNERS]
        rows.append(readme_row(f"River {set_name} (dense): learn_one events/s vs River's, worst of SGD/Adam/FTRL",
                               min(ratio), spread(ratio, "optimizers"), ">= 1x", min(ratio) >= 1))
        rows.append(readme_row(f"River {set_name} (dense): log loss gap vs River's, worst of SGD/Adam/FTRL", max(gap),
                               spread(gap, "optimizers", 3), "<= +1%", max(gap) <= 0.01))
    ratio = ml["ftrl learn_one"]["events_per_s"] / ml["river-ftrl learn_one"]["events_per_s"]
    rows.append(readme_row("MovieLens-100K (sparse): FTRL learn_one events/s vs River's", ratio, None, ">= 1x", ratio >= 1))
    for who in ("ours ftrl", "river-ftrl learn_one", "vw ftrl"):
        for metric in ("logloss", "auc"):
            rows.append(readme_row(f"MovieLens-100K rating>=4, {MOVIELENS_EVENTS} ratings, {who} {metric}",
                                   ml[who][metric], None, None, None))
    return rows


def print_table(seeds: list[dict], river_sets: dict, ml: dict) -> None:
    print(f"report seeds {REPORT_SEEDS} (calibration {CALIBRATION_SEEDS}); per row: median over seeds "
          f"(events/s: each seed's median of {REPEATS} runs) and min-max")
    print(f"{'generated stream':34s} {'events/s':>12s} {'min-max':>20s} {'logloss':>8s} {'min-max':>16s}")
    for key in seeds[0]:
        if key == "clicks":
            continue
        rate = [s[key]["events_per_s"] for s in seeds]
        loss = [s[key]["logloss"] for s in seeds]
        print(f"{key:34s} {np.median(rate):12,.0f} {min(rate):9,.0f}-{max(rate):<10,.0f} {np.median(loss):8.5f} "
              f"{min(loss):.5f}-{max(loss):.5f}")
    print(f"{'data set / model':34s} {'events':>8s} {'events/s':>12s} {'logloss':>8s} {'auc':>6s}")
    for key, row in [*river_sets.items(), *((f"movielens {k}", v) for k, v in ml.items())]:
        print(f"{key:34s} {row['events']:8d} {row['events_per_s']:12,.0f} {row['logloss']:8.5f} "
              f"{row.get('auc', float('nan')):6.3f}")


def main() -> None:
    started = time.perf_counter()
    params = calibrate()
    seeds = [seed_figures(seed, params) for seed in REPORT_SEEDS]
    river_sets, ml = river_set_figures(params), movielens_figures(params)
    learners_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    backlog_events = stream(CALIBRATION_SEEDS[0])[0]
    worker = worker_figures(backlog_events)
    stages = stage_costs(backlog_events)
    print(f"online learners, bits={BITS}, {EVENTS} generated events per seed; calibrated settings: {json.dumps(params)}")
    print_table(seeds, river_sets, ml)
    backlog, paced, real = worker["backlog"], worker["paced"], worker["movielens"]
    print(f"worker backlog: {backlog['learned_this_run']} events at {backlog['events_per_s'] or 0:,.0f} events/s, median "
          f"of {REPEATS} runs ({', '.join(f'{r or 0:,.0f}' for r in backlog['runs_events_per_s'])}); paced at "
          f"{paced['rate']:.0f} events/s: latency p50 {paced.get('latency_p50_s', float('nan')):.3f} s, p95 "
          f"{paced.get('latency_p95_s', float('nan')):.3f} s")
    print(f"worker on MovieLens-100K replayed: {real['learned_this_run']} events at {real['events_per_s'] or 0:,.0f} "
          f"events/s, median of {REPEATS} runs ({', '.join(f'{r or 0:,.0f}' for r in real['runs_events_per_s'])}), "
          f"{real['busy_cpu_us_per_event'] or float('nan'):.1f} µs busy CPU per event")
    print(f"worker CPU per event: hot path {stages['cpu_us_per_event']:.1f} µs in-process ("
          + ", ".join(f"{k} {v:.1f}" for k, v in stages["stages_us_per_event"].items())
          + f"), poll + decode {worker['consumer']['cpu_us_per_event'] or float('nan'):.1f} µs (alone it drains "
          f"{worker['consumer'].get('events_per_s') or 0:,.0f} events/s, its first fetches' ramp included); the worker process "
          f"{backlog['busy_cpu_us_per_event'] or float('nan'):.1f} µs")
    process = worker["process"]
    print(f"worker process by activity, µs CPU per learned event: {process['process_cpu_us_per_event']:.1f} in all, "
          f"learning {process['learning_us_per_event']:.1f}, outside learning {process['outside_learning_us_per_event']:.1f} ("
          + ", ".join(f"{k} {v:.2f}" for k, v in process["activities_us_per_event"].items() if not k.startswith("LEARNING"))
          + ")")
    rows = [*seed_rows(seeds), *dataset_rows(river_sets, ml),
            readme_row("worker events/s on a backlog (embedded broker, calibration seed)", backlog["events_per_s"],
                       spread(backlog["runs_events_per_s"], "runs", 3), f">= {WORKER_TARGET:,.0f} (#16)",
                       (backlog["events_per_s"] or 0) >= WORKER_TARGET),
            readme_row("consumer alone (poll + decode, no learning) events/s on that backlog (its first fetches' ramp included)",
                       worker["consumer"].get("events_per_s"), None, None, None),
            readme_row("worker events/s on MovieLens-100K replayed (real history: 100k one-line orders of one merchant, "
                       "each a recommender step)", real["events_per_s"], spread(real["runs_events_per_s"], "runs", 3),
                       None, None)]
    for row in rows:
        print(f"{row['row']:110s} {row['value']:>10.4g}  {row['spread'] or '':40s} target {row['target']} met {row['met']}")

    def median(key: str, field: str) -> float:
        return float(np.median([s[key][field] for s in seeds]))
    figures = {
        "bench": "online", "quick": QUICK, "bits": BITS, "params": params,
        "vw_ftrl_events_per_s": median("vw ftrl", "events_per_s"), "vw_ftrl_logloss": median("vw ftrl", "logloss"),
        "vw_ftrl_wall_events_per_s": median("vw ftrl wall (start-up incl.)", "events_per_s"),
        **{f"{n}_batch_events_per_s": median(f"ours {n}", "events_per_s") for n in LEARNERS},
        **{f"{n}_batch_logloss": median(f"ours {n}", "logloss") for n in LEARNERS},
        "ftrl32_batch_logloss": median("ours ftrl float32", "logloss"),
        "ftrl_one_events_per_s": median("ftrl learn_one", "events_per_s"),
        "river_ftrl_events_per_s": median("river-ftrl learn_one", "events_per_s"),
        "ftrl_state_bytes_per_slot": 24, "ftrl32_state_bytes_per_slot": 12,
        **{f"ftrl{tag}_bytes_per_slot": make_model("ftrl", 4, dtype=dtype).state_bytes_per_slot
           for tag, dtype in (("", "float64"), ("_f32", "float32"), ("_f16", "q2.13"))},
        "ftrl_f32_logloss": median("ours ftrl float32", "logloss"), "ftrl_f16_logloss": median("ours ftrl q2.13", "logloss"),
        "worker_events_per_s": backlog["events_per_s"], "worker_runs_events_per_s": backlog["runs_events_per_s"],
        "worker_movielens_events_per_s": real["events_per_s"],
        "worker_movielens_runs_events_per_s": real["runs_events_per_s"],
        "latency_p95_s": paced.get("latency_p95_s"), "peak_rss_mb": learners_rss,
        "worker_peak_rss_mb": worker["worker_peak_rss_mb"],
        "worker_busy_cpu_us_per_event": backlog["busy_cpu_us_per_event"],
        "worker_hot_path_cpu_us_per_event": stages["cpu_us_per_event"],
        "worker_stages_us_per_event": stages["stages_us_per_event"],
        "consumer_cpu_us_per_event": worker["consumer"]["cpu_us_per_event"],
        "consumer_events_per_s": worker["consumer"].get("events_per_s"),
        "worker_process_us_per_event": worker["process"],
        "readme": rows, "elapsed_s": time.perf_counter() - started,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    if sys.argv[1:] == ["stages"]:  # the worker's CPU per event by stage, alone
        print_stages(stage_costs(stream(CALIBRATION_SEEDS[0])[0]))
    else:
        main()
