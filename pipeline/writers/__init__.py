"""Results as DICOM and for people: DICOM-SEG, RTSTRUCT, preview PNG and JSON report."""

from pipeline.writers.common import ResultInfo
from pipeline.writers.rtstruct import write_rtstruct
from pipeline.writers.seg import write_seg

__all__ = ["ResultInfo", "write_rtstruct", "write_seg"]
