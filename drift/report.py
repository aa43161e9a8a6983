"""The drift report: a self-contained directory with ``index.html`` and the PNG plots it references.

For each reported merchant: rolling logloss and AUC of the prequential model over time with the drift
events marked; each watched feature (price, hour of day, category shares) before vs after the first
drift (or the merchant's midpoint when nothing drifted); a table of drift events. On top, a table of all
reported merchants: events, CTR, conversion, logloss, AUC, drift events. The same PNGs are logged to
MLflow as artifacts of the serving model's run (``drift-report/<name>/``).

Plots use matplotlib's Agg backend (no display needed). Every text in them is literal: merchant, item and
category names such as ``$\\frac{a}{b}$`` or ``m_1^2`` are shown as written, never parsed as math text.
"""

from __future__ import annotations

import datetime as dt
import functools
import html
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drift.events import DriftEvent
from drift.prequential import EmptyStream, MerchantTrace, learner_name, make_learner, run_monitor
from fedstream.metrics import mean_logloss, roc_auc
from fedstream.logs import get_logger
from fedstream.settings import Settings
from streams.schemas import Event

log = get_logger("drift.report")

FAMILY_COLORS = {"error": "tab:red", "label": "tab:purple", "feature": "tab:green"}


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean logloss, probabilities clipped to [1e-3, 1 - 1e-3] so one confident miss does not swamp a plot.

    >>> round(logloss(np.array([1, 0]), np.array([1.0, 0.5])), 3)
    0.347
    """
    return mean_logloss(y, p, clip=1e-3)



def rolling(y: np.ndarray, p: np.ndarray, window: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(end positions, logloss, AUC) over sliding windows of ``window`` clicks every ``stride`` clicks."""
    ends = np.arange(min(window, len(y)), len(y) + 1, max(stride, 1))
    losses = np.array([logloss(y[e - window:e], p[e - window:e]) for e in ends]) if len(ends) else np.array([])
    aucs = np.array([roc_auc(y[max(e - window, 0):e], p[max(e - window, 0):e]) for e in ends]) if len(ends) else np.array([])
    return ends, losses, aucs


def _when(timestamps: Iterable[float]) -> list[dt.datetime]:
    return [dt.datetime.fromtimestamp(t, dt.timezone.utc) for t in timestamps]


def _mark_drifts(axes, drifts: Sequence[DriftEvent]) -> None:
    seen: set[str] = set()
    for event in drifts:
        label = event.detector if event.detector not in seen else None
        seen.add(event.detector)
        for ax in axes:
            ax.axvline(_when([event.window_end_time])[0], color=FAMILY_COLORS.get(event.family, "k"), alpha=0.7,
                       linestyle="--", linewidth=1.2, label=label if ax is axes[0] else None)


def _literal_text(plot):
    """Run a plotting function with math text off: names from the stream are data, not TeX."""

    @functools.wraps(plot)
    def literal(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)

    return literal


@_literal_text
def plot_performance(trace: MerchantTrace, drifts: Sequence[DriftEvent], path: Path, window: int,
                     truth: Sequence[dict] = ()) -> Path:
    """Rolling logloss and AUC of the prequential model, drift events as dashed lines, known (injected)
    drifts from a ground-truth file as thick grey bands."""
    import matplotlib.pyplot as plt

    y, p = np.asarray(trace.y, dtype=bool), np.asarray(trace.p, dtype=float)
    window = max(20, min(window, len(y) // 4 or 20))
    ends, losses, aucs = rolling(y, p, window, max(window // 5, 1))
    times = _when(np.asarray(trace.click_times)[ends - 1]) if len(ends) else []
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    axes[0].plot(times, losses, color="tab:blue")
    axes[0].set_ylabel(f"logloss (last {window} clicks)")
    axes[1].plot(times, aucs, color="tab:orange")
    axes[1].set_ylabel(f"AUC (last {window} clicks)")
    axes[1].set_xlabel("event time (UTC)")
    for row in truth:
        for ax in axes:
            ax.axvline(_when([row["timestamp"]])[0], color="0.4", alpha=0.35, linewidth=5,
                       label=f"injected {row.get('kind', 'drift')}" if ax is axes[0] else None)
    _mark_drifts(axes, drifts)
    if drifts or truth:
        axes[0].legend(loc="upper left", fontsize=8, title="drift", title_fontsize=8)
    axes[0].set_title(f"merchant {trace.merchant_id}: prequential model quality ({len(y)} clicks)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _split(values: list[tuple[float, object]], split_time: float) -> tuple[list, list]:
    before = [v for t, v in values if t < split_time]
    after = [v for t, v in values if t >= split_time]
    return before, after


@_literal_text
def plot_features(trace: MerchantTrace, split_time: float, split_label: str, path: Path) -> Path:
    """Price and hour histograms and category shares, before vs after ``split_time``."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    price_before, price_after = _split(trace.features.get("price", []), split_time)
    if price_before or price_after:
        prices = np.asarray(price_before + price_after, dtype=float)
        bins = np.histogram_bin_edges(np.log1p(prices), bins=30)
        for values, label, color in ((price_before, "before", "tab:blue"), (price_after, "after", "tab:orange")):
            if values:
                axes[0].hist(np.log1p(np.asarray(values, dtype=float)), bins=bins, density=True, alpha=0.55,
                             label=f"{label} (n={len(values)})", color=color)
        ticks = bins[:: max(len(bins) // 6, 1)]
        axes[0].set_xticks(ticks, [f"{math.expm1(t):.0f}" for t in ticks])
    axes[0].set_title("price of shown items (log scale)")
    hour_before, hour_after = _split(trace.features.get("hour", []), split_time)
    for values, label, color in ((hour_before, "before", "tab:blue"), (hour_after, "after", "tab:orange")):
        if values:
            axes[1].hist(values, bins=np.arange(25) - 0.5, density=True, alpha=0.55, label=f"{label} (n={len(values)})",
                         color=color)
    axes[1].set_title("hour of day (UTC)")
    axes[1].set_xticks(range(0, 24, 3))
    cat_before, cat_after = _split(trace.features.get("category", []), split_time)
    shares_before, shares_after = Counter(cat_before), Counter(cat_after)
    names = [c for c, _ in (shares_before + shares_after).most_common(12)]
    if names:
        x = np.arange(len(names))
        total_b, total_a = max(len(cat_before), 1), max(len(cat_after), 1)
        axes[2].bar(x - 0.2, [shares_before[c] / total_b for c in names], 0.4, label=f"before (n={len(cat_before)})",
                    color="tab:blue")
        axes[2].bar(x + 0.2, [shares_after[c] / total_a for c in names], 0.4, label=f"after (n={len(cat_after)})",
                    color="tab:orange")
        axes[2].set_xticks(x, [str(n)[:14] for n in names], rotation=45, ha="right", fontsize=8)
    axes[2].set_title("category shares (clicked + ordered)")
    for ax in axes:
        if ax.has_data():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    fig.suptitle(f"merchant {trace.merchant_id}: before vs after {split_label}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def merchant_summary(trace: MerchantTrace, drifts: Sequence[DriftEvent]) -> dict:
    """One row of the merchant table."""
    y, p = np.asarray(trace.y, dtype=bool), np.asarray(trace.p, dtype=float)
    return {
        "merchant_id": trace.merchant_id,
        "events": trace.events,
        "clicks": trace.clicks,
        "ctr": trace.clicked / trace.clicks if trace.clicks else math.nan,
        "conversion": trace.orders / trace.clicked if trace.clicked else math.nan,
        "logloss": logloss(y, p),
        "auc": roc_auc(y, p),
        "drift_events": len(drifts),
    }


@dataclass
class Report:
    """Where the report went and what it found."""

    out_dir: Path
    html: Path
    images: list[Path]
    summaries: list[dict]
    drift_events: list[DriftEvent]
    learner: str
    mlflow_run_id: str | None = None
    extra: dict = field(default_factory=dict)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def _table(rows: list[dict], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def write_report(settings: Settings, events: Iterable[Event], out_dir: str | Path, *,
                 merchants: Sequence[str] | None = None, since: float | None = None, window: int = 500,
                 mlflow: bool = True, mlflow_run_id: str | None = None, truth: Sequence[dict] = ()) -> Report:
    """Run the prequential model and the drift monitor over ``events``, then write the report to ``out_dir``.

    ``merchants`` limits what is reported (every merchant's events still train the model); an unknown
    merchant raises :class:`~drift.monitor.UnknownMerchant`. ``since`` (epoch seconds) hides older data from
    plots and tables. With ``mlflow`` the PNGs and HTML are logged as artifacts of the serving model's run.
    ``truth`` (rows of ``streams.generator.ground_truth``: merchant_id, timestamp, kind) marks known drifts.
    """
    import matplotlib

    matplotlib.use("Agg")
    from drift.monitor import DriftMonitor, JsonlSink, UnknownMerchant, serving_run_id

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drift_file = out / "drift-events.jsonl"
    drift_file.unlink(missing_ok=True)
    monitor = DriftMonitor(settings, sinks=[JsonlSink(drift_file)])
    model = make_learner(settings.feature_bits)
    traces = run_monitor(events, monitor, bits=settings.feature_bits, model=model)
    selected = list(merchants) if merchants else sorted(traces)
    missing = [m for m in selected if m not in traces]
    if missing:
        raise UnknownMerchant(f"no events for merchant(s) {', '.join(missing)}; known: {', '.join(sorted(traces)[:20])}")
    if since is not None:
        traces = {m: _since(t, since) for m, t in traces.items()}
        if not any(traces[m].events for m in selected):
            raise EmptyStream(f"no events at or after {_iso(since)} UTC for {', '.join(selected)}")
    images, summaries, sections = [], [], []
    drifts_of = {m: [e for e in monitor.events if e.merchant_id == m and (since is None or e.window_end_time >= since)]
                 for m in selected}
    for merchant in selected:
        trace, drifts = traces[merchant], drifts_of[merchant]
        summaries.append(merchant_summary(trace, drifts))
        if not trace.clicks:
            sections.append(f"<h2>merchant {html.escape(merchant)}</h2><p>No clicks in range: nothing to plot.</p>")
            continue
        known = [row for row in truth if row.get("merchant_id") == merchant]
        perf = plot_performance(trace, drifts, out / f"{_safe(merchant)}_performance.png", window, known)
        split_time, split_label = _split_point(trace, drifts, known)
        feats = plot_features(trace, split_time, split_label, out / f"{_safe(merchant)}_features.png")
        images += [perf, feats]
        sections.append(_section(merchant, perf, feats, drifts, split_label, known))
    columns = ("merchant_id", "events", "clicks", "ctr", "conversion", "logloss", "auc", "drift_events")
    page = _page(summaries, columns, sections, learner_name(model), monitor)
    html_path = out / "index.html"
    html_path.write_text(page, encoding="utf-8")
    report = Report(out, html_path, images, summaries, [e for m in selected for e in drifts_of[m]], learner_name(model))
    if mlflow:
        report.mlflow_run_id = _log_to_mlflow(settings, report, serving_run_id(settings, mlflow_run_id), selected)
    log.info("drift report written", extra={"out": str(out), "merchants": len(selected),
                                             "drift_events": len(report.drift_events)})
    return report


def _since(trace: MerchantTrace, since: float) -> MerchantTrace:
    keep = [k for k, t in enumerate(trace.click_times) if t >= since]
    out = MerchantTrace(trace.merchant_id)
    out.click_times = [trace.click_times[k] for k in keep]
    out.click_index = [trace.click_index[k] for k in keep]
    out.y = [trace.y[k] for k in keep]
    out.p = [trace.p[k] for k in keep]
    out.clicks, out.clicked = len(keep), sum(out.y)
    out.features = {name: [(t, v) for t, v in values if t >= since] for name, values in trace.features.items()}
    out.events = len(out.features.get("hour", []))
    out.orders = max(out.events - out.clicks, 0)
    return out


def _split_point(trace: MerchantTrace, drifts: Sequence[DriftEvent], known: Sequence[dict] = ()) -> tuple[float, str]:
    """Split features at the first detected drift, else at the first injected one, else at the midpoint."""
    if drifts:
        first = min(drifts, key=lambda e: e.window_end_time)
        return first.window_end_time, f"first drift ({first.detector} at {_iso(first.window_end_time)} UTC)"
    if known:
        first_known = min(known, key=lambda row: row["timestamp"])
        return first_known["timestamp"], (f"injected {first_known.get('kind', 'drift')} drift at "
                                          f"{_iso(first_known['timestamp'])} UTC (not detected)")
    middle = trace.click_times[len(trace.click_times) // 2]
    return middle, f"midpoint {_iso(middle)} UTC (no drift detected)"


def _section(merchant: str, perf: Path, feats: Path, drifts: Sequence[DriftEvent], split_label: str,
             known: Sequence[dict] = ()) -> str:
    rows = [{"detector": e.detector, "statistic": e.statistic, "value": e.value, "threshold": e.threshold,
             "event_index": e.event_index, "window": f"{e.window_start_index}–{e.window_end_index}",
             "time (UTC)": _iso(e.window_end_time)} for e in drifts]
    table = _table(rows, ("detector", "statistic", "value", "threshold", "event_index", "window", "time (UTC)")) \
        if rows else "<p>No drift detected.</p>"
    name = html.escape(merchant)
    injected = "".join(f"<p>Injected drift (ground truth): {html.escape(str(row.get('kind')))} from event "
                       f"{row.get('at_event')} at {_iso(row['timestamp'])} UTC.</p>" for row in known)
    return (f"<h2 id='m-{name}'>merchant {name}</h2>{injected}"
            f"<img src='{perf.name}' alt='rolling logloss and AUC of {name}'>"
            f"<p>Features before vs after {html.escape(split_label)}.</p>"
            f"<img src='{feats.name}' alt='feature distributions of {name}'>"
            f"<h3>drift events</h3>{table}")


def _page(summaries: list[dict], columns: Sequence[str], sections: list[str], learner: str, monitor) -> str:
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1500px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
             "img{max-width:100%;display:block;margin:1em 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>fedstream drift report</title>"
            f"<style>{style}</style></head><body><h1>fedstream drift report</h1>"
            f"<p>Generated {generated}. Prequential model: <code>{html.escape(learner)}</code>; "
            f"{monitor.global_index} click/order events; detectors per merchant: "
            f"{html.escape(', '.join(sorted(next(iter(monitor.detectors.values())))))}. "
            f"Drift events are also in <a href='drift-events.jsonl'>drift-events.jsonl</a>.</p>"
            f"{_table(summaries, columns)}{''.join(sections)}</body></html>")


def _log_to_mlflow(settings: Settings, report: Report, run_id: str, merchants: Sequence[str]) -> str:
    from registry.tracking import client

    name = merchants[0] if len(merchants) == 1 else "all"
    client(settings).log_artifacts(run_id, str(report.out_dir), artifact_path=f"drift-report/{_safe(name)}")
    return run_id

