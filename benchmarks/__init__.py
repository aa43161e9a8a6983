"""Speed and memory benchmarks, one module per room: ``python -m benchmarks.<room>`` (or all of them with
``python -m benchmarks``). Each prints a human table and then ONE final JSON line of figures;
``BENCH_QUICK=1`` makes each finish within a few minutes. The final line is also saved to
``benchmarks/results/<room>.json`` (:func:`save_result`), which ``benchmarks/readme_table.py`` turns into the
README's measured table."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from fedstream.logs import quiet_libraries

quiet_libraries()  # the benchmarks are programs: library noise a user cannot act on is dropped, as in the CLI

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def save_result(name: str, figures: dict, results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``figures`` (a benchmark's final JSON object) to ``<results_dir>/<name>.json`` with the UTC
    time it was saved (``saved_at``), atomically."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    record = {**figures, "saved_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, default=str) + "\n")
    tmp.replace(path)
    return path


def emit(name: str, figures: dict) -> None:
    """Print a benchmark's final JSON line and save it (the last thing a benchmark's ``main`` does)."""
    print(json.dumps(figures, default=str), flush=True)
    save_result(name, figures)
