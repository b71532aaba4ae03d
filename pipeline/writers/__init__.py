"""Results as DICOM and for people: DICOM-SEG, RTSTRUCT, preview PNG and JSON report."""

from pipeline.writers.common import ResultInfo
from pipeline.writers.preview import render_preview
from pipeline.writers.report import build_report, uid_entries, write_report
from pipeline.writers.rtstruct import write_rtstruct
from pipeline.writers.seg import write_seg

__all__ = [
    "ResultInfo",
    "build_report",
    "render_preview",
    "uid_entries",
    "write_report",
    "write_rtstruct",
    "write_seg",
]
