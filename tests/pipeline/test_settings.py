"""ProcessSettings against the post-processing a checkpoint's threshold was calibrated under."""

from __future__ import annotations

from pipeline.settings import ProcessSettings


def _calibrated(**changes):
    record = {**ProcessSettings().calibration_record(), **changes}
    return {"threshold": 0.3, "delineation_threshold": 0.5, "postprocessing": record}


def test_the_defaults_match_a_calibration_under_the_defaults():
    assert ProcessSettings().differences_from_calibration(_calibrated()) == {}


def test_each_changed_setting_is_named_with_both_values():
    settings = ProcessSettings(lesion_order="confidence", keep_components=2, delineation_threshold=None)
    assert settings.differences_from_calibration(_calibrated()) == {
        "delineation_threshold": {"calibrated": 0.5, "configured": None},
        "keep_components": {"calibrated": 1, "configured": 2},
        "lesion_order": {"calibrated": "volume", "configured": "confidence"},
    }
    assert ProcessSettings().differences_from_calibration(_calibrated(test_time_flips="lr")) == {
        "test_time_flips": {"calibrated": "lr", "configured": "none"}}


def test_nothing_to_compare_without_a_record_or_with_a_configured_threshold():
    changed = ProcessSettings(lesion_order="uptake")
    assert changed.differences_from_calibration({"threshold": 0.3}) == {}  # calibrated before the record existed
    assert changed.differences_from_calibration({}) == {}  # never calibrated
    own_threshold = ProcessSettings(lesion_order="uptake", threshold=0.4)
    assert own_threshold.differences_from_calibration(_calibrated()) == {}
