"""The README's measured table, regenerated from the benchmarks' saved JSON lines (never typed by hand).

    python -m benchmarks.readme_table                      # print the table
    python -m benchmarks.readme_table --write README.md    # replace the section between the markers

Reads ``benchmarks/results/<name>.json`` (each benchmark's final JSON line, saved by
:func:`benchmarks.save_result`). Rows come from each line's ``"readme"`` list of
``{"row", "value", "spread", "target", "met", "mode", "seeds": {"calibration", "report"}, "date"}``; a line
without that list contributes its top-level numeric fields, with its mode (quick/full) and date.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import RESULTS_DIR

BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"
HEADER = ("| benchmark | what | figure | spread | target | met | mode | seeds (calibration / report) | date |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def _cell(value: object) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "✓" if value else "✗"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def _mode(figures: dict) -> str:
    if "mode" in figures:
        return str(figures["mode"])
    quick = figures.get("quick")
    return "–" if quick is None else ("quick" if quick else "full")


def _date(figures: dict) -> str:
    return str(figures.get("date") or figures.get("saved_at") or "–")[:10]


def _seeds(seeds: object) -> str:
    if isinstance(seeds, dict):
        return f"{_cell(seeds.get('calibration'))} / {_cell(seeds.get('report'))}"
    return _cell(seeds)


def rows_of(name: str, figures: dict) -> list[str]:
    """Markdown rows for one benchmark's figures: its ``readme`` list, else its top-level numbers."""
    readme = figures.get("readme")
    if isinstance(readme, list) and readme:
        return [f"| {name} | {_cell(r.get('row'))} | {_cell(r.get('value'))} | {_cell(r.get('spread'))} | "
                f"{_cell(r.get('target'))} | {_cell(r.get('met'))} | {_cell(r.get('mode', _mode(figures)))} | "
                f"{_seeds(r.get('seeds'))} | {_cell(r.get('date') or _date(figures))} |" for r in readme]
    numbers = {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return [f"| {name} | {_cell(k)} | {_cell(v)} | – | – | – | {_mode(figures)} | – | {_date(figures)} |"
            for k, v in numbers.items()]


def table(results_dir: Path) -> str:
    files = sorted(results_dir.glob("*.json"))
    if not files:
        raise ValueError(f"no saved benchmark results in {results_dir} (run python -m benchmarks first)")
    lines = [HEADER]
    for path in files:
        try:
            figures = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: not a JSON object ({exc})") from None
        if not isinstance(figures, dict):
            raise ValueError(f"{path}: not a JSON object")
        lines.extend(rows_of(path.stem, figures))
    return "\n".join(lines)


def rewrite(markdown: str, body: str) -> str:
    """``markdown`` with the text between the measured-table markers replaced by ``body``."""
    start, end = markdown.find(BEGIN), markdown.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"markers {BEGIN} ... {END} not found (in that order)")
    return markdown[:start + len(BEGIN)] + "\n" + body + "\n" + markdown[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme_table", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="directory of saved <name>.json results")
    parser.add_argument("--write", type=Path, metavar="FILE",
                        help=f"rewrite FILE between {BEGIN} and {END} (else print the table)")
    args = parser.parse_args(argv)
    try:
        body = table(args.results)
        if args.write is None:
            print(body)
            return 0
        args.write.write_text(rewrite(args.write.read_text(), body))
    except (OSError, ValueError) as exc:
        print(f"readme_table: {exc}", file=sys.stderr)
        return 1
    print(f"rewrote the measured table in {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
