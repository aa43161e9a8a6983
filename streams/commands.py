"""`fedstream` subcommands of the streams room: broker, generate, ingest, replay."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from fedstream.cli import pass_settings
from fedstream.settings import Settings


@click.group()
def broker() -> None:
    """Start, stop or inspect the embedded tansu broker (demo and tests; production uses real Kafka)."""


@broker.command("start")
@click.option("--port", type=int, default=None, help="Port on 127.0.0.1 (default: a free one).")
@pass_settings
def broker_start(settings: Settings, port: int | None) -> None:
    """Start tansu on 127.0.0.1, create the platform topics, record the address in the data dir."""
    from streams.broker import start_embedded_broker

    record = start_embedded_broker(settings, port=port)
    click.echo(json.dumps(asdict(record)))


@broker.command("stop")
@pass_settings
def broker_stop(settings: Settings) -> None:
    """Stop the recorded embedded broker by PID."""
    from streams.broker import stop_embedded_broker

    record = stop_embedded_broker(settings)
    click.echo(json.dumps({"stopped": record is not None, "bootstrap": record.bootstrap if record else None}))


@broker.command("status")
@pass_settings
def broker_status(settings: Settings) -> None:
    """Print whether the recorded embedded broker is alive; exit 1 if not."""
    from streams.broker import broker_alive, read_broker_record

    record = read_broker_record(settings.data_path)
    alive = bool(record and broker_alive(record))
    click.echo(json.dumps({"alive": alive, **(asdict(record) if record else {})}))
    raise SystemExit(0 if alive else 1)
