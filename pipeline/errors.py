"""Expected bad-input errors of the pipeline (one family under IgtvError)."""

from model.errors import IgtvError

__all__ = [
    "IgtvError",
    "PipelineError",
    "SeriesSelectionError",
    "MissingPetError",
    "MissingCtError",
    "PatientMismatchError",
    "SuvCalibrationError",
    "GeometryError",
    "CoverageError",
    "PixelDataError",
    "LabelError",
    "InvalidUidError",
]


class PipelineError(IgtvError):
    """A study cannot be processed as received."""


class SeriesSelectionError(PipelineError):
    """No usable PET/CT pair could be chosen from the study."""


class MissingPetError(SeriesSelectionError):
    """The study holds no attenuation-corrected PET series."""


class MissingCtError(SeriesSelectionError):
    """The study holds no usable axial CT series."""


class PatientMismatchError(SeriesSelectionError):
    """PET and CT belong to different patients or studies."""


class SuvCalibrationError(PipelineError):
    """SUV cannot be computed: units, decay or dose information is missing or wrong."""


class GeometryError(PipelineError):
    """Slice geometry is inconsistent (gaps, duplicates, tilt, non-axial, mixed sizes)."""


class CoverageError(PipelineError):
    """PET and CT do not overlap enough to segment the thorax."""


class PixelDataError(PipelineError):
    """Pixel data is missing, corrupt, or in a transfer syntax that cannot be decoded."""


class LabelError(PipelineError):
    """A training label (RTSTRUCT ROI or SEG segment) is missing or unusable."""


class InvalidUidError(IgtvError):
    """A UID is not a valid DICOM UID and must not become a file name."""
