"""Training labels from RTSTRUCT ROIs and DICOM-SEG segments on the CT grid."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from scipy import ndimage

from pipeline import labels, reader
from pipeline.errors import LabelError
from pipeline.volume import SeriesVolume
from pipeline.writers.common import ResultInfo
from pipeline.writers.rtstruct import write_rtstruct
from tests.pipeline.conftest import FFS, centred_grid

FOR = "1.2.826.0.1.3680043.8.498.1"


def ct_volume(iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), size=(40, 30, 10), spacing=(2.0, 2.0, 3.0)) -> SeriesVolume:
    grid = centred_grid(size, spacing, iop=iop)
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetOrigin(grid.origin)
    image.SetSpacing(spacing)
    image.SetDirection(tuple(grid.direction.ravel()))
    return SeriesVolume(image, "CT", "1.2.826.0.1.3680043.8.498.2", FOR, "1.2.826.0.1.3680043.8.498.3")


def to_mm(ct: SeriesVolume, points_xyk) -> list[float]:
    """Flatten (column, row, slice) continuous indices into ContourData (LPS mm)."""
    out: list[float] = []
    for x, y, k in points_xyk:
        out.extend(ct.image.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(k))))
    return out


def rtstruct(rois: dict[str, list[list[float]]], frame: str = FOR) -> Dataset:
    """Minimal structure set: ROI name -> list of ContourData."""
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    ref = Dataset()
    ref.FrameOfReferenceUID = frame
    ds.ReferencedFrameOfReferenceSequence = [ref]
    ds.StructureSetROISequence = []
    ds.ROIContourSequence = []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ROIName = name
        roi.ReferencedFrameOfReferenceUID = frame
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ContourSequence = []
        for data in contours:
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(data) // 3
            c.ContourData = [f"{v:.6f}" for v in data]
            item.ContourSequence.append(c)
        ds.ROIContourSequence.append(item)
    return ds


def test_square_through_pixel_centres_includes_its_boundary():
    ct = ct_volume()
    square = to_mm(ct, [(5, 4, 3), (12, 4, 3), (12, 9, 3), (5, 9, 3)])
    mask = labels.mask_from_rtstruct(rtstruct({"GTV": [square]}), ct, ["GTV"])
    expected = np.zeros((10, 30, 40), bool)
    expected[3, 4:10, 5:13] = True
    np.testing.assert_array_equal(mask, expected)


def test_half_pixel_contour_and_hole_by_even_odd():
    ct = ct_volume()
    outer = to_mm(ct, [(4.5, 3.5, 6), (20.5, 3.5, 6), (20.5, 19.5, 6), (4.5, 19.5, 6)])
    inner = to_mm(ct, [(9.5, 8.5, 6), (13.5, 8.5, 6), (13.5, 12.5, 6), (9.5, 12.5, 6)])
    mask = labels.mask_from_rtstruct(rtstruct({"IGTV": [outer, inner]}), ct, "igtv")
    expected = np.zeros((10, 30, 40), bool)
    expected[6, 4:20, 5:21] = True
    expected[6, 9:13, 10:14] = False
    np.testing.assert_array_equal(mask, expected)


def test_circle_matches_pixel_centres_on_a_feet_first_ct():
    ct = ct_volume(iop=FFS)
    centre, radius = np.array([18.3, 14.7]), 7.2
    angles = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    pts = [(centre[0] + radius * np.cos(a), centre[1] + radius * np.sin(a), 2) for a in angles]
    mask = labels.mask_from_rtstruct(rtstruct({"ITV": [to_mm(ct, pts)]}), ct, ["IGTV"])
    yy, xx = np.mgrid[0:30, 0:40]
    inside = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 < (radius * np.cos(np.pi / 400)) ** 2
    assert mask[2].sum() > 0 and not mask[[0, 1, 3, 4, 5, 6, 7, 8, 9]].any()
    # Polygon vs circle differ only within the chord error, far below a pixel.
    disagree = mask[2] != inside
    ring = np.abs(np.hypot(xx - centre[0], yy - centre[1]) - radius) < 0.01
    assert not (disagree & ~ring).any()


def test_writer_rtstruct_round_trip_is_exact(phantom_study):
    ct = reader.load_volume(reader.scan_files(phantom_study.ct_files).series[0])
    rng = np.random.default_rng(3)
    blobs = ndimage.gaussian_filter(rng.standard_normal((48, 72, 96)), 2.0) > 0.25
    blobs[:10] = False
    ring = np.zeros_like(blobs)
    ring[20, 30:50, 30:60] = True
    ring[20, 35:45, 38:50] = False  # a hole
    mask = blobs | ring
    info = ResultInfo(uid_root="1.2.826.0.1.3680043.10.1561", model_version="t", node_version="t")
    for keyhole in (True, False):
        ds = write_rtstruct(mask, ct, info, roi_names=["IGTV"], keyhole=keyhole)
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(ds)))
        np.testing.assert_array_equal(labels.mask_from_rtstruct(ds, ct, ["IGTV"]), mask)


def _bytes(ds: Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_name_priority_and_aliases():
    ct = ct_volume()
    a = to_mm(ct, [(2, 2, 1), (6, 2, 1), (6, 6, 1), (2, 6, 1)])
    b = to_mm(ct, [(10, 10, 1), (16, 10, 1), (16, 16, 1), (10, 16, 1)])
    ds = rtstruct({"GTVp": [a], "ITV": [b]})
    assert labels.mask_from_rtstruct(ds, ct, ["gtv"])[1, 3, 3]
    assert labels.mask_from_rtstruct(ds, ct, ["IGTV"])[1, 12, 12]
    assert labels.mask_from_rtstruct(ds, ct, ["itv", "gtvp"])[1, 12, 12]
    assert labels.match_name(["Lung_L", "GTV_p", "GTV"], ["GTV"]) == 2  # exact beats alias
    assert labels.match_name(["Lung_L", "G T V-p"], ["gtvp"]) == 1
    assert labels.match_name(["Lung_L"], ["IGTV"]) is None


def test_errors_name_what_is_available():
    ct = ct_volume()
    square = to_mm(ct, [(5, 4, 3), (12, 4, 3), (12, 9, 3), (5, 9, 3)])
    with pytest.raises(LabelError, match=r"no ROI named \['IGTV'\].*'Lung_L', 'Heart'"):
        labels.mask_from_rtstruct(rtstruct({"Lung_L": [square], "Heart": [square]}), ct, ["IGTV"])
    with pytest.raises(LabelError, match="frame"):
        labels.mask_from_rtstruct(rtstruct({"IGTV": [square]}, frame="1.2.3"), ct, ["IGTV"])
    between = to_mm(ct, [(5, 4, 3.5), (12, 4, 3.5), (12, 9, 3.5), (5, 9, 3.5)])
    with pytest.raises(LabelError, match="not drawn on this CT"):
        labels.mask_from_rtstruct(rtstruct({"IGTV": [between]}), ct, ["IGTV"])
    outside = to_mm(ct, [(5, 4, 30), (12, 4, 30), (12, 9, 30)])
    with pytest.raises(LabelError, match=r"no closed planar contour.*1 contour\(s\) outside"):
        labels.mask_from_rtstruct(rtstruct({"IGTV": [outside]}), ct, ["IGTV"])


def test_seg_truth_of_a_synthetic_study(synthetic_study_factory, synthetic_study_object_factory):
    folder = synthetic_study_factory(11, feet_first=True)
    study = synthetic_study_object_factory(11, feet_first=True)
    ct = reader.load_volume(next(s for s in reader.scan_files([folder / "CT"]).series))
    seg = pydicom.dcmread(folder / "truth" / "seg_igtv.dcm")
    got = labels.mask_from_seg(seg, ct, "IGTV")
    np.testing.assert_array_equal(got, study.igtv)
    assert study.igtv.any()
    np.testing.assert_array_equal(labels._seg_by_position(seg, ct, 1), study.igtv)
    np.testing.assert_array_equal(labels.mask_from_seg(seg, ct, ["ITV"]), study.igtv)
    with pytest.raises(LabelError, match=r"no segment labelled \['Heart'\].*1: "):
        labels.mask_from_seg(seg, ct, "Heart")
