"""`fedstream drift` subcommands: report, monitor, status (imports of mlflow/river/matplotlib stay inside)."""

from __future__ import annotations

import datetime as dt
import json

import click

from fedstream.cli import pass_settings
from fedstream.settings import Settings


def parse_since(value: str | None) -> float | None:
    """Epoch seconds or an ISO-8601 date/time (UTC unless it says otherwise) -> epoch seconds."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither epoch seconds nor an ISO date/time", param_hint="--since")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


def _load_events(settings: Settings, events_file: str | None) -> list:
    from drift.prequential import read_events_file, read_events_kafka

    try:
        return list(read_events_file(events_file)) if events_file else read_events_kafka(settings)
    except (ValueError, FileNotFoundError) as bad:
        raise click.ClickException(str(bad))


def _load_truth(truth_file: str | None, events_file: str | None) -> list[dict]:
    """Ground truth rows from ``--truth``, or the ``<stem>.truth.json`` `fedstream generate --out` wrote."""
    from pathlib import Path

    path = Path(truth_file) if truth_file else (Path(events_file).with_suffix(".truth.json") if events_file else None)
    if path is None or (not truth_file and not path.is_file()):
        return []
    try:
        rows = json.loads(path.read_text())
        rows = rows.get("drifts", rows) if isinstance(rows, dict) else rows  # `generate --out` wraps the rows
    except (OSError, ValueError) as bad:
        raise click.ClickException(f"cannot read ground truth {path}: {bad}")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"merchant_id", "timestamp"} <= r.keys()
                                             for r in rows):
        raise click.ClickException(f"ground truth {path} must list objects with merchant_id and timestamp")
    return rows


@click.group()
def drift() -> None:
    """Drift detection per merchant: HTML reports, a monitor run over a stream, the latest drift events."""


@drift.command("report")
@click.option("--merchant", "merchants", multiple=True, help="Merchant to report (repeatable; default: all).")
@click.option("--since", default=None, help="Only show data from this time: epoch seconds or ISO date (UTC).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--events", "events_file", type=click.Path(dir_okay=False), default=None,
              help="Events JSONL (from `fedstream generate --out`); default: read the Kafka topics.")
@click.option("--window", default=500, show_default=True, type=click.IntRange(min=20),
              help="Clicks per rolling logloss/AUC window.")
@click.option("--mlflow/--no-mlflow", default=True, show_default=True,
              help="Log the report as artifacts of the serving model's MLflow run.")
@click.option("--run-id", default=None, help="MLflow run to log to (default: the champion model's run).")
@click.option("--truth", "truth_file", type=click.Path(dir_okay=False), default=None,
              help="Ground-truth drifts JSON to mark (default: <events stem>.truth.json when it exists).")
@pass_settings
def report(settings: Settings, merchants: tuple[str, ...], since: str | None, out_dir: str,
           events_file: str | None, window: int, mlflow: bool, run_id: str | None, truth_file: str | None) -> None:
    """Run a prequential model and the drift detectors over the events, write DIR/index.html with PNG plots."""
    from drift.monitor import UnknownMerchant
    from drift.prequential import EmptyStream
    from drift.report import write_report

    since_ts = parse_since(since)
    events = _load_events(settings, events_file)
    try:
        result = write_report(settings, events, out_dir, merchants=merchants or None, since=since_ts, window=window,
                              mlflow=mlflow, mlflow_run_id=run_id, truth=_load_truth(truth_file, events_file))
    except (UnknownMerchant, EmptyStream) as bad:
        raise click.ClickException(str(bad))
    click.echo(json.dumps({"html": str(result.html), "images": [p.name for p in result.images],
                           "drift_events": len(result.drift_events), "learner": result.learner,
                           "mlflow_run_id": result.mlflow_run_id, "merchants": result.summaries}, default=str))


@drift.command("monitor")
@click.option("--events", "events_file", type=click.Path(dir_okay=False), default=None,
              help="Events JSONL; default: read the Kafka topics.")
@click.option("--follow", is_flag=True,
              help="Run as a consumer-group member until SIGTERM: every event feeds the label and feature "
                   "detectors (the learners feed the error detectors), state checkpointed with the offsets.")
@click.option("--group", default="fedstream-drift", show_default=True, help="Consumer group (with --follow).")
@click.option("--checkpoint", "checkpoint_path", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint file (with --follow; default: <data>/drift/<group>.ckpt).")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=None,
              help="With --follow: stop after S seconds without records (default: run until SIGTERM).")
@click.option("--kafka/--no-kafka", default=True, show_default=True, help="Publish to the drift topic.")
@click.option("--mlflow/--no-mlflow", default=True, show_default=True, help="Log drift to the serving run.")
@click.option("--run-id", default=None, help="MLflow run to log to (default: the champion model's run).")
@pass_settings
def monitor(settings: Settings, events_file: str | None, follow: bool, group: str, checkpoint_path: str | None,
            idle_timeout: float | None, kafka: bool, mlflow: bool, run_id: str | None) -> None:
    """Run every merchant's detectors over a stream and publish the drift events.

    Without --follow: one pass over a file or the topics, with a prequential model feeding the error
    detectors too. With --follow: a long-running, restartable consumer-group service.
    """
    from drift.monitor import DriftMonitor, default_sinks

    if follow and events_file:
        raise click.UsageError("--follow reads the Kafka topics; it does not take --events")
    sinks = default_sinks(settings, kafka=kafka, mlflow=mlflow, mlflow_run_id=run_id)
    if follow:
        from pathlib import Path

        from drift.follow import DriftFollower

        try:
            follower = DriftFollower(settings, group=group, sinks=sinks, idle_timeout_s=idle_timeout,
                                     checkpoint_path=Path(checkpoint_path) if checkpoint_path else None)
        except ValueError as bad:
            raise click.ClickException(str(bad))
        click.echo(json.dumps(follower.run()))
        return
    from drift.prequential import EmptyStream, run_monitor

    events = _load_events(settings, events_file)
    drift_monitor = DriftMonitor(settings, sinks=sinks)
    try:
        run_monitor(events, drift_monitor, bits=settings.feature_bits, trace=False)
    except EmptyStream as bad:
        raise click.ClickException(str(bad))
    finally:
        drift_monitor.close()
    for event in drift_monitor.events:
        click.echo(json.dumps({"merchant_id": event.merchant_id, "detector": event.detector,
                               "value": round(event.value, 4), "event_index": event.event_index}))
    click.echo(json.dumps({"events": drift_monitor.global_index, "drift_events": len(drift_monitor.events)}))


@drift.command("status")
@click.option("--merchant", default=None, help="Only this merchant's drift events.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--source", type=click.Choice(["kafka", "file"]), default=None,
              help="Drift topic or local JSONL log (default: the topic when a broker is known).")
@pass_settings
def status(settings: Settings, merchant: str | None, limit: int, source: str | None) -> None:
    """Print the latest drift events as JSON (what the serving API exposes)."""
    from drift.monitor import latest_drift

    click.echo(json.dumps(latest_drift(settings, merchant, limit, source=source), indent=2))


@drift.command("detectors")
@pass_settings
def detectors(settings: Settings) -> None:
    """List every registered detector: the signal it watches, its threshold setting, whether it runs.

    "disabled": named in drift.disabled; "off": its own switch in the drift settings is off.
    """
    from drift.detectors.registry import DETECTORS

    config = settings.drift
    rows = [("detector", "watches", "threshold setting", "runs")]
    for name, spec in DETECTORS.items():
        field, key = spec.threshold
        runs = "disabled" if name in config.disabled else "on" if spec.enabled(config) else "off"
        rows.append((name, spec.watches.value, field + (f"[{key}]" if key else ""), runs))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        click.echo(" ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " " + row[3])
