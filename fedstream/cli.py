"""The ``fedstream`` console command.

Subcommands live next to the code they drive (``streams/commands.py``, ``online/commands.py``...)
and are imported only when invoked, so ``fedstream --help`` stays fast and never loads TensorFlow.
"""

from __future__ import annotations

import importlib

import click

from fedstream import __version__
from fedstream.errors import ExpectedFailure
from fedstream.logs import configure_logging, quiet_libraries
from fedstream.settings import Settings, load_settings

# name -> (module:attribute, one-line help shown by `fedstream --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("streams.commands:broker", "Start, stop or inspect the embedded Kafka-compatible broker."),
    "generate": ("streams.commands:generate", "Generate seeded synthetic merchant traffic to Kafka or a file."),
    "ingest": ("streams.commands:ingest", "Validate events from a JSONL/CSV file (or -) and produce them."),
    "replay": ("streams.commands:replay", "Replay a real data set shipped in a wheel as click/order events."),
    "learn": ("online.commands:learn", "Run an online learner worker as a Kafka consumer group member."),
    "evaluate": ("online.commands:evaluate", "Evaluate recommendations on an event file against baselines."),
    "federated": ("federated.commands:federated", "Federated averaging rounds across merchants (TFF)."),
    "models": ("registry.commands:models", "List, promote or roll back registered model versions."),
    "mlflow-ui": ("registry.commands:mlflow_ui", "Serve the MLflow UI on the platform's tracking store."),
    "serve": ("serving.commands:serve", "Run the HTTP API for recommendations and predictions."),
    "drift": ("drift.commands:drift", "Drift detection and reports per merchant."),
    "demo": ("fedstream.demo:demo", "Run the whole platform end to end on embedded defaults."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in SUBCOMMANDS:
            return None
        quiet_libraries()  # before the subcommand's module imports a library that reads its settings once
        module_name, attribute = SUBCOMMANDS[cmd_name][0].split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def invoke(self, ctx: click.Context):
        """Run the subcommand; an expected failure is one ``Error: ...`` line and exit code 1."""
        try:
            return super().invoke(ctx)
        except ExpectedFailure as failure:
            raise click.ClickException(str(failure)) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUBCOMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fedstream")
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    envvar="FEDSTREAM_CONFIG",
    help="TOML config file (defaults < file < FEDSTREAM_* env).",
)
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """fedstream: learn from e-commerce event streams per merchant and federated, without pooling data."""
    quiet_libraries()
    configure_logging()
    ctx.obj = load_settings(config_file=config)


pass_settings = click.make_pass_decorator(Settings, ensure=True)
"""Decorator giving a subcommand the :class:`~fedstream.settings.Settings` built by ``main``."""
