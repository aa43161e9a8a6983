"""Drift detection out of sample: calibration seeds, held-out false alarms, power curves, a real change.

Three kinds of streams from ``streams.generator`` (20 merchants, Zipf traffic, 14 days), each run through
the prequential model (``drift.prequential``) and a :class:`drift.monitor.DriftMonitor`:

* ``--calibrate``: drift-free streams of the CALIBRATION seeds with thresholds out of reach; prints the
  thresholds the rule of ``drift.calibration`` (1.4 x the highest drift-free statistic) gives, as settings.
  Only these seeds ever choose a threshold; the defaults in ``fedstream/settings.py`` were copied from it.
* report (default): the settings defaults on drift-free streams of the REPORT seeds (held out: false
  alarms per 1M events, mean ± sd and min-max over seeds), and on POWER streams where each of the five
  drift kinds (preferences, prices, device_mix, popular_item, label_delay) hits one of the five largest
  merchants at magnitudes 0.1, 0.3, 0.5 and 1.0: detection rate within 5k of the merchant's events and
  delay, per detector, kind and magnitude. Detections on drift streams before a drift or on other
  merchants are counted as false alarms too (``all streams``).
* a real-data row: the CDNOW cohort (``fedstream replay cdnow``), whose purchase rate collapses when its
  acquisition period ends; the change point is fixed here before the run (:data:`CDNOW_CHANGE`).

Targets: every drift of magnitude >= 0.5 found within 5k merchant events; <= 1 false alarm per 1M
held-out drift-free events. ``BENCH_QUICK=1``: fewer, shorter streams (a few minutes on 2 cores).
Run: ``python -m benchmarks.drift [--calibrate]``. Prints tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import calendar
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field

from drift.calibration import FACTOR, never_fire, peaks, thresholds
from drift.monitor import DriftMonitor
from drift.prequential import make_learner, prequential
from fedstream.settings import Settings, load_settings
from streams.generator import DRIFT_KINDS, DriftSpec, GeneratorConfig, generate, ground_truth, merchant_ids
from streams.schemas import CatalogItem

TARGET_DELAY = 5000
TARGET_FALSE_ALARMS_PER_1M = 1.0
CALIBRATION_SEEDS = (101, 102, 103, 104, 105)
REPORT_SEEDS = (201, 202, 203, 204, 205)
POWER_SEEDS = (301, 302)
MAGNITUDES = (0.1, 0.3, 0.5, 1.0)
BITS = 18
# CDNOW: the cohort was acquired in Q1 1997 (every customer's first purchase is in it; the last one is on
# 1997-03-25), so the purchase rate collapses when acquisition ends: the change point is 1997-03-26 00:00 UTC.
CDNOW_CHANGE = calendar.timegm((1997, 3, 26, 0, 0, 0))
SIZES = {  # events per stream, streams per kind
    True: {"calibration": (60_000, 3), "report": (60_000, 5), "power": (100_000, 1)},
    False: {"calibration": (150_000, 5), "report": (150_000, 5), "power": (200_000, 2)},
}


@dataclass
class Run:
    """One stream through the model and the monitor."""

    config: GeneratorConfig
    truth: list[dict]
    monitor: DriftMonitor
    merchant_at: dict[int, int] = field(default_factory=dict)  # truth row -> merchant's events before it
    seconds: float = 0.0


def run_stream(config: GeneratorConfig, settings: Settings) -> Run:
    """One prequential pass over a generated stream."""
    truth = ground_truth(config)
    at = {row["at_event"]: k for k, row in enumerate(truth)}
    run = Run(config, truth, DriftMonitor(settings))
    monitor, started = run.monitor, time.perf_counter()
    for event, p in prequential(generate(config), bits=BITS, model=make_learner(BITS)):
        if not isinstance(event, CatalogItem) and monitor.global_index in at:
            row = at[monitor.global_index]
            run.merchant_at[row] = monitor.merchant_index.get(truth[row]["merchant_id"], 0)
        monitor.observe(event, p)
    run.seconds = time.perf_counter() - started
    print(f"# seed={config.seed} {len(truth)} drifts: {monitor.global_index} events, {len(monitor.events)} "
          f"detections in {run.seconds:.0f}s", file=sys.stderr)
    return run


def bench_settings(**drift_updates) -> Settings:
    settings = load_settings(data_dir=tempfile.mkdtemp(prefix="bench-drift-"), feature_bits=BITS)
    return settings.model_copy(update={"drift": settings.drift.model_copy(update=drift_updates)})


def calibrate(quick: bool) -> dict:
    """Peaks on the calibration seeds under never-firing thresholds, and the thresholds of the rule."""
    events, count = SIZES[quick]["calibration"]
    seeds = CALIBRATION_SEEDS[:count]
    base = bench_settings()
    settings = base.model_copy(update={"drift": never_fire(base.drift)})
    found: dict[str, float] = {}
    for seed in seeds:
        run = run_stream(GeneratorConfig(events=events, seed=seed), settings)
        for name, value in peaks(run.monitor.detectors.values()).items():
            found[name] = max(found.get(name, 0.0), value)
    updates = thresholds(found, base.drift)
    print(f"calibration: seeds {list(seeds)}, {events} drift-free events each; threshold = {FACTOR} x the highest "
          "statistic seen (detector: peak)")
    for name, value in sorted(found.items()):
        print(f"  {name:<32}{value:>12.4g}")
    print("settings.drift from the rule (copy into fedstream/settings.py):")
    for key, value in updates.items():
        print(f"  {key} = {value!r}")
    return {"benchmark": "drift", "mode": "calibrate", "quick": quick, "seeds": {"calibration": list(seeds)},
            "events_per_seed": events, "factor": FACTOR, "peaks": found, "thresholds": updates}


def power_plan(seed: int, position: int, magnitude: float, events: int) -> GeneratorConfig:
    """Five drifts of one magnitude, one per kind on m00..m04 (kinds rotate with ``position``), each placed
    so that min(6k, half of the merchant's events) of its events follow the drift."""
    base = GeneratorConfig(events=events, seed=seed)
    share = [1.0 / k ** base.merchant_zipf for k in range(1, base.merchants + 1)]
    mids = merchant_ids(base)
    drifts = []
    for k, kind in enumerate(DRIFT_KINDS):
        m = (k + position) % len(DRIFT_KINDS)
        fraction = share[m] / sum(share)
        after = min(6000.0, fraction * events / 2) / fraction
        drifts.append(DriftSpec(mids[m], int(events - after), kind, magnitude))
    return GeneratorConfig(events=events, seed=seed, drifts=tuple(drifts))


def false_alarms(run: Run) -> list:
    """Detections on merchants without a drift, or on a drifting merchant before its drift."""
    starts = {row["merchant_id"]: row["at_event"] for row in run.truth}
    return [e for e in run.monitor.events if e.global_index < starts.get(e.merchant_id, run.monitor.global_index + 1)]


def drift_rows(run: Run) -> list[dict]:
    """Per drift: the first detection of each detector on its merchant at or after it (merchant-event delay)."""
    rows = []
    for k, truth in enumerate(run.truth):
        start = run.merchant_at.get(k, 0)
        first: dict[str, int] = {}
        for event in run.monitor.events:
            if event.merchant_id == truth["merchant_id"] and event.global_index >= truth["at_event"]:
                first.setdefault(event.detector, event.event_index - start)
        after = run.monitor.merchant_index.get(truth["merchant_id"], 0) - start
        rows.append({"seed": run.config.seed, "merchant_id": truth["merchant_id"], "kind": truth["kind"],
                     "magnitude": truth["magnitude"], "merchant_events_after": after, "delays": first,
                     "found": bool(first) and min(first.values()) <= TARGET_DELAY})
    return rows


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def clean_summary(runs: list[Run]) -> dict:
    per_seed = [1e6 * len(r.monitor.events) / r.monitor.global_index for r in runs]
    by_detector = defaultdict(int)
    for r in runs:
        for e in r.monitor.events:
            by_detector[e.detector] += 1
    return {"seeds": [r.config.seed for r in runs], "events": sum(r.monitor.global_index for r in runs),
            "per_1m_by_seed": per_seed, "per_1m": spread(per_seed), "by_detector": dict(by_detector)}


def cdnow_row() -> dict:
    """The default monitor over the CDNOW orders; delay from :data:`CDNOW_CHANGE`, false alarms before it."""
    from streams.datasets import cdnow_events

    monitor = DriftMonitor(bench_settings())
    change_index = None
    for event in cdnow_events():
        if change_index is None and event.timestamp >= CDNOW_CHANGE:
            change_index = monitor.global_index
        monitor.observe(event)
    before = [e for e in monitor.events if e.window_end_time < CDNOW_CHANGE]
    after = [e for e in monitor.events if e.window_end_time >= CDNOW_CHANGE]
    first = after[0] if after else None
    return {"change": datetime.datetime.fromtimestamp(CDNOW_CHANGE, datetime.UTC).date().isoformat(),
            "events": monitor.global_index, "events_before_change": change_index,
            "false_alarms_before": len(before), "false_alarm_detectors": sorted({e.detector for e in before}),
            "detector": first.detector if first else None,
            "delay_days": round((first.window_end_time - CDNOW_CHANGE) / 86_400, 1) if first else None,
            "delay_events": first.global_index - change_index if first else None,
            "detections_after": len(after)}


def power_table(rows: list[dict]) -> dict:
    """(kind, magnitude) -> found / total and median delay of the first detector; and per detector."""
    cells: dict = {}
    for kind in DRIFT_KINDS:
        for magnitude in MAGNITUDES:
            mine = [r for r in rows if r["kind"] == kind and r["magnitude"] == magnitude]
            delays = [min(r["delays"].values()) for r in mine if r["found"]]
            per_detector = defaultdict(int)
            for r in mine:
                for name, delay in r["delays"].items():
                    per_detector[name] += delay <= TARGET_DELAY
            cells[f"{kind}@{magnitude}"] = {"found": sum(r["found"] for r in mine), "total": len(mine),
                                            "median_delay": statistics.median(delays) if delays else None,
                                            "by_detector": dict(per_detector)}
    return cells


def print_report(clean: dict, cells: dict, all_fa: dict, cdnow: dict) -> None:
    fa = clean["per_1m"]
    print(f"held-out drift-free seeds {clean['seeds']}: {clean['events']} events; false alarms per 1M: "
          f"{fa['mean']:.2f} ± {fa['sd']:.2f} (min-max {fa['min']:.2f}-{fa['max']:.2f}; target <= "
          f"{TARGET_FALSE_ALARMS_PER_1M}); by detector: {clean['by_detector'] or 'none'}")
    print(f"drift streams, before a drift or on other merchants: {all_fa['count']} false alarms in "
          f"{all_fa['events']} events; by detector: {all_fa['by_detector'] or 'none'}")
    print()
    print(f"power: drifts found within {TARGET_DELAY} merchant events (found/total, median delay of the first)")
    print(f"{'kind':<14}" + "".join(f"{'magnitude ' + str(m):>22}" for m in MAGNITUDES))
    for kind in DRIFT_KINDS:
        line = f"{kind:<14}"
        for m in MAGNITUDES:
            c = cells[f"{kind}@{m}"]
            delay = "-" if c["median_delay"] is None else f"{c['median_delay']:.0f}"
            line += f"{c['found']:>14}/{c['total']} {delay:>5}"
        print(line)
    print()
    print("per detector: drifts it found within the target, over all magnitudes (kind: count)")
    detectors = sorted({n for c in cells.values() for n in c["by_detector"]})
    for name in detectors:
        counts = {k: sum(cells[f"{k}@{m}"]["by_detector"].get(name, 0) for m in MAGNITUDES) for k in DRIFT_KINDS}
        print(f"  {name:<32}" + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    print()
    print(f"CDNOW (real): change {cdnow['change']} (after {cdnow['events_before_change']} of {cdnow['events']} "
          f"orders): first detection {cdnow['detector']} after {cdnow['delay_days']} days / {cdnow['delay_events']} "
          f"orders; false alarms before: {cdnow['false_alarms_before']} {cdnow['false_alarm_detectors']}")


def readme_rows(quick: bool, clean: dict, cells: dict, cdnow: dict, seeds: dict) -> list[dict]:
    fa = clean["per_1m"]
    base = {"mode": "quick" if quick else "full", "seeds": seeds, "date": datetime.date.today().isoformat()}
    strong = [c for key, c in cells.items() if float(key.split("@")[1]) >= 0.5]
    found, total = sum(c["found"] for c in strong), sum(c["total"] for c in strong)
    rows = [
        {"row": "drift: false alarms per 1M held-out drift-free events", "value": round(fa["mean"], 3),
         "spread": f"{fa['min']:.2f}-{fa['max']:.2f} (min-max, {len(clean['seeds'])} seeds), sd {fa['sd']:.2f}",
         "target": "<= 1", "met": fa["mean"] <= TARGET_FALSE_ALARMS_PER_1M},
        {"row": "drift: drifts of magnitude >= 0.5 found within 5k merchant events (all 5 kinds)",
         "value": found, "spread": f"{found}/{total}", "target": "all", "met": found == total},
    ]
    for kind in DRIFT_KINDS:
        per = [cells[f"{kind}@{m}"] for m in MAGNITUDES]
        rows.append({"row": f"drift: {kind} drifts found within 5k, by magnitude 0.1/0.3/0.5/1.0",
                     "value": sum(c["found"] for c in per[2:]),
                     "spread": " ".join(f"{m}:{c['found']}/{c['total']}" for m, c in zip(MAGNITUDES, per)),
                     "target": "all at >= 0.5", "met": all(c["found"] == c["total"] for c in per[2:])})
    rows.append({"row": f"drift: CDNOW purchase-rate collapse ({cdnow['change']}) detection delay, days",
                 "value": cdnow["delay_days"], "spread": f"{cdnow['delay_events']} orders; "
                 f"{cdnow['false_alarms_before']} false alarms before", "target": None, "met": None})
    return [{**row, **base} for row in rows]


def report(quick: bool) -> dict:
    sizes = SIZES[quick]
    settings = bench_settings()
    events, count = sizes["report"]
    clean = clean_summary([run_stream(GeneratorConfig(events=events, seed=s), settings) for s in REPORT_SEEDS[:count]])
    p_events, p_count = sizes["power"]
    power_runs = [run_stream(power_plan(seed, position + j, magnitude, p_events), settings)
                  for j, seed in enumerate(POWER_SEEDS[:p_count]) for position, magnitude in enumerate(MAGNITUDES)]
    rows = [row for r in power_runs for row in drift_rows(r)]
    alarms = [e for r in power_runs for e in false_alarms(r)]
    all_fa = {"count": len(alarms), "events": sum(r.monitor.global_index for r in power_runs),
              "by_detector": dict(sorted(defaultdict(int, {d: sum(e.detector == d for e in alarms)
                                                           for d in {e.detector for e in alarms}}).items()))}
    cdnow = cdnow_row()
    cells = power_table(rows)
    print_report(clean, cells, all_fa, cdnow)
    seeds = {"calibration": list(CALIBRATION_SEEDS[:sizes["calibration"][1]]), "report": clean["seeds"],
             "power": list(POWER_SEEDS[:p_count])}
    runs, total_events = power_runs, max(sum(r.monitor.global_index for r in power_runs), 1)
    return {"benchmark": "drift", "mode": "report", "quick": quick, "seeds": seeds,
            "clean_events_per_seed": events, "false_alarms_clean": clean, "false_alarms_drift_streams": all_fa,
            "power": cells, "drifts": rows, "cdnow": cdnow,
            "us_per_event": round(1e6 * sum(r.seconds for r in runs) / total_events),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "readme": readme_rows(quick, clean, cells, cdnow, seeds)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.drift", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibrate", action="store_true",
                        help="print the thresholds the calibration rule gives on the calibration seeds")
    args = parser.parse_args(argv)
    quick = os.environ.get("BENCH_QUICK") == "1"
    figures = calibrate(quick) if args.calibrate else report(quick)
    print(json.dumps(figures, default=str))


if __name__ == "__main__":
    main()
