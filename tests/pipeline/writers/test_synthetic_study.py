"""Writers on the project's synthetic PET/CT study, loaded by the pipeline's own reader."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from PIL import Image

from pipeline import reader
from pipeline.writers.preview import display_geometry, render_preview
from pipeline.writers.rtstruct import write_rtstruct
from pipeline.writers.seg import write_seg
from tests.pipeline.writers.ct_factory import CtSeries
from tests.pipeline.writers.tools import dciodvfy_errors, dice, plastimatch_labelmap


def load_ct_and_truth(study: Path):
    scan = reader.scan_files([study / "CT"])
    (series,) = [s for s in scan.series if s.modality == "CT"]
    ct = reader.load_volume(series)
    truth = hd.seg.segread(study / "truth" / "seg_igtv.dcm")
    pixels = truth.get_pixels_by_source_instance(
        ct.sop_instance_uids, assert_missing_frames_are_empty=True
    )
    return ct, pixels[..., 0] > 0


@pytest.mark.parametrize("feet_first", [False, True])
def test_truth_igtv_round_trips_through_seg_and_rtstruct(
    synthetic_study_factory, info, tmp_path, feet_first
):
    study = synthetic_study_factory(7, motion="breathing", feet_first=feet_first)
    ct, igtv = load_ct_and_truth(study)
    assert igtv.any()

    seg = write_seg(igtv, ct, info)
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    back = hd.seg.segread(seg_path).get_pixels_by_source_instance(
        ct.sop_instance_uids, assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(back[..., 0] > 0, igtv)

    rt_path = tmp_path / "rtstruct.dcm"
    write_rtstruct(igtv, ct, info).save_as(rt_path, enforce_file_format=True)
    spacing = ct.image.GetSpacing()
    series = CtSeries(ct, study / "CT", None, None, None, (spacing[2], spacing[1], spacing[0]))
    labels = plastimatch_labelmap(rt_path, series, tmp_path / "pl", ["IGTV"])
    assert dice(labels == 1, igtv) >= 0.95
    np.testing.assert_array_equal(labels == 1, igtv)

    for path in (seg_path, rt_path):
        errors, output = dciodvfy_errors(path)
        assert errors == [], output


def test_preview_of_the_synthetic_study(small_study, tmp_path):
    ct, igtv = load_ct_and_truth(small_study)
    spacing = ct.image.GetSpacing()
    suv = np.where(igtv, 8.0, 1.0).astype(np.float32)
    path = render_preview(
        ct.array,
        suv,
        igtv,
        (spacing[2], spacing[1], spacing[0]),
        tmp_path / "preview.png",
        title="synthetic study seed 7",
        **display_geometry(ct),
    )
    assert Image.open(path).size[0] > 0
