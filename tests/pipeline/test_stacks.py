"""2.5D stacks: crop, resampling, normalisation, neighbours, and the way back."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from model import metrics
from model.preprocessing import Preprocessing
from pipeline.stacks import AxisMap, build_stacks
from pipeline.volume import SeriesVolume
from tests.pipeline.conftest import (
    FFS,
    HFP,
    TUMOUR_CENTRE,
    Grid,
    centred_grid,
    phantom_ct,
    phantom_suv,
)

PREP = Preprocessing(slices=5, pixel_spacing_mm=2.0, size_multiple=16, lung_margin_mm=20.0)


def volume_on(grid: Grid) -> tuple[SeriesVolume, sitk.Image]:
    """CT volume of the phantom and the PET SUV already on its grid."""
    points = grid.points()

    def image(values: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(values.astype(np.float32))
        img.SetOrigin(grid.origin)
        img.SetSpacing(grid.spacing)
        img.SetDirection(tuple(grid.direction.ravel()))
        return img

    ct = SeriesVolume(image(phantom_ct(points)), "CT", "1.2.3", "1.2.4", "1.2.5")
    return ct, image(phantom_suv(points))


#: ~1 mm CT pixels (ratio 2.04 to the model grid); z from -128.5 to -11.5 mm, so the lungs
#: (z -105..115 mm) reach the top slice and end 23.5 mm above the bottom one.
GRID = centred_grid((330, 250, 40), (0.98, 0.98, 3.0), shift=(0.0, 0.0, -70.0))
LESION = np.array([60.0, -15.0, -50.0])


@pytest.fixture(scope="module")
def stackset():
    ct, pet = volume_on(GRID)
    return build_stacks(ct, pet, PREP), ct, pet


def test_shapes_channels_and_normalisation(stackset):
    s, ct, pet = stackset
    n, channels, k, h, w = s.inputs.shape
    assert (channels, k) == (2, 5) and h % 16 == 0 and w % 16 == 0
    assert n == len(s.slice_indices) and s.inputs.dtype == np.float32
    assert s.ymap.ratio == pytest.approx(2.0 / 0.98)
    # Centre plane of each stack is the centre slice, resampled by area: compare with a direct computation.
    hu = sitk.GetArrayFromImage(ct.image)
    suv = sitk.GetArrayFromImage(pet)
    ay, ax = s.ymap.area(), s.xmap.area()
    for i in (0, n // 2, n - 1):
        z = s.slice_indices[i]
        missing = 1.0 - np.outer(ay.sum(1), ax.sum(1))
        expect_ct = PREP.normalise_ct(ay @ hu[z] @ ax.T - 1000.0 * missing)
        expect_pet = PREP.normalise_pet(ay @ suv[z] @ ax.T)
        np.testing.assert_allclose(s.inputs[i, 1, 2], expect_ct, atol=1e-5)
        np.testing.assert_allclose(s.inputs[i, 0, 2], expect_pet, atol=1e-5)
    assert s.inputs[:, 1].min() >= -1.0 and s.inputs[:, 1].max() <= 1.0
    assert s.inputs[:, 0].min() >= 0.0


def test_neighbours_are_adjacent_ct_slices_with_edges_replicated(stackset):
    s, _ct, _pet = stackset
    planes = s.to_model_grid(sitk.GetArrayFromImage(_ct.image))
    assert s.slice_indices[-1] == GRID.size[2] - 1  # lungs reach the top: edge replication is exercised
    by_z = {int(z): p for z, p in zip(s.slice_indices, planes, strict=True)}
    for i, centre in enumerate(s.slice_indices):
        for k, d in enumerate(range(-2, 3)):
            z = int(np.clip(centre + d, 0, GRID.size[2] - 1))
            if z in by_z:
                np.testing.assert_allclose(s.inputs[i, 1, k], PREP.normalise_ct(by_z[z]), atol=1e-5)


@pytest.mark.parametrize("iop", [GRID.iop, FFS], ids=["HFS", "FFS"])
def test_slice_step_takes_every_other_ct_slice(iop):
    grid = centred_grid(GRID.size, GRID.spacing, iop, shift=(0.0, 0.0, -70.0))
    ct, pet = volume_on(grid)
    stepped = build_stacks(ct, pet, Preprocessing(slices=5, slice_step=2))
    plain = build_stacks(ct, pet, PREP)
    assert stepped.inputs.shape == plain.inputs.shape
    np.testing.assert_array_equal(stepped.slice_indices, plain.slice_indices)
    by_z = {int(z): i for i, z in enumerate(plain.slice_indices)}
    last = grid.size[2] - 1
    offsets = range(-4, 5, 2) if stepped.canonical.z_superior else range(4, -5, -2)  # inferior to superior
    checked = 0
    for i, centre in enumerate(stepped.slice_indices):
        for k, d in enumerate(offsets):
            z = int(np.clip(centre + d, 0, last))
            if z in by_z:  # the same CT slice as centre of the plain stacks
                np.testing.assert_array_equal(stepped.inputs[i, :, k], plain.inputs[by_z[z], :, 2])
                checked += 1
    assert checked > 4 * len(stepped)
    np.testing.assert_array_equal(stepped.inputs[:, :, 2], plain.inputs[:, :, 2])


def test_crop_keeps_the_lungs_and_drops_slices_without_lung(stackset):
    s, ct, _pet = stackset
    z0, z1, y0, y1, x0, x1 = s.crop
    assert s.crop_reason == "lung field"
    lungs = sitk.GetArrayFromImage(ct.image) == -830.0  # the phantom's lung HU
    zz, yy, xx = np.nonzero(lungs)
    assert z0 <= zz.min() and zz.max() <= z1 and y0 <= yy.min() and yy.max() <= y1
    assert x0 <= xx.min() and xx.max() <= x1
    # Lungs end at z=-105 mm; with the 20 mm margin the crop starts between -125 and -105 mm.
    z_first = GRID.origin[2] + GRID.spacing[2] * z0
    assert -125.0 - GRID.spacing[2] <= z_first <= -105.0 and z0 > 0
    assert z1 == GRID.size[2] - 1
    assert s.slice_indices.tolist() == list(range(z0, z1 + 1))


def test_model_grid_mask_round_trip_is_exact(stackset):
    s, _ct, _pet = stackset
    rng = np.random.default_rng(0)
    mask = (rng.random((len(s), *s.shape_hw)) > 0.6).astype(np.uint8)
    back = s.to_ct_grid(mask.astype(np.float32), order=0) >= 0.5
    np.testing.assert_array_equal(s.labels_from_ct_grid(back), mask)


def test_ct_grid_mask_round_trip_keeps_shape_and_position(stackset):
    s, _ct, _pet = stackset
    points = GRID.points()
    for radius in (15.0, 25.0):
        truth = np.linalg.norm(points - LESION, axis=-1) <= radius
        back = s.to_ct_grid(s.labels_from_ct_grid(truth).astype(np.float32)) >= 0.5
        dice = 2.0 * (back & truth).sum() / (back.sum() + truth.sum())
        assert dice > (0.96 if radius < 20 else 0.97)
        shift = (np.subtract(ndimage.center_of_mass(back), ndimage.center_of_mass(truth)) * (3.0, 0.98, 0.98))
        assert np.abs(shift).max() < 0.3


def test_area_labels_recover_small_targets_better_than_majority_labels(stackset):
    # The training targets of `igtv-node train --labels area`: a network that reproduces the
    # area fractions gives back, through bilinear upsampling and >= 0.5, a small target far
    # closer to the truth than one that reproduces 0/1 majority labels.
    s, _ct, _pet = stackset
    points = GRID.points()
    for radius in (4.0, 6.0, 9.0):
        truth = np.linalg.norm(points - LESION, axis=-1) <= radius
        area = s.to_model_grid(truth.astype(np.float32))
        assert 0.0 <= area.min() and area.max() <= 1.0
        assert 0.0 < area[(area > 0) & (area < 1)].size  # fractional boundary pixels
        # area fractions keep the target's volume (model pixel 2x2 mm, CT slices 3 mm)
        assert area.sum() * 4.0 == pytest.approx(truth.sum() * 0.98 * 0.98, rel=1e-3)
        soft = metrics.dice(s.to_ct_grid(area) >= 0.5, truth)
        hard = metrics.dice(s.to_ct_grid(s.labels_from_ct_grid(truth).astype(np.float32)) >= 0.5, truth)
        assert soft > 0.93 and soft > hard + 0.02, (radius, soft, hard)


def test_to_ct_grid_places_each_stack_on_its_slice_and_zeroes_the_rest(stackset):
    s, _ct, _pet = stackset
    probs = np.zeros((len(s), *s.shape_hw), np.float32)
    probs[3] = 1.0
    out = s.to_ct_grid(probs)
    assert out.shape == tuple(reversed(GRID.size)) and out.dtype == np.float32
    nonzero = np.nonzero(out.any(axis=(1, 2)))[0]
    assert nonzero.tolist() == [s.slice_indices[3]]
    z0, z1, y0, y1, x0, x1 = s.crop
    plane = out[s.slice_indices[3]]
    assert plane[y0 : y1 + 1, x0 : x1 + 1].min() == 1.0  # the whole crop is covered
    footprint = s.ymap.owner()[:, None] >= 0
    footprint = footprint & (s.xmap.owner()[None, :] >= 0)
    assert np.all(plane[~footprint] == 0) and np.all(plane[footprint] == 1.0)
    with pytest.raises(ValueError):
        s.to_ct_grid(probs[:, :-1])


@pytest.mark.parametrize("iop", [FFS, HFP], ids=["feet-first", "prone"])
def test_orientations_give_the_same_model_input(iop):
    grid = centred_grid((160, 120, 20), (2.0, 2.0, 5.0))
    flipped = centred_grid(grid.size, grid.spacing, iop=iop)
    ref = build_stacks(*volume_on(grid), PREP)
    other = build_stacks(*volume_on(flipped), PREP)
    order = slice(None, None, -1) if flipped.direction[2, 2] < 0 else slice(None)
    np.testing.assert_allclose(other.inputs[order], ref.inputs, atol=1e-5)
    # and back: a prediction lands on the same anatomy.
    points = grid.points()
    truth = np.linalg.norm(points - TUMOUR_CENTRE, axis=-1) <= 14.0
    probs = ref.labels_from_ct_grid(truth).astype(np.float32)
    back = other.to_ct_grid(probs[order]) >= 0.5
    expected = np.linalg.norm(flipped.points() - TUMOUR_CENTRE, axis=-1) <= 14.0
    assert 2.0 * (back & expected).sum() / (back.sum() + expected.sum()) > 0.95


def test_axis_map_geometry():
    m = AxisMap.centred(10, 109, 200, 1.0, 2.0, 16)
    assert m.n_model == 64 and m.ratio == 2.0
    assert m.start == pytest.approx(9.5 + (100 - 128) / 2.0)
    np.testing.assert_allclose(m.area().sum(axis=0)[20:100], 0.5)  # each CT pixel is half a model pixel
    np.testing.assert_allclose(m.linear_back().sum(axis=1)[m.owner() >= 0], 1.0)
    members = m.members().sum(axis=1)
    assert members[:2].tolist() == [0, 0] and (members[2:] == 2).all()  # first two lie outside the image


def test_mismatched_pet_grid_is_refused():
    ct, _pet = volume_on(centred_grid((40, 30, 10), (4.0, 4.0, 5.0)))
    with pytest.raises(ValueError, match="resample first"):
        build_stacks(ct, sitk.Image(10, 10, 10, sitk.sitkFloat32), PREP)


def test_crop_falls_back_to_body_then_whole_image():
    grid = centred_grid((64, 48, 8), (5.0, 5.0, 5.0))
    ct, pet = volume_on(grid)
    points = grid.points()
    water = np.where(np.hypot(points[..., 0] / 120.0, points[..., 1] / 90.0) <= 1.0, 0.0, -1000.0)
    no_lungs = SeriesVolume(sitk.GetImageFromArray(water.astype(np.float32)), "CT", "1.2", "1.3", "1.4")
    no_lungs.image.CopyInformation(ct.image)
    s = build_stacks(no_lungs, pet, PREP)
    assert s.crop_reason == "body (no lungs found)" and len(s) == grid.size[2]
    air = SeriesVolume(sitk.GetImageFromArray(np.full(water.shape, -1000.0, np.float32)), "CT", "1.2", "1.3", "1.4")
    air.image.CopyInformation(ct.image)
    s = build_stacks(air, pet, PREP)
    assert s.crop_reason == "whole image (no body found)" and s.crop == (0, 7, 0, 47, 0, 63)
