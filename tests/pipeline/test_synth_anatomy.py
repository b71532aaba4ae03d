"""Building blocks of the synthetic generator: anatomy, breathing trace, tumour shapes, grids."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.synth import anatomy as A
from pipeline.synth.breathing import BreathingTrace
from pipeline.synth.grid import Grid
from pipeline.synth.tumour import TumourShape, sample_shape


@pytest.fixture(scope="module")
def model() -> A.ThoraxModel:
    rng = np.random.default_rng(3)
    return A.ThoraxModel(A.sample_anatomy(rng, 80.0, (5.0, -10.0, -300.0), lymph_nodes=True))


def _axes(model, step=4.0):
    c = model.p.centre
    return (c[0] + np.arange(-200, 200, step), c[1] + np.arange(-150, 150, step), c[2] + np.arange(-120, 220, step))


def test_fast_lung_masks_equal_full_rasterisation(model):
    x, y, z = _axes(model)
    shifts = [0.0, -7.5, -22.0]
    fast = model.lung_masks(x, y, z, shifts)
    for i, s in enumerate(shifts):
        np.testing.assert_array_equal(fast[i], model.lung_mask(x, y, z, s))


def test_inhale_lowers_the_diaphragm_and_grows_the_lungs(model):
    x, y, z = _axes(model)
    exhale = model.lung_mask(x, y, z, 0.0)
    inhale = model.lung_mask(x, y, z, -20.0)
    assert inhale.sum() > exhale.sum() * 1.03
    lowest = lambda m: z[np.nonzero(m.any(axis=(1, 2)))[0]].min()  # noqa: E731
    assert lowest(inhale) < lowest(exhale) - 10
    labels = model.labels(x, y, z, 0.0)
    # the liver sits below the lungs on the right, the heart between the lungs
    zl = np.nonzero((labels == A.LIVER).any(axis=(1, 2)))[0]
    zlung = np.nonzero((labels == A.LUNG).any(axis=(1, 2)))[0]
    assert z[zl].min() < z[zlung].min() and z[zl].max() < z[zlung].max()
    heart_x = x[np.nonzero((labels == A.MYOCARDIUM).any(axis=(0, 1)))[0]].mean()
    assert abs(heart_x - model.p.centre[0]) < 60


def test_breathing_trace_spends_most_time_near_exhale():
    trace = BreathingTrace(4.0, 2, 0.05, 0.3)
    s = trace.inhale_fraction(trace.pet_times(200))
    assert s.min() >= 0 and s.max() <= 1
    assert np.mean(s < 0.5) > 0.55
    d = trace.displacement(np.array([1.0, -3.0, -15.0]), np.array([0.0, 0.5]))
    np.testing.assert_allclose(d[0, 2], -15.0)
    np.testing.assert_allclose(d[1], 0.0, atol=0.01)  # hysteresis leaves a trace of AP/LR
    times = trace.envelope_times(15.0, step_mm=1.0)
    positions = np.sort(trace.inhale_fraction(times) * 15.0)
    assert np.diff(positions).max() <= 1.0 + 1e-9


@pytest.mark.parametrize("diameter", [8.0, 30.0, 55.0])
def test_tumour_shape_matches_requested_diameter(diameter):
    rng = np.random.default_rng(int(diameter))
    geo = sample_shape(rng, diameter)
    t = TumourShape(np.zeros(3), "RUL", diameter, suv_peak=8, suv_floor=3, necrosis=0.3,
                    amplitude_lps=np.zeros(3), texture=np.zeros((0, 4)), **geo)
    step = diameter / 40
    g = np.arange(-1.6 * diameter, 1.6 * diameter, step, dtype=np.float32)
    inside = t.inside(g[None, None, :], g[None, :, None], g[:, None, None], (0, 0, 0))
    d_eq = (6 * inside.sum() * step**3 / np.pi) ** (1 / 3)
    assert d_eq == pytest.approx(diameter, rel=0.06)
    pts = np.argwhere(inside) * step - 1.6 * diameter
    assert np.linalg.norm(pts, axis=1).max() <= t.radius_bound_mm
    uptake = t.uptake(g[None, None, :], g[None, :, None], g[:, None, None], (0, 0, 0))[inside]
    assert uptake.min() >= 0.9 - 1e-6 and uptake.max() <= 8.0 + 1e-6
    assert (uptake < 1.0).any()  # necrotic core


def test_grid_axes_and_boxes_follow_direction():
    hfs = Grid((4, 3, 5), (10.0, 20.0, -30.0), (2.0, 3.0, 2.5))
    ffs = Grid((4, 3, 5), (18.0, 20.0, -22.5), (2.0, 3.0, 2.5), (-1, 1, -1))
    for a, b in zip(hfs.axes(), ffs.axes(), strict=True):
        np.testing.assert_allclose(np.sort(a), np.sort(b))
    assert ffs.image_orientation == [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    box = ffs.box(np.array([11.0, 20.0, -30.0]), np.array([15.0, 23.0, -27.0]))
    x, y, z = ffs.axes()
    assert all(11 <= v <= 15 for v in x[box[2]]) and all(-30 <= v <= -27 for v in z[box[0]])
