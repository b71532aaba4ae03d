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
