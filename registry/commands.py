"""`fedstream` subcommands of the registry room: mlflow-ui and models."""

from __future__ import annotations

import json
import os
import subprocess

import click

from fedstream.cli import pass_settings
from fedstream.settings import Settings


@click.command("mlflow-ui")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@pass_settings
def mlflow_ui(settings: Settings, host: str, port: int) -> None:
    """Serve the MLflow UI (runs, metrics, registered models) on the platform's tracking store.

    With a tracking server (FEDSTREAM_MLFLOW_TRACKING_URI=http://...) the server is the UI: its address is shown.
    """
    from registry.tracking import is_tracking_server, server_command, tracking_uri

    if is_tracking_server(settings):
        click.echo(f"MLflow UI: {tracking_uri(settings)}  (served by the tracking server itself)")
        return
    command = server_command(settings, host, port)
    click.echo(f"MLflow UI on http://{host}:{port}  (store: {command[command.index('--backend-store-uri') + 1]})")
    raise SystemExit(subprocess.call(command, env={**os.environ}))


@click.group("models")
def models() -> None:
    """List, promote or roll back registered model versions (MLflow registry, `champion` alias)."""


_name_option = click.option("--name", default=None, help="Registered model name [default: settings.serving.model_name].")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@models.command("list")
@_name_option
@_json_option
@pass_settings
def list_command(settings: Settings, name: str | None, as_json: bool) -> None:
    """List the versions of a model, newest first, with aliases, registration metrics and lineage."""
    from registry.models import RegistryError, list_versions

    name = name or settings.serving.model_name
    try:
        rows = list_versions(settings, name)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(rows, default=str))
        return
    _print_table(
        f"{name}: {len(rows)} version(s)",
        ["version", "aliases", "kind", "created (UTC)", "metrics", "events", "run"],
        [[r["version"], ",".join(r["aliases"]), r["kind"] or "", _iso(r["created"]), _metrics(r["metrics"]),
          str(r["lineage"].get("events_seen", "")), (r["run_id"] or "")[:12]] for r in rows],
    )


@models.command("promote")
@_name_option
@click.option("--version", "version", default=None, help="Version to promote [default: the challenger].")
@click.option("--force", is_flag=True, help="Promote even if the promotion policy says no.")
@_json_option
@pass_settings
def promote_command(settings: Settings, name: str | None, version: str | None, force: bool, as_json: bool) -> None:
    """Move the `champion` alias to a version if the promotion policy (settings.registry) agrees."""
    from registry.models import RegistryError, promote

    try:
        move = promote(settings, name or settings.serving.model_name, version, force=force)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    _print_move(move, as_json)


@models.command("rollback")
@_name_option
@_json_option
@pass_settings
def rollback_command(settings: Settings, name: str | None, as_json: bool) -> None:
    """Move the `champion` alias back to the previous champion."""
    from registry.models import RegistryError, rollback

    try:
        move = rollback(settings, name or settings.serving.model_name)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    _print_move(move, as_json)


def _print_move(move, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(move.as_dict()))
        return
    _print_table(f"{move.name}: {'champion moved' if move.moved else 'champion unchanged'}",
                 ["moved", "version", "previous champion", "reason"],
                 [["yes" if move.moved else "no", move.version, move.previous or "-", move.reason]])


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    Console(width=160).print(table)


def _metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _iso(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
