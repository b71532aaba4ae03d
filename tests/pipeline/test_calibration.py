"""Calibration: every candidate threshold scored with the node's post-processing, the best one chosen."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.calibration import Calibration, calibrate
from pipeline.errors import LabelError
from pipeline.evaluation import run_evaluation


def test_choice_is_the_best_mean_with_ties_nearest_one_half():
    dice = np.array([[0.2, 0.6, 0.6, 0.1], [0.4, 0.8, 0.8, 0.0]])
    cal = Calibration([0.2, 0.4, 0.6, 0.8], dice, np.array([0.5, 10.0]), ["1.2.3", "1.2.4"])
    assert cal.chosen == 0.4  # 0.4 and 0.6 tie, equally near 0.5: the lower one, deterministically
    table = cal.table()
    assert "| 0.4 (chosen) | 0.700 | 0.600 | 0.800 | 0 |" in table
    assert "| 0.8 | 0.050 | 0.100 | 0.000 | 1 |" in table
    record = cal.record()
    assert record["studies"] == 2 and record["candidates"] == {"0.2": 0.3, "0.4": 0.7, "0.6": 0.7, "0.8": 0.05}
    far = Calibration([0.3, 0.7], np.array([[0.5, 0.5]]), np.array([1.0]), ["1.2.3"])
    assert far.chosen == 0.3  # 0.5 - 0.3 and 0.7 - 0.5 differ in floating point; still a tie


def test_bad_candidates_and_unlabelled_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        calibrate([tmp_path], candidates=[0.5, 1.0])
    with pytest.raises(LabelError, match="no labelled study"):
        calibrate([tmp_path], candidates=[0.5])


@pytest.mark.slow
def test_calibration_scores_agree_with_evaluate(small_study):
    cal = calibrate([small_study], candidates=[0.97, 0.5, 0.3], echo=False)
    assert cal.thresholds == [0.3, 0.5, 0.97] and cal.dice.shape == (1, 3)
    assert cal.record()["delineation_threshold"] == 0.5  # the node's default outline, recorded with the choice
    assert cal.record()["postprocessing"] == {"keep_components": 1, "lesion_order": "volume",
                                              "min_component_cc": 0.1, "test_time_flips": "none"}
    for j, threshold in enumerate(cal.thresholds):
        evaluated = run_evaluation([small_study], baselines=False, threshold=threshold, echo=False)
        assert cal.dice[0, j] == pytest.approx(evaluated["cases"][0]["SIM-Mamba"]["dice"])
    assert cal.mean[cal.thresholds.index(cal.chosen)] == cal.dice[0].max()
    assert cal.dice[0, 1] > 0.5  # the shipped model finds this study's tumour
