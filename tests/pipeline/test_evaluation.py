"""Evaluation: metrics per case, the SUV-40 % baseline, summaries, and the whole command on a study."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.evaluation import (
    case_metrics,
    format_size_table,
    format_table,
    run_evaluation,
    size_breakdown,
    suv_threshold_baseline,
)

SPACING = (2.0, 1.0, 1.0)


def _ball(shape, centre, radius):
    zz, yy, xx = np.indices(shape)
    return ((zz - centre[0]) * 2) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2


def test_case_metrics_of_perfect_and_shifted_predictions():
    truth = _ball((20, 40, 40), (10, 20, 20), 8)
    perfect = case_metrics(truth, truth, SPACING)
    assert perfect == {"dice": 1.0, "hd95_mm": 0.0, "volume_ratio": 1.0}
    shifted = case_metrics(np.roll(truth, 4, axis=2), truth, SPACING)
    assert 0.4 < shifted["dice"] < 0.9 and shifted["hd95_mm"] == pytest.approx(4.0, abs=0.5)
    assert shifted["volume_ratio"] == pytest.approx(1.0)


def test_suv40_baseline_contours_the_hot_lesion_inside_the_voi():
    shape = (20, 60, 60)
    truth = _ball(shape, (10, 30, 20), 6)
    suv = np.full(shape, 0.5, dtype=np.float32)
    suv[_ball(shape, (10, 30, 20), 5)] = 10.0  # hot core, slightly smaller than the truth
    suv[_ball(shape, (10, 30, 52), 4)] = 30.0  # hotter, but outside the VOI (15 mm margin)
    seg = suv_threshold_baseline(suv, truth, SPACING)
    assert seg[10, 30, 20] and not seg[10, 30, 52]
    assert np.array_equal(seg, _ball(shape, (10, 30, 20), 5))
    assert not suv_threshold_baseline(suv, np.zeros(shape, bool), SPACING).any()


def test_summary_tables_and_size_breakdown():
    rows = [
        {"truth_cc": 0.5, "A": {"dice": 0.2, "hd95_mm": 10.0, "volume_ratio": 0.5}},
        {"truth_cc": 1.9, "A": {"dice": 0.4, "hd95_mm": math.inf, "volume_ratio": 0.0}},
        {"truth_cc": 2.0, "A": {"dice": 0.8, "hd95_mm": 2.0, "volume_ratio": 1.1}},
    ]
    by_size = size_breakdown(rows, ["A"])
    assert by_size["A"]["small"] == {"cases": 2, "dice_mean": pytest.approx(0.3)}
    assert by_size["A"]["large"] == {"cases": 1, "dice_mean": pytest.approx(0.8)}
    assert "| A | 0.300 (2) | 0.800 (1) |" in format_size_table(by_size)
    empty = size_breakdown(rows[:1], ["A"])
    assert empty["A"]["large"]["cases"] == 0 and math.isnan(empty["A"]["large"]["dice_mean"])
    table = format_table({"A": {"cases": 3, "dice_mean": 0.5, "dice_std": 0.1, "hd95_mm_median": 6.0,
                                "volume_ratio_median": 0.5}})
    assert "| A | 3 | 0.500 ± 0.100 | 6.0 | 0.50 |" in table


@pytest.mark.slow
def test_evaluate_command_on_a_labelled_study(small_study, tmp_path):
    out = tmp_path / "eval.json"
    result = run_evaluation([small_study], out=out, echo=False)
    (case,) = result["cases"]
    assert case["truth_cc"] > 0
    for method in ("SIM-Mamba", "SUV40"):
        assert 0.0 <= case[method]["dice"] <= 1.0
        assert result["summary"][method]["cases"] == 1
        assert result["summary"][method]["dice_mean"] == pytest.approx(case[method]["dice"])
    saved = json.loads(out.read_text())
    assert saved["by_size"].keys() == {"SIM-Mamba", "SUV40"} and "IGTV <" in saved["table"]
    # the post-processing given is the one applied (here: keep no lesion), with the threshold given
    from pipeline.settings import ProcessSettings

    none_kept = run_evaluation([small_study], baselines=False, echo=False, threshold=0.4,
                               settings=ProcessSettings(keep_components=0))
    assert none_kept["cases"][0]["SIM-Mamba"]["dice"] == 0.0 and none_kept["thresholds"]["SIM-Mamba"] == 0.4


def test_a_threshold_outside_zero_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        run_evaluation([tmp_path], threshold=50, echo=False)


def test_error_analysis_reports_gtv_overlap_envelope_and_the_model_grid_ceilings(small_study):
    from benchmarks.error_analysis import analyse_case
    from model.predict import Predictor
    from pipeline.training import find_studies

    (ref,) = find_studies([small_study])
    row = analyse_case(ref, Predictor.load())
    assert row["igtv_cc"] > row["gtv_cc"] > 0  # a breathing study: the envelope is larger
    assert row["dice"] > 0.5 and 0 < row["dice_vs_gtv"] < 1 and row["max_prob_in_igtv"] > 0.5
    # the envelope is the IGTV outside the GTV; finding it too can only raise the Dice
    assert row["envelope_share"] == pytest.approx(1 - row["gtv_cc"] / row["igtv_cc"], abs=0.01)
    assert 0 <= row["found_envelope"] <= 1 and 0.5 < row["found_gtv"] <= 1
    assert row["dice"] <= row["dice_if_envelope_found"] <= 1
    # the small study's CT pixels are coarser than the 2 mm model grid: both label kinds come
    # back whole (tests/pipeline/test_stacks.py compares them on a ~1 mm CT)
    assert row["ceiling_majority"] == pytest.approx(1.0) and row["ceiling_area"] == pytest.approx(1.0)


def _threshold_rows(best_of, n=24, seed=0):
    """Studies whose Dice peaks (at 0.9) at the threshold ``best_of(amplitude)`` and falls 0.5 per unit away."""
    from benchmarks.amplitude_threshold import THRESHOLDS

    rng = np.random.default_rng(seed)
    rows = []
    for amplitude in rng.uniform(0, 20, n):
        curve = 0.9 - 0.5 * np.abs(THRESHOLDS - best_of(amplitude))
        rows.append({"study": "x", "amplitude_mm": float(amplitude), "igtv_cc": 1.0, "dice": curve.tolist()})
    return rows


def test_amplitude_threshold_rule_finds_a_real_dependence_and_gains_nothing_without_one():
    from benchmarks.amplitude_threshold import summarise

    follows = summarise(_threshold_rows(lambda a: 0.5 - 0.02 * (a - 8)))
    assert follows["rule_in_sample"]["slope"] == pytest.approx(-0.02)
    assert follows["paired_gain"] > 0.05 and follows["rule_leave_one_out"] > follows["default"]
    assert follows["rule_leave_one_out"] <= follows["per_study_best"] <= 0.9

    rng = np.random.default_rng(1)
    unrelated = summarise(_threshold_rows(lambda a: 0.5 + rng.choice([-0.2, 0.2])))
    # the rule can only fit noise here: what it finds in sample does not hold out of it
    assert abs(unrelated["paired_gain"]) < 0.01 < follows["paired_gain"]
    assert unrelated["rule_in_sample"]["dice"] >= unrelated["rule_leave_one_out"]


def test_amplitude_threshold_scores_the_nodes_outline_at_every_threshold(small_study):
    from benchmarks.amplitude_threshold import DEFAULT_COLUMN, THRESHOLDS, study_curves

    (row,) = study_curves([small_study], None)
    curve = row["dice"]
    assert len(curve) == len(THRESHOLDS) and all(0 <= d <= 1 for d in curve)
    node = run_evaluation([small_study], baselines=False, echo=False)["cases"][0]["SIM-Mamba"]["dice"]
    assert curve[DEFAULT_COLUMN] == pytest.approx(node)
    assert row["igtv_cc"] > 0 and len(set(np.round(curve, 6))) > 1  # the threshold changes the outline
