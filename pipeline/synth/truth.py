"""Ground truth of a synthetic study: DICOM-SEG (GTV, IGTV) and the case JSON.

Layout under ``truth/``: ``seg_gtv.dcm`` (one segment labelled "GTV"), ``seg_igtv.dcm``
(one segment labelled "IGTV"), both BINARY highdicom Segmentations referencing every CT
instance, ``rtstruct_gtv.dcm`` and ``rtstruct_igtv.dcm`` (the same truth as RT Structure
Sets, ROIs "GTV" and "IGTV"), and ``case.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from pipeline.synth.series import MANUFACTURER
from pipeline.uids import DEFAULT_UID_ROOT


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


def write_rtstruct_truth(study, folder: Path) -> list[Path]:
    """Write the truth as RT Structure Sets: ``truth/rtstruct_gtv.dcm`` (ROI "GTV") and
    ``truth/rtstruct_igtv.dcm`` (ROI "IGTV").

    GTV and IGTV overlap, so each gets its own structure set; both reference every CT
    instance, so training can read labels the way it reads a hospital archive.
    """
    import SimpleITK as sitk

    from pipeline.volume import SeriesVolume
    from pipeline.writers.common import ResultInfo
    from pipeline.writers.rtstruct import write_rtstruct

    headers = study.ct_datasets
    first = headers[0]
    image = sitk.Image([int(n) for n in reversed(study.ct_hu.shape)], sitk.sitkUInt8)
    image.SetOrigin(study.ct_grid.origin)
    image.SetSpacing(study.ct_grid.spacing)
    image.SetDirection(study.ct_grid.direction_matrix)
    ct = SeriesVolume(
        image=image,
        modality="CT",
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        study_instance_uid=str(first.StudyInstanceUID),
        headers=headers,
    )
    written = []
    for name, mask, number in (("GTV", study.gtv, 803), ("IGTV", study.igtv, 804)):
        info = ResultInfo(
            uid_root=DEFAULT_UID_ROOT,
            model_version=f"synthetic-truth-{name}",
            node_version="synth",
            roi_name=name,
            roi_interpreted_type="GTV",
            roi_color=(0, 200, 0) if name == "GTV" else (255, 160, 0),
            series_number=number,
        )
        ds = write_rtstruct(mask.astype(bool), ct, info, roi_names=[name])
        ds.SeriesDescription = f"{name} truth (synthetic)"
        ds.StructureSetName = f"{name} truth"
        ds.StructureSetDescription = "Ground truth of a synthetic study made by igtv-node synth"
        ds.Manufacturer = MANUFACTURER
        path = Path(folder) / "truth" / f"rtstruct_{name.lower()}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
