"""Training labels on the CT grid from an RTSTRUCT ROI or a DICOM-SEG segment.

Contour rasterisation: contour points are mapped to continuous CT voxel
indices (pixel centres are integers, so the half-pixel geometry comes from the
DICOM position of the first pixel's centre). A voxel is inside when its centre
is inside the polygon or on its boundary. All closed contours of a slice are
combined with the even-odd rule, so a contour inside another one is a hole.
Each contour goes to the CT slice nearest its z position (it must lie within a
quarter of the slice spacing of that slice).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from pipeline.errors import LabelError
from pipeline.volume import SeriesVolume

#: Names treated as the same structure (compared after removing case, spaces and punctuation).
ALIASES: dict[str, set[str]] = {
    "igtv": {"igtv", "itv", "igtvp", "itvp", "igtv1", "itv1", "igtvprimary", "itvprimary"},
    "gtv": {"gtv", "gtvp", "gtv1", "gtvt", "gtvprimary", "gtvtumor", "gtvtumour", "gtvprim"},
}
#: Largest distance of a contour from its CT slice, in slice spacings.
SLICE_TOLERANCE = 0.25


def normalise_name(name: str) -> str:
    """Lower case without spaces or punctuation: ``'GTV_p'`` -> ``'gtvp'``."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def _aliases(wanted: Sequence[str]) -> set[str]:
    keys = {normalise_name(w) for w in wanted}
    out = set(keys)
    for group in ALIASES.values():
        if keys & group:
            out |= group
    return out


def match_name(available: Sequence[str], wanted: Sequence[str]) -> int | None:
    """Index of the best match of ``wanted`` among ``available`` names, or None.

    Priority: exact (case-insensitive) match in the order of ``wanted``, then the
    same after removing spaces and punctuation, then any alias of a wanted name.
    """
    if isinstance(wanted, str):
        wanted = [wanted]
    lowered = [str(a).strip().lower() for a in available]
    for w in wanted:
        if w.strip().lower() in lowered:
            return lowered.index(w.strip().lower())
    normalised = [normalise_name(a) for a in available]
    for w in wanted:
        if normalise_name(w) in normalised:
            return normalised.index(normalise_name(w))
    aliases = _aliases(wanted)
    for i, n in enumerate(normalised):
        if n in aliases:
            return i
    return None


def _physical_to_index(ct: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, origin) such that ``index_xyz = (p - origin) @ matrix.T``."""
    direction = np.asarray(ct.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(ct.GetSpacing(), dtype=float)
    return np.linalg.inv(direction @ np.diag(spacing)), np.asarray(ct.GetOrigin(), dtype=float)


def rasterise_polygons(polygons: Sequence[np.ndarray], shape_yx: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of polygons given in continuous (x=column, y=row) pixel indices.

    A pixel is inside when its centre (integer coordinates) is inside an odd
    number of polygons, boundary included.
    """
    ny, nx = shape_yx
    mask = np.zeros((ny, nx), dtype=bool)
    starts, ends = [], []
    for poly in polygons:
        if len(poly) < 3:
            continue
        p = np.asarray(poly, dtype=np.float64)
        q = np.roll(p, -1, axis=0)
        starts.append(p)
        ends.append(q)
    if not starts:
        return mask
    a = np.concatenate(starts)
    b = np.concatenate(ends)
    y_lo = max(0, int(np.ceil(min(a[:, 1].min(), b[:, 1].min()) - 1e-9)))
    y_hi = min(ny - 1, int(np.floor(max(a[:, 1].max(), b[:, 1].max()) + 1e-9)))
    if y_hi < y_lo:
        return mask
    rows = np.arange(y_lo, y_hi + 1, dtype=np.float64)[:, None]
    y1, y2 = a[None, :, 1], b[None, :, 1]
    x1, x2 = a[None, :, 0], b[None, :, 0]
    crosses = (y1 <= rows) != (y2 <= rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = np.where(crosses, x1 + (rows - y1) * (x2 - x1) / (y2 - y1), np.inf)
    xs.sort(axis=1)
    counts = crosses.sum(axis=1)
    eps = 1e-6
    diff = np.zeros((rows.shape[0], nx + 1), dtype=np.int32)
    for r in range(rows.shape[0]):
        n = int(counts[r])
        if n < 2:
            continue
        pairs = xs[r, : n - n % 2].reshape(-1, 2)
        lo = np.clip(np.ceil(pairs[:, 0] - eps), 0, nx).astype(np.int64)
        hi = np.clip(np.floor(pairs[:, 1] + eps) + 1, 0, nx).astype(np.int64)
        ok = hi > lo
        np.add.at(diff[r], lo[ok], 1)
        np.add.at(diff[r], hi[ok], -1)
    mask[y_lo : y_hi + 1] = np.cumsum(diff[:, :nx], axis=1) > 0
    # Pixels on a horizontal edge are on the boundary too.
    flat = np.abs(a[:, 1] - b[:, 1]) < 1e-9
    for (xa, ya), (xb, _yb) in zip(a[flat], b[flat]):
        r = int(round(ya))
        if abs(ya - r) < 1e-6 and 0 <= r < ny:
            lo_x = max(0, int(np.ceil(min(xa, xb) - eps)))
            hi_x = min(nx - 1, int(np.floor(max(xa, xb) + eps)))
            if hi_x >= lo_x:
                mask[r, lo_x : hi_x + 1] = True
    return mask


def _roi_names(rtstruct: Dataset) -> dict[int, str]:
    return {
        int(item.ROINumber): str(item.get("ROIName", ""))
        for item in rtstruct.get("StructureSetROISequence", [])
        if "ROINumber" in item
    }


def _check_frame(rtstruct: Dataset, ct: SeriesVolume) -> None:
    frames = {
        str(item.get("FrameOfReferenceUID", ""))
        for item in rtstruct.get("ReferencedFrameOfReferenceSequence", [])
    }
    frames |= {
        str(item.get("ReferencedFrameOfReferenceUID", ""))
        for item in rtstruct.get("StructureSetROISequence", [])
    }
    frames.discard("")
    if frames and ct.frame_of_reference_uid not in frames:
        raise LabelError(
            f"RTSTRUCT {rtstruct.get('SOPInstanceUID', '?')} refers to frame(s) of reference "
            f"{sorted(frames)}, not to the CT's {ct.frame_of_reference_uid} ({ct.description})"
        )


def mask_from_rtstruct(rtstruct: Dataset, ct: SeriesVolume, roi_names: Sequence[str]) -> np.ndarray:
    """Boolean (Z, Y, X) mask on the CT grid of the ROI chosen by name.

    Parameters
    ----------
    rtstruct:
        An RT Structure Set dataset.
    ct:
        The CT volume the structure set was drawn on.
    roi_names:
        Acceptable ROI names in order of preference (case-insensitive, aliases
        such as IGTV/ITV and GTV/GTVp accepted, see :data:`ALIASES`).

    Raises
    ------
    LabelError
        No matching ROI (the message lists those available), other frame of
        reference, no closed contour on the CT, or contours between CT slices.
    """
    if isinstance(roi_names, str):
        roi_names = [roi_names]
    sop = rtstruct.get("SOPInstanceUID", "?")
    names = _roi_names(rtstruct)
    numbers = sorted(names)
    index = match_name([names[n] for n in numbers], roi_names)
    if index is None:
        shown = ", ".join(repr(names[n]) for n in numbers) or "none"
        raise LabelError(
            f"RTSTRUCT {sop}: no ROI named {list(roi_names)} (or an alias); available ROIs: {shown}"
        )
    number = numbers[index]
    roi = names[number]
    _check_frame(rtstruct, ct)
    contours = None
    for item in rtstruct.get("ROIContourSequence", []):
        if int(item.get("ReferencedROINumber", -1)) == number:
            contours = item.get("ContourSequence", [])
            break
    image = ct.image
    nx, ny, nz = image.GetSize()
    matrix, origin = _physical_to_index(image)
    per_slice: dict[int, list[np.ndarray]] = defaultdict(list)
    outside = 0
    for contour in contours or []:
        if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper() != "CLOSED_PLANAR":
            continue
        data = contour.get("ContourData")
        if not data or len(data) < 9:
            continue
        pts = np.asarray([float(v) for v in data], dtype=np.float64).reshape(-1, 3)
        idx = (pts - origin) @ matrix.T
        k = float(np.mean(idx[:, 2]))
        z = int(round(k))
        if z < 0 or z >= nz:
            outside += 1
            continue
        if np.max(np.abs(idx[:, 2] - z)) > SLICE_TOLERANCE:
            raise LabelError(
                f"RTSTRUCT {sop}, ROI '{roi}': a contour at z={pts[0, 2]:.2f} mm lies "
                f"{abs(k - z) * image.GetSpacing()[2]:.2f} mm from the nearest slice of {ct.description}; "
                f"the structure set was not drawn on this CT"
            )
        per_slice[z].append(idx[:, :2])
    if not per_slice:
        extra = f" ({outside} contour(s) outside the CT)" if outside else ""
        raise LabelError(f"RTSTRUCT {sop}, ROI '{roi}': no closed planar contour on {ct.description}{extra}")
    mask = np.zeros((nz, ny, nx), dtype=bool)
    for z, polygons in per_slice.items():
        mask[z] = rasterise_polygons(polygons, (ny, nx))
    return mask


def _segment_table(seg: Dataset) -> dict[int, str]:
    return {
        int(item.SegmentNumber): str(item.get("SegmentLabel", ""))
        for item in seg.get("SegmentSequence", [])
    }


def mask_from_seg(seg: Dataset, ct: SeriesVolume, segment_label: str | Sequence[str]) -> np.ndarray:
    """Boolean (Z, Y, X) mask on the CT grid of one DICOM-SEG segment.

    Frames are mapped to CT slices through their referenced SOPInstanceUIDs
    (highdicom); a SEG without source references is mapped by frame position.
    Fractional segments are thresholded at 0.5.

    Raises
    ------
    LabelError
        No matching segment (available ones listed), other frame of reference,
        or frames that do not fit the CT grid.
    """
    wanted = [segment_label] if isinstance(segment_label, str) else list(segment_label)
    sop = seg.get("SOPInstanceUID", "?")
    table = _segment_table(seg)
    numbers = sorted(table)
    index = match_name([table[n] for n in numbers], wanted)
    if index is None:
        shown = ", ".join(f"{n}: {table[n]!r}" for n in numbers) or "none"
        raise LabelError(f"SEG {sop}: no segment labelled {wanted} (or an alias); available: {shown}")
    number = numbers[index]
    seg_for = str(seg.get("FrameOfReferenceUID", ""))
    if seg_for and seg_for != ct.frame_of_reference_uid:
        raise LabelError(
            f"SEG {sop} is in frame of reference {seg_for}, not the CT's {ct.frame_of_reference_uid} "
            f"({ct.description})"
        )
    nx, ny, nz = ct.image.GetSize()
    try:
        import highdicom as hd

        reader = hd.seg.Segmentation.from_dataset(seg, copy=True)
        referenced = {uid for _s, _r, uid in reader.get_source_image_uids()}
        if set(ct.sop_instance_uids) & referenced:
            pixels = reader.get_pixels_by_source_instance(
                source_sop_instance_uids=ct.sop_instance_uids,
                segment_numbers=[number],
                assert_missing_frames_are_empty=True,
                dtype=np.float32,
            )
            if pixels.shape[1:3] != (ny, nx):
                raise LabelError(f"SEG {sop}: frames are {pixels.shape[1:3]}, CT slices {(ny, nx)}")
            return pixels[..., 0] >= 0.5
    except LabelError:
        raise
    except Exception:  # noqa: BLE001 - fall back to positions when references are unusable
        pass
    return _seg_by_position(seg, ct, number)


def _seg_by_position(seg: Dataset, ct: SeriesVolume, number: int) -> np.ndarray:
    sop = seg.get("SOPInstanceUID", "?")
    image = ct.image
    nx, ny, nz = image.GetSize()
    if (int(seg.Rows), int(seg.Columns)) != (ny, nx):
        raise LabelError(f"SEG {sop}: frames are {seg.Rows}x{seg.Columns}, CT slices {ny}x{nx}")
    try:
        frames = seg.pixel_array
    except Exception as exc:  # noqa: BLE001
        raise LabelError(f"SEG {sop}: pixel data cannot be decoded: {exc}") from None
    frames = frames.reshape(-1, ny, nx)
    matrix, origin = _physical_to_index(image)
    scale = 1.0
    if str(seg.get("SegmentationType", "")).upper() == "FRACTIONAL":
        scale = 1.0 / float(seg.get("MaximumFractionalValue", 255))
    shared = (seg.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    mask = np.zeros((nz, ny, nx), dtype=bool)
    for i, group in enumerate(seg.get("PerFrameFunctionalGroupsSequence", [])):
        ident = group.get("SegmentIdentificationSequence") or shared.get("SegmentIdentificationSequence")
        if not ident or int(ident[0].ReferencedSegmentNumber) != number:
            continue
        plane = group.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
        if not plane:
            raise LabelError(f"SEG {sop}: frame {i + 1} has no position and no source reference")
        pos = np.asarray([float(v) for v in plane[0].ImagePositionPatient])
        idx = (pos - origin) @ matrix.T
        z = int(round(idx[2]))
        if abs(idx[2] - z) > SLICE_TOLERANCE or np.max(np.abs(idx[:2])) > 0.01 or not 0 <= z < nz:
            raise LabelError(
                f"SEG {sop}: frame {i + 1} at {pos.round(2).tolist()} mm is not on a slice of {ct.description}"
            )
        mask[z] |= frames[i] * scale >= 0.5
    return mask
