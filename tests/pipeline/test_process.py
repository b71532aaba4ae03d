"""The whole worker path on a synthetic study, with an oracle in place of the network.

The oracle returns the truth IGTV on the model grid, so every geometric step
(crop, in-plane resampling, K-slice windows, back-projection, writers) must be
right for the SEG and RTSTRUCT to match the truth on the CT grid.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from model.preprocessing import Preprocessing
from pipeline import geometry, labels, reader, selection, stacks, suv
from pipeline.errors import MissingPetError
from pipeline.process import process_study
from pipeline.settings import ProcessSettings


class OraclePredictor:
    """Predicts the truth: built from the same stack geometry the pipeline uses."""

    version = "oracle-1"
    threshold = 0.5  # the calibrated operating point a checkpoint would carry

    def __init__(self, study_dir: Path, prep: Preprocessing) -> None:
        self.preprocessing = prep
        scan = reader.scan_files(sorted(study_dir.rglob("*.dcm")))
        chosen = selection.select_pet_ct(scan.series)
        ct = reader.load_volume(chosen.ct)
        pet_on_ct, _ = geometry.pet_onto_ct(suv.to_suv(reader.load_volume(chosen.pet)), ct)
        truth = labels.mask_from_seg(pydicom.dcmread(study_dir / "truth" / "seg_igtv.dcm"), ct, "IGTV")
        built = stacks.build_stacks(ct, pet_on_ct, prep)
        self.expected_shape = built.inputs.shape
        self.answer = built.labels_from_ct_grid(truth).astype(np.float32)
        self.truth = truth

    def predict(self, inputs: np.ndarray, batch_size: int = 8, flips: str = "none") -> np.ndarray:
        assert flips == ProcessSettings().test_time_flips, "the pipeline did not pass the settings' flips"
        assert inputs.shape == self.expected_shape, "the pipeline built different stacks"
        assert inputs.dtype == np.float32
        return self.answer


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def oracle_run(small_study, tmp_path_factory):
    prep = Preprocessing(slices=3)
    oracle = OraclePredictor(small_study, prep)
    out = tmp_path_factory.mktemp("results")
    result = process_study(sorted(small_study.rglob("*.dcm")), out, ProcessSettings(), predictor=oracle)
    return oracle, result, out


def test_outputs_are_written_and_described(oracle_run):
    oracle, result, out = oracle_run
    assert [p.name for p in result.outputs] == ["seg.dcm", "rtstruct.dcm", "preview.png", "report.json"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in result.outputs)
    assert any("PT" in line for line in result.found) and any("CT" in line for line in result.found)
    assert any("SEG" in what or "seg" in why.lower() for what, why in result.skipped)
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["version"] == "oracle-1"
    assert report["model"]["lesion_refiner"] is False and report["model"]["lesion_refined"] is False
    assert report["model"]["outline_refiner"] is False and report["model"]["outline_refined"] is False
    assert report["postprocessing"]["threshold"] == 0.5 and report["postprocessing"]["threshold_from"] == "default"
    assert report["postprocessing"]["delineation_threshold"] == 0.5
    assert {"load", "suv", "register", "stacks", "inference", "writers"} <= set(report["timings_s"])


def test_seg_matches_truth_through_the_whole_path(oracle_run, small_study):
    oracle, result, out = oracle_run
    ct_series = selection.select_pet_ct(reader.scan_files(sorted(small_study.rglob("*.dcm"))).series).ct
    ct = reader.load_volume(ct_series)
    seg = pydicom.dcmread(out / "seg.dcm")
    got = labels.mask_from_seg(seg, ct, "IGTV")
    assert dice(got, oracle.truth) > 0.9
    rts = pydicom.dcmread(out / "rtstruct.dcm")
    got_rt = labels.mask_from_rtstruct(rts, ct, ["IGTV"])
    assert dice(got_rt, got) > 0.98
    assert seg.StudyInstanceUID == ct.study_instance_uid == rts.StudyInstanceUID


def test_rerun_replaces_results_with_the_same_uids(oracle_run, small_study, tmp_path):
    oracle, result, out = oracle_run
    again = process_study(sorted(small_study.rglob("*.dcm")), tmp_path, ProcessSettings(), predictor=oracle)
    for a, b in zip(result.dicom_outputs, again.dicom_outputs, strict=True):
        da, db = pydicom.dcmread(a), pydicom.dcmread(b)
        assert (da.SOPInstanceUID, da.SeriesInstanceUID) == (db.SOPInstanceUID, db.SeriesInstanceUID)


def test_threshold_is_the_checkpoints_unless_the_settings_override_it(oracle_run, small_study, tmp_path):
    oracle, _, _ = oracle_run
    unsure = OraclePredictor.__new__(OraclePredictor)
    unsure.__dict__.update(oracle.__dict__, answer=oracle.answer * 0.6, threshold=0.7,
                           metadata={"operating_point": {"threshold": 0.7}})
    files = sorted(small_study.rglob("*.dcm"))
    own = process_study(files, tmp_path / "own", ProcessSettings(), predictor=unsure).report
    assert not own["target_found"]
    assert own["postprocessing"]["threshold"] == 0.7 and own["postprocessing"]["threshold_from"] == "checkpoint"
    forced = process_study(files, tmp_path / "forced", ProcessSettings(threshold=0.5), predictor=unsure).report
    assert forced["target_found"]
    assert forced["postprocessing"]["threshold"] == 0.5 and forced["postprocessing"]["threshold_from"] == "settings"
    assert own["postprocessing"]["differs_from_calibration"] == {}  # calibrated before the record existed


def test_a_threshold_calibrated_under_other_post_processing_is_reported(oracle_run, small_study, tmp_path, caplog):
    oracle, _, _ = oracle_run
    calibrated = OraclePredictor.__new__(OraclePredictor)
    record = {**ProcessSettings().calibration_record(), "lesion_order": "confidence"}
    calibrated.__dict__.update(oracle.__dict__, threshold=0.5, version="oracle-calibrated",
                               metadata={"operating_point": {"threshold": 0.5, "postprocessing": record}})
    files = sorted(small_study.rglob("*.dcm"))
    with caplog.at_level("WARNING", logger="pipeline.process"):
        first = process_study(files, tmp_path / "a", ProcessSettings(), predictor=calibrated).report
        process_study(files, tmp_path / "b", ProcessSettings(), predictor=calibrated)
    assert first["postprocessing"]["differs_from_calibration"] == {
        "lesion_order": {"calibrated": "confidence", "configured": "volume"}}
    warnings = [r.getMessage() for r in caplog.records if "calibrated under other post-processing" in r.getMessage()]
    assert len(warnings) == 1 and "lesion_order 'volume' (calibrated with 'confidence')" in warnings[0]
    same = process_study(files, tmp_path / "c", ProcessSettings(lesion_order="confidence"), predictor=calibrated)
    assert same.report["postprocessing"]["differs_from_calibration"] == {}


def test_ct_only_study_is_refused_with_a_clear_reason(small_study, tmp_path):
    ct_only = tmp_path / "ct-only"
    shutil.copytree(small_study / "CT", ct_only / "CT")
    with pytest.raises(MissingPetError, match="PET"):
        process_study(sorted(ct_only.rglob("*.dcm")), tmp_path / "out", ProcessSettings(), predictor=object())
    assert len(list((ct_only / "CT").iterdir())) > 0  # input kept


class KeepLesionRefiner:
    """A refiner that returns the lesion it is given, as probability 1."""

    def __init__(self) -> None:
        self.lesions: list[np.ndarray] = []

    def refine(self, volume, lesion):
        self.lesions.append(lesion)
        return lesion.astype(np.float32), (slice(None), slice(None), slice(None))


def test_the_checkpoints_refiner_gets_the_kept_lesion_and_the_report_says_so(small_study, tmp_path):
    oracle = OraclePredictor(small_study, Preprocessing(slices=3))
    oracle.refiner = KeepLesionRefiner()
    result = process_study(sorted(small_study.rglob("*.dcm")), tmp_path, ProcessSettings(), predictor=oracle)
    (lesion,) = oracle.refiner.lesions
    assert lesion.any() and lesion.shape == oracle.answer.shape
    assert result.report["model"]["lesion_refiner"] is True and result.report["model"]["lesion_refined"] is True
    assert result.report["lesion_count"] == 1


class IdentityOutline(torch.nn.Module):
    """An outline refiner stand-in that returns its input probability."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.logit(x[:, 2:3].clamp(1e-3, 1 - 1e-3))


def test_the_outline_refiner_is_left_out_for_pixels_it_never_learned_and_the_report_says_so(small_study, tmp_path):
    oracle = OraclePredictor(small_study, Preprocessing(slices=3))
    oracle.outline = IdentityOutline()
    result = process_study(sorted(small_study.rglob("*.dcm")), tmp_path, ProcessSettings(), predictor=oracle)
    assert result.report["lesion_count"] == 1  # the small study's CT has 3.9 mm pixels
    assert result.report["model"]["outline_refiner"] is True and result.report["model"]["outline_refined"] is False
    assert oracle.outline.calls == 0
