"""``fedstream federated``: build per-merchant stores and run federated rounds with TFF.

Import-light on purpose: TensorFlow, TFF and MLflow are imported inside the command bodies, so
``fedstream --help`` never pays TFF's ~11 s import. Every command that starts TFF stops its
``worker_binary`` child by PID when done (success, error or Ctrl-C).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from federated.aggregators import AGGREGATIONS
from federated.training import FederatedConfig
from fedstream.cli import pass_settings
from fedstream.logs import get_logger

log = get_logger("federated.commands")


@click.group()
def federated() -> None:
    """Federated averaging rounds across merchants (TFF); each merchant's examples stay in its own store."""


def _merchant_list(text: str | None, source: str) -> list[str] | None:
    """The listed merchants (None: every store / generated merchant); ids that cannot be stores are skipped.

    ``--source kafka`` reads the platform's topics, where every merchant's events are: only merchants
    listed explicitly take part, so an empty list is an error (exit 2), never "everyone".
    """
    from federated.stores import id_problem

    names = [m.strip() for m in (text or "").split(",") if m.strip()]
    if text and text.strip() and not names:
        raise click.BadParameter("give merchant ids separated by commas, e.g. m00,m01", param_hint="--merchants")
    if not names:
        if source == "kafka":
            raise click.UsageError("--source kafka needs --merchants m00,m01,...: only merchants listed explicitly "
                                   "take part in federated training")
        return None
    usable = []
    for name in dict.fromkeys(names):
        if (reason := id_problem(name)) is None:
            usable.append(name)
        else:
            click.echo(f"skipped: {reason}", err=True)
            log.warning("merchant skipped", extra={"merchant": name, "reason": reason})
    if not usable:
        raise click.BadParameter("no usable merchant id left", param_hint="--merchants")
    return usable


def _store_root(settings):
    return settings.data_path / "federated"


def _build_stores(settings, source: str, merchants: list[str] | None, events: int, n_merchants: int, seed: int,
                  bits: int, multitask: bool = False):
    """Merchant stores; with ``multitask`` their labels are [clicked, ordered], orders attributed within
    ``settings.multitask``'s window (per merchant where ``merchant_windows_s`` says)."""
    from federated.stores import StoreError, build_stores, build_stores_from_kafka, open_stores

    root = _store_root(settings)
    windows = {"attribution_window_s": settings.multitask.attribution_window_s,
               "merchant_windows_s": settings.multitask.merchant_windows_s} if multitask else {}
    if source == "stores":
        try:
            stores = open_stores(root, merchants)
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None
        if not stores:
            raise click.ClickException(f"no merchant stores under {root}; build them with --source generate|kafka")
        single = [m for m, store in stores.items() if "ordered" not in store.meta().get("labels", [])]
        if multitask and single:
            raise click.ClickException(f"--multitask needs stores with purchase labels; {', '.join(single[:5])} "
                                       "have clicks only (rebuild them with --multitask --source generate|kafka)")
        return stores
    if source == "kafka":
        return build_stores_from_kafka(settings, root, merchants, bits=bits, **windows)
    from streams.generator import GeneratorConfig, generate

    return build_stores(generate(GeneratorConfig(merchants=n_merchants, events=events, seed=seed)), root, bits=bits,
                        merchants=merchants, **windows)


@federated.command("run")
@click.option("--rounds", type=click.IntRange(min=1), default=20, show_default=True, help="Federated rounds.")
@click.option("--merchants", default=None,
              help="Comma-separated merchant ids that take part; required with --source kafka "
                   "(with generate/stores: default all).")
@click.option("--clients-per-round", type=click.IntRange(min=1), default=10, show_default=True,
              help="Merchants sampled per round (seeded; with --dp: the expected number, Poisson-sampled in secret).")
@click.option("--dp", is_flag=True, help="DP-FedAvg with TFF's Gaussian DP aggregator; reports (ε, δ).")
@click.option("--noise-multiplier", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--clip", type=click.FloatRange(min=0, min_open=True), default=None,
              help="L2 clip of each client update (fixed); with --dp the DP clip (else adaptive).")
@click.option("--dp-delta", type=float, default=1e-5, show_default=True)
@click.option("--secure-agg", is_flag=True, help="Secure aggregation: the plain weighted mean over TFF's (simulated) secure sums, test context.")
@click.option("--server-optimizer", type=click.Choice(["adam", "yogi", "sgd"]), default="sgd", show_default=True,
              help="sgd with lr 1 is plain FedAvg; adam/yogi are FedAdam/FedYogi.")
@click.option("--server-lr", type=float, default=None, help="Server learning rate [default: 1.0 for sgd, 0.02 else].")
@click.option("--client-lr", type=float, default=0.5, show_default=True, help="Client SGD learning rate.")
@click.option("--aggregation", type=click.Choice(list(AGGREGATIONS)), default="touched", show_default=True,
              help="touched: each hashed slot averaged over the merchants whose update moved it (reaches "
                   "centralized AUC); mean: plain weighted FedAvg mean. --dp uses TFF's DP aggregator; --secure-agg the plain mean over secure sums.")
@click.option("--client-epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--prox-mu", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="FedProx proximal strength (0 = FedAvg).")
@click.option("--dropout-rate", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Simulated mid-round client failures.")
@click.option("--deep", is_flag=True, help="Add the deep part (8-dim embedding bag + MLP) to the wide model.")
@click.option("--multitask", is_flag=True,
              help="Click + purchase model (shared body, purchase head): orders attributed to clicks within "
                   "settings.multitask's window; reports purchase AUC. Serving and transfer use its click output.")
@click.option("--bits", type=click.IntRange(8, 24), default=None, help="Hash bits (default: settings.feature_bits).")
@click.option("--source", type=click.Choice(["kafka", "stores", "generate"]), default="kafka", show_default=True,
              help="Where merchant examples come from: the platform's Kafka topics (each listed merchant's own "
                   "events), existing merchant stores, or the seeded synthetic generator (demos, benchmarks).")
@click.option("--events", type=click.IntRange(min=100), default=50_000, show_default=True,
              help="Generated events (--source generate).")
@click.option("--generate-merchants", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--register-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also register every Nth round's global model (the final one always is).")
@click.option("--register", "model_name", default=None, metavar="NAME",
              help="Register the global model under NAME [default: settings.federated.model_name]; a learner starts "
                   "from it with `fedstream learn --warm-start models:/NAME@ALIAS --transfer features|finetune`.")
@click.option("--no-personalize", is_flag=True, help="Skip the per-merchant local/global/fine-tuned table.")
@click.option("--seed", type=int, default=None, help="Seed (default: settings.seed).")
@click.option("--workers", is_flag=True,
              help="Run client work on the merchants that joined with `fedstream federated join` (one worker each).")
@click.option("--client-groups", type=click.IntRange(min=0), default=FederatedConfig.client_groups, show_default=True,
              help="TFF clients per simulated round, each training a group of merchants one after another (the "
                   "same global model as one client per merchant, fewer TFF calls); 0 or 1: one TFF client per "
                   "merchant. --secure-agg, --dp without --clip and --workers always run one per merchant.")
@pass_settings
def run(settings, rounds, merchants, clients_per_round, dp, noise_multiplier, clip, dp_delta, secure_agg,
        server_optimizer, server_lr, client_lr, aggregation, client_epochs, prox_mu, dropout_rate, deep, multitask, bits,
        source, events, generate_merchants, register_every, model_name, no_personalize, seed, workers,
        client_groups) -> None:
    """Run federated rounds over per-merchant stores, log every round to MLflow and register the model."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from federated.model import ModelConfig

    seed = settings.seed if seed is None else seed
    model_name = model_name if model_name is not None else settings.federated.model_name
    if not model_name.strip() or any(c in model_name for c in "/@"):
        raise click.BadParameter(f"a registered model name has no '/' or '@' and is not empty, got {model_name!r}",
                                 param_hint="--register")
    server_lr = server_lr if server_lr is not None else (1.0 if server_optimizer == "sgd" else 0.02)
    bits = bits or min(settings.feature_bits, 20)
    try:
        config = FederatedConfig(
            rounds=rounds, clients_per_round=clients_per_round, client_learning_rate=client_lr,
            client_epochs=client_epochs, server_optimizer=server_optimizer, server_learning_rate=server_lr,
            aggregation=aggregation,
            prox_mu=prox_mu, clip=clip, dp=dp, noise_multiplier=noise_multiplier, dp_delta=dp_delta,
            secure_agg=secure_agg, dropout_rate=dropout_rate, seed=seed, client_groups=client_groups)
        model_config = ModelConfig(bits=bits, deep=deep, seed=seed, multitask=multitask)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    joined = None
    if workers:
        from federated.remote import joined_workers

        joined = joined_workers(settings)
        if not joined:
            raise click.ClickException("no joined merchant workers answer; start some with `fedstream federated join`")
        if dp or secure_agg:
            raise click.BadParameter("--workers runs FedAvg/FedProx (with --clip), not --dp or --secure-agg")
        from federated.certs import tls_files

        if any(w.tls for w in joined) and (missing := tls_files(settings, "coordinator").missing()):
            raise click.ClickException(f"joined workers require TLS and the coordinator's certificate is missing: "
                                       f"{', '.join(map(str, missing))} (fedstream federated certs)")
        source = "stores"
        merchants = ",".join(w.merchant_id for w in joined)
    stores = _build_stores(settings, source, _merchant_list(merchants, source), events, generate_merchants, seed,
                           bits, multitask)
    if not stores:
        raise click.ClickException("no merchant has enough examples to train on")
    click.echo(f"{len(stores)} merchant stores under {_store_root(settings)}", err=True)
    _warn_meaningless_dp(settings, config, len(stores))
    outcome = _run_with_progress(settings, stores, config, model_config, register_every, not no_personalize, joined,
                                 model_name)
    _report(outcome, model_name)


def _warn_meaningless_dp(settings, config, n_merchants: int) -> None:
    """Say before training, in plain words, when the DP run's ε will give no meaningful guarantee."""
    if not config.dp:
        return
    from federated.runner import dp_verdict, privacy_spent

    planned = privacy_spent(config, n_merchants, config.rounds)
    verdict = dp_verdict(planned["dp_epsilon"], settings.federated.meaningful_epsilon)
    if verdict.startswith("none"):
        click.echo(f"WARNING: DP guarantee {verdict} (noise multiplier {config.noise_multiplier:g}, "
                   f"{config.rounds} rounds, sampling rate {planned['dp_sampling_rate']:.3g}); "
                   "raise --noise-multiplier or run fewer rounds", err=True)


@federated.command("join")
@click.option("--merchant", "merchant_id", required=True, help="The merchant whose local store this worker serves.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the TLS gateway listens on (loopback unless the coordinator is on another host).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="Port (0: a free one).")
@click.option("--advertise", default=None, help="Host the coordinator dials [default: --host].")
@click.option("--insecure-bind-all", is_flag=True,
              help="Run TFF's worker bare: plain gRPC on ALL interfaces, no authentication (only where the "
                   "worker cannot be isolated, on a private network you trust).")
@click.option("--stop-after", type=click.FloatRange(min=0), default=None, help="Stop after this many seconds.")
@pass_settings
def join(settings, merchant_id, host, port, advertise, insecure_bind_all, stop_after) -> None:
    """Join federated rounds: run this merchant's TFF worker (its client work and data reads happen here).

    The worker runs in a network namespace of its own (only lo) and is reached through a TLS gateway that
    requires a client certificate from the federation CA (fedstream federated certs; settings.federated).
    """
    from federated.stores import StoreError, open_stores

    try:
        open_stores(_store_root(settings), [merchant_id])
    except (StoreError, ValueError) as exc:
        raise click.ClickException(f"{exc}; build the merchant's store first (fedstream federated run --source ...)")
    advertise = advertise or host
    if insecure_bind_all:
        _join_insecure(settings, merchant_id, port, advertise, stop_after)
        return
    context, prefix = _join_preflight(settings)
    from federated.isolation import serve_isolated
    from federated.remote import WorkerRecord, write_record

    paths = []

    def publish(gateway_port: int, ready: dict) -> None:
        record = WorkerRecord(merchant_id=merchant_id, address=f"{advertise}:{gateway_port}", pid=ready["worker_pid"])
        paths.append(write_record(settings, record))
        click.echo(json.dumps(record.__dict__), nl=True)
        log.info("merchant joined", extra={**record.__dict__, "isolation": " ".join(prefix)})

    try:
        serve_isolated(prefix, context, host, port, publish, stop_after)
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(f"cannot serve merchant {merchant_id}'s worker: {exc}") from None
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def _join_preflight(settings):
    """The gateway's TLS context and the namespace prefix, or a one-line refusal."""
    from federated.certs import server_context, tls_files
    from federated.isolation import isolation_command

    files = tls_files(settings, "worker")
    if missing := files.missing():
        raise click.ClickException(
            f"no worker TLS material: {', '.join(map(str, missing))} missing; make a test federation with "
            "`fedstream federated certs` or set FEDSTREAM_FEDERATED__TLS_CA_FILE / __WORKER_CERT_FILE / __WORKER_KEY_FILE")
    prefix = isolation_command()
    if prefix is None:
        raise click.ClickException(
            "cannot give the worker a network namespace of its own here (`unshare --net` and `unshare -Urn` "
            "both refused): refusing to start TFF's worker_binary, which serves plain gRPC on all interfaces and "
            "runs any computation it is sent; pass --insecure-bind-all only on a private network you trust")
    try:
        return server_context(files), prefix
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"unusable worker TLS material: {exc}") from None


def _join_insecure(settings, merchant_id, port, advertise, stop_after) -> None:
    from federated.remote import WorkerRecord, serve_until_stopped, start_worker, stop_worker, write_record

    click.echo("WARNING: --insecure-bind-all: TFF's worker listens on ALL interfaces with NO authentication and "
               "NO encryption; anyone who reaches its port can run any TensorFlow computation as this user "
               "(read and write its files)", err=True)
    proc, port = start_worker(port)
    record_path = None
    try:
        record = WorkerRecord(merchant_id=merchant_id, address=f"{advertise}:{port}", pid=proc.pid, tls=False)
        record_path = write_record(settings, record)
        click.echo(json.dumps(record.__dict__), nl=True)
        log.warning("merchant joined without isolation or TLS", extra=record.__dict__)
        serve_until_stopped(proc, stop_after)
    finally:
        stop_worker(proc)
        if record_path is not None:
            record_path.unlink(missing_ok=True)


@federated.command("certs")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory to write to [default: <data_dir>/federated/tls, where join and run look].")
@click.option("--worker-host", "worker_hosts", multiple=True, default=("127.0.0.1", "localhost"), show_default=True,
              help="Address or name the coordinator dials a worker by (repeat for several).")
@click.option("--days", type=click.IntRange(1, 3650), default=30, show_default=True, help="Validity.")
@click.option("--name", default="fedstream", show_default=True, help="Federation name (in the subjects).")
@pass_settings
def certs(settings, out, worker_hosts, days, name) -> None:
    """Make a test/demo federation: a CA, a worker (server) and a coordinator (client) certificate."""
    from federated.certs import default_dir, make_federation

    written = make_federation(out or default_dir(settings), list(worker_hosts), days=days, name=name)
    click.echo(json.dumps({k: str(v) for k, v in written.items()}))


def _run_with_progress(settings, stores, config, model_config, register_every, personalize, workers=None,
                       model_name=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from federated.runner import run_federated
    from fedstream.processes import stop_tff_workers

    columns = (TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}"))
    try:
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task("rounds", total=config.rounds, status="")

            def on_round(round_num, result):
                auc = result.evaluation.get("auc")
                status = f"clients {len(result.participants)}/{len(result.sampled)}" + (
                    f"  eval auc {auc:.4f}" if auc is not None else "")
                progress.update(task, advance=1, status=status)

            return run_federated(settings, stores, config, model_config, register_every=register_every,
                                 personalize=personalize, on_round=on_round, workers=workers, model_name=model_name)
    finally:
        stop_tff_workers()


def _report(outcome, model_name: str) -> None:
    from federated.personalize import format_table

    if outcome.personalization:
        click.echo(format_table(outcome.personalization))
    summary = {"run_id": outcome.run_id, "model": model_name, "versions": outcome.versions, "execution_context": outcome.context,
               "final_eval": outcome.history[-1].evaluation, **outcome.privacy, **outcome.privacy_notes,
               **outcome.summary}
    if "eval_purchase_auc" in outcome.history[-1].metrics():
        summary["purchase_auc"] = outcome.history[-1].metrics()["eval_purchase_auc"]
    if outcome.privacy_notes.get("dp_guarantee", "").startswith("none"):
        click.echo(f"WARNING: DP guarantee {outcome.privacy_notes['dp_guarantee']}", err=True)
    click.echo(json.dumps(summary, default=float))
