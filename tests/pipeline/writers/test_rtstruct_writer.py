"""RTSTRUCT writer: plastimatch (an independent reader) rasterises it back to the mask."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydicom import dcmread

from pipeline.errors import GeometryError
from pipeline.writers.rtstruct import format_ds, write_rtstruct
from tests.pipeline.writers.ct_factory import ellipsoid_mask
from tests.pipeline.writers.tools import dciodvfy_errors, dice, plastimatch_labelmap


def save(ds, tmp_path, name="rtstruct.dcm"):
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def sphere(ct, diameter_mm: float, centre_zyx_mm=None) -> np.ndarray:
    shape = ct.volume.array.shape
    extent = [n * s for n, s in zip(shape, ct.spacing_zyx, strict=True)]
    centre = centre_zyx_mm or tuple(e / 2 for e in extent)
    radius = diameter_mm / 2
    return ellipsoid_mask(shape, ct.spacing_zyx, centre, (radius, radius, radius))


# Tumours from 5 mm to 6 cm; grids chosen so the largest fits (1 mm pixels, 2-3 mm slices).
@pytest.mark.parametrize(
    ("diameter_mm", "orientation", "descending"),
    [(5.0, "HFS", False), (12.0, "FFS", True), (30.0, "HFS", True), (60.0, "FFS", False)],
)
def test_spheres_round_trip_through_plastimatch(
    ct_factory, info, tmp_path, diameter_mm, orientation, descending
):
    slices = int(np.ceil(diameter_mm / 2.0)) + 6
    ct = ct_factory(
        shape=(slices, 80, 80),
        spacing_zyx=(2.0, 0.9765625, 0.9765625),
        orientation=orientation,
        descending=descending,
    )
    mask = sphere(ct, diameter_mm)
    assert mask.any()
    path = save(write_rtstruct(mask, ct.volume, info), tmp_path)
    labels = plastimatch_labelmap(path, ct, tmp_path / "pl", ["IGTV"])
    score = dice(labels == 1, mask)
    assert score >= 0.95, f"Dice {score:.4f} for a {diameter_mm} mm tumour"
    # Contours run along pixel boundaries, so the reconstruction is in fact exact.
    np.testing.assert_array_equal(labels == 1, mask)


def hollow_and_two_part(ct) -> np.ndarray:
    """A 4 cm tumour with a necrotic hole, and a separate two-part lesion (label 2)."""
    mask = sphere(ct, 40.0, (16.0, 40.0, 36.0)).astype(np.uint8)
    mask[sphere(ct, 14.0, (16.0, 40.0, 36.0))] = 0
    part = sphere(ct, 10.0, (16.0, 64.0, 66.0)) | sphere(ct, 8.0, (16.0, 66.0, 18.0))
    mask[part & (mask == 0)] = 2
    return mask


@pytest.mark.parametrize(("keyhole", "xor"), [(True, False), (True, True), (False, True)])
def test_hole_and_two_part_tumour_round_trip(ct_factory, info, tmp_path, keyhole, xor):
    ct = ct_factory(shape=(16, 80, 80), spacing_zyx=(2.0, 0.9765625, 0.9765625))
    mask = hollow_and_two_part(ct)
    hole_slice = int(
        np.flatnonzero(mask.any(axis=(1, 2)))[len(np.flatnonzero(mask.any(axis=(1, 2)))) // 2]
    )
    assert mask[hole_slice, 40, 36] == 0 and (mask[hole_slice] == 1).any()
    path = save(write_rtstruct(mask, ct.volume, info, keyhole=keyhole), tmp_path)
    labels = plastimatch_labelmap(path, ct, tmp_path / "pl", ["IGTV", "IGTV 2"], xor=xor)
    for label in (1, 2):
        score = dice(labels == label, mask == label)
        assert score >= 0.95, f"Dice {score:.4f} for ROI {label} (keyhole={keyhole}, xor={xor})"
    np.testing.assert_array_equal(labels, mask)


def test_separate_hole_contours_are_filled_by_or_readers(ct_factory, info, tmp_path):
    """Why keyhole is the default: plastimatch's default OR fills separately written holes."""
    ct = ct_factory(shape=(16, 80, 80), spacing_zyx=(2.0, 0.9765625, 0.9765625))
    mask = hollow_and_two_part(ct)
    path = save(write_rtstruct(mask, ct.volume, info, keyhole=False), tmp_path)
    labels = plastimatch_labelmap(path, ct, tmp_path / "pl", ["IGTV", "IGTV 2"], xor=False)
    assert ((labels == 1) & (mask == 0)).sum() > 0


def test_structure_references_and_contours(small_ct, info, tmp_path):
    ct = small_ct.volume
    mask = hollow_and_two_part(small_ct)
    ds = dcmread(save(write_rtstruct(mask, ct, info), tmp_path))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == ct.study_instance_uid
    assert ds.PatientID == ct.headers[0].PatientID
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == ct.frame_of_reference_uid
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == ct.series_instance_uid
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == ct.sop_instance_uids
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["IGTV", "IGTV 2"]
    assert {r.ROIGenerationAlgorithm for r in ds.StructureSetROISequence} == {"AUTOMATIC"}
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == ["GTV", "GTV"]
    assert list(ds.ROIContourSequence[0].ROIDisplayColor) == [255, 0, 0]
    assert ds.SeriesDescription == "IGTV (AI, igtv-node) RTSTRUCT"
    positions = {h.SOPInstanceUID: np.asarray(h.ImagePositionPatient, float) for h in ct.headers}
    normal = np.cross(*np.asarray(ct.headers[0].ImageOrientationPatient, float).reshape(2, 3))
    regions_per_slice = {}
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            (ref,) = contour.ContourImageSequence
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            assert len(points) == contour.NumberOfContourPoints
            # Every point lies in the plane of the CT slice it references.
            offsets = (points - positions[ref.ReferencedSOPInstanceUID]) @ normal
            np.testing.assert_allclose(offsets, 0.0, atol=1e-3)
            key = (roi.ReferencedROINumber, ref.ReferencedSOPInstanceUID)
            regions_per_slice[key] = regions_per_slice.get(key, 0) + 1
    # Keyhole: one contour per connected region, holes included; the two-part lesion gives two.
    middle = ct.sop_instance_uids[round(16.0 / small_ct.spacing_zyx[0])]
    assert regions_per_slice[(1, middle)] == 1
    assert regions_per_slice[(2, middle)] == 2


def test_ds_values_fit_16_characters(small_ct, info, tmp_path):
    ds = write_rtstruct(hollow_and_two_part(small_ct), small_ct.volume, info)
    path = save(ds, tmp_path)
    raw = dcmread(path).ROIContourSequence[0].ContourSequence[0]["ContourData"]
    assert all(len(str(v)) <= 16 for v in raw.value)
    assert format_ds(np.array([-123456.78901234, 1e-9, -0.0])) == ["-123456.789", "0", "0"]
    assert all(len(v) <= 16 for v in format_ds(np.array([1.23456789e15, -9.87654321e20])))


def test_interpreted_type_colour_and_names_from_info(small_ct, info):
    custom = dataclasses.replace(
        info, roi_name="ITV_AI", roi_interpreted_type="CTV", roi_color=(0, 128, 255)
    )
    ds = write_rtstruct(sphere(small_ct, 20.0), small_ct.volume, custom)
    assert ds.StructureSetROISequence[0].ROIName == "ITV_AI"
    assert ds.RTROIObservationsSequence[0].RTROIInterpretedType == "CTV"
    assert list(ds.ROIContourSequence[0].ROIDisplayColor) == [0, 128, 255]
    named = write_rtstruct(sphere(small_ct, 20.0), small_ct.volume, info, roi_names=["GTVp"])
    assert named.StructureSetROISequence[0].ROIName == "GTVp"


def test_uids_are_deterministic_and_depend_on_model_version(small_ct, info):
    mask = sphere(small_ct, 20.0)
    first = write_rtstruct(mask, small_ct.volume, info)
    again = write_rtstruct(mask, small_ct.volume, info)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    other = write_rtstruct(mask, small_ct.volume, dataclasses.replace(info, model_version="v2"))
    assert other.SeriesInstanceUID != first.SeriesInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID


def test_empty_mask_gives_roi_without_contours(small_ct, info, tmp_path):
    ds = write_rtstruct(np.zeros(small_ct.volume.array.shape, bool), small_ct.volume, info)
    assert "ContourSequence" not in ds.ROIContourSequence[0]
    errors, output = dciodvfy_errors(save(ds, tmp_path))
    assert errors == [], output


def test_mask_off_the_ct_grid_is_refused(small_ct, info):
    with pytest.raises(GeometryError, match="does not match the CT grid"):
        write_rtstruct(np.zeros((2, 2, 2), dtype=bool), small_ct.volume, info)


@pytest.mark.parametrize("orientation", ["HFS", "ROT20"])
def test_passes_dciodvfy(ct_factory, info, tmp_path, orientation):
    ct = ct_factory(
        shape=(16, 80, 80), spacing_zyx=(2.0, 0.9765625, 0.9765625), orientation=orientation
    )
    errors, output = dciodvfy_errors(
        save(write_rtstruct(hollow_and_two_part(ct), ct.volume, info), tmp_path)
    )
    assert errors == [], output
