"""`fedstream serve`: run the HTTP API under uvicorn, and manage its API keys (`fedstream serve keys ...`)."""

from __future__ import annotations

import json
import os

import click

from fedstream.cli import pass_settings
from fedstream.settings import Settings


@click.group("serve", invoke_without_command=True)
@click.option("--host", default=None, help="Interface to bind [default: settings.serving.host].")
@click.option("--port", default=None, type=int, help="Port [default: settings.serving.port].")
@click.option("--model-name", default=None, help="Registered model to serve [default: settings.serving.model_name].")
@click.option("--no-poll", is_flag=True, help="Do not poll the champion alias (swap only via the admin API).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes (each loads the model and polls the alias; /metrics is per worker).")
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None, model_name: str | None, no_poll: bool,
          workers: int) -> None:
    """Serve recommendations, predictions and event ingestion over HTTP (OpenAPI docs at /docs).

    Loads models:/NAME@champion from the MLflow registry and hot-swaps it when the alias moves.
    Every /v1 route needs an X-API-Key: issue keys with `fedstream serve keys issue`.
    """
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from serving.app import create_app

    settings = ctx.find_object(Settings)
    if settings is None:
        from fedstream.settings import load_settings

        settings = load_settings()
    bind_host, bind_port = host or settings.serving.host, port or settings.serving.port
    click.echo(f"fedstream API on http://{bind_host}:{bind_port}  (docs: /docs, metrics: /metrics)")
    if workers == 1:
        from serving.app import prefer_requests_over_background_work

        prefer_requests_over_background_work()
        app = create_app(settings, model_name=model_name, poll=not no_poll)
        uvicorn.run(app, host=bind_host, port=bind_port, log_level="warning", access_log=False)
        return
    # worker processes rebuild settings from the environment: pass the command line's choices through it
    if model_name:
        os.environ["FEDSTREAM_SERVING__MODEL_NAME"] = model_name
    if no_poll:
        os.environ["FEDSTREAM_SERVING_NO_POLL"] = "1"
    os.environ.setdefault("FEDSTREAM_DATA_DIR", str(settings.data_path))
    if settings.config_file is not None:
        os.environ.setdefault("FEDSTREAM_CONFIG", str(settings.config_file))
    uvicorn.run("serving.app:create_app_from_env", factory=True, host=bind_host, port=bind_port, workers=workers,
                log_level="warning", access_log=False)


@serve.group("keys")
def keys() -> None:
    """Issue, list and revoke API keys (stored hashed in <data_dir>/api-keys.json)."""


@keys.command("issue")
@click.option("--merchant", "merchant_id", default=None, help="Merchant the key may access.")
@click.option("--admin", is_flag=True, help="Issue an admin key (all merchants, model operations).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_settings
def issue(settings: Settings, merchant_id: str | None, admin: bool, as_json: bool) -> None:
    """Issue a key for one merchant (--merchant M) or an admin key (--admin); the token is shown once."""
    from serving.keys import KeyStore

    if admin == (merchant_id is not None):
        raise click.UsageError("give exactly one of --merchant M or --admin")
    try:
        token = KeyStore.for_settings(settings).issue(merchant_id, admin=admin)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"token": token, "merchant_id": merchant_id, "role": "admin" if admin else "merchant"}))
    else:
        click.echo(token)
        click.echo(f"(key for {'admin' if admin else 'merchant ' + str(merchant_id)}; store it now, it is not shown again)",
                   err=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_settings
def list_keys(settings: Settings, as_json: bool) -> None:
    """List key ids, roles and merchants (never secrets)."""
    from serving.keys import KeyStore

    rows = KeyStore.for_settings(settings).list()
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        state = "revoked" if row["revoked"] else "active"
        click.echo(f"{row['key_id']}  {row['role']:<8}  {row['merchant_id'] or '*':<20}  {state}")


@keys.command("revoke")
@click.argument("key_id")
@pass_settings
def revoke(settings: Settings, key_id: str) -> None:
    """Revoke a key by id; requests with it get 401 within a second."""
    from serving.keys import KeyStore

    if not KeyStore.for_settings(settings).revoke(key_id):
        raise click.ClickException(f"no active key {key_id!r}")
    click.echo(f"revoked {key_id}")
