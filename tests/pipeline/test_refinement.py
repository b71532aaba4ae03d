"""Where the lesion and outline refiners are applied: the found lesion, orientation, and when they are left out."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from model.outline import AMPLITUDE_SCALE_MM
from model.preprocessing import Preprocessing
from pipeline.refinement import lesion_amplitude, outline_in_place, refine_probabilities
from pipeline.settings import ProcessSettings
from pipeline.stacks import Canonical


class RecordingRefiner:
    """Returns 0.9 in a fixed region and records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def refine(self, volume, lesion):
        self.calls.append((volume.copy(), lesion.copy()))
        out = np.zeros(lesion.shape, np.float32)
        region = (slice(0, 3), slice(0, 4), slice(0, 4))
        out[region] = 0.9
        return out, region


def _stackset(n=10, span=5, z_superior=True):
    planes = np.stack([np.full((2, 8, 8), i, np.float32) for i in range(n + span - 1)])  # plane i holds i
    prep = SimpleNamespace(span=span, pixel_spacing_mm=2.0)
    return SimpleNamespace(planes=planes, prep=prep, canonical=SimpleNamespace(z_superior=z_superior))


def _probs(n=10):
    probs = np.zeros((n, 8, 8), np.float32)
    probs[6:9, 2:6, 2:6] = 0.95  # one lesion near the end of the stack order
    return probs


def test_the_kept_lesion_and_centre_planes_go_to_the_refiner():
    refiner = RecordingRefiner()
    out = refine_probabilities(_probs(), _stackset(), refiner, 3.0, ProcessSettings(), 0.4)
    volume, lesion = refiner.calls[0]
    assert volume.shape == (10, 3, 8, 8)
    assert volume[0, 0, 0, 0] == 2 and volume[9, 1, 0, 0] == 11  # stack i is centred on plane i + span // 2
    assert np.array_equal(volume[:, 2], _probs())
    assert lesion[6:9, 2:6, 2:6].all() and lesion.sum() == 3 * 16
    assert np.allclose(out[:3, :4, :4], 0.9) and np.count_nonzero(out) == 48  # the refined crop only


def test_slices_ordered_superior_first_are_turned_for_the_refiner_and_back():
    refiner = RecordingRefiner()
    out = refine_probabilities(_probs(), _stackset(z_superior=False), refiner, 3.0, ProcessSettings(), 0.4)
    volume, lesion = refiner.calls[0]
    assert volume[0, 0, 0, 0] == 11 and lesion[1:4].any() and not lesion[6:9].any()
    assert np.allclose(out[-3:, :4, :4], 0.9) and not out[:-3].any()


def test_left_alone_without_refiner_with_several_lesions_kept_or_nothing_found():
    probs = _probs()
    assert refine_probabilities(probs, _stackset(), None, 3.0, ProcessSettings(), 0.4) is probs
    refiner = RecordingRefiner()
    several = ProcessSettings(keep_components=2)
    assert refine_probabilities(probs, _stackset(), refiner, 3.0, several, 0.4) is probs
    assert not refiner.calls
    nothing = np.zeros_like(probs)
    refine_probabilities(nothing, _stackset(), refiner, 3.0, ProcessSettings(), 0.4)
    assert not refiner.calls[0][1].any()  # the refiner is asked and refuses an empty lesion itself


class MarkingOutline(torch.nn.Module):
    """An outline refiner stand-in: probability 0.9 on the crop's first (most inferior) slice, 0.01 elsewhere."""

    def __init__(self, keep: bool = True, inputs: int = 3, box_margin: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        self.keep, self.inputs, self.box_margin = keep, inputs, box_margin
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        out = torch.full(x[:, :1].shape, -4.6)
        if self.keep:
            out[:, :, 0] = 2.2
        return out


def _ct_grid_case():
    prob = np.zeros((12, 40, 40), np.float32)
    prob[4:8, 10:20, 12:22] = 0.9  # the lesion
    prob[0:2, 30:34, 30:34] = 0.6  # a smaller one, far away
    hu = np.full(prob.shape, -800.0, np.float32)
    suv = np.ones(prob.shape, np.float32)
    return prob, hu, suv


def _canonical(z_superior=True, flip_y=False):
    return Canonical(transpose=False, flip_y=flip_y, flip_x=False, z_superior=z_superior)


SPACING = (3.0, 1.0, 1.0)


def test_the_outline_refiner_sees_the_canonical_box_around_the_kept_lesion_and_replaces_it():
    prob, hu, suv = _ct_grid_case()
    outline = MarkingOutline()
    out = prob.copy()
    assert outline_in_place(out, hu, suv, _canonical(), Preprocessing(), outline, SPACING, ProcessSettings(), 0.4)
    (x,) = outline.seen
    assert x.shape == (1, 3, 10, 28, 28)  # slices 1-10, rows 2-27, columns 4-29, padded to 28 x 28
    assert torch.allclose(x[0, 2, 3:7, 8:18, 8:18], torch.tensor(0.9))
    assert np.allclose(out[1, 2:28, 4:30], 0.9, atol=1e-3) and np.allclose(out[2:11, 2:28, 4:30], 0.01, atol=1e-3)
    assert not out[0].any() and not out[:, 30:34, 30:34].any()  # outside the box: 0, the other lesion gone


def test_slices_stored_superior_first_and_flipped_rows_are_turned_for_the_outline_refiner_and_back():
    prob, hu, suv = _ct_grid_case()
    hu[4:8, 10:12, 12:22] = 40.0  # tissue in the lesion's first rows of the array
    out, outline = prob.copy(), MarkingOutline()
    assert outline_in_place(out, hu, suv, _canonical(z_superior=False, flip_y=True), Preprocessing(), outline,
                            SPACING, ProcessSettings(), 0.4)
    x = outline.seen[0][0]
    assert np.allclose(out[10, 2:28, 4:30], 0.9, atol=1e-3)  # the box's last array slice is its most inferior
    ct = x[1, 3:7]  # the lesion's slices, rows in the canonical (flipped) order
    assert torch.all(ct[:, 16:18, 8:18] > 0) and torch.all(ct[:, 8:16, 8:18] < 0)


def test_the_outline_refiner_is_left_out_where_it_cannot_help():
    prob, hu, suv = _ct_grid_case()
    before = prob.copy()
    settings, prep = ProcessSettings(), Preprocessing()
    refiner = MarkingOutline()
    several = ProcessSettings(keep_components=2)
    nothing = np.zeros_like(prob)
    assert not outline_in_place(prob, hu, suv, _canonical(), prep, None, SPACING, settings, 0.4)
    assert not outline_in_place(prob, hu, suv, _canonical(), prep, refiner, SPACING, several, 0.4)
    assert not outline_in_place(prob, hu, suv, _canonical(), prep, refiner, (3.0, 0.5, 0.5), settings, 0.4)
    assert not outline_in_place(nothing, hu, suv, _canonical(), prep, refiner, SPACING, settings, 0.4)
    assert not refiner.seen and not nothing.any()
    losing = MarkingOutline(keep=False)  # would leave no lesion: the found one stays
    assert not outline_in_place(prob, hu, suv, _canonical(), prep, losing, SPACING, settings, 0.4)
    assert len(losing.seen) == 1
    assert np.array_equal(prob, before)


def test_an_amplitude_outline_refiner_is_given_the_fitted_amplitude_in_its_own_box():
    prob, hu, suv = _ct_grid_case()
    hu[4:8, 12:18, 14:20] = 40.0  # the tumour at the CT's moment
    suv[2:8, 12:18, 14:20] = 6.0  # its PET smear reaches two slices further inferior
    outline = MarkingOutline(inputs=4, box_margin=(1, 2, 2))
    notes: dict = {}
    out = prob.copy()
    assert outline_in_place(out, hu, suv, _canonical(), Preprocessing(), outline, SPACING, ProcessSettings(), 0.4,
                            notes)
    fitted = lesion_amplitude(hu, suv, prob >= 0.4, _canonical(), SPACING)
    assert fitted.amplitude_mm > 0 and notes == {"si_amplitude_mm": fitted.amplitude_mm}
    (x,) = outline.seen
    assert x.shape == (1, 4, 6, 16, 16)  # slices 3-8, rows 8-21, columns 10-23, padded to 16 x 16
    assert torch.all(x[0, 3] == fitted.amplitude_mm / AMPLITUDE_SCALE_MM)
    assert np.allclose(out[3, 8:22, 10:24], 0.9, atol=1e-3) and not out[:3].any() and not out[9:].any()


def test_the_amplitude_is_noted_as_unknown_and_given_as_0_when_it_cannot_be_fitted():
    prob, hu, suv = _ct_grid_case()  # no soft tissue on the CT: no tumour to sweep
    outline, notes = MarkingOutline(inputs=4), {}
    assert outline_in_place(prob, hu, suv, _canonical(), Preprocessing(), outline, SPACING, ProcessSettings(), 0.4,
                            notes)
    assert notes == {"si_amplitude_mm": None} and torch.all(outline.seen[0][0, 3] == 0)
