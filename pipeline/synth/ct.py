"""The CT image: tissue labels -> HU with lung texture, vessels, tumour and noise."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.synth.anatomy import CORTEX, HU, LUNG, MARROW, ThoraxModel
from pipeline.synth.grid import Grid
from pipeline.synth.tumour import TumourShape


def linear_resample_axis(vol: np.ndarray, axis: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``vol`` along ``axis`` from coordinates ``src`` to ``dst`` (both monotonic)."""
    order = np.argsort(src)
    s = src[order]
    pos = np.interp(dst, s, np.arange(s.size, dtype=np.float64))
    i0 = np.clip(np.floor(pos).astype(int), 0, s.size - 1)
    i1 = np.clip(i0 + 1, 0, s.size - 1)
    w1 = (pos - i0).astype(np.float32)
    shape = [1] * vol.ndim
    shape[axis] = -1
    w1 = w1.reshape(shape)
    a = np.take(vol, order[i0], axis=axis)
    b = np.take(vol, order[i1], axis=axis)
    a += (b - a) * w1
    return a


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox) -> np.ndarray:
    """Gaussian-correlated float32 noise with unit standard deviation."""
    n = rng.standard_normal(shape, dtype=np.float32)
    n = ndimage.gaussian_filter(n, sigma_vox, mode="wrap")
    sd = float(n.std()) or 1.0
    n /= sd
    return n


def _vessel_field(rng: np.random.Generator, model: ThoraxModel, x, y, z) -> np.ndarray:
    """Fraction (0-1) of each voxel filled by lung vessels, from crossings of two smooth random fields."""
    step = 3.0
    lo = np.array([x.min(), y.min(), z.min()]) - step
    hi = np.array([x.max(), y.max(), z.max()]) + step
    ax = [np.arange(a, b + step, step) for a, b in zip(lo, hi, strict=False)]
    shape = (ax[2].size, ax[1].size, ax[0].size)
    g1 = smooth_noise(rng, shape, 2.2)
    g2 = smooth_noise(rng, shape, 2.2)
    r = np.sqrt(g1 * g1 + g2 * g2)
    # radius of vessels shrinks with distance from the hila
    p = model.p
    cz, cy, cx = ax[2][:, None, None], ax[1][None, :, None], ax[0][None, None, :]
    rel_x, rel_y, rel_z = cx - p.centre[0], cy - p.centre[1], cz - p.centre[2]
    hilum = np.sqrt((np.abs(rel_x) - 45) ** 2 + (rel_y - 10) ** 2 + (rel_z - p.carina_z + 25) ** 2)
    radius_mm = 0.6 + 3.4 * np.exp(-hilum / 55.0)
    thickness = radius_mm / (2.2 * step)  # |grad g| ~ 1 / sigma
    frac = np.clip((thickness - r) / (0.35 * thickness + 0.05) + 0.5, 0, 1).astype(np.float32)
    for axis, (src, dst) in enumerate(((ax[2], z), (ax[1], y), (ax[0], x))):
        frac = linear_resample_axis(frac, axis, src, dst)
    return frac


def render_ct(model: ThoraxModel, grid: Grid, diaphragm_shift: float, tumours: list[TumourShape],
              tumour_offsets: list[np.ndarray], tumour_mask: np.ndarray, tumour_box, rng: np.random.Generator,
              work_factor: int) -> np.ndarray:
    """HU image (float32, z-y-x) of the patient at one breathing state.

    Anatomy is rasterised at ``1/work_factor`` of the in-plane resolution and interpolated
    (partial-volume edges like a reconstruction kernel); the tumour and the noise are added
    at full resolution.
    """
    x, y, z = grid.axes()
    xw = x.reshape(-1, work_factor).mean(axis=1) if work_factor > 1 else x
    yw = y.reshape(-1, work_factor).mean(axis=1) if work_factor > 1 else y
    labels = model.labels(xw, yw, z, diaphragm_shift)
    hu = HU[labels]
    p = model.p
    lung = labels == LUNG
    # dependent (posterior) lung is denser in a supine patient
    gradient = (45.0 * (yw - p.centre[1] + p.half_depth) / (2 * p.half_depth)).astype(np.float32)
    hu += lung * gradient[None, :, None]
    vessels = _vessel_field(rng, model, xw, yw, z)
    hu += lung * vessels * (np.float32(40.0) - hu)
    bone = (labels == MARROW) | (labels == CORTEX)
    hu += bone * (smooth_noise(rng, labels.shape, 1.0) * 60.0)
    del labels, vessels
    if work_factor > 1:
        hu = linear_resample_axis(hu, 1, yw, y)
        hu = linear_resample_axis(hu, 2, xw, x)
    # tumour at the CT phase, with partial volume from 2x supersampling
    if tumour_box is not None and tumour_mask.any():
        bz, by, bx = tumour_box
        frac = np.zeros(tumour_mask.shape, np.float32)
        tissue = np.zeros(tumour_mask.shape, np.float32)
        sx, sy, sz = grid.spacing
        for dz in (-0.25, 0.25):
            for dy in (-0.25, 0.25):
                for dx in (-0.25, 0.25):
                    xs = (x[bx] + dx * sx * grid.direction[0]).astype(np.float32)
                    ys = (y[by] + dy * sy * grid.direction[1]).astype(np.float32)
                    zs = (z[bz] + dz * sz * grid.direction[2]).astype(np.float32)
                    inside = np.zeros(frac.shape, bool)
                    for t, off in zip(tumours, tumour_offsets, strict=True):
                        lz, ly, lx = t.local_box(xs, ys, zs, off)
                        X, Y, Z = xs[lx][None, None, :], ys[ly][None, :, None], zs[lz][:, None, None]
                        f = t.field(X, Y, Z, off)
                        here = (f >= t.level) & ~inside[lz, ly, lx]
                        tissue[lz, ly, lx] += np.where(here, t.ct_hu(X, Y, Z, off, f), 0)
                        inside[lz, ly, lx] |= here
                    frac += inside
        tissue /= np.maximum(frac, 1)
        frac /= 8.0
        # keep the tumour inside the lung: only where the voxel-centre mask or its neighbours are tumour
        frac *= ndimage.binary_dilation(tumour_mask, iterations=1)
        sub = hu[bz, by, bx]
        sub += frac * (tissue + smooth_noise(rng, frac.shape, 1.0) * 8.0 - sub)
        hu[bz, by, bx] = sub
    # quantum noise, slightly correlated in-plane; one slice at a time to bound memory
    for k in range(hu.shape[0]):
        noise = rng.standard_normal(hu.shape[1:], dtype=np.float32)
        noise = ndimage.uniform_filter1d(noise, 2, axis=1)
        noise *= np.float32(14.0)
        hu[k] += noise
    return hu


def hu_to_stored(hu: np.ndarray, intercept: int = -1024) -> np.ndarray:
    """Round HU to stored int16 values for RescaleIntercept ``intercept`` (slope 1); ``hu`` is overwritten."""
    np.rint(hu, out=hu)
    hu -= np.float32(intercept)
    np.clip(hu, -1024 - intercept, 3071 - intercept, out=hu)
    return hu.astype(np.int16)
