"""Scale-out of the learner: events/s and CPU per event with 1, 2 and 3 workers in one consumer group, and
how long a partition takes to resume on a new owner after its worker is killed -9.

Method: an embedded broker, the platform's topic layout (clicks and orders on 8 partitions, the catalog on
4, read whole by every worker). For each group size N a fresh set of topics gets the whole stream (a
backlog: the producer, ~8k events/s on this shared VM, would otherwise pace the learners), then N
``fedstream learn`` processes start together in one group sharing one store. Events/s = clicks and orders
learned by the group / (last block learned by any worker - first record seen by any), on the one monotonic
clock of the host: it includes the group forming (the first member learns alone until the others join;
``group_split_after_s`` says when all N held partitions). CPU per event = the workers' process CPU while learning (``busy_cpu_us_per_event``) weighted by their
events, and the whole processes' CPU from ``getrusage(RUSAGE_CHILDREN)`` (imports, joins and idling too).
Resume: 3 workers on a backlog, one killed -9 after its first checkpoint; resume = kill -> the first block
learned by a survivor on a slot it adopted from the killed worker's checkpoint (log time stamps); the group
only notices a member that died without leaving after ``session_timeout_ms`` (6 s here).

This VM has 2 cores shared with other sessions: events/s cannot grow with N beyond the cores, CPU per event
shows what each added worker costs. Run: ``.venv/bin/python -m benchmarks.scaleout`` (``BENCH_QUICK=1``:
40k events; else 200k).
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks import emit
from streams.generator import GeneratorConfig, generate
from streams.schemas import CatalogItem

QUICK = os.environ.get("BENCH_QUICK") == "1"
EVENTS = 40_000 if QUICK else 200_000
MERCHANTS, BITS, SEED, SIZES = 20, 18, 5, (1, 2, 3)
LEARN = ["--model", "ftrl", "--no-publish", "--no-drift", "--rank-every", "50"]


def _env(settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSTREAM_")}
    env.update(FEDSTREAM_BOOTSTRAP_SERVERS=settings.bootstrap_servers, FEDSTREAM_DATA_DIR=str(settings.data_path),
               FEDSTREAM_FEATURE_BITS=str(BITS))
    for kind in ("clicks", "orders", "catalog", "dead_letter", "drift"):
        topic = getattr(settings.topics, kind)
        env[f"FEDSTREAM_TOPICS__{kind.upper()}__NAME"] = topic.name
        env[f"FEDSTREAM_TOPICS__{kind.upper()}__PARTITIONS"] = str(topic.partitions)
    return env


def _settings(root: Path, bootstrap: str, tag: str):
    from fedstream.settings import Topic, Topics, load_settings
    from streams.kafka import ensure_topics

    topics = Topics(clicks=Topic(name=f"{tag}.clicks", partitions=8), orders=Topic(name=f"{tag}.orders", partitions=8),
                    catalog=Topic(name=f"{tag}.catalog", partitions=4), dead_letter=Topic(name=f"{tag}.dlq", partitions=1),
                    drift=Topic(name=f"{tag}.drift", partitions=1))
    settings = load_settings(data_dir=root / tag, feature_bits=BITS, bootstrap_servers=bootstrap, topics=topics)
    ensure_topics(settings)
    return settings


def _produce(settings, events: list) -> None:
    from streams.producer import EventProducer

    with EventProducer(settings, source="bench-scaleout") as producer:
        for event in events:
            producer.send_event(event)


def _log_lines(path: Path, message: str) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if f'"msg": "{message}"' in line]


def _wait_split(logs: list[Path], deadline_s: float = 180.0) -> None:
    """Until every worker's latest assignment is non-empty and together they hold the 8 clicks partitions."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        latest = [lines[-1]["partitions"] if (lines := _log_lines(path, "partitions assigned")) else [] for path in logs]
        clicks = sorted(p for part in latest for p in part if ".clicks:" in p)
        if all(latest) and len(clicks) == 8 == len(set(clicks)):
            return
        time.sleep(0.2)
    raise RuntimeError("the group did not split the partitions among its workers in time")


def _start(settings, root: Path, group: str, n: int, extra: list[str]) -> tuple[list[subprocess.Popen], list[Path]]:
    command = [str(Path(sys.executable).parent / "fedstream"), "learn", *LEARN, "--group", group,
               "--store", str(root / group), *extra]
    logs = [root / f"{group}-{i}.log" for i in range(n)]
    procs = [subprocess.Popen([*command, "--worker-id", str(i)], env=_env(settings), stdout=subprocess.PIPE,
                              stderr=logs[i].open("w"), text=True) for i in range(n)]
    return procs, logs


def _finish(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"worker exited with {proc.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def group_run(root: Path, bootstrap: str, n: int, catalog: list, stream: list) -> dict:
    """N workers started together in one group on a backlog: events/s and CPU per event."""
    settings = _settings(root, bootstrap, f"size{n}-{uuid.uuid4().hex[:6]}")
    _produce(settings, catalog + stream)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    procs, logs = _start(settings, root, f"bench-{n}", n, ["--idle-timeout", "20"])
    _wait_split(logs)
    split_at = time.monotonic()
    runs = _finish(procs)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    learned = sum(r["learned_this_run"] for r in runs)
    starts = [r["learning_window_monotonic"][0] for r in runs if r["learning_window_monotonic"][0]]
    ends = [r["learning_window_monotonic"][1] for r in runs if r["learning_window_monotonic"][1]]
    busy_cpu = sum((r["busy_cpu_us_per_event"] or 0) * r["learned_this_run"] for r in runs)
    process_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"workers": n, "events": learned, "events_per_s": learned / (max(ends) - min(starts)),
            "learning_s": max(ends) - min(starts), "group_split_after_s": split_at - started,
            "busy_cpu_us_per_event": busy_cpu / learned, "process_cpu_us_per_event": 1e6 * process_cpu / learned,
            "per_worker_events": [r["learned_this_run"] for r in runs]}


def _stamp(line: dict) -> float:
    return datetime.datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()


def resume_run(root: Path, bootstrap: str, catalog: list, stream: list) -> dict:
    """3 workers, one killed -9 mid-backlog: kill -> first block learned on an adopted slot."""
    from online.worker import read_checkpoint

    settings = _settings(root, bootstrap, f"resume-{uuid.uuid4().hex[:6]}")
    _produce(settings, catalog)
    group = "bench-resume"
    procs, logs = _start(settings, root, group, 3, ["--idle-timeout", "20", "--checkpoint-seconds", "1"])
    _wait_split(logs)
    _produce(settings, stream)
    victim, deadline = root / group / "2.ckpt", time.monotonic() + 120
    while not (read_checkpoint(victim) or {}).get("events") and time.monotonic() < deadline:
        time.sleep(0.05)
    killed_at = time.time()
    os.kill(procs[2].pid, signal.SIGKILL)
    procs[2].wait(timeout=30)
    runs = _finish(procs[:2])
    adopted = [line for path in logs[:2] for line in _log_lines(path, "partitions assigned")
               if line["adopted_slots"] and _stamp(line) >= killed_at]
    resumed = [line for path in logs[:2] for line in _log_lines(path, "adopted slot resumed") if _stamp(line) >= killed_at]
    if not resumed:
        raise RuntimeError("no survivor resumed a slot of the killed worker (it may have finished before the kill)")
    return {"kill_to_reassigned_s": min(_stamp(line) for line in adopted) - killed_at,
            "kill_to_first_event_s": min(_stamp(line) for line in resumed) - killed_at,
            "survivor_events": [r["learned_this_run"] for r in runs], "killed_checkpoint_events": read_checkpoint(victim)["events"]}


def readme_rows(sizes: list[dict], resume: dict) -> list[dict]:
    base = {"mode": "quick" if QUICK else "full", "seeds": {"calibration": "–", "report": [SEED]},
            "date": datetime.date.today().isoformat()}
    rate = "/".join(f"{s['events_per_s'] / 1000:.1f}k" for s in sizes)
    cpu = "/".join(f"{s['busy_cpu_us_per_event']:.0f}" for s in sizes)
    return [
        {**base, "row": "scale-out: events/s with 1/2/3 learners in one group (2 shared cores)",
         "value": round(sizes[-1]["events_per_s"]), "spread": rate, "target": "–", "met": None},
        {**base, "row": "scale-out: learning CPU µs per event with 1/2/3 learners", "value": round(sizes[-1]["busy_cpu_us_per_event"], 1),
         "spread": cpu, "target": "–", "met": None},
        {**base, "row": "scale-out: kill -9 -> first event learned by the new owner (s; session timeout 6 s)",
         "value": round(resume["kill_to_first_event_s"], 2), "spread": f"reassigned after {resume['kill_to_reassigned_s']:.2f} s",
         "target": "–", "met": None},
    ]


def main() -> None:
    from fedstream.processes import terminate
    from streams.broker import start_broker_process

    events = list(generate(GeneratorConfig(merchants=MERCHANTS, events=EVENTS, seed=SEED)))
    catalog = [e for e in events if type(e) is CatalogItem]
    stream = [e for e in events if type(e) is not CatalogItem]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        proc, record = start_broker_process(root / "broker")
        try:
            sizes = [group_run(root, record.bootstrap, n, catalog, stream) for n in SIZES]
            resume = resume_run(root, record.bootstrap, catalog, stream)
        finally:
            terminate(proc.pid)
    print(f"learners in one group, {len(stream)} clicks+orders over 8 partitions ({len(catalog)} catalog items), "
          f"{MERCHANTS} merchants, {BITS} bits")
    print("| learners | events/s | learning s | all members after s | learning CPU µs/event | "
          "process CPU µs/event | events per worker |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for s in sizes:
        print(f"| {s['workers']} | {s['events_per_s']:,.0f} | {s['learning_s']:.1f} | {s['group_split_after_s']:.1f} | "
              f"{s['busy_cpu_us_per_event']:.1f} | {s['process_cpu_us_per_event']:.1f} | {s['per_worker_events']} |")
    print(f"kill -9 -> partitions reassigned {resume['kill_to_reassigned_s']:.2f} s, first event learned by the new "
          f"owner {resume['kill_to_first_event_s']:.2f} s")
    emit("scaleout", {"mode": "quick" if QUICK else "full", "events": len(stream), "sizes": sizes, "resume": resume,
                      "readme": readme_rows(sizes, resume)})


if __name__ == "__main__":
    main()
