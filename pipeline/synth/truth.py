"""Ground truth of a synthetic study: DICOM-SEG (GTV, IGTV) and the case JSON.

Layout under ``truth/``: ``seg_gtv.dcm`` (one segment labelled "GTV"), ``seg_igtv.dcm``
(one segment labelled "IGTV"), both BINARY highdicom Segmentations referencing every CT
instance, and ``case.json``. ``write_rtstruct_truth`` is the hook for the RTSTRUCT truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from pipeline.synth.series import MANUFACTURER


def make_seg(ct: list[Dataset], mask: np.ndarray, label: str, series_uid: str, sop_uid: str,
             series_number: int, software_version: str) -> Dataset:
    """BINARY DICOM-SEG of ``mask`` (z-y-x, aligned with ``ct``) with one segment named ``label``."""
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.GrossTumorVolume,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=ct,
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="synth-thorax",
        software_versions=software_version,
        device_serial_number="0001",
        series_description=f"{label} truth (synthetic)",
    )
    return seg


def write_case_json(case: dict, path: Path) -> Path:
    """Write the case parameters as indented JSON."""
    path.write_text(json.dumps(case, indent=2, sort_keys=True))
    return path


def write_rtstruct_truth(study, folder: Path) -> Path | None:
    """Hook for the RTSTRUCT truth (``truth/rtstruct.dcm``) once the RTSTRUCT writer exists.

    Returns None until then; the DICOM-SEG truth is always written.
    """
    return None
