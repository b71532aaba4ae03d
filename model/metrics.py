"""Segmentation metrics on voxel grids: Dice, HD95 (mm), volume ratio (numpy/scipy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / denom


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric surface distance in mm.

    ``spacing`` is the voxel size per array axis (e.g. z, y, x). 0.0 when both
    masks are empty, ``inf`` when exactly one is.
    """
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float("inf")
    # work inside the joint bounding box (plus a margin) to keep distance maps small
    idx = np.argwhere(p | t)
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = np.minimum(idx.max(0) + 3, p.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=False))
    p, t = p[box], t[box]
    sp, st = _surface(p), _surface(t)
    dt_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    dists = np.concatenate([dt_t[sp], dt_p[st]])
    return float(np.percentile(dists, 95))


def volume_ratio(pred: np.ndarray, truth: np.ndarray) -> float:
    """Predicted volume / true volume (``inf`` for an empty truth and non-empty prediction)."""
    p, t = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    if t == 0:
        return 1.0 if p == 0 else float("inf")
    return p / t
