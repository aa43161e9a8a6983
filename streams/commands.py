"""`fedstream` subcommands of the streams room: broker, generate, ingest, replay."""

from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

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


# -- producing events --------------------------------------------------------------------------------------

CSV_FIELD_TYPES = {"timestamp": float, "price": float, "position": int, "schema_version": int,
                   "clicked": "bool", "items": "json"}


def _progress(total: int | None, unit: str, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=None, file=sys.stderr, leave=False)


def _open_producer(settings: Settings, source: str):
    from streams.kafka import BrokerUnavailable, ensure_topics
    from streams.producer import EventProducer

    try:
        ensure_topics(settings)
        return EventProducer(settings, source=source, linger_ms=max(settings.kafka.producer_linger_ms, 50))  # bulk
    except BrokerUnavailable as exc:
        raise click.ClickException(f"{exc} (start one with `fedstream broker start`)") from exc


def _finish(producer) -> dict:
    from streams.producer import DeliveryFailed

    try:
        producer.close()
    except DeliveryFailed as exc:
        raise click.ClickException(f"{exc}; accounting so far: {json.dumps(producer.summary())}") from exc
    return producer.summary()


def csv_row_to_json(header: list[str], cells: list[str]) -> bytes:
    """One CSV row as a JSON event: empty cells are omitted, typed columns converted when they parse
    (a cell that does not parse stays a string, so validation reports ``wrong_type``)."""
    import msgspec

    row: dict = {}
    for name, cell in zip(header, cells):
        if cell == "":
            continue
        kind = CSV_FIELD_TYPES.get(name)
        try:
            if kind == "bool":
                row[name] = {"true": True, "false": False, "1": True, "0": False}[cell.strip().lower()]
            elif kind == "json":
                row[name] = json.loads(cell)
            elif kind is not None:
                row[name] = kind(cell)
            else:
                row[name] = cell
        except (KeyError, ValueError):
            row[name] = cell
    if len(cells) > len(header):
        row["_extra_columns"] = cells[len(header):]
    return msgspec.json.encode(row)


def iter_payloads(handle, fmt: str, progress=None):
    """(payload, original bytes, line number) per record of a JSONL or CSV byte stream."""
    import csv

    header: list[str] | None = None
    for number, line in enumerate(handle, start=1):
        if progress is not None:
            progress.update(len(line))
        original = line.rstrip(b"\r\n")
        if not original.strip():
            continue
        if fmt == "jsonl":
            yield original, original, number
            continue
        try:
            text = original.decode("utf-8")
        except UnicodeDecodeError:
            yield original, original, number  # validation reports not_utf8 with the raw line
            continue
        cells = next(csv.reader([text]))
        if header is None:
            header = cells
            continue
        yield csv_row_to_json(header, cells), original, number


def parse_line_ranges(text: str) -> frozenset[int]:
    """``"4,7-9"`` -> {4, 7, 8, 9} (the ``skip_lines`` an interrupted ingest prints)."""
    lines: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        try:
            start, stop = int(first), int(last or first)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a line number or a range like 7-9") from None
        lines.update(range(start, stop + 1))
    return frozenset(lines)


def format_line_ranges(lines: list[int]) -> str:
    """Sorted line numbers as ``"4,7-9"``."""
    ranges: list[list[int]] = []
    for line in lines:
        if ranges and line == ranges[-1][1] + 1:
            ranges[-1][1] = line
        else:
            ranges.append([line, line])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def open_input(handle):
    """A byte stream of the input, gunzipped when it starts with the gzip magic (file or stdin)."""
    import gzip
    import io

    stream = handle if hasattr(handle, "peek") else io.BufferedReader(handle)
    return gzip.GzipFile(fileobj=stream) if stream.peek(2)[:2] == b"\x1f\x8b" else stream


def _send_lines(producer, payloads, from_line: int, skip: frozenset[int]) -> tuple[int | None, str | None]:
    """Send every payload from ``from_line`` on (except ``skip``); (first line not handed to the producer,
    why it stopped), (None, None) when the input was read to its end."""
    from kafka.errors import KafkaError

    from streams.kafka import BrokerUnavailable
    from streams.producer import DeliveryFailed

    number = 0
    try:
        for payload, original, number in payloads:
            if number < from_line or number in skip:
                continue
            producer.send_raw(payload, original=original if payload is not original else None, line=number)
    except (DeliveryFailed, BrokerUnavailable, KafkaError) as exc:
        return (number + 1 if producer.last_line_sent == number else number), f"broker: {exc}"
    except (OSError, EOFError) as exc:  # unreadable input, e.g. a corrupt or cut .gz
        return number + 1, f"input: {exc}"
    return None, None


def _close_counting(producer) -> str | None:
    """Close the producer (every record is then acknowledged or failed); why delivery failed, if it did."""
    from kafka.errors import KafkaError

    from streams.kafka import BrokerUnavailable
    from streams.producer import DeliveryFailed

    try:
        producer.close()
    except (DeliveryFailed, BrokerUnavailable, KafkaError) as exc:
        return f"broker: {exc}"
    return None


@click.command()
@click.argument("file", type=click.File("rb"))
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "csv"]), default="auto", show_default=True,
              help="Input format; auto uses the file extension (.csv or .csv.gz, else JSONL).")
@click.option("--source", default=None, help="Name recorded in dead-letter headers (default: ingest:<file>).")
@click.option("--from-line", type=click.IntRange(min=1), default=1, show_default=True,
              help="Resume: skip the lines before this one (the resume_from_line of an interrupted ingest).")
@click.option("--skip-lines", default="", metavar="RANGES",
              help="Resume: lines already acknowledged, e.g. 4,7-9 (the skip_lines of an interrupted ingest).")
@pass_settings
def ingest(settings: Settings, file, fmt: str, source: str | None, from_line: int, skip_lines: str) -> None:
    """Validate events from FILE (JSONL or CSV, gzipped or not, `-` for stdin) and produce them to Kafka.

    Valid events go to the clicks/orders/catalog topic keyed by merchant; invalid ones go, with their
    original bytes and the reason in the headers, to the dead-letter topic. CSV has one event per line with
    a header row naming the event fields (``items`` as a JSON array). Always prints one JSON line:
    {"accepted", "dead_lettered" (both acknowledged by the broker), "reasons", "failed",
    "dead_letter_failed", "resume_from_line", "skip_lines"}; when the broker or the input failed, it exits
    1 and `--from-line N --skip-lines RANGES` with the printed values resumes without duplicates.
    """
    skip = parse_line_ranges(skip_lines)
    name = getattr(file, "name", "-")
    if fmt == "auto":
        fmt = "csv" if str(name).lower().endswith((".csv", ".csv.gz")) else "jsonl"
    size = os.fstat(file.fileno()).st_size if name not in ("-", "<stdin>") and hasattr(file, "fileno") else None
    stream = open_input(file)
    try:
        producer = _open_producer(settings, source or f"ingest:{os.path.basename(str(name))}")
    except click.ClickException:  # no broker: nothing sent, the summary says where to start again
        click.echo(json.dumps({"accepted": 0, "dead_lettered": 0, "reasons": {}, "failed": 0, "dead_letter_failed": 0,
                               "resume_from_line": from_line, "skip_lines": ""}))
        raise
    with _progress(None if stream is not file else size, "B", "ingest") as progress:
        unsent, problem = _send_lines(producer, iter_payloads(stream, fmt, progress), from_line, skip)
    problem = _close_counting(producer) or problem
    resume, acknowledged = producer.resume_point(unsent)
    click.echo(json.dumps({**producer.summary(), "resume_from_line": resume, "skip_lines": format_line_ranges(acknowledged)}))
    if problem is not None or resume is not None:
        raise click.ClickException(f"ingest stopped ({problem}); resume with --from-line {resume}"
                                   + (f" --skip-lines {format_line_ranges(acknowledged)}" if acknowledged else ""))


@click.command()
@click.option("--merchants", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--events", type=click.IntRange(min=0), default=100_000, show_default=True,
              help="Clicks + orders (catalog events come on top).")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--days", type=float, default=14.0, show_default=True, help="Time span of the traffic.")
@click.option("--drift", "drifts", multiple=True, metavar="MERCHANT:AT_EVENT:KIND[:MAGNITUDE]",
              help="Concept drift, e.g. m03:500000:preferences or m01:200000:prices:0.5 (repeatable); kinds: "
                   "preferences, prices, device_mix, popular_item, label_delay (streams.generator.DRIFT_KINDS).")
@click.option("--consumables", type=click.FloatRange(min=0, max=1), default=0.0, show_default=True,
              help="Share of each merchant's categories that are consumables re-bought on per-user cycles "
                   "(streams/consumables.py; 0: off). Re-buy orders come on top of --events.")
@click.option("--conversion-delay-s", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Late conversions: median extra delay of orders after their session (lognormal; 0: off).")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write JSONL here instead of producing to Kafka (ground truth goes to <out stem>.truth.json).")
@pass_settings
def generate(settings: Settings, merchants: int, events: int, seed: int, days: float, drifts: tuple[str, ...],
             consumables: float, conversion_delay_s: float, out: str | None) -> None:
    """Generate seeded synthetic merchant traffic (see streams/generator.py) to Kafka or a JSONL file.

    Prints one JSON line with the accounting, where the ground truth of the drifts was written, and the
    ground truth itself.
    """
    from streams import generator
    from streams.schemas import CatalogItem, encode_event

    try:
        config = generator.GeneratorConfig(merchants=merchants, events=events, seed=seed, days=days,
                                           drifts=tuple(generator.DriftSpec.parse(d) for d in drifts),
                                           conversion_delay_s=conversion_delay_s)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    truth = generator.ground_truth(config)
    stream, repeat_truth = generator.generate(config), []
    if consumables > 0:
        from streams.consumables import ConsumableSpec, with_consumables

        stream, repeat_truth = with_consumables(stream, ConsumableSpec(share=consumables), seed=seed)
    if out is not None:
        path = Path(out)
        truth_path = path.with_name(path.name.split(".")[0] + ".truth.json")
        counts = {"written": 0}
        with path.open("wb") as handle, _progress(events, "ev", "generate") as progress:
            for event in stream:
                handle.write(encode_event(event) + b"\n")
                counts["written"] += 1
                progress.update(not isinstance(event, CatalogItem))
        summary: dict = {"out": str(path), **counts}
    else:
        producer = _open_producer(settings, f"generate:seed={seed}")
        with _progress(events, "ev", "generate") as progress:
            for event in stream:
                producer.send_event(event)
                progress.update(not isinstance(event, CatalogItem))
        summary = _finish(producer)
        truth_path = settings.data_path / "generated" / f"truth-seed{seed}-m{merchants}-e{events}.json"
        truth_path.parent.mkdir(parents=True, exist_ok=True)
    truth_path.write_text(json.dumps({"config": {"merchants": merchants, "events": events, "seed": seed, "days": days,
                                                 "drifts": list(drifts), "consumables": consumables},
                                      "drifts": truth, "consumables": repeat_truth}, indent=2))
    click.echo(json.dumps({**summary, "ground_truth_file": str(truth_path), "ground_truth": truth}))


@click.command()
@click.argument("dataset", type=click.Choice(["cdnow", "ecom", "movielens"]))
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N events.")
@click.option("--merchant-id", default=None, help="Merchant id to replay as (default: the data set's name).")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write JSONL here instead of producing to Kafka.")
@pass_settings
def replay(settings: Settings, dataset: str, limit: int | None, merchant_id: str | None, out: str | None) -> None:
    """Replay a real data set shipped in an installed wheel as our events (mapping: streams/datasets.py).

    cdnow: 69,659 real CDNOW orders (lifetimes wheel) as orders of one merchant; ecom: retentioneering's
    31k-event clickstream (synthetic, per its own docs) as page clicks; movielens: MovieLens-100K's 100,000
    real ratings (recbole wheel, data only) as one-line orders of one merchant, after its 1,682-movie
    catalog. Prints one JSON line of accounting.
    """
    from streams import datasets
    from streams.schemas import encode_event

    try:
        events = datasets.load(dataset, limit=limit, merchant_id=merchant_id)
        first = next(events, None)
    except datasets.DatasetMissing as exc:
        raise click.ClickException(str(exc)) from exc
    stream = [] if first is None else itertools.chain([first], events)
    if out is not None:
        written = 0
        with open(out, "wb") as handle, _progress(limit, "ev", dataset) as progress:
            for event in stream:
                handle.write(encode_event(event) + b"\n")
                written += 1
                progress.update(1)
        click.echo(json.dumps({"dataset": dataset, "out": out, "written": written}))
        return
    producer = _open_producer(settings, f"replay:{dataset}")
    with _progress(limit, "ev", dataset) as progress:
        for event in stream:
            producer.send_event(event)
            progress.update(1)
    click.echo(json.dumps({"dataset": dataset, **_finish(producer)}))
