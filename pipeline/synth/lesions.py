"""Placing tumours in the lungs and rasterising them over the breathing cycle."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.synth.anatomy import LUNG, ThoraxModel
from pipeline.synth.breathing import BreathingTrace
from pipeline.synth.grid import Grid
from pipeline.synth.tumour import LOBES, TumourShape, sample_shape, sample_texture

#: Range of superior-inferior inhale amplitude (mm) per lobe.
SI_RANGE = {"RUL": (0.0, 8.0), "LUL": (0.0, 8.0), "RML": (3.0, 14.0), "RLL": (8.0, 25.0), "LLL": (8.0, 25.0)}


def _lobe_of(rel: np.ndarray, carina_z: float) -> np.ndarray:
    """Lobe index (into LOBES) of points given relative to the body centre, shape (n, 3)."""
    x, y, z = rel[:, 0], rel[:, 1], rel[:, 2]
    right = x < 0
    upper = z > carina_z - 25 + 0.3 * y
    middle = right & ~upper & (z > 25) & (y < -10)
    out = np.where(right, np.where(upper, 0, np.where(middle, 1, 2)), np.where(upper, 3, 4))
    return out


def sample_diameter(rng: np.random.Generator, range_mm: tuple[float, float] | None = None) -> float:
    """Tumour equivalent diameter (mm): mostly 10-60 mm, a few small nodules.

    With ``range_mm`` (low, high), log-uniform in that range instead.
    """
    if range_mm is not None:
        return float(np.exp(rng.uniform(np.log(range_mm[0]), np.log(range_mm[1]))))
    if rng.random() < 0.12:
        return float(rng.uniform(5, 10))
    return float(np.exp(rng.uniform(np.log(10), np.log(60))))


def place_tumours(rng: np.random.Generator, model: ThoraxModel, n: int, diameter_mm: float | None,
                  amplitude_mm: float | None, static: bool, necrosis: bool | None,
                  z_range_rel: tuple[float, float] = (-1e4, 1e4),
                  amplitude_range_mm: tuple[float, float] | None = None,
                  diameter_range_mm: tuple[float, float] | None = None) -> list[TumourShape]:
    """Choose lobe, size, position, uptake and motion of ``n`` tumours inside the lungs.

    ``z_range_rel`` (relative to the body centre) keeps the tumours, with their motion,
    inside the imaged range. The SI amplitude is ``amplitude_mm`` if given, else drawn from
    ``amplitude_range_mm`` if given, else from the lobe's typical range (:data:`SI_RANGE`).
    The diameter is ``diameter_mm`` if given, else drawn by :func:`sample_diameter` (in
    ``diameter_range_mm`` if given).
    """
    p = model.p
    c = np.asarray(p.centre)
    step = 4.0
    x = c[0] + np.arange(-p.half_width, p.half_width, step)
    y = c[1] + np.arange(-p.half_depth, p.half_depth, step)
    z = c[2] + np.arange(-150, p.apex_z, step)
    lung = model.labels(x, y, z, 0.0, table=False) == LUNG
    dist, (iz, iy, ix) = ndimage.distance_transform_edt(lung, sampling=step, return_indices=True)
    labels0 = model.labels(x, y, z, 0.0, table=False)
    zz, yy, xx = np.nonzero(lung)
    rel = np.stack([x[xx], y[yy], z[zz]], axis=1) - c
    lobe_idx = _lobe_of(rel, p.carina_z)
    tumours: list[TumourShape] = []
    for _ in range(n):
        for attempt in range(30):
            d = diameter_mm if diameter_mm is not None else sample_diameter(rng, diameter_range_mm)
            d = d if attempt < 10 else d * 0.85 ** (attempt - 9)
            lobe = int(rng.choice(len(LOBES), p=[0.3, 0.07, 0.2, 0.25, 0.18]))
            geometry = sample_shape(rng, d)
            shape = TumourShape(np.zeros(3), LOBES[lobe], d, suv_peak=0, suv_floor=0, necrosis=0,
                                amplitude_lps=np.zeros(3), texture=np.zeros((0, 4)), **geometry)
            r = shape.radius_bound_mm
            abut = rng.random() < 0.3
            lo, hi = (0.2 * d, 0.4 * d) if abut else (0.65 * r + 2, 1e9)
            dd = dist[zz, yy, xx]
            ok = (lobe_idx == lobe) & (dd >= lo) & (dd <= hi)
            ok &= (rel[:, 2] > z_range_rel[0] + r + 26) & (rel[:, 2] < z_range_rel[1] - r - 4)
            for t in tumours:
                ok &= np.linalg.norm(rel + c - t.centre, axis=1) > t.radius_bound_mm + r + 5
            cand = np.nonzero(ok)[0]
            if cand.size:
                break
        else:
            raise RuntimeError("could not place a tumour in the lungs")  # pragma: no cover - anatomy always has room
        pick = int(rng.choice(cand))
        centre = rel[pick] + c + rng.uniform(-step / 2, step / 2, size=3)
        abutting = "none"
        if abut:
            nz_, ny_, nx_ = iz[zz[pick], yy[pick], xx[pick]], iy[zz[pick], yy[pick], xx[pick]], ix[zz[pick], yy[pick], xx[pick]]
            near = int(labels0[nz_, ny_, nx_])
            abutting = "chest wall" if np.hypot(x[nx_] - c[0], y[ny_] - c[1]) > 0.55 * p.cage_width else "mediastinum"
            abutting = abutting if near != 0 else "lung boundary"
        si_lo, si_hi = SI_RANGE[LOBES[lobe]]
        # draw every random number whatever the options, so that static and breathing variants
        # (or amplitude overrides) of one seed share the patient and the tumour
        u = float(rng.random())
        if amplitude_range_mm is not None:
            si_lo, si_hi = amplitude_range_mm
        si_drawn = (si_lo + u * (si_hi - si_lo)) * (0.6 if abutting == "chest wall" and amplitude_range_mm is None else 1.0)
        lr, ap = rng.uniform(-0.15, 0.15), rng.uniform(0.1, 0.35)
        si = 0.0 if static else (amplitude_mm if amplitude_mm is not None else si_drawn)
        amp = np.array([si * lr, -si * ap, -si])
        necrosis_draw = rng.random() < 0.4
        has_necrosis = necrosis if necrosis is not None else (d > 30 and necrosis_draw)
        peak = float(rng.uniform(3.0, 15.0) if d > 12 else rng.uniform(2.5, 8.0))
        tumours.append(TumourShape(
            centre=centre, lobe=LOBES[lobe], diameter_mm=float(d), **geometry,
            suv_peak=peak, suv_floor=float(max(1.5, peak * rng.uniform(0.35, 0.6))),
            necrosis=float(rng.uniform(0.25, 0.5)) if has_necrosis else 0.0, amplitude_lps=amp,
            texture=sample_texture(rng), abutting=abutting, hu=float(rng.uniform(30, 50)),
        ))
    return tumours


def tumour_box(tumours: list[TumourShape], grid: Grid, offset=(0.0, 0.0, 0.0), margin: float = 4.0):
    """Index box of ``grid`` covering all tumours over the whole cycle (None if outside)."""
    lo = np.min([t.centre + np.minimum(t.amplitude_lps, 0) - t.radius_bound_mm for t in tumours], axis=0)
    hi = np.max([t.centre + np.maximum(t.amplitude_lps, 0) + t.radius_bound_mm for t in tumours], axis=0)
    off = np.asarray(offset, float)
    return grid.box(lo + off - margin, hi + off + margin)


def tumour_masks(tumours: list[TumourShape], model: ThoraxModel, trace: BreathingTrace, dia_amp: float,
                 X, Y, Z, times: np.ndarray) -> np.ndarray:
    """Boolean tumour masks (len(times), ...) at the coordinates, clipped to the lungs of each phase.

    ``X``, ``Y``, ``Z`` are broadcastable axis arrays shaped (1,1,nx), (1,ny,1), (nz,1,1).
    Each tumour is evaluated only in the box around its displaced position.
    """
    times = np.atleast_1d(times)
    x, y, z = X.ravel(), Y.ravel(), Z.ravel()
    out = np.zeros((len(times), z.size, y.size, x.size), bool)
    for i, t in enumerate(times):
        for tum in tumours:
            off = trace.displacement(tum.amplitude_lps, t)
            box = tum.local_box(x, y, z, off)
            sub = out[i][box]
            if sub.size:
                sub |= tum.inside(X[..., box[2]], Y[:, box[1]], Z[box[0]], off)
    if out.any():
        shifts = -trace.inhale_fraction(times) * dia_amp
        out &= model.lung_masks(x, y, z, shifts)
    return out
