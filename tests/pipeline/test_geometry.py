"""PET onto the CT grid: geometry-only resampling, registration, coverage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline import geometry, reader, suv
from pipeline.errors import CoverageError
from pipeline.volume import SeriesVolume
from tests.pipeline.conftest import (
    BQML_PER_SUV,
    CT_GRID,
    FFS,
    HFP,
    PET_GRID,
    TUMOUR_CENTRE,
    StudyIds,
    centred_grid,
    phantom_suv,
    write_ct,
    write_pet,
)

#: Points well inside homogeneous regions (lung, soft tissue, heart).
KNOWN_POINTS = {
    "right lung": (-68.0, -5.0, 5.0),
    "left lung": (75.0, 20.0, -40.0),
    "body": (0.0, -80.0, 0.0),
    "heart": (-15.0, -35.0, -25.0),
}


def load(files: list[Path]) -> SeriesVolume:
    return reader.load_volume(reader.scan_files(files).series[0])


def pet_value_at(image: sitk.Image, point: tuple[float, float, float]) -> float:
    index = image.TransformPhysicalPointToIndex(point)
    return float(image[index])


def hot_spot_centroid(image: sitk.Image, background: float = 1.0) -> np.ndarray:
    """Uptake-weighted centroid (LPS mm) of SUV above ``background`` near the tumour."""
    arr = sitk.GetArrayFromImage(image).astype(np.float64)
    nx, ny, nz = image.GetSize()
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    idx = np.stack([i, j, k], axis=-1).astype(float) * np.asarray(image.GetSpacing())
    points = idx @ np.asarray(image.GetDirection()).reshape(3, 3).T + np.asarray(image.GetOrigin())
    near = np.linalg.norm(points - TUMOUR_CENTRE, axis=-1) < 30.0
    weight = np.clip(arr - background, 0.0, None) * near
    return (points * weight[..., None]).sum(axis=(0, 1, 2)) / weight.sum()


def check_known_points(pet_on_ct: sitk.Image, tolerance_mm: float = 0.5) -> None:
    """SUV at known points equals the phantom's; the tumour's hot spot is where the phantom puts it."""
    for name, point in KNOWN_POINTS.items():
        truth = float(phantom_suv(np.asarray(point)[None])[0])
        assert pet_value_at(pet_on_ct, point) == pytest.approx(truth, rel=0.02), name
    assert np.linalg.norm(hot_spot_centroid(pet_on_ct) - TUMOUR_CENTRE) < tolerance_mm
    peak = pet_value_at(pet_on_ct, tuple(TUMOUR_CENTRE))
    assert 0.8 * 7.3 < peak <= 7.3 + 0.01


def make_pair(root: Path, ct_grid=CT_GRID, pet_grid=PET_GRID, pet_shift=(0.0, 0.0, 0.0), same_frame=True):
    ids = StudyIds()
    ct = load(write_ct(root / "CT", ct_grid, ids))
    pet_ids = ids if same_frame else StudyIds(patient_id=ids.patient_id, study_uid=ids.study_uid)
    values = phantom_suv(pet_grid.points() - np.asarray(pet_shift)) * BQML_PER_SUV
    pet = suv.to_suv(load(write_pet(root / "PT", pet_grid, pet_ids, values=values)))
    return ct, pet


def test_same_frame_resamples_by_geometry(tmp_path):
    ct, pet = make_pair(tmp_path)
    out, info = geometry.pet_onto_ct(pet, ct)
    assert not info.registered and info.method == "geometry" and info.coverage == 1.0
    assert out.GetSize() == ct.image.GetSize() and out.GetOrigin() == ct.image.GetOrigin()
    assert out.GetPixelID() == sitk.sitkFloat32
    check_known_points(out)


def test_finer_pet_slices_and_feet_first_ct(tmp_path):
    ct_grid = centred_grid(CT_GRID.size, CT_GRID.spacing, iop=FFS)
    pet_grid = centred_grid((64, 48, 75), (5.0, 5.0, 3.27), iop=HFP)
    ct, pet = make_pair(tmp_path, ct_grid=ct_grid, pet_grid=pet_grid)
    out, _ = geometry.pet_onto_ct(pet, ct)
    check_known_points(out)


def test_resample_to_reference_identity_is_exact():
    image = sitk.GetImageFromArray(np.arange(60, dtype=np.float32).reshape(3, 4, 5))
    image.SetOrigin((1.0, 2.0, 3.0))
    out = geometry.resample_to_reference(image, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(image))
    nearest = geometry.resample_to_reference(image, image, sitk.TranslationTransform(3, (1.0, 0.0, 0.0)),
                                             sitk.sitkNearestNeighbor, default=-1.0)
    arr = sitk.GetArrayFromImage(nearest)
    np.testing.assert_array_equal(arr[:, :, :-1], sitk.GetArrayFromImage(image)[:, :, 1:])
    assert np.all(arr[:, :, -1] == -1.0)


def test_different_frame_registers_known_offset(tmp_path):
    shift = (9.0, -13.0, 17.0)
    ct, pet = make_pair(tmp_path, pet_shift=shift, same_frame=False)
    out, info = geometry.pet_onto_ct(pet, ct)
    assert info.registered and "FrameOfReferenceUIDs differ" in info.reason
    assert np.linalg.norm(np.asarray(info.translation_mm) - shift) < 2.0
    assert max(abs(a) for a in info.rotation_deg) < 1.0
    check_known_points(out, tolerance_mm=2.0)

    unregistered, plain = geometry.pet_onto_ct(pet, ct, register="never")
    assert not plain.registered and "disabled" in plain.reason
    assert np.linalg.norm(hot_spot_centroid(unregistered) - TUMOUR_CENTRE) > 15.0


def test_unknown_mode_and_no_overlap(tmp_path):
    ct, pet = make_pair(tmp_path)
    with pytest.raises(ValueError):
        geometry.pet_onto_ct(pet, ct, register="sometimes")
    far = sitk.Image(pet.image)
    far.SetOrigin(tuple(np.asarray(far.GetOrigin()) + (0.0, 0.0, 900.0)))
    away = SeriesVolume(far, "PT", pet.series_instance_uid, pet.frame_of_reference_uid,
                        pet.study_instance_uid, pet.headers, "GML")
    with pytest.raises(CoverageError, match=rf"{pet.series_instance_uid}.*covers only 0%.*{ct.series_instance_uid}"):
        geometry.pet_onto_ct(away, ct)
