"""Run every ``benchmarks/<room>.py`` in turn, each in its own process, and summarize.

    .venv/bin/python -m benchmarks            # all rooms
    BENCH_QUICK=1 .venv/bin/python -m benchmarks streams drift   # some rooms, quick

Each module's output is passed through; each module's final JSON line is saved to
``benchmarks/results/<module>.json`` (for ``benchmarks/readme_table.py``); the last line printed here is one
JSON object mapping each module to its final JSON figures (or to its exit code when it failed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import save_result

HERE = Path(__file__).resolve().parent
TOOLS = {"readme_table"}  # modules here that are not benchmarks


def modules() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_") and p.stem not in TOOLS)


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def main(selected: list[str]) -> int:
    names = selected or modules()
    unknown = sorted(set(names) - set(modules()))
    if unknown:
        print(f"unknown benchmark module(s): {', '.join(unknown)}; known: {', '.join(modules())}", file=sys.stderr)
        return 2
    results: dict[str, object] = {}
    failed = 0
    for name in names:
        print(f"== benchmarks.{name} ==", flush=True)
        done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], cwd=HERE.parent,
                              stdout=subprocess.PIPE, text=True)
        sys.stdout.write(done.stdout)
        sys.stdout.flush()
        figures = last_json(done.stdout) if done.returncode == 0 else None
        if figures is None:
            failed += 1
            results[name] = {"exit_code": done.returncode, "error": "no final JSON line" if done.returncode == 0 else "failed"}
        else:
            results[name] = figures
            save_result(name, figures)
    print(json.dumps(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
