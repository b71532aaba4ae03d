"""PET evidence for the breathing envelope: a moving ball whose PET is its time average."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from model.metrics import dice
from pipeline.envelope import FRACTIONS, envelope_evidence, pet_rule_dice

SPACING = (2.0, 1.0, 1.0)
SHAPE = (40, 60, 60)


def _ball(centre_mm, radius_mm):
    zz, yy, xx = np.indices(SHAPE).astype(float)
    z, y, x = zz * SPACING[0], yy * SPACING[1], xx * SPACING[2]
    return (z - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (x - centre_mm[2]) ** 2 <= radius_mm**2


def _moving_tumour(amplitude_mm, uptake, noise_sd=0.0, seed=0):
    """GTV at the top of its path, IGTV over the path, PET = background + time-averaged uptake."""
    centre = np.array([30.0, 30.0, 30.0])
    offsets = np.linspace(0.0, amplitude_mm, 11)
    gtv = _ball(centre, 6.0)
    truth = np.zeros(SHAPE, dtype=bool)
    activity = np.zeros(SHAPE, dtype=np.float32)
    for dz in offsets:
        ball = _ball(centre + [dz, 0.0, 0.0], 6.0)
        truth |= ball
        activity += ball / len(offsets)
    suv = 0.5 + uptake * ndimage.gaussian_filter(activity, sigma=(1.0, 2.0, 2.0))
    suv += np.random.default_rng(seed).normal(0.0, noise_sd, SHAPE)
    return truth, gtv, suv.astype(np.float32)


def test_a_bright_moving_tumour_marks_its_envelope():
    truth, gtv, suv = _moving_tumour(amplitude_mm=16.0, uptake=8.0, noise_sd=0.05)
    ev = envelope_evidence(truth, gtv, suv, SPACING)
    assert 0.4 < ev.envelope_share < 0.8
    assert ev.envelope_marked > 0.9
    assert ev.pet_oracle > 0.85
    assert ev.pet_oracle > dice(gtv, truth) + 0.2  # the PET adds the envelope the GTV lacks


def test_a_tumour_without_uptake_leaves_the_envelope_unmarked():
    truth, gtv, suv = _moving_tumour(amplitude_mm=16.0, uptake=0.0, noise_sd=0.05)
    ev = envelope_evidence(truth, gtv, suv, SPACING)
    assert ev.envelope_marked < 0.1
    # grown into noise, the rule cannot do much better than the GTV alone
    assert ev.pet_oracle < dice(gtv, truth) + 0.1


def test_a_static_tumour_has_no_envelope_and_the_gtv_is_the_answer():
    truth, gtv, suv = _moving_tumour(amplitude_mm=0.0, uptake=8.0)
    assert np.array_equal(truth, gtv)
    ev = envelope_evidence(truth, gtv, suv, SPACING)
    assert ev.envelope_share == 0.0
    assert ev.envelope_marked == 1.0
    assert ev.pet_oracle == pytest.approx(1.0)


def test_the_oracle_is_the_best_rule_and_fractions_shape_the_region():
    truth, gtv, suv = _moving_tumour(amplitude_mm=12.0, uptake=4.0, noise_sd=0.02)
    dices = pet_rule_dice(truth, gtv, suv, SPACING)
    assert dices.shape == (len(FRACTIONS),)
    ev = envelope_evidence(truth, gtv, suv, SPACING)
    assert ev.pet_oracle == pytest.approx(dices.max())
    assert ev.oracle_fraction == FRACTIONS[int(np.argmax(dices))]
    assert ev.rule_dice == pytest.approx(tuple(dices))
    assert len(set(np.round(dices, 4))) > 3  # the fraction matters


def test_each_lesion_is_measured_against_its_own_background():
    bright = _moving_tumour(amplitude_mm=16.0, uptake=8.0, noise_sd=0.05)
    dark = _moving_tumour(amplitude_mm=16.0, uptake=0.0, noise_sd=0.05, seed=1)
    # the dark tumour moved 20 mm along x: two lesions, one marked by the PET and one not
    shift = lambda a: np.roll(a, 20, axis=2)  # noqa: E731
    keep_left = np.zeros(SHAPE, dtype=bool)
    keep_left[:, :, :40] = True
    truth = (bright[0] & keep_left) | shift(dark[0])
    gtv = (bright[1] & keep_left) | shift(dark[1])
    suv = np.where(keep_left, bright[2], shift(dark[2])).astype(np.float32)
    assert ndimage.label(truth)[1] == 2
    ev = envelope_evidence(truth, gtv, suv, SPACING)
    alone = envelope_evidence(bright[0], bright[1], bright[2], SPACING)
    assert 0.35 < ev.envelope_marked < 0.6  # about half: the bright lesion's envelope only
    assert ev.envelope_marked < alone.envelope_marked - 0.3
    assert ev.rule_dice == pytest.approx(tuple(pet_rule_dice(truth, gtv, suv, SPACING)))


def test_bad_inputs_are_refused():
    truth, gtv, suv = _moving_tumour(amplitude_mm=8.0, uptake=4.0)
    with pytest.raises(ValueError, match="one grid"):
        envelope_evidence(truth, gtv[:-1], suv, SPACING)
    with pytest.raises(ValueError, match="empty"):
        envelope_evidence(np.zeros_like(truth), gtv, suv, SPACING)
