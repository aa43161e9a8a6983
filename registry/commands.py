"""`fedstream` subcommands of the registry room: mlflow-ui and models."""

from __future__ import annotations

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
    """Serve the MLflow UI (runs, metrics, registered models) on the platform's tracking store."""
    from registry.tracking import server_command

    command = server_command(settings, host, port)
    click.echo(f"MLflow UI on http://{host}:{port}  (store: {command[command.index('--backend-store-uri') + 1]})")
    raise SystemExit(subprocess.call(command, env={**os.environ}))
