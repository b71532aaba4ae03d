"""A lesion's superior-inferior breathing amplitude, fitted from its PET smear.

The CT is a snapshot at one moment of the breathing cycle; the PET is an average over
many cycles. A tumour moving ``A`` mm along z therefore leaves in the PET its CT-time
shape swept along z, each position weighted by the time spent there, and blurred by the
scanner. :func:`fit_si_amplitude` finds the sweep that best explains the PET around the
lesion: the amplitude, where in the cycle the CT was taken, and how long the cycle rests
at exhale (the cos^2n breathing model of Lujan et al., n = 1-3), by least squares with a
free uptake scale and a background linear along z (the smear of the liver or the heart
into the lung). Inhale moves lung tumours inferiorly, so only sweeps towards the feet
are considered.

The settings below were chosen on the 240 synthetic studies the outline refiner learns
from (their true amplitudes known), never on the studies that choose or evaluate models.
There, on the studies whose lesion the node finds, the fit correlates at 0.91 with the
true amplitude (2.5 mm root-mean-square error; 0.76 and 3.4 mm below 2 cc).

Everything here works on CT-grid arrays in the canonical orientation, slices ordered
inferior to superior (:func:`pipeline.refinement.canonical_crop`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Largest amplitude considered (mm); lung tumours rarely move more than 30 mm.
MAX_AMPLITUDE_MM = 30.0
#: Blur of the PET (mm FWHM) assumed for the sweep.
PET_FWHM_MM = 6.0
#: How far from the tumour in-plane (mm) the PET is compared; along z, this plus the amplitude.
REACH_MM = 6.0
#: CT-grid voxels (z, y, x) around the lesion that the node gives the fit.
FIT_MARGIN = (12, 12, 12)
#: Soft tissue on CT (HU): the tumour at the CT's moment is the lesion's voxels above this.
TISSUE_HU = -400.0
#: PET voxels outside the tumour take part only where the CT is lung (below this HU), so
#: that the heart, the liver or the chest wall do not count as the tumour's smear.
LUNG_HU = -300.0
#: Time samples of one breathing cycle.
CYCLE_SAMPLES = 20
#: Step (mm) of the sweep's positions and of the amplitudes tried.
STEP_MM = 1.0


@dataclass(frozen=True)
class AmplitudeFit:
    """The sweep that best explains a lesion's PET.

    Attributes
    ----------
    amplitude_mm:
        Superior-inferior distance between exhale and inhale positions (>= 0).
    ct_inhale_fraction:
        Where the CT's moment lies between exhale (0) and inhale (1).
    shape_n:
        The breathing model's exponent (larger: longer rest at exhale).
    explained:
        Fraction of the PET's variance around the lesion the sweep explains (0-1).
    """

    amplitude_mm: float
    ct_inhale_fraction: float
    shape_n: int
    explained: float


def tumour_at_ct_time(ct_hu: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """The tumour as the CT shows it: the soft tissue of ``lesion``."""
    return (ct_hu > TISSUE_HU) & lesion


def _shift_z(volume: np.ndarray, voxels: float) -> np.ndarray:
    """``volume`` moved by ``voxels`` (fractional) along axis 0 towards higher indices, zero-filled."""
    n = volume.shape[0]
    whole = int(np.floor(voxels))
    frac = voxels - whole
    out = np.zeros_like(volume)
    for k, weight in ((whole, 1.0 - frac), (whole + 1, frac)):
        lo, hi = max(0, k), min(n, n + k)
        if hi > lo and weight > 0:
            out[lo:hi] += weight * volume[lo - k:hi - k]
    return out


def _inhale_fractions(shape_n: int) -> np.ndarray:
    """Inhale fraction cos(pi t)^(2n) at :data:`CYCLE_SAMPLES` moments spread evenly over a cycle."""
    t = (np.arange(CYCLE_SAMPLES) + 0.5) / CYCLE_SAMPLES
    return np.cos(np.pi * t) ** (2 * shape_n)


def fit_si_amplitude(suv: np.ndarray, ct_hu: np.ndarray, lesion: np.ndarray,
                     spacing_zyx: tuple[float, float, float]) -> AmplitudeFit | None:
    """The breathing sweep of ``lesion`` that best explains ``suv``; None when nothing can be fitted.

    Parameters
    ----------
    suv, ct_hu:
        (Z, Y, X) PET SUV and CT HU on the CT grid around the lesion, canonical
        orientation, slices inferior to superior, reaching :data:`FIT_MARGIN` voxels
        beyond the lesion.
    lesion:
        (Z, Y, X) boolean lesion the node delivers (its soft tissue is taken as the tumour
        at the CT's moment, :func:`tumour_at_ct_time`).
    spacing_zyx:
        Voxel spacing in mm.
    """
    tumour = tumour_at_ct_time(ct_hu, lesion)
    if not tumour.any() or spacing_zyx[0] <= 0:
        return None
    blurred = ndimage.gaussian_filter(tumour.astype(np.float32), [PET_FWHM_MM / 2.355 / s for s in spacing_zyx])
    z_reach = MAX_AMPLITUDE_MM + REACH_MM
    near = ndimage.distance_transform_edt(
        ~tumour, sampling=(spacing_zyx[0] * REACH_MM / z_reach, spacing_zyx[1], spacing_zyx[2])) <= REACH_MM
    region = near & ((ct_hu < LUNG_HU) | ndimage.binary_dilation(tumour, iterations=1))
    pet = suv[region].astype(np.float64)
    if pet.size < 10 or np.ptp(pet) <= 0:
        return None
    offsets = np.arange(-MAX_AMPLITUDE_MM, MAX_AMPLITUDE_MM + STEP_MM / 2, STEP_MM)
    templates = np.stack([_shift_z(blurred, o / spacing_zyx[0])[region] for o in offsets]).astype(np.float64)
    background, _ = np.linalg.qr(np.stack([np.ones(pet.size), np.nonzero(region)[0].astype(np.float64)], axis=1))
    templates -= (templates @ background) @ background.T
    pet -= background @ (background.T @ pet)
    gram = templates @ templates.T
    cross = templates @ pet
    best: tuple[float, float, float, int] = (0.0, 0.0, 0.0, 1)
    for shape_n in (1, 2, 3):
        s = _inhale_fractions(shape_n)
        for ct_fraction in np.linspace(0.0, 1.0, 11):
            for amplitude in np.arange(0.0, MAX_AMPLITUDE_MM + STEP_MM / 2, STEP_MM):
                # inhale moves the tumour inferiorly: towards lower slice indices
                position = -amplitude * (s - ct_fraction)
                index = np.clip(np.round((position - offsets[0]) / STEP_MM).astype(int), 0, len(offsets) - 1)
                weights = np.bincount(index, minlength=len(offsets)) / len(s)
                sxx, sxy = weights @ gram @ weights, weights @ cross
                if sxx > 0 and sxy > 0 and sxy * sxy / sxx > best[0]:
                    best = (sxy * sxy / sxx, amplitude, ct_fraction, shape_n)
    if best[0] <= 0:
        return None
    return AmplitudeFit(amplitude_mm=float(best[1]), ct_inhale_fraction=float(best[2]), shape_n=int(best[3]),
                        explained=float(best[0] / (pet @ pet)))
