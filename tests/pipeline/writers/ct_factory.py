"""A small, realistic CT series (on disk and in memory) for the writer tests and benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipeline.volume import SeriesVolume

ORIENTATIONS = {
    "HFS": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "FFS": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "HFP": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    # In-plane rotation by 20 degrees: not axis-aligned, exercises the general geometry.
    "ROT20": (
        (np.cos(np.radians(20.0)), np.sin(np.radians(20.0)), 0.0),
        (-np.sin(np.radians(20.0)), np.cos(np.radians(20.0)), 0.0),
    ),
}
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


@dataclass
class CtSeries:
    """A synthetic CT series: the volume contract, its files and geometry."""

    volume: SeriesVolume
    directory: Path | None
    row_dir: np.ndarray
    col_dir: np.ndarray
    slice_dir: np.ndarray
    spacing_zyx: tuple[float, float, float]

    def voxel_centres_mm(self) -> np.ndarray:
        """Patient coordinates (Z, Y, X, 3) of every voxel centre."""
        nz, ny, nx = self.volume.array.shape
        sz, sy, sx = self.spacing_zyx
        origin = np.asarray(self.volume.headers[0].ImagePositionPatient, dtype=float)
        k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
        return (
            origin
            + (i[..., None] * sx) * self.row_dir
            + (j[..., None] * sy) * self.col_dir
            + (k[..., None] * sz) * self.slice_dir
        )


def make_ct_series(
    directory: Path | None,
    shape: tuple[int, int, int] = (12, 96, 96),
    spacing_zyx: tuple[float, float, float] = (3.0, 0.9765625, 0.9765625),
    orientation: str = "HFS",
    descending: bool = False,
    origin: tuple[float, float, float] = (-46.5, -120.25, -250.0),
    patient_name: str = "Test^Writer",
    seed: int = 0,
) -> CtSeries:
    """Build a CT series of ``shape`` (Z, Y, X); write it to ``directory`` when given.

    Parameters
    ----------
    orientation:
        "HFS", "FFS", "HFP" or "ROT20" (rows and columns of the image in patient space).
    descending:
        Slices stored with decreasing position along the slice normal (z order of the mask).
    """
    nz, ny, nx = shape
    sz, sy, sx = spacing_zyx
    row_dir, col_dir = (np.asarray(v, dtype=float) for v in ORIENTATIONS[orientation])
    normal = np.cross(row_dir, col_dir)
    slice_dir = -normal if descending else normal
    rng = np.random.default_rng(seed)
    study_uid, series_uid, for_uid = (generate_uid(prefix=UID_PREFIX) for _ in range(3))
    yy, xx = np.mgrid[0:ny, 0:nx]
    body = ((yy - ny / 2) / (0.42 * ny)) ** 2 + ((xx - nx / 2) / (0.47 * nx)) ** 2 <= 1.0
    pixels = np.where(body, 40, -1000).astype(np.int16)
    headers: list[Dataset] = []
    volume = np.empty(shape, dtype=np.float32)
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    for k in range(nz):
        ipp = np.asarray(origin, dtype=float) + k * sz * slice_dir
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid(prefix=UID_PREFIX)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName = patient_name
        ds.PatientID = "WRITERS-001"
        ds.PatientBirthDate = "19500101"
        ds.PatientSex = "F"
        ds.PatientAge = "074Y"
        ds.PatientWeight = "61.5"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "S1"
        ds.AccessionNumber = "ACC1"
        ds.StudyDescription = "PET/CT thorax"
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.SeriesDescription = "CT thorax"
        ds.PatientPosition = orientation if orientation in ("HFS", "FFS", "HFP") else "HFS"
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "Synthetic"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}".rstrip("0").rstrip(".") for v in ipp]
        ds.ImageOrientationPatient = [
            f"{v:.8f}".rstrip("0").rstrip(".") or "0" for v in (*row_dir, *col_dir)
        ]
        ds.SliceThickness = sz
        ds.PixelSpacing = [sy, sx]
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.ContentDate, ds.ContentTime = "20240102", "101500"
        noisy = (pixels + rng.integers(-5, 6, size=pixels.shape)).astype(np.int16)
        volume[k] = noisy
        if directory is not None:
            on_disk = ds.copy()
            on_disk.PixelData = noisy.tobytes()
            on_disk.file_meta = FileMetaDataset()
            on_disk.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            on_disk.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            on_disk.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            on_disk.save_as(directory / f"CT{k:04d}.dcm", enforce_file_format=True)
        headers.append(ds)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((sx, sy, sz))
    image.SetOrigin(tuple(float(v) for v in headers[0].ImagePositionPatient))
    image.SetDirection(tuple(np.column_stack([row_dir, col_dir, slice_dir]).ravel()))
    ct = SeriesVolume(
        image=image,
        modality="CT",
        series_instance_uid=series_uid,
        frame_of_reference_uid=for_uid,
        study_instance_uid=study_uid,
        headers=headers,
        units="HU",
    )
    return CtSeries(ct, directory, row_dir, col_dir, slice_dir, spacing_zyx)


def ellipsoid_mask(
    shape: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    centre_zyx_mm: tuple[float, float, float],
    radii_zyx_mm: tuple[float, float, float],
) -> np.ndarray:
    """Bool mask of an ellipsoid in voxel index space scaled by spacing."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    total = 0.0
    for g, s, c, r in zip(grids, spacing_zyx, centre_zyx_mm, radii_zyx_mm, strict=True):
        total = total + ((g * s - c) / r) ** 2
    return np.asarray(total <= 1.0)
