"""What the SEG and RTSTRUCT writers share: result metadata, UIDs, copied modules, mask checks."""

from __future__ import annotations

import datetime as dt
from copy import deepcopy
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset

from pipeline.errors import GeometryError, PipelineError
from pipeline.uids import derive_uid, validate_uid
from pipeline.volume import SeriesVolume

MANUFACTURER = "igtv-node"
MANUFACTURER_MODEL_NAME = "igtv-node SIM-Mamba"
ALGORITHM_NAME = "igtv-node SIM-Mamba"

# Patient, Patient Study and General Study attributes copied verbatim from the CT.
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
# Type 2 attributes of the Patient and General Study modules: present, possibly empty.
TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

OUTPUT_KINDS = ("SEG", "RTSTRUCT")
_DEFAULT_SERIES_NUMBER = {"SEG": 901, "RTSTRUCT": 902}


@dataclass
class ResultInfo:
    """Identity of one result: UID root, versions, ROI naming and series metadata.

    Attributes
    ----------
    uid_root:
        Organisation UID root of derived result UIDs.
    model_version:
        Checkpoint version string; part of the derived UIDs.
    node_version:
        igtv-node software version.
    roi_name, roi_interpreted_type, roi_color:
        Name of the (first) target, RT ROI Interpreted Type and display colour (RGB).
    institution_name:
        Copied into General Equipment when set.
    series_number:
        SEG series number; the RTSTRUCT gets ``series_number + 1``. None gives 901 / 902.
    device_serial_number:
        General Equipment Device Serial Number of this node.
    created:
        Creation time stamp of the results; None means now.
    """

    uid_root: str
    model_version: str
    node_version: str
    roi_name: str = "IGTV"
    roi_interpreted_type: str = "GTV"
    roi_color: tuple[int, int, int] = (255, 0, 0)
    institution_name: str | None = None
    series_number: int | None = None
    device_serial_number: str = "1"
    created: dt.datetime | None = None

    @property
    def software_versions(self) -> list[str]:
        """Software Versions (multi-valued): node and checkpoint version."""
        return [_lo(f"igtv-node {self.node_version}"), _lo(f"model {self.model_version}")]

    @property
    def algorithm_version(self) -> str:
        """Algorithm version string: node version and checkpoint version."""
        return _lo(f"{self.node_version}/{self.model_version}")

    def series_description(self, kind: str) -> str:
        """Series Description of the ``kind`` ("SEG" or "RTSTRUCT") result series."""
        return _lo(f"{self.roi_name} (AI, igtv-node) {kind}")

    def series_number_for(self, kind: str) -> int:
        """Series Number of the ``kind`` result series."""
        _check_kind(kind)
        if self.series_number is None:
            return _DEFAULT_SERIES_NUMBER[kind]
        return int(self.series_number) + (0 if kind == "SEG" else 1)

    def timestamp(self) -> dt.datetime:
        """Creation time stamp (``created`` or now), without microseconds."""
        return (self.created or dt.datetime.now()).replace(microsecond=0)


def _check_kind(kind: str) -> None:
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"output kind must be one of {OUTPUT_KINDS}, got {kind!r}")


def _lo(text: str) -> str:
    """Clip to the 64 characters of a LO value."""
    return text[:64]


def result_uids(ct: SeriesVolume, info: ResultInfo, kind: str) -> tuple[str, str]:
    """Deterministic (SeriesInstanceUID, SOPInstanceUID) of one result.

    Derived from the CT study and series UIDs, the checkpoint version and the
    output kind, so re-running a study replaces its results.
    """
    _check_kind(kind)
    study = validate_uid(ct.study_instance_uid, "CT StudyInstanceUID")
    series = validate_uid(ct.series_instance_uid, "CT SeriesInstanceUID")
    parts = (study, series, info.model_version, kind)
    series_uid = derive_uid(info.uid_root, *parts, "series")
    instance_uid = derive_uid(info.uid_root, *parts, "instance")
    return validate_uid(series_uid, f"{kind} SeriesInstanceUID"), validate_uid(
        instance_uid, f"{kind} SOPInstanceUID"
    )


def copy_patient_study(source: Dataset, target: Dataset) -> Dataset:
    """Copy Patient / Patient Study / General Study attributes of ``source`` into ``target``.

    Type 2 attributes missing in the source are written empty. The Specific
    Character Set is copied so that names keep their encoding.
    """
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            elem = source[keyword]
            target[elem.tag] = deepcopy(elem)
    for keyword in TYPE2_KEYWORDS:
        if keyword not in target:
            setattr(target, keyword, "")
    return target


def set_equipment(target: Dataset, info: ResultInfo) -> Dataset:
    """Fill the General Equipment module with this node's identity."""
    target.Manufacturer = MANUFACTURER
    target.ManufacturerModelName = MANUFACTURER_MODEL_NAME
    target.SoftwareVersions = info.software_versions
    target.DeviceSerialNumber = info.device_serial_number
    if info.institution_name:
        target.InstitutionName = _lo(info.institution_name)
    return target


def da_tm(moment: dt.datetime) -> tuple[str, str]:
    """DICOM DA and TM strings of ``moment``."""
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")


def check_ct(ct: SeriesVolume) -> list[Dataset]:
    """Return the CT headers after checking what the writers need from them.

    Raises
    ------
    GeometryError
        When headers are missing or lack geometry, or slices disagree in size or orientation.
    """
    headers = list(ct.headers)
    if not headers:
        raise GeometryError(f"{ct.description}: no slice headers, results cannot reference the CT")
    needed = (
        "SOPClassUID",
        "SOPInstanceUID",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "Rows",
        "Columns",
    )
    first = headers[0]
    for index, header in enumerate(headers):
        missing = [k for k in needed if k not in header]
        if missing:
            raise GeometryError(
                f"{ct.description}: slice {index} lacks {', '.join(missing)}; cannot place results"
            )
        if (header.Rows, header.Columns) != (first.Rows, first.Columns):
            raise GeometryError(f"{ct.description}: slice {index} has a different matrix size")
        iop = np.asarray(header.ImageOrientationPatient, dtype=float)
        if index == 0:
            iop0 = iop
        elif not np.allclose(iop, iop0, atol=1e-4):
            raise GeometryError(f"{ct.description}: slice {index} has a different orientation")
    return headers


def label_volume(mask: np.ndarray, ct: SeriesVolume) -> tuple[np.ndarray, int]:
    """Check a bool or label mask (Z, Y, X) on the CT grid; return (labels, target count).

    A bool mask is one target; an integer mask with labels 1..n is n targets
    (label k -> target k), background 0. ``labels`` is an unsigned integer
    array (a view of ``mask`` where possible). An empty mask counts as one
    target without voxels, so results still name the ROI.

    Raises
    ------
    GeometryError
        When the mask shape differs from the CT grid (slices, rows, columns).
    PipelineError
        When the mask is not bool or integer, or holds negative labels.
    """
    headers = check_ct(ct)
    mask = np.asarray(mask)
    expected = (len(headers), int(headers[0].Rows), int(headers[0].Columns))
    if mask.shape != expected:
        raise GeometryError(
            f"{ct.description}: mask shape {mask.shape} does not match the CT grid {expected} "
            "(slices, rows, columns)"
        )
    if mask.dtype == bool:
        return mask.view(np.uint8), 1
    if not np.issubdtype(mask.dtype, np.integer):
        raise PipelineError(
            f"{ct.description}: mask must be bool or integer labels, got {mask.dtype}"
        )
    low, high = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
    if low < 0:
        raise PipelineError(f"{ct.description}: mask holds negative labels")
    if high > 65535:
        raise PipelineError(
            f"{ct.description}: mask holds {high} labels, more than a SEG can carry"
        )
    dtype = np.uint8 if high < 256 else np.uint16
    labels = mask if mask.dtype == dtype else mask.astype(dtype)
    return labels, max(high, 1)


def target_labels(base: str, count: int, labels: list[str] | None) -> list[str]:
    """Names of ``count`` targets: ``labels`` if given, else "IGTV", "IGTV 2", ..."""
    if labels is not None:
        if len(labels) != count:
            raise PipelineError(f"{count} targets in the mask but {len(labels)} names given")
        return [_lo(str(label)) for label in labels]
    return [base if i == 0 else f"{base} {i + 1}" for i in range(count)]
