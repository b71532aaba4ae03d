"""Put the PET on the CT grid: by DICOM geometry, or after a rigid registration.

Orientation (head-first/feet-first, supine/prone) needs no special case: every
volume carries its direction cosines, and resampling works in LPS physical
coordinates.
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk

from pipeline.errors import CoverageError
from pipeline.registration import RegistrationInfo, physical_box, register_rigid
from pipeline.volume import SeriesVolume

log = logging.getLogger(__name__)

REGISTER_MODES = ("auto", "always", "never")
#: Fewest fraction of CT slices whose centre must lie inside the PET field of view.
MIN_COVERAGE = 0.5


def resample_to_reference(
    moving: sitk.Image,
    reference: sitk.Image,
    transform: sitk.Transform | None = None,
    interpolator: int = sitk.sitkLinear,
    default: float = 0.0,
) -> sitk.Image:
    """Resample ``moving`` onto the grid of ``reference`` (float32).

    Parameters
    ----------
    moving:
        Image to resample.
    reference:
        Grid (origin, spacing, direction, size) of the result.
    transform:
        Maps reference physical points to moving physical points; identity when None.
    interpolator:
        A SimpleITK interpolator (linear by default; nearest neighbour for labels).
    default:
        Value outside ``moving``.
    """
    transform = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    return sitk.Resample(moving, reference, transform, interpolator, float(default), sitk.sitkFloat32)


def slice_coverage(ct: sitk.Image, pet: sitk.Image, transform: sitk.Transform | None = None) -> float:
    """Fraction of CT slices whose in-plane centre maps inside the PET volume."""
    nx, ny, nz = ct.GetSize()
    size = np.asarray(pet.GetSize(), dtype=float)
    inside = 0
    for k in range(nz):
        point = ct.TransformContinuousIndexToPhysicalPoint(((nx - 1) / 2.0, (ny - 1) / 2.0, float(k)))
        if transform is not None:
            point = transform.TransformPoint(point)
        index = np.asarray(pet.TransformPhysicalPointToContinuousIndex(point))
        if np.all(index >= -0.5) and np.all(index <= size - 0.5):
            inside += 1
    return inside / max(nz, 1)


def pet_onto_ct(
    pet_suv: SeriesVolume,
    ct: SeriesVolume,
    register: str = "auto",
    min_coverage: float = MIN_COVERAGE,
) -> tuple[sitk.Image, RegistrationInfo]:
    """Resample the PET onto the CT grid, registering first when needed.

    Parameters
    ----------
    pet_suv:
        PET volume (SUV).
    ct:
        CT volume: the output grid.
    register:
        "auto": register only when the FrameOfReferenceUIDs differ; "always"; "never".
    min_coverage:
        Smallest acceptable fraction of CT slices inside the PET field of view.

    Returns
    -------
    (sitk.Image, RegistrationInfo)
        float32 PET on the CT grid (0 outside the PET field of view) and the record
        of how it got there.

    Raises
    ------
    ValueError
        Unknown ``register`` mode.
    CoverageError
        PET and CT overlap on fewer than ``min_coverage`` of the CT slices.
    """
    if register not in REGISTER_MODES:
        raise ValueError(f"register must be one of {REGISTER_MODES}, got {register!r}")
    same_for = pet_suv.frame_of_reference_uid == ct.frame_of_reference_uid
    if register == "always" or (register == "auto" and not same_for):
        info = register_rigid(ct.image, pet_suv.image)
        why = "requested" if register == "always" else "FrameOfReferenceUIDs differ"
        info.reason = f"registered ({why}); {info.reason}"
        log.info(
            "registered PET to CT: translation %s mm, rotation %s deg, %.1f s",
            [round(v, 1) for v in info.translation_mm],
            [round(v, 2) for v in info.rotation_deg],
            info.seconds,
        )
    else:
        reason = (
            "same FrameOfReferenceUID: DICOM geometry only"
            if same_for
            else "FrameOfReferenceUIDs differ but registration is disabled: DICOM geometry only"
        )
        info = RegistrationInfo(method="geometry", registered=False, reason=reason)
    info.coverage = slice_coverage(ct.image, pet_suv.image, info.transform)
    if info.coverage < min_coverage:
        cmin, cmax = physical_box(ct.image)
        pmin, pmax = physical_box(pet_suv.image)
        raise CoverageError(
            f"{pet_suv.description} covers only {info.coverage:.0%} of the slices of {ct.description} "
            f"(at least {min_coverage:.0%} needed; CT z {cmin[2]:.0f}..{cmax[2]:.0f} mm, "
            f"PET z {pmin[2]:.0f}..{pmax[2]:.0f} mm); send a PET and CT of the same body region"
        )
    resampled = resample_to_reference(pet_suv.image, ct.image, info.transform)
    return resampled, info
