"""`fedstream learn`: run an online learner worker as a member of a Kafka consumer group."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import click

from fedstream.cli import pass_settings
from fedstream.settings import Settings
from online.learners import LEARNERS as OWN_LEARNERS
from online.river_models import MODEL_NAMES

MODEL_CHOICES = MODEL_NAMES  # the learner registry (online.river_models.MODELS): a registered learner is a choice


def learner_params(settings: Settings, model: str, params: dict) -> dict:
    """``params`` plus the settings' state dtype for our own learners (an explicit ``dtype`` param wins)."""
    if model in OWN_LEARNERS and "dtype" not in params:
        return {**params, "dtype": settings.online.state_dtype}
    return params


def _parse_params(pairs: tuple[str, ...]) -> dict:
    params = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--param")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


# Prediction monitors a learner can feed, by name -> "module:factory". Rooms above online (drift) plug in
# here; online never imports them statically (the worker only knows the PredictionMonitor protocol).
PREDICTION_MONITORS: dict[str, str] = {"drift": "drift.monitor:learner_monitor_factory"}


def prediction_monitor(name: str):
    """The factory builder declared for ``name`` in :data:`PREDICTION_MONITORS`, imported on first use."""
    import importlib

    module, attribute = PREDICTION_MONITORS[name].split(":")
    return getattr(importlib.import_module(module), attribute)

@click.command()
@click.option("--model", type=click.Choice(MODEL_CHOICES), default="ftrl", show_default=True,
              help="Learner: ours (ftrl, adam, sgd) or River's (river-...).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Learner hyper-parameter, e.g. --param alpha=0.1 --param l1=1.0 (JSON values).")
@click.option("--group", default=None, help="Consumer group (default: fedstream-learn-<model>).")
@click.option("--topic", "topics", multiple=True, help="Topic to read (repeatable; default: clicks, orders, catalog).")
@click.option("--worker-id", default="0", show_default=True,
              help="Names this worker's checkpoint in the group's store (unique per worker; 'auto': the host name, "
                   "e.g. a container's).")
@click.option("--max-events", type=click.IntRange(min=1), default=None, help="Stop after learning N events.")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=None,
              help="Stop after S seconds without records (default: run until SIGTERM).")
@click.option("--block", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Mini-batch size per partition; blocks are cut at offsets that are multiples of it (a partial "
                   "block is learned when its partition is caught up or after --flush-after).")
@click.option("--flush-after", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Learn a partial block after it waited S seconds.")
@click.option("--flush-caught-up/--no-flush-caught-up", "flush_caught_up", default=True, show_default=True,
              help="Learn a partial block at once when its partition is read up to the high watermark (low "
                   "latency); off: only full blocks, --flush-after and the idle end cut blocks.")
@click.option("--fetch-wait-ms", type=click.IntRange(min=0), default=100, show_default=True,
              help="Longest a fetch waits for records (the embedded broker always waits this long).")
@click.option("--checkpoint", "checkpoint_path", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint file of a worker on its own (no peers; default: <store>/<worker>.ckpt).")
@click.option("--store", default=None, metavar="DIR|s3://BUCKET/PREFIX",
              help="Store the group's workers share (a directory, or an S3 prefix: endpoint from "
                   "FEDSTREAM_ONLINE__STORE_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL, credentials AWS_*): one checkpoint "
                   "each, partitions adopted from it when they move, publications assembled from all of it "
                   "(default: <data>/artifacts/online/<group>).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Checkpoint every N events...")
@click.option("--checkpoint-seconds", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="...or every S seconds.")
@click.option("--publish-every", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="Register a snapshot in MLflow every S seconds (0: only at the end).")
@click.option("--no-publish", is_flag=True, help="Never register snapshots in MLflow.")
@click.option("--rank-every", type=click.IntRange(min=0), default=50, show_default=True,
              help="Score the recommender on every N-th click/order (HitRate/NDCG; 0: never).")
@click.option("--drift/--no-drift", "watch_drift", default=True, show_default=True,
              help="Feed every prediction to per-merchant drift detectors (ADWIN, Page-Hinkley), checkpointed with "
                   "the model; drift events go to the drift topic, the JSONL drift log and MLflow.")
@click.option("--warm-start", "warm_start", default=None, metavar="models:/NAME@ALIAS",
              help="Start a fresh learner (ftrl, adam, sgd) from a registered version, e.g. a federated one; "
                   "ignored when resuming from a checkpoint.")
@click.option("--transfer", type=click.Choice(("finetune", "features")), default="finetune", show_default=True,
              help="With --warm-start: finetune (start at its weights) or features (its logit is a frozen input "
                   "of a local learner).")
@click.option("--text-candidates", is_flag=True,
              help="Propose cold-start items (nobody chose them yet) by the similarity of their catalog text to the "
                   "user's recent items (all-MiniLM-L6-v2, each item embedded once in the worker).")
@pass_settings
def learn(settings: Settings, model: str, params: tuple[str, ...], group: str | None, topics: tuple[str, ...],
          worker_id: str, max_events: int | None, idle_timeout: float | None, block: int, flush_after: float,
          flush_caught_up: bool, fetch_wait_ms: int,
          checkpoint_path: str | None, store: str | None, checkpoint_every: int, checkpoint_seconds: float, publish_every: float,
          no_publish: bool, rank_every: int, watch_drift: bool, warm_start: str | None,
          transfer: str, text_candidates: bool) -> None:
    """Consume clicks and orders as a consumer group member, learn test-then-train, checkpoint and publish.

    Resumes from its checkpoint (model, features, recommender, metrics and offsets saved together), so a
    restarted worker neither loses nor re-learns an event. Prints a JSON summary when it stops.
    """
    from online.worker import OnlineWorker, WorkerConfig

    if worker_id == "auto":
        worker_id = socket.gethostname()
    config = WorkerConfig(
        model=model, params=learner_params(settings, model, _parse_params(params)), group=group,
        topics=list(topics) or None, worker_id=worker_id,
        block=block, flush_after_s=flush_after, flush_when_caught_up=flush_caught_up,
        fetch_max_wait_ms=fetch_wait_ms, checkpoint_every=checkpoint_every,
        checkpoint_seconds=checkpoint_seconds, checkpoint_path=Path(checkpoint_path) if checkpoint_path else None,
        store=store or None,
        publish_every_s=None if no_publish or publish_every == 0 else publish_every, publish_at_end=not no_publish,
        max_events=max_events, idle_timeout_s=idle_timeout, rank_every=rank_every,
        warm_start=warm_start, transfer=transfer, text_candidates=text_candidates, settle_heap=True,
    )
    monitors = {"drift": prediction_monitor("drift")(settings, publish_to_mlflow=not no_publish)} if watch_drift else {}
    try:
        worker = OnlineWorker(settings, config, monitors=monitors)
    except (ValueError, OSError) as exc:  # a checkpoint of another model or feature space, a store unreachable
        raise click.ClickException(str(exc)) from exc
    try:
        summary = worker.run()
    finally:
        for monitor in worker.state.monitors.values():
            monitor.close()
    monitor = worker.state.monitors.get("drift")
    if monitor is not None:
        summary["drift_events"] = [{"merchant_id": e.merchant_id, "detector": e.detector, "event_index": e.event_index}
                                   for e in monitor.events]
    click.echo(json.dumps(summary, default=str))


@click.group()
def evaluate() -> None:
    """Offline evaluation on any event file."""


@evaluate.command("recs")
@click.argument("file", type=click.File("rb"))
@click.option("--k", "k", type=click.IntRange(min=1, max=100), default=10, show_default=True, help="List length.")
@click.option("--split", type=click.Choice(["last-order", "last-session", "time"]), default="last-order",
              show_default=True, help="Which events are the targets (each with a validation twin before it).")
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "csv"]), default="auto", show_default=True,
              help="Input format (auto: by extension, .csv is CSV, anything else JSONL).")
@click.option("--river/--no-river", default=True, show_default=True, help="Include River's BiasedMF baseline.")
def evaluate_recs(file, k: int, split: str, fmt: str, river: bool) -> None:
    """Replay FILE through fedstream's served recommender and the baselines; print a table, then one JSON line.

    Every method learns the events in time order and is asked for its top-K right before each target event
    (no method sees the future). Invalid lines are skipped and counted.
    """
    from online.evaluate import all_methods, evaluate as run, format_table
    from streams.commands import iter_payloads, open_input
    from streams.schemas import InvalidEvent, decode_event

    if fmt == "auto":
        fmt = "csv" if str(getattr(file, "name", "")).endswith(".csv") else "jsonl"
    events, invalid = [], 0
    for payload, _, _ in iter_payloads(open_input(file), fmt):
        try:
            events.append(decode_event(payload))
        except InvalidEvent:
            invalid += 1
    events.sort(key=lambda event: event.timestamp)  # stable: same-time events keep the file order
    if not events:
        raise click.ClickException(f"no valid events in {getattr(file, 'name', 'the input')} ({invalid} invalid)")
    report = run(events, all_methods(river=river), split=split, k=k)
    report["invalid_lines"] = invalid
    click.echo(format_table(report))
    click.echo(json.dumps(report))
