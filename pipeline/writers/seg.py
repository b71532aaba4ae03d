"""DICOM-SEG (binary) of the IGTV on the CT grid, written with highdicom.

Coding choice
-------------
Each segment is described anatomically, as DICOM SEG asks (CID 7150 / 7151):
category "Morphologically Abnormal Structure" (SCT 49755003), type "Neoplasm"
(SCT 108369006), anatomic region "Lung" (SCT 39607008). "Neoplasm" rather
than "Neoplasm, Primary" because the network cannot tell a primary tumour
from a nodal or metastatic lesion when several are kept. The radiotherapy role
(an internal gross tumour volume) is carried by the segment label ("IGTV") and
by the RTSTRUCT's RT ROI Interpreted Type.
"""

from __future__ import annotations

import string
import warnings
from copy import deepcopy

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM

from pipeline.volume import SeriesVolume
from pipeline.writers.common import (
    ALGORITHM_NAME,
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    TYPE2_KEYWORDS,
    ResultInfo,
    copy_patient_study,
    da_tm,
    label_volume,
    result_uids,
    target_labels,
)

SEGMENT_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
SEGMENT_TYPE = codes.SCT.Neoplasm
ANATOMIC_REGION = codes.SCT.Lung


def algorithm_identification(info: ResultInfo) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification: igtv-node SIM-Mamba, node + checkpoint version, AI family."""
    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.DCM.ArtificialIntelligence,
        version=info.algorithm_version,
        source=MANUFACTURER,
    )


def segment_descriptions(info: ResultInfo, labels: list[str]) -> list[hd.seg.SegmentDescription]:
    """One AUTOMATIC segment description per target, numbered from 1."""
    algorithm = algorithm_identification(info)
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=SEGMENT_CATEGORY,
            segmented_property_type=SEGMENT_TYPE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[ANATOMIC_REGION],
        )
        for number, label in enumerate(labels, start=1)
    ]


def write_seg(
    mask: np.ndarray,
    ct: SeriesVolume,
    info: ResultInfo,
    segment_labels: list[str] | None = None,
    workers: int = 0,
) -> Dataset:
    """Build a binary DICOM-SEG of ``mask`` referencing every CT image.

    Parameters
    ----------
    mask:
        (Z, Y, X) on the CT grid, z in the order of ``ct.headers``: bool (one
        target) or integer labels 1..n (n targets, one segment each).
    ct:
        The CT volume; its headers (no pixel data needed) are the source images.
    info:
        Result identity (UID root, versions, names).
    segment_labels:
        Segment labels; default "IGTV", "IGTV 2", ... from ``info.roi_name``.
    workers:
        Passed to highdicom (only matters for compressed transfer syntaxes).

    Returns
    -------
    pydicom.Dataset
        The Segmentation instance (a ``highdicom.seg.Segmentation``). Frames
        without any segmented pixel are omitted; a mask without any target
        still yields a valid object with its segments and one empty frame.
    """
    label_map, count = label_volume(mask, ct)
    labels = target_labels(info.roi_name, count, segment_labels)
    series_uid, instance_uid = result_uids(ct, info, "SEG")
    moment = info.timestamp()
    date, time = da_tm(moment)
    seg = hd.seg.Segmentation(
        source_images=[highdicom_source(ct.headers[0]), *ct.headers[1:]],
        pixel_array=label_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(info, labels),
        series_instance_uid=series_uid,
        series_number=info.series_number_for("SEG"),
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=info.software_versions,  # type: ignore[arg-type]
        device_serial_number=info.device_serial_number,
        omit_empty_frames=True,
        content_label=_cs_label(info.roi_name),
        content_description=f"{info.roi_name} segmented automatically by igtv-node"[:64],
        series_description=info.series_description("SEG"),
        institution_name=info.institution_name,
        content_date=date,
        content_time=time,
        series_date=date,
        series_time=time,
        workers=workers,
    )
    copy_patient_study(ct.headers[0], seg)
    seg.InstanceCreationDate = DA(date)
    seg.InstanceCreationTime = TM(time)
    return seg


def highdicom_source(header: Dataset) -> Dataset:
    """A copy of the first CT header whose patient and study values highdicom can parse.

    highdicom parses the birth date, study date and time and sex of the first source image;
    values senders do write ("00000000" for an unknown birth date, "Male") would stop the SEG.
    Those, and the attributes it reads but the CT lacks, are empty in the copy; the SEG still
    carries the CT's own values (:func:`copy_patient_study`).
    """
    source = deepcopy(header)
    for keyword, parse in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        value = source.get(keyword)
        if not value:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parse(value)
        except ValueError:
            setattr(source, keyword, "")
    if source.get("PatientSex") not in ("M", "F", "O"):
        source.PatientSex = ""
    for keyword in TYPE2_KEYWORDS:
        if keyword not in source:
            setattr(source, keyword, "")
    return source


def _cs_label(text: str) -> str:
    """A Content Label (CS: upper case, digits, space, underscore; 16 chars)."""
    keep = string.ascii_uppercase + string.digits + " _"
    allowed = "".join(ch if ch in keep else "_" for ch in text.upper())
    return (allowed.strip() or "IGTV")[:16]
