"""Bad-study variants made by editing a small synthetic study with pydicom (fresh UIDs per variant)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid


def _z(ds: Dataset) -> float:
    return float(ds.ImagePositionPatient[2])


def _drop_middle_ct(cts: list[Dataset], pets: list[Dataset]) -> tuple[list[Dataset], list[Dataset]]:
    cts = sorted(cts, key=_z)
    mid = len(cts) // 2
    return cts[:mid - 1] + cts[mid + 2:], pets


def _no_decay(cts: list[Dataset], pets: list[Dataset]) -> tuple[list[Dataset], list[Dataset]]:
    for ds in pets:
        for kw in ("RadiopharmaceuticalInformationSequence", "DecayCorrection", "DecayFactor"):
            if kw in ds:
                delattr(ds, kw)
    return cts, pets


def _other_patient(cts: list[Dataset], pets: list[Dataset]) -> tuple[list[Dataset], list[Dataset]]:
    for ds in pets:
        ds.PatientID = "SOMEONE-ELSE"
        ds.PatientName = "Other^Person"
    return cts, pets


def _far_pet(cts: list[Dataset], pets: list[Dataset]) -> tuple[list[Dataset], list[Dataset]]:
    for ds in pets:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 3000.0]
    return cts, pets


def _gantry_tilt(cts: list[Dataset], pets: list[Dataset]) -> tuple[list[Dataset], list[Dataset]]:
    a = math.radians(15)
    for ds in cts:
        ds.ImageOrientationPatient = [1, 0, 0, 0, round(math.cos(a), 6), round(math.sin(a), 6)]
        ds.GantryDetectorTilt = 15
    return cts, pets


VARIANTS: dict[str, Callable[[list[Dataset], list[Dataset]], tuple[list[Dataset], list[Dataset]]]] = {
    "ct_only": lambda c, p: (c, []),
    "pet_only": lambda c, p: ([], p),
    "pet_without_decay_data": _no_decay,
    "different_patients": _other_patient,
    "no_overlap": _far_pet,
    "missing_slices": _drop_middle_ct,
    "gantry_tilt": _gantry_tilt,
}


def write_variant(study_dir: Path, name: str, out: Path) -> tuple[str, list[Path]]:
    """Write variant ``name`` of the study in ``study_dir`` to ``out``; return (StudyInstanceUID, files)."""
    cts = [dcmread(p) for p in sorted((study_dir / "CT").glob("*.dcm"))]
    pets = [dcmread(p) for p in sorted((study_dir / "PT").glob("*.dcm"))]
    cts, pets = VARIANTS[name](cts, pets)
    study_uid = generate_uid()
    series = {}
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, ds in enumerate([*cts, *pets]):
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series.setdefault(ds.SeriesInstanceUID, generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = out / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study_uid, files
