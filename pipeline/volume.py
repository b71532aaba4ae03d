"""The volume contract between pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset


@dataclass
class SeriesVolume:
    """One image series as a 3D volume that remembers where it came from.

    Attributes
    ----------
    image:
        float32 SimpleITK image with DICOM geometry (origin, spacing, direction in
        LPS patient coordinates). CT holds HU; PET holds Bq/mL until converted
        (``units`` says which).
    modality:
        "CT" or "PT".
    series_instance_uid, frame_of_reference_uid, study_instance_uid:
        Source UIDs (validated).
    headers:
        One pydicom Dataset per z-slice **in the image's z order**, pixel data
        removed. Writers reference every CT instance through these.
    units:
        "HU" for CT; "BQML", "CNTS", "GML" (SUV) for PET.
    """

    image: sitk.Image
    modality: str
    series_instance_uid: str
    frame_of_reference_uid: str
    study_instance_uid: str
    headers: list[Dataset] = field(default_factory=list)
    units: str = "HU"

    @property
    def sop_instance_uids(self) -> list[str]:
        """SOPInstanceUID of every slice, in z order."""
        return [str(h.SOPInstanceUID) for h in self.headers]

    @property
    def array(self) -> np.ndarray:
        """Pixel values as a numpy z-y-x view copy (float32)."""
        return sitk.GetArrayFromImage(self.image)

    @property
    def description(self) -> str:
        """Short human label for messages: modality, series number and description."""
        h = self.headers[0] if self.headers else Dataset()
        number = getattr(h, "SeriesNumber", "?")
        text = getattr(h, "SeriesDescription", "")
        return f"{self.modality} series {number} '{text}' ({self.series_instance_uid})"
