"""The lesion the node would deliver, re-outlined in 3D by the checkpoint's refiner (:mod:`model.refiner`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.postprocess import postprocess_with
from pipeline.settings import ProcessSettings


def refine_probabilities(probs: np.ndarray, stackset: Any, refiner: Any, z_spacing_mm: float,
                         settings: ProcessSettings, threshold: float) -> np.ndarray:
    """Model-grid probabilities with the found lesion's crop re-outlined by ``refiner``.

    The lesion is the one the node's post-processing keeps from ``probs`` at ``threshold``
    on the model grid. The refiner's probabilities replace the crop around it and
    everything outside the crop becomes 0, since the node keeps that one lesion. Unchanged
    when there is no refiner, when ``settings.keep_components`` is not 1, or when no
    lesion is found or it does not fit the refiner's crop.

    Parameters
    ----------
    probs:
        (N, H, W) network probabilities of the stacks of ``stackset``.
    stackset:
        The :class:`~pipeline.stacks.StackSet` they were predicted from.
    refiner:
        A :class:`~model.refiner.LesionRefiner` or None.
    z_spacing_mm:
        CT slice spacing (the model grid's z spacing).
    """
    if refiner is None or settings.keep_components != 1:
        return probs
    first = stackset.prep.span // 2
    planes = stackset.planes[first:first + len(probs)]
    volume = np.concatenate([planes, probs[:, None]], axis=1).astype(np.float32)
    upward = stackset.canonical.z_superior  # the refiner was trained on slices ordered inferior to superior
    if not upward:
        volume = np.ascontiguousarray(volume[::-1])
    pixel = stackset.prep.pixel_spacing_mm
    lesion = postprocess_with(volume[:, 2], (z_spacing_mm, pixel, pixel), settings, threshold) > 0
    refined = refiner.refine(volume, lesion)
    if refined is None:
        return probs
    out = refined[0]
    return out if upward else np.ascontiguousarray(out[::-1])


def model_probabilities(predictor: Any, stackset: Any, z_spacing_mm: float, settings: ProcessSettings,
                        threshold: float, batch_size: int = 8) -> tuple[np.ndarray, bool]:
    """The predictor's model-grid probabilities of ``stackset``, refined as the node does.

    The one path the node, ``evaluate`` and ``calibrate`` share: the network (with the
    settings' test-time flips), then the checkpoint's refiner, if it has one, on the lesion
    found at ``threshold``. Returns the probabilities and whether the refiner changed them.
    """
    network = predictor.predict(stackset.inputs, batch_size=batch_size, flips=settings.test_time_flips)
    probs = refine_probabilities(network, stackset, getattr(predictor, "refiner", None), z_spacing_mm,
                                 settings, threshold)
    return probs, probs is not network
