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


def test_kafka_source_takes_only_explicitly_listed_merchants(tmp_path):
    """The compose file passes `--merchants "$FEDSTREAM_FEDERATED_MERCHANTS"`: unset must not mean everyone."""
    for args in (["run", "--source", "kafka"], ["run", "--source", "kafka", "--merchants", ""],
                 ["run", "--source", "kafka", "--merchants", "../x,a/b"]):
        result = _invoke(args, tmp_path)
        assert result.exit_code == 2 and "--merchants" in result.output, (args, result.output)
    assert not (tmp_path / "federated" / "merchants").exists()


def test_run_defaults_to_the_platforms_data_not_the_generator(tmp_path):
    help_text = _invoke(["run", "--help"], tmp_path).output
    assert "[default: kafka]" in " ".join(help_text.split())
    result = _invoke(["run", "--rounds", "1"], tmp_path)  # = --source kafka: needs the merchant list
    assert result.exit_code == 2 and "--merchants" in result.output


def test_an_unusable_merchant_id_is_skipped_with_its_reason(tmp_path):
    result = _invoke(["run", "--source", "stores", "--merchants", "../x,m07"], tmp_path)
    assert "skipped: merchant id '../x' cannot name a directory" in result.output
    assert result.exit_code == 1 and "m07" in result.output and "Traceback" not in result.output


def test_register_takes_a_name_a_models_uri_can_carry(tmp_path):
    for bad in ("a/b", "x@y", " "):
        result = _invoke(["run", "--source", "generate", "--register", bad], tmp_path)
        assert result.exit_code == 2 and "--register" in result.output and "Traceback" not in result.output, bad
    assert not (tmp_path / "federated" / "merchants").exists()  # refused before any store is built
    assert "models:/NAME@ALIAS" in " ".join(_invoke(["run", "--help"], tmp_path).output.split())


def test_multitask_run_needs_stores_with_purchase_labels_and_windows_come_from_settings(tmp_path):
    from federated.stores import build_stores
    from streams.generator import GeneratorConfig, generate

    events = list(generate(GeneratorConfig(merchants=2, events=3000, seed=3, conversion_delay_s=600.0)))
    build_stores(events, tmp_path / "federated", bits=10)  # click-only stores where the command looks
    result = _invoke(["run", "--multitask", "--source", "stores"], tmp_path)
    assert result.exit_code == 1 and "--multitask needs stores with purchase labels" in result.output
    assert "Traceback" not in result.output and "--multitask" in _invoke(["run", "--help"], tmp_path).output

    # settings.multitask's per-merchant window overrides the default one for that merchant only
    wide = build_stores(events, tmp_path / "a", bits=10, attribution_window_s=3600.0)
    narrow = build_stores(events, tmp_path / "b", bits=10, attribution_window_s=3600.0, merchant_windows_s={"m00": 1.0})
    ordered = {name: {m: s.load("train")["labels"][:, 1].sum() for m, s in stores.items()}
               for name, stores in (("wide", wide), ("narrow", narrow))}
    assert ordered["narrow"]["m00"] < ordered["wide"]["m00"] and ordered["narrow"]["m01"] == ordered["wide"]["m01"]
