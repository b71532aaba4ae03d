"""The pipeline's own reader, series selection and SUV conversion reproduce the generator's truth."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.reader import load_volume, read_study
from pipeline.selection import select_pet_ct
from pipeline.suv import to_suv


@pytest.mark.parametrize("variant", [{}, {"feet_first": True, "compress": "jpeg2000", "pet_offset_mm": (5.0, -4.0, 9.0)}])
def test_pipeline_reads_synthetic_study(synthetic_study_factory, synthetic_study_object_factory, variant):
    folder = synthetic_study_factory(5, **variant)
    study = synthetic_study_object_factory(5, **variant)
    selection = select_pet_ct(read_study([folder]).series)
    ct = load_volume(selection.ct)
    pet = to_suv(load_volume(selection.pet))
    np.testing.assert_array_equal(ct.array, study.ct_hu)
    assert ct.image.GetDirection() == pytest.approx(study.ct_direction)
    assert ct.image.GetOrigin() == pytest.approx(study.ct_origin, abs=1e-3)
    assert pet.image.GetOrigin() == pytest.approx(study.pet_origin, abs=1e-3)
    body = study.pet_suv > 0.2
    assert np.abs(pet.array[body] - study.pet_suv[body]).max() <= 0.01 * study.pet_suv[body].max()
    same_frame = ct.frame_of_reference_uid == pet.frame_of_reference_uid
    assert same_frame == (not any(variant.get("pet_offset_mm", (0, 0, 0))))


def test_rtstruct_truth_matches_the_seg_truth(small_study):
    """The RTSTRUCT truth rasterises back onto the CT grid as the SEG truth (both GTV and IGTV)."""
    import subprocess

    import pydicom

    from pipeline import labels, reader, selection

    scan = reader.scan_files(sorted(small_study.rglob("*.dcm")))
    ct = reader.load_volume(selection.select_pet_ct(scan.series).ct)
    for name in ("GTV", "IGTV"):
        rts_path = small_study / "truth" / f"rtstruct_{name.lower()}.dcm"
        from_rt = labels.mask_from_rtstruct(pydicom.dcmread(rts_path), ct, [name])
        from_seg = labels.mask_from_seg(pydicom.dcmread(small_study / "truth" / f"seg_{name.lower()}.dcm"), ct, name)
        assert from_seg.sum() > 0
        assert np.array_equal(from_rt, from_seg), name
        out = subprocess.run(["dciodvfy", str(rts_path)], capture_output=True, text=True)
        assert "Error" not in out.stdout + out.stderr, out.stderr
