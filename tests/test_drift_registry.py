"""One registry of detectors: build_detectors, the monitor's routing, calibration and the CLI all read it."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from drift.calibration import NEVER_FIRE, setting_for
from drift.detectors import DETECTORS, Signal, build_detectors, watchers
from fedstream.settings import DriftSettings

# settings the monitor itself reads (what it computes before any detector sees a value)
MONITOR_SETTINGS = {"disabled", "error_metric", "error_clip", "psi_threshold", "chi2_min_effect"}


def test_every_registered_detector_builds_under_its_own_name_with_its_declared_threshold() -> None:
    config = DriftSettings().model_copy(update={"disabled": ()})
    built = build_detectors(config, "m1")
    assert list(built) == list(DETECTORS)
    for name, detector in built.items():
        assert detector.name == name and detector.merchant_id == "m1"
        field, key = DETECTORS[name].threshold
        assert setting_for(name) == (field, key) and field in DriftSettings.model_fields
        assert key is None or key in getattr(config, field)


def test_every_setting_is_read_by_a_declared_detector_or_the_monitor() -> None:
    declared = {field for spec in DETECTORS.values() for field in (spec.threshold[0], *spec.settings)}
    assert declared <= DriftSettings.model_fields.keys()
    assert DriftSettings.model_fields.keys() - declared <= MONITOR_SETTINGS


def test_routing_follows_the_declarations() -> None:
    assert watchers(Signal.ERROR) == ("error.adwin", "error.page_hinkley")
    assert watchers(Signal.PRICE) == ("feature.price.psi", "feature.price.ks")
    assert {name for signal in Signal for name in watchers(signal)} == DETECTORS.keys()


def test_switches_and_disabled_names_come_from_the_registry() -> None:
    assert "feature.price.index" not in build_detectors(DriftSettings(price_index=False), "m1")
    assert not any(n.startswith("feature.hour") for n in build_detectors(
        DriftSettings(numeric_fields=("price",), disabled=()), "m1"))
    with pytest.raises(ValueError, match="unknown detectors \\['feature.prcie.psi'\\]"):
        build_detectors(DriftSettings(disabled=("feature.prcie.psi",)), "m1")


def test_calibration_settings_put_every_threshold_out_of_reach() -> None:
    calibrating = DriftSettings(**NEVER_FIRE)
    detectors = build_detectors(calibrating, "m1")
    assert list(detectors) == list(DETECTORS)
    assert calibrating.ks_threshold == 1.0 and calibrating.ph_threshold >= 1e12


def test_the_cli_lists_the_registry_within_80_columns(tmp_path) -> None:
    from fedstream.cli import main

    result = CliRunner().invoke(main, ["drift", "detectors"], env={"FEDSTREAM_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == len(DETECTORS) + 1 and max(map(len, lines)) <= 80
    runs = {line.split()[0]: line.split()[-1] for line in lines[1:]}
    assert runs["error.adwin"] == "disabled" and runs["error.page_hinkley"] == "on"


def test_a_detector_built_without_settings_uses_the_calibrated_thresholds():
    """The constructors' defaults and the settings were two sources that disagreed (KS 0.15 vs 0.206)."""
    from drift.detectors import ErrorPageHinkley, NumericShift, RateShift, TasteShift
    from drift.traffic import ArrivalRate
    from fedstream.settings import DriftSettings

    calibrated = DriftSettings()
    assert NumericShift("m1", "price", statistic="ks").ks_threshold == calibrated.ks_threshold
    assert RateShift("m1", "label.ctr").z_threshold == calibrated.label_z
    assert TasteShift("m1").threshold == calibrated.user_category_threshold
    assert ArrivalRate("m1").threshold == calibrated.rate_threshold
    assert ErrorPageHinkley("m1").params["threshold"] == calibrated.ph_threshold
