"""The lesion the node would deliver, re-outlined in 3D by the checkpoint's refiner (:mod:`model.refiner`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.motion import FIT_MARGIN, AmplitudeFit, fit_si_amplitude
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


def canonical_crop(canonical: Any, array: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """A (Z, Y, X) CT-grid box of ``array`` in the ``canonical`` orientation, slices inferior to superior (a view)."""
    view = canonical.view(array[box])
    return view if canonical.z_superior else view[::-1]


def lesion_amplitude(ct_hu: np.ndarray, suv: np.ndarray, lesion: np.ndarray, canonical: Any,
                     spacing_zyx: tuple[float, float, float]) -> AmplitudeFit | None:
    """The breathing sweep of ``lesion`` fitted from the PET around it (:func:`pipeline.motion.fit_si_amplitude`).

    ``ct_hu``, ``suv`` and ``lesion`` are (Z, Y, X) CT-grid arrays in the CT's own
    orientation; the fit sees :data:`~pipeline.motion.FIT_MARGIN` voxels around the lesion
    in the ``canonical`` one. None when the lesion is empty or nothing can be fitted.
    """
    from model.outline import lesion_box

    box = lesion_box(lesion, FIT_MARGIN)
    if box is None:
        return None
    sz, sy, sx = spacing_zyx
    spacing = (sz, sx, sy) if canonical.transpose else (sz, sy, sx)
    return fit_si_amplitude(*(canonical_crop(canonical, a, box) for a in (suv, ct_hu, lesion)), spacing)


def outline_in_place(prob_ct: np.ndarray, ct_hu: np.ndarray, suv: np.ndarray, canonical: Any, prep: Any,
                     outline: Any, spacing_zyx: tuple[float, float, float], settings: ProcessSettings,
                     threshold: float, notes: dict[str, Any] | None = None) -> bool:
    """Re-outline the delivered lesion of ``prob_ct`` with ``outline`` (:mod:`model.outline`), in place.

    The lesion is the one the node's post-processing keeps from ``prob_ct`` at
    ``threshold``. The outline refiner's probabilities replace the box around it and
    everything outside the box becomes 0, as with the lesion refiner (in place: a second
    CT-grid array would add its size to the node's peak memory). Returns whether
    ``prob_ct`` changed. It is left alone when there is no outline refiner, when
    ``settings.keep_components`` is not 1, when the CT's pixels are outside
    :data:`model.outline.PIXEL_MM` (the refiner never saw such a scale), when no lesion is
    found, or when the refined box would hold no lesion at ``threshold`` (a refiner never
    loses a found lesion).

    Parameters
    ----------
    prob_ct, ct_hu, suv:
        (Z, Y, X) probabilities, HU and SUV on the CT grid.
    canonical:
        The CT's :class:`~pipeline.stacks.Canonical` orientation (the refiner sees that view).
    prep:
        The network's :class:`~model.preprocessing.Preprocessing` (how PET and CT are normalised).
    notes:
        When given and the refiner takes the lesion's breathing amplitude
        (:func:`model.outline.takes_amplitude`), ``si_amplitude_mm`` is set to the fitted one
        (:func:`lesion_amplitude`; None when it could not be fitted, and the refiner is told 0).
    """
    from model.outline import PIXEL_MM, box_margin, lesion_box, outline_crop, takes_amplitude

    if outline is None or settings.keep_components != 1:
        return False
    if not all(PIXEL_MM[0] <= s <= PIXEL_MM[1] for s in spacing_zyx[1:]):
        return False
    lesion = postprocess_with(prob_ct, spacing_zyx, settings, threshold, suv=suv) > 0
    box = lesion_box(lesion, box_margin(outline))
    if box is None:
        return False
    amplitude = None
    if takes_amplitude(outline):
        fit = lesion_amplitude(ct_hu, suv, lesion, canonical, spacing_zyx)
        if notes is not None:
            notes["si_amplitude_mm"] = None if fit is None else fit.amplitude_mm
        amplitude = 0.0 if fit is None else fit.amplitude_mm
    del lesion
    crop = np.stack([prep.normalise_pet(canonical_crop(canonical, suv, box)),
                     prep.normalise_ct(canonical_crop(canonical, ct_hu, box)),
                     canonical_crop(canonical, prob_ct, box)]).astype(np.float32)
    refined = outline_crop(outline, crop, amplitude)
    voxel_cc = float(np.prod(spacing_zyx)) / 1000.0
    if np.count_nonzero(refined >= threshold) * voxel_cc < settings.min_component_cc:
        return False
    prob_ct[...] = 0.0
    canonical_crop(canonical, prob_ct, box)[...] = refined
    return True


def ct_grid_probabilities(predictor: Any, stackset: Any, ct_hu: np.ndarray, suv: np.ndarray,
                          spacing_zyx: tuple[float, float, float], settings: ProcessSettings, threshold: float,
                          batch_size: int = 8) -> tuple[np.ndarray, dict[str, Any]]:
    """The predictor's probabilities on the CT grid, refined as the node does.

    The one path the node, ``evaluate`` and ``calibrate`` share: :func:`model_probabilities`,
    then the CT grid, then the checkpoint's outline refiner, if it has one
    (:func:`outline_in_place`). Returns the (Z, Y, X) probabilities and which refiners
    changed them (``lesion_refined``, ``outline_refined``), with the lesion's fitted
    breathing amplitude (``si_amplitude_mm``) when the outline refiner takes it.
    """
    probs, refined = model_probabilities(predictor, stackset, spacing_zyx[0], settings, threshold, batch_size)
    prob_ct = stackset.to_ct_grid(probs)
    del probs
    notes: dict[str, Any] = {}
    outlined = outline_in_place(prob_ct, ct_hu, suv, stackset.canonical, stackset.prep,
                                getattr(predictor, "outline", None), spacing_zyx, settings, threshold, notes)
    return prob_ct, {"lesion_refined": refined, "outline_refined": outlined, **notes}
