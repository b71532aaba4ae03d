"""Hand-made PET/CT DICOM series for the pipeline tests.

An analytic thorax phantom is defined in LPS millimetres, so any grid (spacing,
orientation, feet-first, prone, shifted frame of reference) samples the same
anatomy and the truth at any physical point is known.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
F18_HALF_LIFE = 6586.2
DOSE_BQ = 350e6
WEIGHT_KG = 75.0
#: One hour between injection (10:00) and scan start (11:00).
DECAYED_DOSE = DOSE_BQ * math.exp(-math.log(2) * 3600.0 / F18_HALF_LIFE)
BQML_PER_SUV = DECAYED_DOSE / (WEIGHT_KG * 1000.0)

HFS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
FFS = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
HFP = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)

TUMOUR_CENTRE = np.array([60.0, -15.0, 10.0])
TUMOUR_RADIUS = 14.0


@dataclass
class Grid:
    """A voxel grid in LPS: size (nx, ny, nz), spacing (mm), origin, orientation (IOP)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    iop: tuple[float, ...] = HFS

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the row, column and normal directions."""
        row = np.asarray(self.iop[:3])
        col = np.asarray(self.iop[3:])
        return np.column_stack([row, col, np.cross(row, col)])

    def points(self) -> np.ndarray:
        """Physical coordinates (Z, Y, X, 3) of every voxel centre."""
        nx, ny, nz = self.size
        k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
        idx = np.stack([i, j, k], axis=-1).astype(np.float64) * np.asarray(self.spacing)
        return idx @ self.direction.T + np.asarray(self.origin)

    def slice_position(self, k: int) -> list[float]:
        return list(np.asarray(self.origin) + k * self.spacing[2] * self.direction[:, 2])


def centred_grid(
    size: tuple[int, int, int], spacing: tuple[float, float, float], iop=HFS, shift=(0.0, 0.0, 0.0)
) -> Grid:
    """A grid whose centre is at ``shift`` (LPS mm) for the given orientation."""
    g = Grid(size, spacing, (0.0, 0.0, 0.0), iop)
    half = (np.asarray(size) - 1) * np.asarray(spacing) / 2.0
    origin = np.asarray(shift) - g.direction @ half
    return Grid(size, spacing, tuple(float(v) for v in origin), iop)


def _ellipsoid(p: np.ndarray, centre, radii) -> np.ndarray:
    d = (p - np.asarray(centre)) / np.asarray(radii)
    return np.sum(d * d, axis=-1) <= 1.0


def phantom_ct(p: np.ndarray) -> np.ndarray:
    """HU of the thorax phantom at physical points ``p`` (..., 3)."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    hu = np.full(p.shape[:-1], -1000.0)
    body = ((x / 150.0) ** 2 + (y / 105.0) ** 2 <= 1.0) & (np.abs(z) <= 160)
    hu[body] = 40.0
    for sx in (-1, 1):
        hu[_ellipsoid(p, (sx * 68.0, -5.0, 5.0), (48.0, 62.0, 110.0))] = -830.0
    hu[_ellipsoid(p, (-15.0, -35.0, -25.0), (40.0, 35.0, 35.0))] = 45.0  # heart
    hu[((x / 14.0) ** 2 + ((y - 75.0) / 14.0) ** 2 <= 1.0) & (np.abs(z) <= 160)] = 650.0  # spine
    hu[_ellipsoid(p, TUMOUR_CENTRE, (TUMOUR_RADIUS,) * 3)] = 35.0
    hu[(y >= 115.0) & (y <= 125.0) & (np.abs(x) <= 200)] = 150.0  # couch
    return hu


def phantom_suv(p: np.ndarray) -> np.ndarray:
    """SUV of the phantom at physical points ``p`` (..., 3); smooth at the tumour edge."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    suv = np.zeros(p.shape[:-1])
    body = ((x / 150.0) ** 2 + (y / 105.0) ** 2 <= 1.0) & (np.abs(z) <= 160)
    suv[body] = 1.0
    for sx in (-1, 1):
        suv[_ellipsoid(p, (sx * 68.0, -5.0, 5.0), (48.0, 62.0, 110.0))] = 0.3
    suv[_ellipsoid(p, (-15.0, -35.0, -25.0), (40.0, 35.0, 35.0))] = 3.0
    r = np.linalg.norm(p - TUMOUR_CENTRE, axis=-1)
    suv += 7.0 * np.exp(-0.5 * (r / 9.0) ** 2)
    return suv


@dataclass
class StudyIds:
    """UIDs and patient identity shared by the series of one study."""

    patient_id: str = "PHANTOM-1"
    study_uid: str = field(default_factory=generate_uid)
    for_uid: str = field(default_factory=generate_uid)


def _base(ids: StudyIds, modality: str, sop_class: str, series_uid: str, number: int, description: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.PatientID = ids.patient_id
    ds.PatientName = "Phantom^Test"
    ds.PatientWeight = str(WEIGHT_KG)
    ds.StudyInstanceUID = ids.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = ids.for_uid
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20240315"
    ds.SeriesTime = "110000"
    ds.AcquisitionTime = "110000"
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "igtv-tests"
    return ds


def _finish(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    ds.save_as(path, enforce_file_format=True)


def write_slices(
    folder: Path,
    grid: Grid,
    stored: np.ndarray,
    base: Dataset,
    per_slice: list[dict] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    shuffle_names: bool = True,
    seed: int = 0,
) -> list[Path]:
    """Write one file per z-slice of ``stored`` (Z, Y, X integer array)."""
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = grid.size
    names = list(range(nz))
    if shuffle_names:
        random.Random(seed).shuffle(names)
    paths = []
    for k in range(nz):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = nz - k  # deliberately not the spatial order
        ds.ImagePositionPatient = [f"{v:.4f}" for v in grid.slice_position(k)]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in grid.iop]
        ds.PixelSpacing = [f"{grid.spacing[1]:.6f}", f"{grid.spacing[0]:.6f}"]
        ds.SliceThickness = f"{grid.spacing[2]:.4f}"
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        arr = np.ascontiguousarray(stored[k])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if arr.dtype == np.int16 else 0
        ds.PixelData = arr.tobytes()
        for key, value in (per_slice[k] if per_slice else {}).items():
            setattr(ds, key, value)
        path = folder / f"img{names[k]:04d}.dcm"
        _finish(ds, path, transfer_syntax)
        paths.append(path)
    return paths


def write_ct(
    folder: Path,
    grid: Grid,
    ids: StudyIds,
    *,
    unsigned: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    number: int = 2,
    description: str = "CT AC thorax",
    hu: np.ndarray | None = None,
    series_uid: str | None = None,
    extra: dict | None = None,
) -> list[Path]:
    """A CT series of the phantom (or of ``hu``) on ``grid``; stored int16 or uint16."""
    hu = phantom_ct(grid.points()) if hu is None else hu
    base = _base(ids, "CT", CT_STORAGE, series_uid or generate_uid(), number, description)
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.KVP = "120"
    if unsigned:
        base.RescaleIntercept, base.RescaleSlope = "-1024", "1"
        stored = np.clip(np.round(hu + 1024), 0, 65535).astype(np.uint16)
    else:
        base.RescaleIntercept, base.RescaleSlope = "0", "1"
        stored = np.round(hu).astype(np.int16)
    for key, value in (extra or {}).items():
        setattr(base, key, value)
    return write_slices(folder, grid, stored, base, transfer_syntax=transfer_syntax)


def pet_base(ids: StudyIds, series_uid: str | None = None, number: int = 3, description: str = "PET AC WB") -> Dataset:
    """PET series header with F-18 FDG, 350 MBq at 10:00, scan at 11:00, START decay correction."""
    base = _base(ids, "PT", PET_STORAGE, series_uid or generate_uid(), number, description)
    base.ImageType = ["ORIGINAL", "PRIMARY"]
    base.Units = "BQML"
    base.DecayCorrection = "START"
    base.CorrectedImage = ["ATTN", "DECY", "NORM", "SCAT", "RAN"]
    base.AttenuationCorrectionMethod = "CT-based"
    info = Dataset()
    info.Radiopharmaceutical = "Fluorodeoxyglucose"
    info.RadiopharmaceuticalStartTime = "100000"
    info.RadiopharmaceuticalStartDateTime = "20240315100000"
    info.RadionuclideTotalDose = str(DOSE_BQ)
    info.RadionuclideHalfLife = str(F18_HALF_LIFE)
    base.RadiopharmaceuticalInformationSequence = [info]
    return base


def write_pet(
    folder: Path,
    grid: Grid,
    ids: StudyIds,
    *,
    base: Dataset | None = None,
    values: np.ndarray | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[Path]:
    """A PET series in Bq/mL (per-slice RescaleSlope) of the phantom on ``grid``."""
    base = base if base is not None else pet_base(ids)
    if values is None:
        values = phantom_suv(grid.points()) * BQML_PER_SUV
    per_slice = []
    stored = np.zeros(values.shape, dtype=np.uint16)
    for k in range(values.shape[0]):
        peak = float(values[k].max())
        slope = peak / 65000.0 if peak > 0 else 1.0
        stored[k] = np.round(values[k] / slope).astype(np.uint16)
        per_slice.append({"RescaleSlope": f"{slope:.10g}", "RescaleIntercept": "0"})
    return write_slices(folder, grid, stored, base, per_slice=per_slice, transfer_syntax=transfer_syntax)


@dataclass
class PhantomStudy:
    """A written study: folder, grids, identities and file lists."""

    root: Path
    ids: StudyIds
    ct_grid: Grid
    pet_grid: Grid
    ct_files: list[Path]
    pet_files: list[Path]


#: Small but thorax-like grids (fast to write and process).
CT_GRID = centred_grid((96, 72, 48), (3.4, 3.4, 5.0))
PET_GRID = centred_grid((64, 48, 40), (5.0, 5.0, 6.0))


def make_study(root: Path, ct_grid: Grid = CT_GRID, pet_grid: Grid = PET_GRID, **ct_kwargs) -> PhantomStudy:
    """Write a PET/CT phantom study under ``root`` (CT/ and PT/ subfolders)."""
    ids = StudyIds()
    ct_files = write_ct(root / "CT", ct_grid, ids, **ct_kwargs)
    pet_files = write_pet(root / "PT", pet_grid, ids)
    return PhantomStudy(root, ids, ct_grid, pet_grid, ct_files, pet_files)


@pytest.fixture
def phantom_study(tmp_path: Path) -> PhantomStudy:
    """The default phantom study (head-first supine, shared frame of reference)."""
    return make_study(tmp_path / "study")


def read(path: Path) -> Dataset:
    return pydicom.dcmread(path)
