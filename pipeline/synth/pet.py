"""The PET image: FDG uptake averaged over the breathing cycle, PSF blur and noise (SUVbw)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.synth import anatomy as A
from pipeline.synth.breathing import BreathingTrace
from pipeline.synth.grid import Grid
from pipeline.synth.lesions import tumour_box, tumour_masks
from pipeline.synth.tumour import TumourShape


def sample_uptake(rng: np.random.Generator) -> dict[str, float]:
    """Per-patient SUVs of the normal tissues."""
    return {
        "lung": float(rng.uniform(0.35, 0.6)),
        "blood": float(rng.uniform(1.5, 2.0)),
        "liver": float(rng.uniform(2.0, 2.5)),
        "myocardium": float(np.exp(rng.uniform(np.log(2.0), np.log(10.0)))),
        "marrow": float(rng.uniform(1.5, 2.0)),
        "spleen": float(rng.uniform(1.6, 2.1)),
        "stomach": float(rng.uniform(1.3, 2.8)),
        "muscle": float(rng.uniform(0.6, 0.9)),
        "fat": float(rng.uniform(0.25, 0.4)),
        "oesophagus": float(rng.uniform(1.2, 2.0)),
    }


def suv_table(uptake: dict[str, float]) -> np.ndarray:
    """SUV per tissue label."""
    t = np.zeros(A.N_LABELS, np.float32)
    t[A.FAT] = uptake["fat"]
    t[A.MUSCLE] = uptake["muscle"]
    t[A.LUNG] = uptake["lung"]
    t[A.CORTEX] = 0.5
    t[A.MARROW] = uptake["marrow"]
    t[A.CARTILAGE] = 0.5
    t[A.MYOCARDIUM] = uptake["myocardium"]
    t[A.BLOOD] = uptake["blood"]
    t[A.LIVER] = uptake["liver"]
    t[A.SPLEEN] = uptake["spleen"]
    t[A.STOMACH_WALL] = uptake["stomach"]
    t[A.CANAL] = 0.6
    t[A.DISC] = 0.6
    t[A.ABDOMEN] = 1.1
    t[A.OESOPHAGUS] = uptake["oesophagus"]
    t[A.NODE] = 1.0
    return t


def _node_suv(model: A.ThoraxModel, x, y, z, base: np.ndarray, labels: np.ndarray) -> None:
    """Give each lymph node its own SUV (in place)."""
    p = model.p
    for node in p.nodes:
        c = np.asarray(node["centre_rel"]) + np.asarray(p.centre)
        d2 = (x[None, None, :] - c[0]) ** 2 + (y[None, :, None] - c[1]) ** 2 + (z[:, None, None] - c[2]) ** 2
        base[(d2 <= node["radius_mm"] ** 2) & (labels == A.NODE)] = node["suv"]


def _tumour_uptake(tumours: list[TumourShape], trace: BreathingTrace, t: float, X, Y, Z,
                   occupied: np.ndarray) -> np.ndarray:
    """Tumour SUV at the coordinates at cycle fraction ``t`` (0 where ``occupied`` is false)."""
    up = np.zeros(occupied.shape, np.float32)
    x, y, z = X.ravel(), Y.ravel(), Z.ravel()
    for tum in tumours:
        off = trace.displacement(tum.amplitude_lps, t)
        box = tum.local_box(x, y, z, off)
        if not up[box].size:
            continue
        Xs, Ys, Zs = X[..., box[2]], Y[:, box[1]], Z[box[0]]
        f = tum.field(Xs, Ys, Zs, off)
        here = occupied[box] & (f >= tum.level)
        up[box] = np.where(here, tum.uptake(Xs, Ys, Zs, off, f), up[box])
    return up


def render_pet(model: A.ThoraxModel, grid: Grid, uptake: dict[str, float], tumours: list[TumourShape],
               trace: BreathingTrace, dia_amp: float, n_phases: int, offset: np.ndarray, fwhm_mm: float,
               noise_level: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless-ideal and final SUV images (float32, z-y-x) on the PET grid.

    ``offset`` is the PET-to-CT geometry translation: the PET voxel at stored position q
    images the patient point q - offset.
    """
    x, y, z = grid.axes()
    tx, ty, tz = x - offset[0], y - offset[1], z - offset[2]
    table = suv_table(uptake)
    times = trace.pet_times(n_phases) if dia_amp > 0 or any(np.any(t.amplitude_lps) for t in tumours) else np.array([0.0])
    box = tumour_box(tumours, grid, offset=offset, margin=8.0)
    sup = 3
    total = np.zeros(grid.shape, np.float32)
    if box is not None:
        bz, by, bx = box
        fine = []
        for axis, sl, step in ((tx, bx, grid.spacing[0]), (ty, by, grid.spacing[1]), (tz, bz, grid.spacing[2])):
            sub = np.sort(axis[sl])
            d = (np.arange(sup) - (sup - 1) / 2) * step / sup
            fine.append((sub[:, None] + d[None, :]).ravel().astype(np.float32))
        X, Y, Z = fine[0][None, None, :], fine[1][None, :, None], fine[2][:, None, None]
        occupancy = tumour_masks(tumours, model, trace, dia_amp, X, Y, Z, times)
    for phase, t in enumerate(times):
        shift = -float(trace.inhale_fraction(t)) * dia_amp
        labels = model.labels(tx, ty, tz, shift, table=False)
        suv = table[labels]
        _node_suv(model, tx, ty, tz, suv, labels)
        if box is not None:
            occ = occupancy[phase]
            if occ.any():
                up = _tumour_uptake(tumours, trace, t, X, Y, Z, occ)
                nzb, nyb, nxb = (bz.stop - bz.start), (by.stop - by.start), (bx.stop - bx.start)
                o = occ.reshape(nzb, sup, nyb, sup, nxb, sup).mean(axis=(1, 3, 5)).astype(np.float32)
                u = up.reshape(nzb, sup, nyb, sup, nxb, sup).mean(axis=(1, 3, 5)).astype(np.float32)
                # fine axes were sorted ascending; put them back in grid order
                for axis_idx, sign in ((0, grid.direction[2]), (1, grid.direction[1]), (2, grid.direction[0])):
                    if sign < 0:
                        o = np.flip(o, axis=axis_idx)
                        u = np.flip(u, axis=axis_idx)
                sub = suv[bz, by, bx]
                suv[bz, by, bx] = sub * (1 - o) + u
        total += suv
    total /= np.float32(len(times))
    sig = [fwhm_mm / 2.3548 / s for s in (grid.spacing[2], grid.spacing[1], grid.spacing[0])]
    ideal = ndimage.gaussian_filter(total, sig, mode="constant").astype(np.float32)
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, [0.7 * s for s in sig], mode="wrap")
    noise /= float(noise.std()) or 1.0
    image = ideal + noise_level * np.sqrt(np.maximum(ideal, 0)) * noise
    np.maximum(image, 0, out=image)
    return ideal, image.astype(np.float32)
