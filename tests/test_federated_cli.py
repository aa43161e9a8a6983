"""`fedstream federated` bad paths that never start TFF (fast): missing stores, no joined workers, bad options."""

from __future__ import annotations

from click.testing import CliRunner

from fedstream.cli import main


def _invoke(args, data_dir):
    return CliRunner().invoke(main, ["federated", *args], env={"FEDSTREAM_DATA_DIR": str(data_dir)})


def test_join_needs_the_merchants_store(tmp_path):
    result = _invoke(["join", "--merchant", "m99"], tmp_path)
    assert result.exit_code == 1 and "m99" in result.output and "store" in result.output
    unsafe = _invoke(["join", "--merchant", "../x"], tmp_path)
    assert unsafe.exit_code == 1 and "cannot name a directory" in unsafe.output


def test_run_on_workers_needs_joined_merchants(tmp_path):
    result = _invoke(["run", "--workers"], tmp_path)
    assert result.exit_code == 1 and "no joined merchant workers" in result.output


def test_option_validation(tmp_path):
    assert _invoke(["run", "--rounds", "0"], tmp_path).exit_code == 2
    assert _invoke(["run", "--server-optimizer", "rmsprop"], tmp_path).exit_code == 2
    dp = _invoke(["run", "--dp", "--noise-multiplier", "0.5", "--clients-per-round", "3"], tmp_path)
    assert dp.exit_code == 2 and "0.1 x clients_per_round" in dp.output
    assert _invoke(["run", "--dropout-rate", "1"], tmp_path).exit_code == 2
    both = _invoke(["run", "--dp", "--noise-multiplier", "0.1", "--clip", "1", "--secure-agg"], tmp_path)
    assert both.exit_code == 2
    help_text = _invoke(["--help"], tmp_path).output
    assert "join" in help_text and "run" in help_text
