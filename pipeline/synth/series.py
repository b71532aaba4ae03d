"""DICOM CT and PET instances of a synthetic study (pydicom datasets)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
)

from pipeline.synth.grid import Grid

MANUFACTURER = "igtv-node synthetic"
F18_HALF_LIFE_S = 6586.2


@dataclass
class StudyInfo:
    """Patient, study and acquisition facts shared by all series of one study."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    weight_kg: float
    height_m: float
    study_uid: str
    frame_of_reference_uid: str
    pet_frame_of_reference_uid: str
    study_datetime: datetime
    ct_datetime: datetime
    injection_datetime: datetime
    pet_datetime: datetime
    injected_dose_bq: float
    accession: str
    study_id: str
    patient_position: str
    software_version: str


def _da(dt: datetime) -> str:
    return dt.strftime("%Y%m%d")


def _tm(dt: datetime) -> str:
    return dt.strftime("%H%M%S.%f")[:13]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    ds = Dataset()
    ds.CodeValue = value
    ds.CodingSchemeDesignator = scheme
    ds.CodeMeaning = meaning
    return ds


def _common(info: StudyInfo, sop_class: str, sop_uid: str, series_uid: str, modality: str,
            series_number: int, description: str, series_dt: datetime) -> Dataset:
    """Patient, study, series, equipment and SOP common modules."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = _da(info.study_datetime)
    ds.SeriesDate = _da(series_dt)
    ds.StudyTime = _tm(info.study_datetime)
    ds.SeriesTime = _tm(series_dt)
    ds.AccessionNumber = info.accession
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.StudyDescription = "PET-CT thorax (synthetic)"
    ds.SeriesDescription = description
    ds.ManufacturerModelName = "synth-thorax"
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = info.birth_date
    ds.PatientSex = info.sex
    ds.PatientAge = info.age
    ds.PatientSize = f"{info.height_m:.2f}"
    ds.PatientWeight = f"{info.weight_kg:.1f}"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = info.software_version
    ds.PatientPosition = info.patient_position
    ds.StudyInstanceUID = info.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = info.study_id
    ds.SeriesNumber = series_number
    ds.PositionReferenceIndicator = ""
    ds.BurnedInAnnotation = "NO"
    return ds


def _plane(ds: Dataset, grid: Grid, k: int, thickness: float) -> None:
    ds.ImagePositionPatient = [round(v, 4) for v in grid.slice_position(k)]
    ds.ImageOrientationPatient = grid.image_orientation
    ds.SliceLocation = round(grid.slice_position(k)[2], 4)
    ds.SliceThickness = round(thickness, 4)
    ds.PixelSpacing = [round(grid.spacing[1], 6), round(grid.spacing[0], 6)]
    ds.Rows = grid.shape[1]
    ds.Columns = grid.shape[2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15


def ct_datasets(info: StudyInfo, grid: Grid, stored: np.ndarray, series_uid: str,
                sop_uids: list[str], intercept: int = -1024) -> list[Dataset]:
    """One CT Image Storage instance per slice of ``stored`` (int16, HU - intercept)."""
    out = []
    for k in range(grid.shape[0]):
        acq = info.ct_datetime + timedelta(seconds=0.35 * k)
        ds = _common(info, CTImageStorage, sop_uids[k], series_uid, "CT", 2, "CT thorax free breathing",
                     info.ct_datetime)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionDate = _da(acq)
        ds.AcquisitionTime = _tm(acq)
        ds.ContentDate = _da(acq)
        ds.ContentTime = _tm(acq)
        ds.FrameOfReferenceUID = info.frame_of_reference_uid
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        _plane(ds, grid, k, grid.spacing[2])
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = [40, -600]
        ds.WindowWidth = [400, 1500]
        ds.KVP = 120
        ds.XRayTubeCurrent = 80
        ds.ExposureTime = 500
        ds.ConvolutionKernel = "B30f"
        ds.DataCollectionDiameter = 500
        ds.ReconstructionDiameter = round(grid.spacing[0] * grid.shape[2], 3)
        ds.GantryDetectorTilt = 0
        ds.TableHeight = 150
        ds.RotationDirection = "CW"
        ds.BodyPartExamined = "CHEST"
        ds.PatientOrientation = ["L", "P"] if grid.direction[0] > 0 else ["R", "P"]
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<i2").tobytes()
        out.append(ds)
    return out


def pet_datasets(info: StudyInfo, grid: Grid, bqml: np.ndarray, series_uid: str, sop_uids: list[str],
                 frame_s: float, bed_mm: float) -> tuple[list[Dataset], list[float]]:
    """One PET Image Storage instance per slice of ``bqml`` (Bq/mL, decay corrected to series start).

    Pixel values are unsigned 16-bit with a per-slice RescaleSlope. Returns the datasets and
    the slopes.
    """
    out, slopes = [], []
    z = grid.axes()[2]
    top = z.max() if info.patient_position.startswith("HF") else z.min()
    n = grid.shape[0]
    for k in range(n):
        bed = int(abs(top - z[k]) // bed_mm)
        acq = info.pet_datetime + timedelta(seconds=bed * frame_s)
        ds = _common(info, PositronEmissionTomographyImageStorage, sop_uids[k], series_uid, "PT", 3,
                     "PET AC thorax (synthetic FDG)", info.pet_datetime)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.AcquisitionDate = _da(acq)
        ds.AcquisitionTime = _tm(acq)
        ds.ContentDate = _da(info.pet_datetime)
        ds.ContentTime = _tm(info.pet_datetime)
        ds.FrameOfReferenceUID = info.pet_frame_of_reference_uid
        ds.InstanceNumber = k + 1
        _plane(ds, grid, k, grid.spacing[2])
        ds.PixelRepresentation = 0
        plane = bqml[k].astype(np.float64)
        peak = float(plane.max())
        slope = peak / 65535.0 if peak > 0 else 1e-6
        pixels = np.clip(np.rint(plane / slope), 0, 65535).astype("<u2")
        ds.RescaleIntercept = 0
        ds.RescaleSlope = f"{slope:.10g}"[:16]
        slopes.append(float(ds.RescaleSlope))
        ds.Units = "BQML"
        ds.CountsSource = "EMISSION"
        ds.SeriesType = ["WHOLE BODY", "IMAGE"]
        ds.NumberOfSlices = n
        ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
        ds.DecayCorrection = "START"
        ds.RandomsCorrectionMethod = "DLYD"
        ds.AttenuationCorrectionMethod = "CT-based"
        ds.ScatterCorrectionMethod = "Model-based"
        ds.ReconstructionMethod = "OSEM 3i21s PSF"
        ds.ReconstructionDiameter = round(grid.spacing[0] * grid.shape[2], 3)
        ds.CollimatorType = "NONE"
        ds.AxialAcceptance = 0
        ds.FrameReferenceTime = round(((acq - info.pet_datetime).total_seconds() + frame_s / 2) * 1000.0, 1)
        ds.ActualFrameDuration = int(frame_s * 1000)
        ds.ImageIndex = k + 1
        ds.DecayFactor = f"{2 ** ((acq - info.pet_datetime).total_seconds() / F18_HALF_LIFE_S):.6f}"
        ds.DoseCalibrationFactor = 1.0
        ds.SliceSensitivityFactor = 1.0
        ds.LossyImageCompression = "00"
        ds.BodyPartExamined = "CHEST"
        del ds.PatientPosition  # the PET IOD carries the position as code sequences instead
        ds.PatientGantryRelationshipCodeSequence = Sequence([_code("102540008", "SCT", "headfirst")
                                                             if info.patient_position.startswith("HF")
                                                             else _code("102541007", "SCT", "feet-first")])
        orient = _code("102538003", "SCT", "recumbent")
        orient.PatientOrientationModifierCodeSequence = Sequence([_code("40199007", "SCT", "supine")])
        ds.PatientOrientationCodeSequence = Sequence([orient])
        ds.RadiopharmaceuticalInformationSequence = Sequence([_radiopharmaceutical(info)])
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out, slopes


def _radiopharmaceutical(info: StudyInfo) -> Dataset:
    item = Dataset()
    item.Radiopharmaceutical = "Fluorodeoxyglucose"
    item.RadiopharmaceuticalRoute = "Intravenous route"
    item.RadiopharmaceuticalStartTime = _tm(info.injection_datetime)
    item.RadiopharmaceuticalStartDateTime = info.injection_datetime.strftime("%Y%m%d%H%M%S.%f")[:21]
    item.RadionuclideTotalDose = f"{info.injected_dose_bq:.1f}"
    item.RadionuclideHalfLife = F18_HALF_LIFE_S
    item.RadionuclidePositronFraction = 0.9673
    item.RadionuclideCodeSequence = Sequence([_code("77004003", "SCT", "^18^Fluorine")])
    item.RadiopharmaceuticalCodeSequence = Sequence([_code("35321007", "SCT", "Fluorodeoxyglucose F^18^")])
    return item
