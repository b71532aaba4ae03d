"""From a probability map on the CT grid to labelled lesions and their measurements.

Steps: threshold, 3D connected components (26-connectivity), removal of
components smaller than ``min_component_cc``, at most ``keep`` components
(largest, most confident or most FDG-avid first), each outlined at the delineation
threshold when one is given, then hole filling per component in 3D and in every axial
slice. Components are numbered 1..n in that order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from pipeline.settings import ProcessSettings

#: Orders in which components are kept (see :func:`postprocess`).
ORDERS = ("volume", "confidence", "uptake")

_FULL = ndimage.generate_binary_structure(3, 3)
_PLANAR = np.zeros((3, 3, 3), dtype=bool)
_PLANAR[1] = ndimage.generate_binary_structure(2, 1)


def postprocess(
    prob: np.ndarray,
    spacing_zyx: Sequence[float],
    threshold: float = 0.5,
    min_component_cc: float = 0.1,
    keep: int = 5,
    order_by: str = "volume",
    suv: np.ndarray | None = None,
    delineation_threshold: float | None = None,
) -> np.ndarray:
    """Labelled lesion mask (uint8 (Z, Y, X); 0 background, 1 the first lesion, ...).

    Parameters
    ----------
    prob:
        Probabilities on the CT grid (Z, Y, X).
    spacing_zyx:
        Voxel spacing in mm (z, y, x).
    threshold:
        Voxels with ``prob >= threshold`` are foreground.
    min_component_cc:
        Components smaller than this volume are removed.
    keep:
        At most this many components are kept (first in ``order_by`` order, at most 255);
        0 keeps none.
    order_by:
        "volume" (largest first), "confidence" (highest mean probability first; ties by
        volume) or "uptake" (highest SUVmax first; ties by mean probability). With
        ``keep=1``, "confidence" keeps the component the network is surest of.
    suv:
        SUV on the CT grid (Z, Y, X); needed for ``order_by="uptake"``.
    delineation_threshold:
        When above ``threshold``, each kept component is cut down to its voxels with
        ``prob >= delineation_threshold``: ``threshold`` decides which lesions are found
        and kept, this one where their borders run. A component that nowhere reaches it
        keeps its outline at ``threshold``. None: outlines at ``threshold``.
    """
    if order_by not in ORDERS:
        raise ValueError(f"order_by must be one of {ORDERS}, got {order_by!r}")
    if order_by == "uptake" and (suv is None or np.shape(suv) != np.shape(prob)):
        raise ValueError("order_by='uptake' needs the SUV volume on the probability map's grid")
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"prob must be (Z, Y, X), got shape {prob.shape}")
    voxel_cc = float(np.prod(spacing_zyx)) / 1000.0
    out = np.zeros(prob.shape, dtype=np.uint8)
    fg = prob >= threshold
    box = _bounding_box(fg)
    if box is None or keep <= 0:
        return out
    # Label only the foreground's bounding box (plus one voxel for hole filling): predictions
    # are small against the CT grid, so this avoids a full-size int32 label array.
    fg_box = fg[box]
    del fg
    labels, n = ndimage.label(fg_box, structure=_FULL)
    del fg_box
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    if order_by == "volume":
        ranking = np.argsort(-sizes, kind="stable")
    else:
        means = np.asarray(ndimage.mean(prob[box], labels, index=np.arange(1, n + 1)), dtype=float)
        ranking = np.lexsort((-sizes, -means))
        if order_by == "uptake":
            peaks = np.asarray(ndimage.maximum(np.asarray(suv)[box], labels, index=np.arange(1, n + 1)), dtype=float)
            ranking = np.lexsort((-sizes, -means, -peaks))
    order = [int(i) + 1 for i in ranking if sizes[i] * voxel_cc >= min_component_cc]
    boxes = ndimage.find_objects(labels)
    target = out[box]
    outline = delineation_threshold if delineation_threshold is not None and delineation_threshold > threshold else None
    for new, old in enumerate(order[: min(keep, 255)], start=1):
        sub = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in boxes[old - 1])
        part = labels[sub] == old
        if outline is not None:
            core = part & (prob[box][sub] >= outline)
            part = core if core.any() else part
        part = ndimage.binary_fill_holes(part)
        part = ndimage.binary_fill_holes(part, structure=_PLANAR)
        region = target[sub]
        region[part & (region == 0)] = new
    return out


def postprocess_with(
    prob: np.ndarray, spacing_zyx: Sequence[float], settings: ProcessSettings, threshold: float,
    suv: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`postprocess` under a node's settings (size limit, lesions kept, their order, outline) at ``threshold``.

    The one call shared by the worker, ``evaluate`` and ``calibrate``, so all three score
    the same post-processing.
    """
    return postprocess(prob, spacing_zyx, threshold=threshold, min_component_cc=settings.min_component_cc,
                       keep=settings.keep_components, order_by=settings.lesion_order, suv=suv,
                       delineation_threshold=settings.delineation_threshold)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding ``mask`` grown by one voxel, or None when empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.nonzero(mask.any(axis=other))[0]
        if hit.size == 0:
            return None
        box.append(slice(max(0, int(hit[0]) - 1), min(mask.shape[axis], int(hit[-1]) + 2)))
    return tuple(box)


def component_report(
    mask: np.ndarray,
    suv: np.ndarray,
    spacing_zyx: Sequence[float],
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
) -> list[dict]:
    """Measurements of each lesion, in label order.

    Parameters
    ----------
    mask:
        Labelled mask (as from :func:`postprocess`) or a boolean mask (labelled here, 26-connected).
    suv:
        SUV on the same grid.
    spacing_zyx:
        Voxel spacing in mm (z, y, x).
    origin, direction:
        CT origin (x, y, z) and direction cosines (9 values, row-major as in
        SimpleITK); when given, centroids are also reported in LPS mm and the
        extents are named by patient axis (left-right, anterior-posterior,
        superior-inferior) instead of assuming an axial head-first grid.

    Returns
    -------
    list[dict]
        ``label, voxels, volume_cc, suv_max, suv_mean, si_extent_mm, ap_extent_mm,
        lr_extent_mm, centroid_voxel_zyx`` (and ``centroid_mm_lps`` with ``origin``).
    """
    mask = np.asarray(mask)
    suv = np.asarray(suv)
    if mask.shape != suv.shape:
        raise ValueError(f"mask {mask.shape} and SUV {suv.shape} differ in shape")
    if mask.dtype == bool:
        labels, _ = ndimage.label(mask, structure=_FULL)
    elif np.issubdtype(mask.dtype, np.integer):
        labels = mask  # find_objects takes any integer type: no full-size copy
    else:
        raise ValueError(f"mask must be bool or integer labels, got {mask.dtype}")
    spacing = np.asarray(spacing_zyx, dtype=float)
    voxel_cc = float(np.prod(spacing)) / 1000.0
    d = np.asarray(direction if direction is not None else np.eye(3).ravel(), dtype=float).reshape(3, 3)
    # Patient axis (0=x LR, 1=y AP, 2=z SI) along which each array axis (z, y, x) runs.
    axis_of = {a: int(np.argmax(np.abs(d[:, 2 - a]))) for a in range(3)}
    names = {0: "lr_extent_mm", 1: "ap_extent_mm", 2: "si_extent_mm"}
    report = []
    boxes = ndimage.find_objects(labels)
    for label, box in enumerate(boxes, start=1):
        if box is None:
            continue
        region = labels[box] == label
        values = suv[box][region]
        idx = np.argwhere(region) + np.asarray([s.start for s in box])
        extents = (idx.max(axis=0) - idx.min(axis=0) + 1) * spacing
        centroid = idx.mean(axis=0)
        item = {
            "label": label,
            "voxels": int(region.sum()),
            "volume_cc": round(float(region.sum()) * voxel_cc, 4),
            "suv_max": round(float(values.max()), 4),
            "suv_mean": round(float(values.mean()), 4),
        }
        for a in range(3):
            item[names[axis_of[a]]] = round(float(extents[a]), 2)
        item["centroid_voxel_zyx"] = [round(float(v), 2) for v in centroid]
        if origin is not None:
            xyz = centroid[::-1] * spacing[::-1]
            point = np.asarray(origin, dtype=float) + d @ xyz
            item["centroid_mm_lps"] = [round(float(v), 2) for v in point]
        report.append(item)
    return report
