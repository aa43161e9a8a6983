"""Where the learner worker *process* spends its CPU while it learns a backlog, activity by activity.

Runs ``fedstream learn ARGS`` in this process (give it ``--max-events N``: the window ends with the N-th
learned event) and accounts the window from the first record to the last block: the main thread's CPU
(``time.thread_time``) around the run loop's calls and the hot path's stages (exclusive: nested calls are
charged to the inner one), every other thread's CPU from ``/proc/self/task``, and the time in garbage
collections (``gc.callbacks``, already inside the activities). Prints one JSON line of µs per learned event.

Run against a broker holding a backlog (the settings from the environment, as ``fedstream``):
``python -m benchmarks._worker_process learn --model ftrl --group G --no-publish --max-events 30000``.
Self-contained (imports nothing else from ``benchmarks``), so it can also run against another checkout.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import sys
import time
from collections import defaultdict

# (module, class, method) -> activity; a method missing in the code measured is skipped
ACTIVITIES = [
    ("streams.consumer", "EventConsumer", "poll", "consumer poll (fetch, record parsing)"),
    ("streams.consumer", "EventConsumer", "_decode_chunk", "consumer decoding (msgspec, Records)"),
    ("streams.consumer", "EventConsumer", "lag", "consumer lag"),
    ("online.catalog", "CatalogReader", "poll", "catalog poll"),
    ("online.worker", "OnlineWorker", "accept", "queueing records into blocks"),
    ("online.worker", "OnlineWorker", "flush_caught_up", "flushing caught-up partitions"),
    ("online.worker", "OnlineWorker", "flush_stale", "flushing stale blocks"),
    ("online.worker", "OnlineWorker", "_maybe_checkpoint", "checkpoints"),
    ("online.worker", "OnlineWorker", "_maybe_publish", "publishing"),
    ("online.worker", "OnlineWorker", "learn_block", "learn_block glue (the block's arrays)"),
    ("online.worker", "OnlineWorker", "_count", "counting events per slot and merchant"),
    ("online.worker", "OnlineWorker", "_record_latencies", "latencies"),
    ("online.worker", "OnlineWorker", "_observe_recommender", "LEARNING recommender update"),
    ("online.worker", "OnlineWorker", "_score_ranking", "LEARNING ranking evaluation"),
    ("streams.features", "Featurizer", "featurize_block", "LEARNING featurize"),
    ("online.learners", "HashedLogisticRegression", "learn_many", "LEARNING learner (learn_many)"),
    ("online.prequential", "PrequentialEvaluator", "update_many", "LEARNING prequential evaluator"),
    ("drift.monitor", "DriftMonitor", "observe_predictions", "LEARNING drift monitor"),
]


class Account:
    """The window's CPU: per activity (main thread, exclusive), per thread, in garbage collections."""

    def __init__(self) -> None:
        self.on = False
        self.spent: dict[str, float] = defaultdict(float)
        self.stack: list[float] = []
        self.gc_spent = 0.0
        self._gc_started = 0.0
        self.marks: dict[str, tuple] = {}

    def wrap(self, owner: type, name: str, activity: str) -> None:
        function = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.on:
                return function(*args, **kwargs)
            self.stack.append(0.0)
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.thread_time() - started
                self.spent[activity] += elapsed - self.stack.pop()
                if self.stack:
                    self.stack[-1] += elapsed
        setattr(owner, name, timed)

    def on_gc(self, phase: str, info: dict) -> None:
        if self.on and phase == "start":
            self._gc_started = time.thread_time()
        elif self.on:
            self.gc_spent += time.thread_time() - self._gc_started

    def mark(self, name: str) -> None:
        self.marks[name] = (time.thread_time(), time.process_time(), _threads())


def _threads() -> dict[str, float]:
    """CPU seconds of each thread of this process (user + system)."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def instrument(account: Account) -> None:
    """Wrap the activities and open the window at the first record, close it before the final checkpoint."""
    import importlib

    for module, cls, name, activity in ACTIVITIES:
        owner = getattr(importlib.import_module(module), cls, None)
        if owner is not None and hasattr(owner, name):
            account.wrap(owner, name, activity)
    from online.worker import OnlineWorker

    accept, checkpoint = OnlineWorker.accept, OnlineWorker.checkpoint

    def first_accept(self, records):
        if not account.on and "start" not in account.marks:
            account.mark("start")
            account.on = True
        return accept(self, records)

    def last_checkpoint(self, *args, **kwargs):
        limit = self.config.max_events
        if account.on and limit is not None and self.learned_this_run >= limit:
            account.on = False
            account.mark("end")
            account.marks["learned"] = self.learned_this_run
        return checkpoint(self, *args, **kwargs)
    OnlineWorker.accept, OnlineWorker.checkpoint = first_accept, last_checkpoint
    gc.callbacks.append(account.on_gc)


def report(account: Account) -> dict:
    """µs per learned event of the window (see the module docstring)."""
    (main0, cpu0, threads0), (main1, cpu1, threads1) = account.marks["start"], account.marks["end"]
    per = 1e6 / account.marks["learned"]
    others = sum(cpu - threads0.get(tid, 0.0) for tid, cpu in threads1.items() if tid != str(os.getpid()))
    activities = {name: spent * per for name, spent in sorted(account.spent.items(), key=lambda kv: -kv[1])}
    activities["main thread, the rest of the run loop"] = (main1 - main0 - sum(account.spent.values())) * per
    activities["other threads (kafka-python's IO thread, heartbeat, checkpoint writer)"] = others * per
    learning = sum(v for k, v in activities.items() if k.startswith("LEARNING"))
    return {"learned": account.marks["learned"], "process_cpu_us_per_event": (cpu1 - cpu0) * per,
            "learning_us_per_event": learning, "outside_learning_us_per_event": (cpu1 - cpu0) * per - learning,
            "garbage_collection_us_per_event": account.gc_spent * per, "activities_us_per_event": activities}


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help") or "--max-events" not in argv:
        print(__doc__.strip())
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    account = Account()
    instrument(account)
    sys.argv = ["fedstream", *argv]
    stdout = sys.stdout
    with open(os.devnull, "w") as sys.stdout:  # the worker's summary: not this tool's output
        try:
            runpy.run_module("fedstream", run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
        finally:
            sys.stdout = stdout
    if "end" not in account.marks:
        raise SystemExit("Error: the worker stopped before --max-events were learned")
    print(json.dumps(report(account)))


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))  # run as a file: benchmarks/streams.py must not shadow streams
    sys.path[:] = [path for path in sys.path if os.path.abspath(path or ".") != here]
    main(sys.argv[1:])
