"""RT Structure Set of the IGTV on the CT grid, written with pydicom.

Contours
--------
Every connected region (4-connected) of every CT slice becomes one
CLOSED_PLANAR contour traced along the pixel boundaries (vertices at pixel
corners, half a pixel from the pixel centres), so rasterising the contour at
the pixel centres gives the mask back exactly.

Holes: planning systems differ in how they combine several contours of one
ROI on one plane: some XOR them (even-odd; a contour inside another is a
hole), others OR them (plastimatch by default, without ``--xor-contours``).
By default (``keyhole=True``) each hole is therefore joined to the outline of
its region by a zero-width cut along a pixel-boundary line, so a region with
holes is a single polygon and both conventions fill it correctly; the cut
adds no area. ``keyhole=False`` writes holes as separate contours running the
other way round, for systems that XOR and dislike keyhole cuts.
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from pipeline.volume import SeriesVolume
from pipeline.writers.common import (
    ALGORITHM_NAME,
    ResultInfo,
    copy_patient_study,
    da_tm,
    label_volume,
    result_uids,
    set_equipment,
    target_labels,
)
from pipeline.writers.contours import trace_slice

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# Retired "Detached Study Management" SOP class: the value RT readers expect in
# RT Referenced Study Sequence > Referenced SOP Class UID.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"


def write_rtstruct(
    mask: np.ndarray,
    ct: SeriesVolume,
    info: ResultInfo,
    roi_names: list[str] | None = None,
    keyhole: bool = True,
) -> Dataset:
    """Build an RT Structure Set of ``mask`` referencing every CT image.

    Parameters
    ----------
    mask:
        (Z, Y, X) on the CT grid, z in the order of ``ct.headers``: bool (one
        target) or integer labels 1..n (n ROIs).
    ct:
        The CT volume; its headers (no pixel data needed) give geometry and references.
    info:
        Result identity (UID root, versions, ROI naming, colour, interpreted type).
    roi_names:
        ROI names; default "IGTV", "IGTV 2", ... from ``info.roi_name``.
    keyhole:
        Join holes to their outline (default) instead of writing them as
        separate contours (see the module notes).

    Returns
    -------
    pydicom.Dataset
        The RT Structure Set with file meta information, ready for
        ``save_as(path, enforce_file_format=True)``.
    """
    labels, count = label_volume(mask, ct)
    names = target_labels(info.roi_name, count, roi_names)
    headers = ct.headers
    series_uid, instance_uid = result_uids(ct, info, "RTSTRUCT")
    date, time = da_tm(info.timestamp())

    ds = Dataset()
    ds.file_meta = _file_meta(instance_uid)
    copy_patient_study(headers[0], ds)
    # SOP Common
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # RT Series
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = info.series_number_for("RTSTRUCT")
    ds.SeriesDescription = info.series_description("RTSTRUCT")
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.OperatorsName = ""
    # Frame of Reference: the CT's
    ds.FrameOfReferenceUID = ct.frame_of_reference_uid
    ds.PositionReferenceIndicator = headers[0].get("PositionReferenceIndicator", "")
    # General Equipment
    set_equipment(ds, info)
    # Structure Set
    ds.StructureSetLabel = info.roi_name[:16] or "IGTV"
    ds.StructureSetName = f"{info.roi_name} AI"[:64]
    ds.StructureSetDescription = f"{info.roi_name} contoured automatically by igtv-node"[:1024]
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ReferencedFrameOfReferenceSequence = Sequence([_referenced_frame(ct)])
    ds.StructureSetROISequence = Sequence(
        [_structure_set_roi(number, name, ct, info) for number, name in enumerate(names, start=1)]
    )
    # ROI Contour
    colours = _colours(info.roi_color, count)
    ds.ROIContourSequence = Sequence(
        [
            _roi_contour(number, labels, colour, headers, keyhole)
            for number, colour in enumerate(colours, start=1)
        ]
    )
    # RT ROI Observations
    ds.RTROIObservationsSequence = Sequence(
        [
            _observation(number, name, info.roi_interpreted_type)
            for number, name in enumerate(names, start=1)
        ]
    )
    # Approval: an automatic contour is not clinically approved until a person reviews it.
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def _file_meta(instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(RT_STRUCTURE_SET_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID(instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _image_reference(header: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    return item


def _referenced_frame(ct: SeriesVolume) -> Dataset:
    """Frame of reference -> study -> series -> every CT image."""
    series = Dataset()
    series.SeriesInstanceUID = ct.series_instance_uid
    series.ContourImageSequence = Sequence([_image_reference(h) for h in ct.headers])
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = ct.study_instance_uid
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = ct.frame_of_reference_uid
    frame.RTReferencedStudySequence = Sequence([study])
    return frame


def _structure_set_roi(number: int, name: str, ct: SeriesVolume, info: ResultInfo) -> Dataset:
    item = Dataset()
    item.ROINumber = number
    item.ReferencedFrameOfReferenceUID = ct.frame_of_reference_uid
    item.ROIName = name[:64]
    item.ROIGenerationAlgorithm = "AUTOMATIC"
    item.ROIGenerationDescription = f"{ALGORITHM_NAME} {info.algorithm_version}"[:64]
    return item


def _observation(number: int, name: str, interpreted_type: str) -> Dataset:
    item = Dataset()
    item.ObservationNumber = number
    item.ReferencedROINumber = number
    item.ROIObservationLabel = name[:16]
    item.RTROIInterpretedType = interpreted_type
    item.ROIInterpreter = ""
    return item


def _colours(base: tuple[int, int, int], count: int) -> list[list[int]]:
    """``base`` for the first ROI, then a fixed palette for further lesions."""
    palette = [(255, 165, 0), (255, 0, 255), (0, 200, 255), (255, 255, 0), (0, 255, 0)]
    out = [[int(v) for v in base]]
    for i in range(1, count):
        out.append(list(palette[(i - 1) % len(palette)]))
    return out


def _roi_contour(
    number: int, labels: np.ndarray, colour: list[int], headers: list[Dataset], keyhole: bool
) -> Dataset:
    """ROI Contour item of label ``number``: the contours of every slice it occupies."""
    item = Dataset()
    item.ReferencedROINumber = number
    item.ROIDisplayColor = colour
    contours: list[Dataset] = []
    for k in np.flatnonzero(labels.any(axis=(1, 2))):
        region = labels[int(k)] == number
        if not region.any():
            continue
        header = headers[int(k)]
        to_patient = _pixel_to_patient(header)
        for loop in trace_slice(region, keyhole=keyhole):
            contour = Dataset()
            contour.ContourNumber = len(contours) + 1
            contour.ContourImageSequence = Sequence([_image_reference(header)])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(loop.points)
            contour.ContourData = format_ds(to_patient(loop.points).ravel())
            contours.append(contour)
    if contours:
        item.ContourSequence = Sequence(contours)
    return item


def _pixel_to_patient(header: Dataset):
    """Map (row, column) pixel coordinates of ``header``'s slice to patient mm (LPS)."""
    origin = np.asarray(header.ImagePositionPatient, dtype=float)
    iop = np.asarray(header.ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    row_spacing, col_spacing = (float(v) for v in header.PixelSpacing)

    def to_patient(points: np.ndarray) -> np.ndarray:
        rows, cols = points[:, 0:1], points[:, 1:2]
        return origin + cols * col_spacing * row_dir + rows * row_spacing * col_dir

    return to_patient


def format_ds(values: np.ndarray) -> list[str]:
    """Decimal String values of at most 16 characters (0.1 micrometre resolution)."""
    out = []
    for value in np.asarray(values, dtype=float):
        text = f"{value:.4f}".rstrip("0").rstrip(".")
        if text in ("-0", ""):
            text = "0"
        if len(text) > 16:
            text = format_number_as_ds(float(value))
        out.append(text)
    return out
