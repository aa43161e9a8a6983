"""The README's measured table is generated from saved benchmark JSON lines, between the markers only."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks import save_result
from benchmarks.readme_table import BEGIN, END, main


def test_rows_from_readme_lists_and_numeric_fallback(tmp_path):
    results = tmp_path / "results"
    save_result("federated", {"quick": True, "readme": [
        {"row": "federated vs centralized AUC", "value": 0.7412, "spread": "±0.0021 (sd, 3 seeds)", "target": "within 1%",
         "met": False, "mode": "quick", "seeds": {"calibration": [1, 2], "report": [11, 12, 13]}, "date": "2026-12-01"}]},
                results)
    save_result("streams", {"benchmark": "streams", "quick": False, "events_per_s": 77012.5, "ok": True}, results)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{BEGIN}\nold | typed | table\n{END}\nafter\n")
    assert main(["--results", str(results), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n" + BEGIN + "\n| benchmark |") and text.endswith(END + "\nafter\n")
    assert "old | typed" not in text
    row = next(line for line in text.splitlines() if line.startswith("| federated"))
    assert row == ("| federated | federated vs centralized AUC | 0.7412 | ±0.0021 (sd, 3 seeds) | within 1% | ✗ | quick | "
                   "1, 2 / 11, 12, 13 | 2026-12-01 |")
    streams = [line for line in text.splitlines() if line.startswith("| streams")]
    assert len(streams) == 1 and "| events_per_s | 7.701e+04 |" in streams[0] and "| full |" in streams[0]
    saved = json.loads((results / "streams.json").read_text())
    assert saved["saved_at"][:4].isdigit() and streams[0].endswith(f"| {saved['saved_at'][:10]} |")
    assert main(["--results", str(results), "--write", str(readme)]) == 0 and readme.read_text() == text  # idempotent


def test_missing_markers_or_results_are_one_line_errors(tmp_path):
    save_result("x", {"a": 1.0}, tmp_path / "results")
    (tmp_path / "no-markers.md").write_text("# nothing to replace\n")
    command = [sys.executable, "-m", "benchmarks.readme_table", "--results", str(tmp_path / "results"), "--write",
               str(tmp_path / "no-markers.md")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "markers" in done.stderr
    assert (tmp_path / "no-markers.md").read_text() == "# nothing to replace\n"
    empty = subprocess.run(command[:3] + ["--results", str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert empty.returncode == 1 and "no saved benchmark results" in empty.stderr
    assert "--write" in subprocess.run(command[:3] + ["--help"], capture_output=True, text=True, timeout=60).stdout
