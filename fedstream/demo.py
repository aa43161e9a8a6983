"""`fedstream demo`: the whole platform end to end on embedded defaults.

Every step runs the same ``fedstream`` subcommand a user would run, as a child process, so the demo
exercises the CLI contract and keeps TensorFlow out of this process. Everything it starts (broker,
learner workers, the API server) is stopped at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import httpx
from rich.console import Console
from rich.table import Table

from fedstream.cli import pass_settings
from fedstream.settings import Settings

console = Console(stderr=True)

BAD_EVENTS = [
    b'{"type": "click", "event_id": "bad-1"',  # malformed JSON
    b'{"type": "click", "event_id": "bad-2", "merchant_id": "m00"}',  # missing fields
    b'{"type": "teleport", "event_id": "bad-3"}',  # unknown event type
    b'{"type": "order", "event_id": "bad-4", "order_id": "o", "merchant_id": "m00", "user_id": "u", '
    b'"timestamp": 1700000000, "currency": "EUR", "items": [{"item_id": "i", "quantity": 1, "unit_price": -5}]}',
    b'{"type": "catalog", "event_id": "bad-5", "merchant_id": "m00", "item_id": "i", "category": "c", '
    b'"price": "cheap", "title": "t", "timestamp": 1700000000}',  # wrong type
]


# The two learners the demo runs side by side (champion vs challenger), with the hyper-parameters
# benchmarks/online.py uses: River's default Adam step (0.1) is far too hot for hashed sparse features.
LEARNERS: dict[str, tuple[str, ...]] = {
    "ftrl": ("--param", "alpha=0.1", "--param", "l2=1.0"),
    "adam": ("--param", "learning_rate=0.005"),
}


@dataclass(frozen=True)
class DemoPlan:
    """How big the demo is. The defaults finish in a few minutes on 2 cores; ``quick`` is the CI size."""

    merchants: int = 20
    events: int = 200_000
    rounds: int = 10
    clients_per_round: int = 10
    seed: int = 7
    drift_merchant: str = "m02"
    drift_fraction: float = 0.6
    users_to_query: int = 3

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls(merchants=6, events=20_000, rounds=3, clients_per_round=4)

    @property
    def drift_at(self) -> int:
        return int(self.events * self.drift_fraction)


@dataclass
class Started:
    """Processes the demo owns; all stopped in :meth:`stop_all`."""

    processes: list[subprocess.Popen] = field(default_factory=list)

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Demo:
    """Runs the steps in order, keeping what the summary needs."""

    def __init__(self, settings: Settings, plan: DemoPlan, workdir: Path) -> None:
        self.settings = settings
        self.plan = plan
        self.workdir = workdir
        self.started = Started()
        self.summary: dict = {"plan": plan.__dict__ | {"drift_at": plan.drift_at}}
        self.env = {
            **os.environ,
            "FEDSTREAM_DATA_DIR": str(settings.data_path),
            "FEDSTREAM_LOG_LEVEL": os.environ.get("FEDSTREAM_LOG_LEVEL", "WARNING"),
            # TensorFlow's C++ start-up lines (CUDA plugin registration on a CPU machine) are logged at
            # ERROR level 2; nothing a user can act on, so level 3 unless the user chose a level.
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
        }

    # -- helpers -------------------------------------------------------------------------------
    def fedstream(self, *args: str, stdin: bytes | None = None, timeout: float = 900) -> str:
        """Run one ``fedstream`` subcommand to completion; its stdout is returned, stderr shown live."""
        command = [sys.executable, "-m", "fedstream", *args]
        done = subprocess.run(command, input=stdin, stdout=subprocess.PIPE, env=self.env, timeout=timeout,
                              check=False)
        if done.returncode != 0:
            raise click.ClickException(f"`fedstream {' '.join(args)}` exited with {done.returncode}")
        return done.stdout.decode()

    def spawn(self, *args: str, log_name: str) -> subprocess.Popen:
        log = (self.workdir / log_name).open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "fedstream", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, start_new_session=True)
        self.started.processes.append(proc)
        self.summary.setdefault("started_pids", []).append(proc.pid)  # the end-to-end test checks each is gone
        return proc

    @staticmethod
    def last_json(text: str) -> dict:
        for line in reversed(text.strip().splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise click.ClickException(f"expected a JSON summary line, got: {text[-500:]!r}")

    def step(self, number: int, title: str) -> None:
        console.rule(f"[bold cyan]{number}/9 {title}")

    # -- steps -----------------------------------------------------------------------------------
    def start_infrastructure(self) -> None:
        self.step(2, "embedded broker and MLflow store")
        record = self.last_json(self.fedstream("broker", "start"))
        from registry.tracking import tracking_uri

        self.summary["broker"] = record["bootstrap"]
        self.summary.setdefault("started_pids", []).append(record["pid"])
        self.summary["mlflow"] = tracking_uri(self.settings)
        console.print(f"broker {record['bootstrap']} (cluster {record['cluster_id']}), MLflow {self.summary['mlflow']}")

    def generate_traffic(self) -> Path:
        self.step(3, f"traffic: {self.plan.merchants} merchants, {self.plan.events:,} events, one drift")
        events = self.workdir / "events.jsonl"
        drift = f"{self.plan.drift_merchant}:{self.plan.drift_at}:preferences"
        self.fedstream("generate", "--merchants", str(self.plan.merchants), "--events", str(self.plan.events),
                       "--seed", str(self.plan.seed), "--drift", drift, "--out", str(events))
        accepted = self.last_json(self.fedstream("ingest", str(events)))
        rejected = self.last_json(self.fedstream("ingest", "-", "--format", "jsonl", "--source", "demo:bad-events",
                                                 stdin=b"\n".join(BAD_EVENTS) + b"\n"))
        self.summary["ingest"] = {
            "accepted": accepted["accepted"] + rejected["accepted"],
            "dead_lettered": accepted["dead_lettered"] + rejected["dead_lettered"],
            "reasons": {**accepted["reasons"], **rejected["reasons"]},
            "drift": drift,
        }
        ingest = self.summary["ingest"]
        console.print(f"{ingest['accepted']:,} events accepted, {ingest['dead_lettered']} dead-lettered "
                      f"({_reasons(ingest['reasons'])}); drift injected at {drift}")
        return events

    def run_learners(self) -> None:
        self.step(4, "online learner workers (consumer groups)")
        workers = {
            model: self.spawn("learn", "--model", model, *params, "--group", f"demo-{model}", "--idle-timeout", "10",
                              log_name=f"learn-{model}.log")
            for model, params in LEARNERS.items()
        }
        results = {}
        for model, proc in workers.items():
            code = proc.wait(timeout=900)
            output = (self.workdir / f"learn-{model}.log").read_text()
            if code != 0:
                raise click.ClickException(f"learner {model} exited with {code}:\n{output[-2000:]}")
            results[model] = self.last_json(output)
        self.summary["online"] = results
        console.print(_online_table(results))

    def run_federated(self) -> None:
        from streams.generator import GeneratorConfig, merchant_ids

        self.step(5, f"federated rounds across merchants ({self.plan.rounds} rounds, TFF)")
        joined = ",".join(merchant_ids(GeneratorConfig(merchants=self.plan.merchants)))  # joining is explicit
        output = self.fedstream(
            "federated", "run", "--rounds", str(self.plan.rounds), "--clients-per-round",
            str(self.plan.clients_per_round), "--source", "kafka", "--merchants", joined,
        )
        self.summary["federated"] = self.last_json(output)

    def promote_champion(self) -> None:
        self.step(6, "model versions and champion")
        name = self.settings.serving.model_name
        registered = json.loads(self.fedstream("models", "list", "--name", name, "--json"))
        decisions = []
        for version in sorted(registered, key=lambda v: int(v["version"])):  # each challenger meets the policy
            decisions.append(self.last_json(self.fedstream("models", "promote", "--name", name, "--version",
                                                           str(version["version"]), "--json")))
            console.print(f"version {version['version']} ({version.get('lineage', {}).get('model', '?')}): "
                          f"{'promoted' if decisions[-1]['moved'] else 'kept as challenger'}: {decisions[-1]['reason']}")
        self.summary["promotion"] = decisions
        self.summary["versions"] = json.loads(self.fedstream("models", "list", "--name", name, "--json"))

    def serve_and_query(self) -> None:
        self.step(7, "serving: recommendations for a few users")
        from fedstream.host import free_port

        port = free_port()
        self.spawn("serve", "--port", str(port), log_name="serve.log")
        base = f"http://127.0.0.1:{port}"
        self.summary["api"] = base
        merchant = "m00"
        key = self.last_json(self.fedstream("serve", "keys", "issue", "--merchant", merchant, "--json"))["token"]
        _wait_ready(base)
        users = _users_of(self.workdir / "events.jsonl", merchant, self.plan.users_to_query)
        answers = {}
        with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=10) as http:
            for user in users:
                reply = http.get(f"/v1/merchants/{merchant}/recommendations", params={"user_id": user, "k": 5})
                reply.raise_for_status()
                answers[user] = reply.json()
            denied = http.get("/v1/merchants/m01/recommendations", params={"user_id": "u1", "k": 5}).status_code
        self.summary["recommendations"] = answers
        self.summary["other_merchant_status"] = denied
        for user, answer in answers.items():
            items = ", ".join(f"{r['item_id']} ({r['score']:.2f}, {r['source']})" for r in answer["items"])
            console.print(f"{merchant}/{user}: {items}")
        console.print(f"a {merchant} key asking for m01 gets HTTP {denied}")

    def compare_recommenders(self, events: Path) -> None:
        """``fedstream evaluate recs`` on the traffic's order history: next order, fedstream vs baselines."""
        orders = self.workdir / "orders.jsonl"
        with events.open("rb") as source, orders.open("wb") as target:
            for line in source:
                if b'"type":"click"' not in line:
                    target.write(line)
        output = self.fedstream("evaluate", "recs", str(orders), "--split", "last-order")
        console.print(output.rsplit("\n", 2)[0])
        report = self.last_json(output)
        self.summary["recommendation_eval"] = {name: {m: round(row[m], 4) for m in ("hit_rate_at_10", "ndcg_at_10")}
                                               for name, row in report["methods"].items()}

    def drift_report(self, events: Path) -> None:
        self.step(8, f"drift report for {self.plan.drift_merchant}")
        out = self.workdir / "drift-report"
        self.fedstream("drift", "report", "--merchant", self.plan.drift_merchant, "--events", str(events),
                       "--out", str(out))
        self.summary["report"] = str(out / "index.html")

    def print_summary(self) -> None:
        self.step(9, "summary")
        summary_file = self.workdir / "summary.json"
        summary_file.write_text(json.dumps(self.summary, indent=2, default=str))
        table = Table(title="fedstream demo", show_lines=False)
        table.add_column("what")
        table.add_column("result")
        for what, result in _summary_rows(self.summary):
            table.add_row(what, result)
        table.add_row("MLflow UI", f"FEDSTREAM_DATA_DIR={self.settings.data_path} fedstream mlflow-ui")
        table.add_row("drift report", self.summary.get("report", "-"))
        table.add_row("API (stopped now)", f"{self.summary.get('api')}/docs")
        table.add_row("everything above, as JSON", str(summary_file))
        console.print(table)

    def stop(self) -> None:
        self.started.stop_all()
        subprocess.run([sys.executable, "-m", "fedstream", "broker", "stop"], env=self.env,
                       stdout=subprocess.DEVNULL, check=False)


def _reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items())) or "none"


def _figure(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def _online_table(results: dict[str, dict]) -> Table:
    """One row per learner worker: what it learned and how well (test-then-train)."""
    table = Table(title="online learners, test-then-train (AUC over the last window)")
    columns = {"events": "events", "logloss": "logloss", "rolling_auc": "AUC", "hit_rate_at_10": "HR@10",
               "ndcg_at_10": "NDCG@10", "events_per_s": "events/s"}
    table.add_column("model")
    for title in (*columns.values(), "versions"):
        table.add_column(title, justify="right")
    for model, result in results.items():
        cells = [_figure(result.get(k), 0 if k == "events_per_s" else 3) for k in columns]
        table.add_row(model, *cells, ", ".join(result.get("published_versions", [])) or "-")
    return table


def _summary_rows(summary: dict) -> list[tuple[str, str]]:
    """The summary table's rows: a few figures per step (the full record is summary.json)."""
    ingest = summary.get("ingest", {})
    rows = [("events accepted / dead-lettered", f"{ingest.get('accepted', 0):,} / {ingest.get('dead_lettered', 0)}"),
            ("dead-letter reasons", _reasons(ingest.get("reasons", {})))]
    for model, result in summary.get("online", {}).items():
        rows.append((f"online {model}", f"logloss {_figure(result.get('logloss'))}, "
                     f"AUC {_figure(result.get('rolling_auc'))}, "
                     f"HitRate@10 {_figure(result.get('hit_rate_at_10'))}, "
                     f"versions {', '.join(result.get('published_versions', [])) or '-'}"))
    federated = summary.get("federated", {})
    if federated:
        final = federated.get("final_eval", {})
        rows.append(("federated", f"AUC {_figure(final.get('auc'))}, "
                     f"logloss {_figure(final.get('logloss'))}, "
                     f"versions {', '.join(map(str, federated.get('versions', []))) or '-'}"))
    for version in summary.get("versions", []):
        aliases = ", ".join(version.get("aliases") or []) or "-"
        metrics, lineage = version.get("metrics") or {}, version.get("lineage") or {}
        logloss = metrics.get("prequential_logloss", metrics.get("logloss"))
        rows.append((f"version {version.get('version')}", f"{version.get('kind') or '?'}, aliases {aliases}, "
                     f"logloss {_figure(logloss)}, events seen {_figure(lineage.get('events_seen'))}"))
    for name, row in summary.get("recommendation_eval", {}).items():
        rows.append((f"next order, {name}", f"HitRate@10 {row['hit_rate_at_10']:.3f}  NDCG@10 {row['ndcg_at_10']:.3f}"))
    rows.append(("demo time", f"{summary.get('seconds', '-')} s"))
    return rows


def _wait_ready(base: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise click.ClickException(f"the API at {base} was not ready within {timeout_s}s")


def _users_of(events: Path, merchant: str, count: int) -> list[str]:
    """The most active users of a merchant in the generated stream (those worth recommending to)."""
    from collections import Counter

    seen: Counter[str] = Counter()
    with events.open("rb") as handle:
        for line in handle:
            if b'"type":"click"' in line and f'"merchant_id":"{merchant}"'.encode() in line:
                seen[json.loads(line)["user_id"]] += 1
    return [user for user, _ in seen.most_common(count)]


def run_demo(settings: Settings, plan: DemoPlan) -> dict:
    """Run steps 2-9 (step 1, the environment, is `make demo`'s `uv sync`) in ``<data_dir>/demo``, which is
    wiped first so every demo starts from an empty broker, MLflow store and key file. Returns the summary."""
    workdir = settings.data_path / "demo"
    shutil.rmtree(workdir, ignore_errors=True)  # the demo owns this directory: broker record, MLflow, keys
    workdir.mkdir(parents=True)
    demo = Demo(settings.model_copy(update={"data_dir": workdir}), plan, workdir)
    started = time.monotonic()
    try:
        demo.start_infrastructure()
        events = demo.generate_traffic()
        demo.run_learners()
        demo.run_federated()
        demo.promote_champion()
        demo.serve_and_query()
        demo.compare_recommenders(events)
        demo.drift_report(events)
        demo.summary["seconds"] = round(time.monotonic() - started, 1)
        demo.print_summary()
    finally:
        demo.stop()
    return demo.summary


@click.command()
@click.option("--quick", is_flag=True, help="A small run (CI size): 6 merchants, 20k events, 3 rounds.")
@click.option("--events", type=click.IntRange(min=1000), default=None, help="Override the number of events.")
@pass_settings
def demo(settings: Settings, quick: bool, events: int | None) -> None:
    """Run the platform end to end: broker + MLflow, traffic with drift, online learners, federated
    rounds, champion promotion, serving queries, drift report, summary; then stop everything."""
    plan = DemoPlan.quick() if quick else DemoPlan()
    if events:
        plan = DemoPlan(**{**plan.__dict__, "events": events})
    console.rule("[bold cyan]1/9 environment: ready (uv sync --frozen)")
    run_demo(settings, plan)
