"""Read a study from DICOM files: group instances into series, build volumes.

``scan_files`` reads headers only (no pixel data) from files in any order with
any names and groups them by SeriesInstanceUID. ``load_volume`` reads one
series' pixels, orders slices by their position along the slice normal (never
by InstanceNumber or file name), checks that the slices form a regular axial
grid, applies the modality rescale per slice and returns a
:class:`~pipeline.volume.SeriesVolume` (float32, LPS geometry).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipeline.errors import GeometryError, PixelDataError
from pipeline.uids import is_valid_uid, validate_uid
from pipeline.volume import SeriesVolume

log = logging.getLogger(__name__)

#: Largest angle (degrees) between the slice normal and the patient's z axis of an "axial" series.
AXIAL_TOLERANCE_DEG = 2.0
#: Largest angle (degrees) between slice-to-slice steps and the slice normal (gantry tilt).
TILT_TOLERANCE_DEG = 0.5
#: Slice steps may differ from their median by at most max(ABS, REL * median) mm.
SPACING_TOLERANCE_ABS_MM = 0.02
SPACING_TOLERANCE_REL = 0.02
#: Each slice may lie at most this fraction of the slice spacing from the uniform grid
#: (first position + k * spacing) that the volume uses, so small step errors cannot add up.
GRID_TOLERANCE_REL = 0.1
#: Two slices closer than this (mm) along the normal are duplicates.
DUPLICATE_TOLERANCE_MM = 0.01

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


@dataclass
class InstanceInfo:
    """Header facts of one file that the volume builder and the selector need."""

    path: Path
    sop_instance_uid: str
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    rows: int | None
    columns: int | None
    pixel_spacing: tuple[float, float] | None
    number_of_frames: int
    has_pixel_data: bool
    acquisition_time: str
    transfer_syntax_uid: str


@dataclass
class SeriesInfo:
    """One series as found in the headers (no pixel data read).

    Attributes
    ----------
    uid:
        SeriesInstanceUID (the grouping key).
    modality, sop_class_uid, description, number:
        Modality, SOP Class UID of the first instance, SeriesDescription, SeriesNumber.
    frame_of_reference_uid, study_instance_uid, patient_id:
        As in the first instance ("" when absent).
    image_type:
        ImageType values, upper case.
    instances:
        One entry per file, in the order found (not sorted).
    """

    uid: str
    modality: str
    sop_class_uid: str
    description: str
    number: int | None
    frame_of_reference_uid: str
    study_instance_uid: str
    patient_id: str
    image_type: tuple[str, ...] = ()
    series_date: str = ""
    series_time: str = ""
    acquisition_time: str = ""
    manufacturer: str = ""
    units: str = ""
    corrected_image: tuple[str, ...] = ()
    attenuation_correction_method: str = ""
    convolution_kernel: str = ""
    instances: list[InstanceInfo] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """Paths of the series' files, in the order found."""
        return [i.path for i in self.instances]

    @property
    def label(self) -> str:
        """Short human label for messages (no patient data)."""
        number = "?" if self.number is None else self.number
        return f"{self.modality} series {number} '{self.description}' ({self.uid})"

    @property
    def n_images(self) -> int:
        """Number of image frames (files times frames per file) that carry pixel data."""
        return sum(i.number_of_frames for i in self.instances if i.has_pixel_data)

    @property
    def earliest_acquisition_time(self) -> str:
        """Smallest AcquisitionTime of the instances ("" when none has one)."""
        times = sorted(i.acquisition_time for i in self.instances if i.acquisition_time)
        return times[0] if times else self.acquisition_time


@dataclass
class ScanResult:
    """Outcome of :func:`scan_files`: series found and files that could not be used."""

    series: list[SeriesInfo] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    def by_uid(self, uid: str) -> SeriesInfo:
        """The series with SeriesInstanceUID ``uid`` (KeyError when absent)."""
        for s in self.series:
            if s.uid == uid:
                return s
        raise KeyError(uid)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    return str(value).strip()


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(values) != count or not all(np.isfinite(values)):
        return None
    return values


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _multi(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, (str, bytes)):
        return (str(value).strip().upper(),)
    try:
        return tuple(str(v).strip().upper() for v in value)
    except TypeError:
        return (str(value).strip().upper(),)


def _expand(paths: Iterable[Path]) -> list[Path]:
    """Files of ``paths`` (directories walked), each file once."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, _dirs, names in os.walk(p):
                out.extend(Path(root) / n for n in sorted(names))
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def _read_header(path: Path) -> Dataset:
    """Header of ``path`` without pixel data; files without preamble are accepted."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, defer_size="1 KB")
    except InvalidDicomError:
        pass
    # Some archives write bare datasets without the 128-byte preamble.
    ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size="1 KB", force=True)
    if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
        raise InvalidDicomError("not a DICOM file (no preamble and no DICOM attributes)")
    return ds


def _has_pixel_data(ds: Dataset) -> bool:
    """Whether the instance is an image (``stop_before_pixels`` hides the pixel element itself)."""
    if any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return True
    return "Rows" in ds and "Columns" in ds


def scan_files(paths: Iterable[Path]) -> ScanResult:
    """Read the headers of ``paths`` and group the instances by series.

    Parameters
    ----------
    paths:
        Files (directories are walked recursively) in any order with any names.

    Returns
    -------
    ScanResult
        ``series`` in order of SeriesNumber then UID; ``unreadable`` lists
        (path, reason) for files that are not usable DICOM instances.
    """
    result = ScanResult()
    groups: dict[str, SeriesInfo] = {}
    seen_sops: dict[str, Path] = {}
    for path in _expand(paths):
        try:
            ds = _read_header(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, never fatal
            result.unreadable.append((path, f"not readable as DICOM: {type(exc).__name__}: {exc}"[:300]))
            continue
        try:
            sop_class = _text(ds, "SOPClassUID") or _text(
                getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID"
            )
            if sop_class == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
                result.unreadable.append((path, "DICOMDIR (media directory), not an instance"))
                continue
            series_uid = _text(ds, "SeriesInstanceUID")
            if not series_uid:
                result.unreadable.append((path, "no SeriesInstanceUID"))
                continue
            if not is_valid_uid(series_uid):
                result.unreadable.append((path, f"invalid SeriesInstanceUID {series_uid[:70]!r}"))
                continue
            sop_uid = _text(ds, "SOPInstanceUID")
            if sop_uid and sop_uid in seen_sops:
                result.unreadable.append(
                    (path, f"duplicate of SOPInstanceUID {sop_uid} already read from {seen_sops[sop_uid]}")
                )
                continue
            if sop_uid:
                seen_sops[sop_uid] = path
            info = groups.get(series_uid)
            if info is None:
                info = SeriesInfo(
                    uid=series_uid,
                    modality=_text(ds, "Modality").upper(),
                    sop_class_uid=sop_class,
                    description=_text(ds, "SeriesDescription"),
                    number=_int_or_none(ds, "SeriesNumber"),
                    frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
                    study_instance_uid=_text(ds, "StudyInstanceUID"),
                    patient_id=_text(ds, "PatientID"),
                    image_type=_multi(ds, "ImageType"),
                    series_date=_text(ds, "SeriesDate"),
                    series_time=_text(ds, "SeriesTime"),
                    acquisition_time=_text(ds, "AcquisitionTime"),
                    manufacturer=_text(ds, "Manufacturer"),
                    units=_text(ds, "Units").upper(),
                    corrected_image=_multi(ds, "CorrectedImage"),
                    attenuation_correction_method=_text(ds, "AttenuationCorrectionMethod"),
                    convolution_kernel=_text(ds, "ConvolutionKernel"),
                )
                groups[series_uid] = info
            tsyntax = _text(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID")
            spacing = _floats(ds, "PixelSpacing", 2)
            info.instances.append(
                InstanceInfo(
                    path=path,
                    sop_instance_uid=sop_uid,
                    instance_number=_int_or_none(ds, "InstanceNumber"),
                    position=_floats(ds, "ImagePositionPatient", 3),  # type: ignore[arg-type]
                    orientation=_floats(ds, "ImageOrientationPatient", 6),
                    rows=_int_or_none(ds, "Rows"),
                    columns=_int_or_none(ds, "Columns"),
                    pixel_spacing=spacing,  # type: ignore[arg-type]
                    number_of_frames=max(1, _int_or_none(ds, "NumberOfFrames") or 1),
                    has_pixel_data=_has_pixel_data(ds),
                    acquisition_time=_text(ds, "AcquisitionTime"),
                    transfer_syntax_uid=tsyntax,
                )
            )
        except Exception as exc:  # noqa: BLE001 - malformed header values
            result.unreadable.append((path, f"malformed header: {type(exc).__name__}: {exc}"[:300]))
    result.series = sorted(
        groups.values(), key=lambda s: (s.number is None, s.number or 0, s.uid)
    )
    return result


def read_study(paths: Iterable[Path]) -> ScanResult:
    """Convenience alias of :func:`scan_files` for a study folder or file list."""
    return scan_files(paths)


# ---------------------------------------------------------------------------
# Geometry of a series


@dataclass(frozen=True)
class SliceGeometry:
    """Validated geometry of a stack of single-frame slices.

    ``order`` lists indices into the input instances sorted along the normal.
    """

    order: list[int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    rows: int
    columns: int


def slice_geometry(series: SeriesInfo) -> SliceGeometry:
    """Sort the slices of ``series`` along the slice normal and check regularity.

    Raises
    ------
    GeometryError
        Missing position/orientation, mixed orientation or image size, non-axial
        slices, gantry tilt, duplicate slice positions, gaps in the spacing, or
        slice positions that drift from a uniform grid by more than
        ``GRID_TOLERANCE_REL`` of the spacing.
    """
    label = series.label
    inst = [i for i in series.instances if i.has_pixel_data]
    if not inst:
        raise GeometryError(f"{label}: no instance carries pixel data")
    if any(i.number_of_frames > 1 for i in inst):
        raise GeometryError(
            f"{label}: multi-frame instances are not supported; export the series as single-frame slices"
        )
    for what in ("position", "orientation", "pixel_spacing", "rows", "columns"):
        missing = [i.path.name for i in inst if getattr(i, what) is None]
        if missing:
            raise GeometryError(
                f"{label}: {len(missing)} slice(s) lack a usable {what.replace('_', ' ')} "
                f"(e.g. {missing[0]}); cannot place the slices in patient space"
            )
    sizes = {(i.rows, i.columns) for i in inst}
    if len(sizes) > 1:
        raise GeometryError(f"{label}: slices have different sizes {sorted(sizes)} (rows, columns)")
    spacings = {tuple(round(v, 4) for v in i.pixel_spacing) for i in inst}  # type: ignore[union-attr]
    if len(spacings) > 1:
        raise GeometryError(f"{label}: slices have different pixel spacings {sorted(spacings)}")
    ref = np.asarray(inst[0].orientation, dtype=np.float64)
    for i in inst[1:]:
        if np.max(np.abs(np.asarray(i.orientation) - ref)) > 1e-4:
            raise GeometryError(
                f"{label}: slices have different orientations ({inst[0].orientation} vs {i.orientation})"
            )
    row = ref[:3] / np.linalg.norm(ref[:3])
    col = ref[3:] / np.linalg.norm(ref[3:])
    if abs(float(np.dot(row, col))) > 1e-3:
        raise GeometryError(f"{label}: ImageOrientationPatient row and column are not orthogonal")
    normal = np.cross(row, col)
    angle = np.degrees(np.arccos(min(1.0, abs(float(normal[2])))))
    if angle > AXIAL_TOLERANCE_DEG:
        raise GeometryError(
            f"{label}: slices are not axial (normal {np.round(normal, 3).tolist()} is {angle:.1f} deg "
            f"from the patient's head-feet axis); send the axial reconstruction"
        )
    positions = np.asarray([i.position for i in inst], dtype=np.float64)
    along = positions @ normal
    order = [int(k) for k in np.argsort(along, kind="stable")]
    along = along[order]
    pixel_spacing = inst[0].pixel_spacing  # (row spacing = between rows, column spacing)
    assert pixel_spacing is not None
    rows, columns = inst[0].rows, inst[0].columns
    assert rows is not None and columns is not None
    if len(inst) > 1:
        steps = np.diff(along)
        dup = np.nonzero(steps < DUPLICATE_TOLERANCE_MM)[0]
        if dup.size:
            where = ", ".join(f"{along[k]:.2f}" for k in dup[:5])
            raise GeometryError(
                f"{label}: {dup.size} duplicate slice position(s) along the normal at {where} mm "
                f"(two instances at the same place); remove the duplicates and resend"
            )
        median = float(np.median(steps))
        tol = max(SPACING_TOLERANCE_ABS_MM, SPACING_TOLERANCE_REL * median)
        bad = np.nonzero(np.abs(steps - median) > tol)[0]
        if bad.size:
            where = ", ".join(f"{along[k]:.2f}->{along[k + 1]:.2f}" for k in bad[:5])
            raise GeometryError(
                f"{label}: irregular slice spacing (median {median:.3f} mm) at {where} mm; "
                f"slices are missing or the series mixes reconstructions"
            )
        # Gantry tilt: the step between slice origins leaves the normal direction.
        delta = positions[order[-1]] - positions[order[0]]
        in_plane = delta - np.dot(delta, normal) * normal
        tilt = np.degrees(np.arctan2(np.linalg.norm(in_plane), abs(np.dot(delta, normal))))
        if tilt > TILT_TOLERANCE_DEG:
            raise GeometryError(
                f"{label}: slices are sheared by {tilt:.1f} deg (gantry tilt); "
                f"send a reconstruction without tilt"
            )
        z_spacing = float((along[-1] - along[0]) / (len(inst) - 1))
        # Steps within tolerance can still add up: bound each slice's distance from the grid.
        deviation = np.abs(along - (along[0] + z_spacing * np.arange(len(inst))))
        worst = int(np.argmax(deviation))
        grid_tol = GRID_TOLERANCE_REL * z_spacing
        if deviation[worst] > grid_tol:
            raise GeometryError(
                f"{label}: slice positions drift up to {deviation[worst]:.2f} mm (at {along[worst]:.2f} mm) "
                f"from a uniform {z_spacing:.3f} mm grid (at most {grid_tol:.2f} mm allowed); "
                f"the slice spacing is uneven, so one spacing cannot place every slice"
            )
    else:
        z_spacing = 1.0
    direction = np.column_stack([row, col, normal])
    return SliceGeometry(
        order=order,
        origin=tuple(float(v) for v in positions[order[0]]),  # type: ignore[arg-type]
        spacing=(float(pixel_spacing[1]), float(pixel_spacing[0]), z_spacing),
        direction=tuple(float(v) for v in direction.ravel()),
        rows=rows,
        columns=columns,
    )


def _slice_pixels(ds: Dataset, label: str, path: Path, rows: int, columns: int) -> np.ndarray:
    """Modality-rescaled pixels of one slice as float32."""
    try:
        raw = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - every decoder failure means unusable pixel data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        name = getattr(ts, "name", str(ts))
        raise PixelDataError(
            f"{label}: pixel data of {path.name} cannot be decoded ({name}): {exc}"[:500]
        ) from None
    if raw.shape != (rows, columns):
        raise PixelDataError(
            f"{label}: {path.name} decodes to shape {raw.shape}, expected ({rows}, {columns}) "
            f"single-channel pixels"
        )
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    out = raw.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _strip_pixels(ds: Dataset) -> Dataset:
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def load_volume(series: SeriesInfo) -> SeriesVolume:
    """Read the pixels of ``series`` into a float32 volume with DICOM geometry.

    Slices are ordered by their position along the slice normal; rescale
    slope/intercept are applied per slice (PET slices carry their own slopes).

    Raises
    ------
    GeometryError
        Inconsistent slice geometry (see :func:`slice_geometry`) or missing UIDs.
    PixelDataError
        A file cannot be read or its pixel data cannot be decoded.
    """
    label = series.label
    geometry = slice_geometry(series)
    inst = [i for i in series.instances if i.has_pixel_data]
    rows, columns = geometry.rows, geometry.columns
    volume = np.empty((len(inst), rows, columns), dtype=np.float32)
    headers: list[Dataset] = []
    for z, k in enumerate(geometry.order):
        path = inst[k].path
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception as exc:  # noqa: BLE001
            raise PixelDataError(f"{label}: {path.name} cannot be read: {exc}"[:500]) from None
        volume[z] = _slice_pixels(ds, label, path, rows, columns)
        headers.append(_strip_pixels(ds))
    first = headers[0]
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        if not _text(first, keyword):
            raise GeometryError(f"{label}: {keyword} is missing; cannot relate the series to others")
    image = sitk.GetImageFromArray(volume, isVector=False)
    del volume
    image.SetOrigin(geometry.origin)
    image.SetSpacing(geometry.spacing)
    image.SetDirection(geometry.direction)
    modality = "PT" if series.modality in ("PT", "PET") else series.modality
    units = "HU" if modality == "CT" else (_text(first, "Units").upper() or "UNKNOWN")
    log.debug("loaded %s: %s voxels", label, image.GetSize())
    return SeriesVolume(
        image=image,
        modality=modality,
        series_instance_uid=validate_uid(_text(first, "SeriesInstanceUID"), "SeriesInstanceUID"),
        frame_of_reference_uid=validate_uid(_text(first, "FrameOfReferenceUID"), "FrameOfReferenceUID"),
        study_instance_uid=validate_uid(_text(first, "StudyInstanceUID"), "StudyInstanceUID"),
        headers=headers,
        units=units,
    )
