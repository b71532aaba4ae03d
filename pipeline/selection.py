"""Pick the attenuation-corrected PET and the CT of one study.

Every series that is not chosen is reported with the reason it was skipped.

Rules
-----
1. A series is a *candidate* when it is an axial, single-frame CT Image or PET
   Image object with pixel data and at least ``min_slices`` slices, and is not a
   localizer/scout, secondary capture, MIP/projection, dose report,
   non-attenuation-corrected (NAC) PET or a non-image object (SEG, RTSTRUCT, SR, ...).
2. Pairs (PET, CT) must share PatientID and StudyInstanceUID; if candidates exist
   for both modalities but no pair matches, :class:`PatientMismatchError`.
3. Among matching pairs the choice is, in order of priority: the PET covers
   at least :data:`~pipeline.geometry.MIN_COVERAGE` of the CT slices, same
   FrameOfReferenceUID (no registration needed), most PET slices, most CT
   slices, closest acquisition times, lowest series numbers, then UIDs (so the
   choice is deterministic).
4. Coverage is judged from the headers only (ImagePositionPatient and
   ImageOrientationPatient, no pixel reads) and only when PET and CT share the
   FrameOfReferenceUID; otherwise their coordinates are not comparable and the
   pair is not ranked down (registration decides later). When every pair is
   known to cover too little, :class:`CoverageError` names each CT considered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from pipeline.errors import CoverageError, MissingCtError, MissingPetError, PatientMismatchError
from pipeline.geometry import MIN_COVERAGE
from pipeline.reader import AXIAL_TOLERANCE_DEG, SeriesInfo

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
_SOP_NAMES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT (multi-frame)",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT (multi-frame)",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET (multi-frame)",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET (multi-frame)",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.88.67": "X-Ray Radiation Dose SR",
}
_NON_IMAGE_MODALITIES = {
    "SEG": "segmentation object (SEG)",
    "RTSTRUCT": "RT structure set",
    "RTPLAN": "RT plan",
    "RTDOSE": "RT dose",
    "RTRECORD": "RT record",
    "SR": "structured report",
    "KO": "key object selection",
    "PR": "presentation state",
    "REG": "registration object",
    "DOC": "encapsulated document",
}
_LOCALIZER_WORDS = re.compile(r"\b(scout|topogram|scanogram|surview|localizer|localiser|pilot|planning view)\b", re.I)
_MIP_WORDS = re.compile(r"\b(mip|maximum intensity|projection|rotating)\b", re.I)
_DOSE_WORDS = re.compile(r"\b(dose report|dose info|dose summary|patient protocol)\b", re.I)
_NAC_WORDS = re.compile(r"(\bnac\b|\bnon[ -]?ac\b|\bno[ -]?ac\b|uncorrected|\bnoattn\b|\bnon[ -]?attenuation)", re.I)

#: Fewest slices a PET or CT series must have to be considered.
MIN_SLICES = 8


@dataclass
class Selection:
    """The chosen pair, what was skipped and why the choice was made."""

    pet: SeriesInfo
    ct: SeriesInfo
    skipped: list[tuple[SeriesInfo, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _secondary_capture(s: SeriesInfo) -> bool:
    """Secondary Capture SOP classes (single- and multi-frame) are 1.2.840.10008.5.1.4.1.1.7[.x]."""
    uid = s.sop_class_uid
    return uid == "1.2.840.10008.5.1.4.1.1.7" or uid.startswith("1.2.840.10008.5.1.4.1.1.7.")


def reject_reason(s: SeriesInfo, min_slices: int = MIN_SLICES) -> str | None:
    """Why ``s`` cannot be the PET or CT of the pair, or None when it is a candidate."""
    modality = s.modality
    if modality in _NON_IMAGE_MODALITIES:
        return f"{_NON_IMAGE_MODALITIES[modality]}, not an image series"
    if s.sop_class_uid in _SOP_NAMES and modality not in ("CT", "PT"):
        return f"{_SOP_NAMES[s.sop_class_uid]}, not an image series"
    if modality not in ("CT", "PT"):
        shown = modality or "missing"
        return f"modality {shown} is neither PET (PT) nor CT"
    text = s.description
    if _secondary_capture(s):
        return "secondary capture (screen shot), not an acquired image series"
    if "LOCALIZER" in s.image_type or _LOCALIZER_WORDS.search(text):
        return "localizer/scout image"
    if _DOSE_WORDS.search(text) or "DOSE INFO" in s.image_type or "SCREEN SAVE" in s.image_type:
        return "dose report / protocol page"
    if "MIP" in s.image_type or "PROJECTION IMAGE" in s.image_type or _MIP_WORDS.search(text):
        return "MIP / projection / 3D rendering, not slices"
    expected = CT_IMAGE_STORAGE if modality == "CT" else PET_IMAGE_STORAGE
    if s.sop_class_uid != expected:
        name = _SOP_NAMES.get(s.sop_class_uid, f"SOP class {s.sop_class_uid or 'missing'}")
        return f"{name} is not supported; expected single-frame {'CT' if modality == 'CT' else 'PET'} Image Storage"
    if s.n_images == 0:
        return "no pixel data"
    if modality == "PT":
        corrected = set(s.corrected_image)
        if corrected and "ATTN" not in corrected:
            return f"PET not attenuation-corrected (CorrectedImage {'/'.join(s.corrected_image)})"
        if not corrected and _NAC_WORDS.search(text):
            return "PET not attenuation-corrected (NAC, by description)"
    orientations = {i.orientation for i in s.instances if i.orientation is not None}
    if len(orientations) == 1:
        iop = np.asarray(next(iter(orientations)))
        normal = np.cross(iop[:3], iop[3:])
        norm = float(np.linalg.norm(normal)) or 1.0
        angle = float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / norm))))
        if angle > AXIAL_TOLERANCE_DEG:
            return f"not axial (slice normal {angle:.0f} deg from head-feet); a reformat"
    elif len(orientations) > 1:
        return "slices with mixed orientations (not one axial stack)"
    if s.n_images < min_slices:
        return f"too few slices ({s.n_images} < {min_slices})"
    return None


def _time(s: SeriesInfo) -> datetime | None:
    date = s.series_date
    clock = s.earliest_acquisition_time or s.series_time
    if not date or not clock:
        return None
    clock = clock.split(".")[0].ljust(6, "0")[:6]
    try:
        return datetime.strptime(date[:8] + clock, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def _dt_seconds(a: SeriesInfo, b: SeriesInfo) -> float:
    ta, tb = _time(a), _time(b)
    if ta is None or tb is None:
        return float("inf")
    return abs((ta - tb).total_seconds())


def _slice_centres(s: SeriesInfo) -> np.ndarray | None:
    """LPS centres (N, 3) of the slices of ``s`` from the headers; None when a slice lacks geometry."""
    inst = [i for i in s.instances if i.has_pixel_data]
    centres = []
    for i in inst:
        if i.position is None or i.orientation is None or i.pixel_spacing is None:
            return None
        if i.rows is None or i.columns is None:
            return None
        iop = np.asarray(i.orientation, dtype=np.float64)
        row, col = iop[:3], iop[3:]
        nrow, ncol = float(np.linalg.norm(row)), float(np.linalg.norm(col))
        if nrow == 0.0 or ncol == 0.0:
            return None
        # Column index moves along the row direction by the column spacing (PixelSpacing[1]).
        centre = (
            np.asarray(i.position, dtype=np.float64)
            + row / nrow * (i.columns - 1) / 2.0 * i.pixel_spacing[1]
            + col / ncol * (i.rows - 1) / 2.0 * i.pixel_spacing[0]
        )
        centres.append(centre)
    return np.asarray(centres) if centres else None


def _normal(s: SeriesInfo) -> np.ndarray | None:
    """Unit slice normal of ``s`` (candidates have one orientation); None when unknown."""
    for i in s.instances:
        if i.orientation is not None:
            iop = np.asarray(i.orientation, dtype=np.float64)
            normal = np.cross(iop[:3], iop[3:])
            norm = float(np.linalg.norm(normal))
            return normal / norm if norm > 0.0 else None
    return None


def header_coverage(pet: SeriesInfo, ct: SeriesInfo) -> float | None:
    """Fraction of CT slices whose in-plane centre lies within the PET's slab along its normal.

    The PET slab reaches half a slice step beyond its first and last slice, as in
    :func:`pipeline.geometry.slice_coverage` (which also checks the in-plane
    extent after the volumes are read). Only the headers are used.

    Returns
    -------
    float or None
        None when the series do not share a FrameOfReferenceUID (positions are
        not comparable) or a slice lacks position/orientation/size.
    """
    if not pet.frame_of_reference_uid or pet.frame_of_reference_uid != ct.frame_of_reference_uid:
        return None
    normal = _normal(pet)
    pet_pos = [i.position for i in pet.instances if i.has_pixel_data]
    ct_centres = _slice_centres(ct)
    if normal is None or ct_centres is None or not pet_pos or any(p is None for p in pet_pos):
        return None
    along = np.asarray(pet_pos, dtype=np.float64) @ normal
    lo, hi = float(along.min()), float(along.max())
    half = (hi - lo) / (len(along) - 1) / 2.0 if len(along) > 1 else 0.5
    ct_along = ct_centres @ normal
    inside = (ct_along >= lo - half) & (ct_along <= hi + half)
    return float(np.count_nonzero(inside)) / len(ct_along)


def _z_range(s: SeriesInfo) -> str:
    """Patient z range (mm) of the slice positions of ``s``, for messages."""
    z = [i.position[2] for i in s.instances if i.has_pixel_data and i.position is not None]
    return f"{min(z):.0f}..{max(z):.0f}" if z else "?"


def select_pet_ct(series: list[SeriesInfo], min_slices: int = MIN_SLICES) -> Selection:
    """Choose the attenuation-corrected PET and the CT to segment (rules in the module doc).

    Raises
    ------
    MissingPetError, MissingCtError
        No candidate of that modality; the message lists what was skipped and why.
    PatientMismatchError
        PET and CT candidates exist but none share PatientID and StudyInstanceUID.
    CoverageError
        Every matching pair shares a FrameOfReferenceUID and the PET covers fewer
        than ``MIN_COVERAGE`` of the CT slices (by header geometry); the message
        names every CT series considered.
    """
    skipped: list[tuple[SeriesInfo, str]] = []
    pets: list[SeriesInfo] = []
    cts: list[SeriesInfo] = []
    for s in series:
        why = reject_reason(s, min_slices)
        if why is not None:
            skipped.append((s, why))
        elif s.modality == "PT":
            pets.append(s)
        else:
            cts.append(s)

    def summary(modality: str) -> str:
        rows = [f"{s.label}: {why}" for s, why in skipped if s.modality == modality]
        return ("; skipped " + "; ".join(rows)) if rows else ""

    if not pets:
        raise MissingPetError(
            f"no attenuation-corrected PET series among {len(series)} series{summary('PT')}"
        )
    if not cts:
        raise MissingCtError(f"no usable axial CT series among {len(series)} series{summary('CT')}")
    pairs = [
        (p, c)
        for p in pets
        for c in cts
        if p.patient_id == c.patient_id and p.study_instance_uid == c.study_instance_uid
    ]
    if not pairs:
        p, c = pets[0], cts[0]
        what = "PatientID" if p.patient_id != c.patient_id else "StudyInstanceUID"
        raise PatientMismatchError(
            f"PET and CT belong to different patients or studies ({what} differs): "
            f"PET {p.label} (study {p.study_instance_uid}) vs CT {c.label} "
            f"(study {c.study_instance_uid}); route each patient's study separately"
        )

    coverage = {(p.uid, c.uid): header_coverage(p, c) for p, c in pairs}

    def too_little(p: SeriesInfo, c: SeriesInfo) -> bool:
        cov = coverage[(p.uid, c.uid)]
        return cov is not None and cov < MIN_COVERAGE

    if all(too_little(p, c) for p, c in pairs):
        rows = [
            f"{p.label} covers only {coverage[(p.uid, c.uid)]:.0%} of the slices of {c.label} "
            f"(CT z {_z_range(c)} mm, PET z {_z_range(p)} mm)"
            for p, c in pairs
        ]
        considered = ", ".join(dict.fromkeys(c.label for _p, c in pairs))
        raise CoverageError(
            f"no PET/CT pair overlaps enough (at least {MIN_COVERAGE:.0%} of the CT slices must lie in the "
            f"PET field of view): {'; '.join(rows)}; CT series considered: {considered}; "
            f"send a PET and CT of the same body region"
        )

    def rank(pair: tuple[SeriesInfo, SeriesInfo]) -> tuple:
        p, c = pair
        same_for = bool(p.frame_of_reference_uid) and p.frame_of_reference_uid == c.frame_of_reference_uid
        return (
            too_little(p, c),
            not same_for,
            -p.n_images,
            -c.n_images,
            _dt_seconds(p, c),
            p.number if p.number is not None else 1 << 30,
            c.number if c.number is not None else 1 << 30,
            p.uid,
            c.uid,
        )

    pairs.sort(key=rank)
    pet, ct = pairs[0]
    notes = [
        f"PET: {pet.label}, {pet.n_images} slices, units {pet.units or '?'} "
        f"(1 of {len(pets)} PET candidate(s))",
        f"CT: {ct.label}, {ct.n_images} slices (1 of {len(cts)} CT candidate(s))",
    ]
    if pet.frame_of_reference_uid == ct.frame_of_reference_uid:
        notes.append("PET and CT share the FrameOfReferenceUID: resampled by DICOM geometry")
        chosen_cov = coverage[(pet.uid, ct.uid)]
        if chosen_cov is not None:
            notes.append(f"PET covers {chosen_cov:.0%} of the CT slices (header geometry)")
    else:
        notes.append("PET and CT have different FrameOfReferenceUIDs: registration needed")
    if len(pairs) > 1:
        notes.append(
            f"chosen by: PET covering at least {MIN_COVERAGE:.0%} of the CT slices, same FrameOfReferenceUID, "
            "most PET slices, most CT slices, closest acquisition time, lowest series numbers"
        )
    for s in pets + cts:
        if s is not pet and s is not ct:
            p, c = (s, ct) if s.modality == "PT" else (pet, s)
            cov = coverage.get((p.uid, c.uid))
            if cov is not None and cov < MIN_COVERAGE:
                why = (
                    f"PET covers only {cov:.0%} of the CT slices (at least {MIN_COVERAGE:.0%} needed); "
                    f"another {s.modality} candidate was preferred (see notes)"
                )
            else:
                why = f"another {s.modality} candidate was preferred (see notes)"
            skipped.append((s, why))
    return Selection(pet=pet, ct=ct, skipped=skipped, notes=notes)
