"""The Flower peer of benchmarks/federated.py: an unbuildable venv makes the row "peer unavailable", not a failure."""

from __future__ import annotations

from benchmarks import _flower


def test_unbuildable_flower_venv_reports_the_peer_unavailable(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("FEDSTREAM_BENCH_CACHE", str(blocker / "cache"))
    result = _flower.flower_round([str(tmp_path)], bits=8, lr=0.5, batch=32, rounds=1)
    assert set(result) == {"unavailable"}
    assert result["unavailable"].startswith("building the Flower venv failed") and "\n" not in result["unavailable"]


def test_a_built_venv_is_reused_by_its_marker(tmp_path):
    venv = tmp_path / "flower-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / ".fedstream-ok").write_text(_flower.FLWR_SPEC + "\n")
    assert _flower.flower_python(tmp_path) == venv / "bin" / "python"
