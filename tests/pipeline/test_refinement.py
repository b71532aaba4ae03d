"""Where the lesion refiner is applied: the found lesion, slice order, and when it is left out."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from pipeline.refinement import refine_probabilities
from pipeline.settings import ProcessSettings


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
