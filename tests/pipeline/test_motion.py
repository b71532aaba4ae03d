"""The breathing amplitude fitted from a lesion's PET smear, on phantoms whose motion is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.motion import fit_si_amplitude, tumour_at_ct_time
from pipeline.refinement import lesion_amplitude
from pipeline.stacks import Canonical

SPACING = (2.0, 1.0, 1.0)
SHAPE = (60, 36, 36)


def _sphere(centre_z_mm: float, radius_mm: float) -> np.ndarray:
    z, y, x = np.indices(SHAPE, dtype=np.float64)
    z, y, x = z * SPACING[0], y * SPACING[1], x * SPACING[2]
    return (z - centre_z_mm) ** 2 + (y - 18.0) ** 2 + (x - 18.0) ** 2 <= radius_mm ** 2


def _phantom(amplitude_mm: float, ct_inhale_fraction: float, radius_mm: float = 6.0, seed: int = 0):
    """SUV, HU and IGTV of a sphere in lung moving ``amplitude_mm`` feet-wards at inhale.

    The PET averages 50 moments of a cos^4 cycle and is blurred to 6 mm FWHM, with noise;
    the CT shows the sphere at ``ct_inhale_fraction``. Slices run feet to head.
    """
    exhale_z = 70.0
    times = (np.arange(50) + 0.5) / 50
    positions = exhale_z - amplitude_mm * np.cos(np.pi * times) ** 4
    activity = np.mean([_sphere(z, radius_mm) for z in positions], axis=0)
    sigma = [6.0 / 2.355 / s for s in SPACING]
    suv = 0.6 + 8.0 * ndimage.gaussian_filter(activity, sigma)
    suv += np.random.default_rng(seed).normal(0.0, 0.05, SHAPE)
    ct_z = exhale_z - amplitude_mm * ct_inhale_fraction
    hu = np.where(_sphere(ct_z, radius_mm), 40.0, -850.0)
    igtv = np.any([_sphere(z, radius_mm) for z in np.linspace(exhale_z - amplitude_mm, exhale_z, 30)], axis=0)
    return suv.astype(np.float32), hu.astype(np.int16), igtv


@pytest.mark.parametrize(("amplitude", "ct_fraction"), [(0.0, 0.0), (8.0, 0.0), (16.0, 1.0), (24.0, 0.5)])
def test_the_fit_recovers_the_amplitude_of_a_moving_sphere(amplitude, ct_fraction):
    suv, hu, igtv = _phantom(amplitude, ct_fraction)
    fit = fit_si_amplitude(suv, hu, igtv, SPACING)
    assert fit is not None
    assert abs(fit.amplitude_mm - amplitude) <= 2.0, fit
    assert 0.5 < fit.explained <= 1.0
    if amplitude >= 8.0:  # where in the cycle the CT was taken shows only when the sphere moves
        assert abs(fit.ct_inhale_fraction - ct_fraction) <= 0.2, fit


def test_a_moving_and_a_still_sphere_are_told_apart_at_the_same_size():
    still = fit_si_amplitude(*_phantom(0.0, 0.0, seed=1), SPACING)
    moving = fit_si_amplitude(*_phantom(12.0, 0.3, seed=1), SPACING)
    assert still.amplitude_mm <= 2.0 and moving.amplitude_mm >= 10.0


def test_the_tumour_at_ct_time_is_the_soft_tissue_of_the_lesion():
    hu = np.full((3, 4, 4), -850, np.int16)
    hu[1, 1:3, 1:3] = 30
    hu[0, 0, 0] = 30  # tissue outside the lesion
    lesion = np.zeros(hu.shape, bool)
    lesion[:, 1:4, 1:4] = True
    assert np.array_equal(tumour_at_ct_time(hu, lesion), (hu > -400) & lesion)
    assert tumour_at_ct_time(hu, lesion).sum() == 4


def test_nothing_is_fitted_without_soft_tissue_in_the_lesion():
    suv, hu, igtv = _phantom(10.0, 0.0)
    assert fit_si_amplitude(suv, np.full_like(hu, -850), igtv, SPACING) is None
    assert fit_si_amplitude(suv, hu, np.zeros_like(igtv), SPACING) is None


def test_the_node_fits_the_same_amplitude_in_any_stored_orientation():
    suv, hu, igtv = _phantom(14.0, 0.2, seed=2)
    canonical = Canonical(transpose=False, flip_y=False, flip_x=False, z_superior=True)
    expected = lesion_amplitude(hu, suv, igtv, canonical, SPACING)
    # stored head-first and with rows and columns swapped: the canonical view undoes both
    stored = Canonical(transpose=True, flip_y=False, flip_x=False, z_superior=False)
    as_stored = [np.ascontiguousarray(a[::-1].transpose(0, 2, 1)) for a in (hu, suv, igtv)]
    assert lesion_amplitude(*as_stored, stored, SPACING) == expected
    assert abs(expected.amplitude_mm - 14.0) <= 2.0
