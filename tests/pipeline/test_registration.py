"""Rigid PET-to-CT registration on the analytic phantom with known transforms."""

from __future__ import annotations

import json
import math

import numpy as np
import SimpleITK as sitk

from pipeline.registration import RegistrationInfo, box_overlap, register_rigid
from tests.pipeline.conftest import CT_GRID, PET_GRID, Grid, phantom_ct, phantom_suv


def to_image(values: np.ndarray, grid: Grid) -> sitk.Image:
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetOrigin(grid.origin)
    image.SetSpacing(grid.spacing)
    image.SetDirection(tuple(grid.direction.ravel()))
    return image


def moved_pet(transform: sitk.Euler3DTransform, grid: Grid = PET_GRID) -> sitk.Image:
    """PET whose physical point T(p) shows the anatomy at CT point p."""
    inverse = transform.GetInverse()
    matrix = np.asarray(inverse.GetMatrix()).reshape(3, 3)
    centre = np.asarray(inverse.GetCenter())
    translation = np.asarray(inverse.GetTranslation())
    q = grid.points()
    p = (q - centre) @ matrix.T + centre + translation
    return to_image(phantom_suv(p), grid)


def test_recovers_translation_and_rotation():
    ct = to_image(phantom_ct(CT_GRID.points()), CT_GRID)
    truth = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, math.radians(3.0), (-11.0, 7.0, 14.0))
    info = register_rigid(ct, moved_pet(truth))
    # Compare where the two transforms send points spread over the thorax.
    points = [(x, y, z) for x in (-100.0, 100.0) for y in (-60.0, 60.0) for z in (-80.0, 80.0)]
    errors = [np.linalg.norm(np.subtract(info.transform.TransformPoint(p), truth.TransformPoint(p))) for p in points]
    assert max(errors) < 2.0, errors
    assert abs(info.rotation_deg[2] - 3.0) < 0.5
    assert info.registered and info.iterations > 0 and info.seconds > 0
    assert "Step too small" in info.stop_condition or info.iterations > 0


def test_is_deterministic_and_serialisable():
    ct = to_image(phantom_ct(CT_GRID.points()), CT_GRID)
    pet = moved_pet(sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, 0.0, (4.0, -6.0, 8.0)))
    first = register_rigid(ct, pet)
    second = register_rigid(ct, pet)
    np.testing.assert_allclose(first.parameters, second.parameters, rtol=1e-9, atol=1e-12)
    assert first.metric_value is not None
    assert np.isclose(first.metric_value, second.metric_value, rtol=1e-9)
    data = json.loads(json.dumps(first.to_dict()))
    assert data["method"] == "rigid-mattes-mi" and len(data["translation_mm"]) == 3
    assert np.allclose(data["translation_mm"], (4.0, -6.0, 8.0), atol=1.5)


def test_far_apart_fields_of_view_start_from_body_centroids():
    ct = to_image(phantom_ct(CT_GRID.points()), CT_GRID)
    offset = (0.0, 0.0, 400.0)
    pet = moved_pet(sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, 0.0, offset),
                    Grid(PET_GRID.size, PET_GRID.spacing, tuple(np.add(PET_GRID.origin, offset))))
    assert box_overlap(ct, pet) == 0.0
    info = register_rigid(ct, pet)
    assert "centroids" in info.reason
    assert np.linalg.norm(np.subtract(info.translation_mm, offset)) < 2.0


def test_default_record_is_identity():
    info = RegistrationInfo()
    assert info.translation_mm == (0.0, 0.0, 0.0) and info.rotation_deg == (0.0, 0.0, 0.0)
    assert info.to_dict()["registered"] is False
