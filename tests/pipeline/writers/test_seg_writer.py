"""DICOM-SEG writer: read back with highdicom equals the mask; metadata, UIDs, validation."""

from __future__ import annotations

import dataclasses

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.sr.codedict import codes

from pipeline.errors import GeometryError
from pipeline.writers.seg import write_seg
from tests.pipeline.writers.ct_factory import ellipsoid_mask
from tests.pipeline.writers.tools import dciodvfy_errors


def lesions(ct) -> np.ndarray:
    """Label mask with two lesions, the first with a hole, on ``ct``'s grid."""
    shape = ct.volume.array.shape
    mask = ellipsoid_mask(shape, ct.spacing_zyx, (18.0, 45.0, 40.0), (9.0, 14.0, 12.0)).astype(
        np.uint8
    )
    mask[5:7, 44:48, 38:42] = 0
    mask[ellipsoid_mask(shape, ct.spacing_zyx, (24.0, 70.0, 75.0), (4.0, 5.0, 5.0))] = 2
    return mask


def read_back(seg, tmp_path):
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    return hd.seg.segread(path), path


def pixels_per_source(seg_read, ct) -> np.ndarray:
    """(Z, Y, X, segments) read back through each CT SOPInstanceUID."""
    return seg_read.get_pixels_by_source_instance(
        ct.volume.sop_instance_uids, assert_missing_frames_are_empty=True
    )


@pytest.mark.parametrize("orientation", ["HFS", "FFS"])
def test_two_lesions_round_trip_exactly(ct_factory, info, tmp_path, orientation):
    ct = ct_factory(orientation=orientation, descending=orientation == "FFS")
    mask = lesions(ct)
    seg_read, _ = read_back(write_seg(mask, ct.volume, info), tmp_path)
    assert seg_read.get_segment_numbers() == [1, 2]
    pixels = pixels_per_source(seg_read, ct)
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), mask == 1)
    np.testing.assert_array_equal(pixels[..., 1].astype(bool), mask == 2)
    labels = [seg_read.get_segment_description(n).segment_label for n in (1, 2)]
    assert labels == ["IGTV", "IGTV 2"]


def test_bool_mask_is_one_segment_and_empty_frames_are_omitted(small_ct, info, tmp_path):
    mask = lesions(small_ct) == 1
    seg = write_seg(mask, small_ct.volume, info)
    assert int(seg.NumberOfFrames) == int(mask.any(axis=(1, 2)).sum()) < mask.shape[0]
    seg_read, _ = read_back(seg, tmp_path)
    pixels = pixels_per_source(seg_read, small_ct)
    assert pixels.shape[-1] == 1
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), mask)


def test_references_every_ct_image_and_copies_patient_and_study(small_ct, info):
    ct = small_ct.volume
    seg = write_seg(lesions(small_ct), ct, info)
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == set(ct.sop_instance_uids)
    source = ct.headers[0]
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "AccessionNumber",
        "StudyID",
    ):
        assert seg[keyword].value == source[keyword].value, keyword
    assert seg.FrameOfReferenceUID == ct.frame_of_reference_uid
    assert seg.SeriesInstanceUID != ct.series_instance_uid
    assert seg.Modality == "SEG"
    assert seg.SeriesDescription == "IGTV (AI, igtv-node) SEG"
    assert seg.SeriesNumber == 901
    assert seg.Manufacturer == "igtv-node"
    assert seg.ManufacturerModelName == "igtv-node SIM-Mamba"
    assert list(seg.SoftwareVersions) == ["igtv-node 0.1.0", "model ckpt-2024.1"]
    assert str(seg.InstanceCreationDate) == str(seg.ContentDate)


def test_segment_codes_and_algorithm_identification(small_ct, info):
    seg = write_seg(lesions(small_ct), small_ct.volume, info)
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
        assert (kind.CodeValue, kind.CodingSchemeDesignator) == ("108369006", "SCT")
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "igtv-node SIM-Mamba"
        assert algorithm.AlgorithmVersion == "0.1.0/ckpt-2024.1"
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert family.CodeValue == codes.DCM.ArtificialIntelligence.value


def test_uids_are_deterministic_and_depend_on_model_version(small_ct, info):
    mask = lesions(small_ct)
    first = write_seg(mask, small_ct.volume, info)
    again = write_seg(mask, small_ct.volume, info)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    assert first.StudyInstanceUID == small_ct.volume.study_instance_uid
    other = write_seg(mask, small_ct.volume, dataclasses.replace(info, model_version="ckpt-2024.2"))
    assert other.SeriesInstanceUID != first.SeriesInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert first.SOPInstanceUID.startswith(info.uid_root + ".")


def test_empty_mask_still_gives_a_valid_object(small_ct, info, tmp_path):
    mask = np.zeros(small_ct.volume.array.shape, dtype=bool)
    seg_read, path = read_back(write_seg(mask, small_ct.volume, info), tmp_path)
    assert not pixels_per_source(seg_read, small_ct).any()
    errors, output = dciodvfy_errors(path)
    assert errors == [], output


def test_mask_off_the_ct_grid_is_refused(small_ct, info):
    with pytest.raises(GeometryError, match="does not match the CT grid"):
        write_seg(np.zeros((3, 4, 5), dtype=bool), small_ct.volume, info)


def test_passes_dciodvfy(small_ct, info, tmp_path):
    _, path = read_back(write_seg(lesions(small_ct), small_ct.volume, info), tmp_path)
    errors, output = dciodvfy_errors(path)
    assert errors == [], output
    assert dcmread(path).file_meta.MediaStorageSOPClassUID == hd.UID("1.2.840.10008.5.1.4.1.1.66.4")


def test_non_ascii_names_and_series_numbers_survive_both_writers(ct_factory, info, tmp_path):
    from pipeline.writers.rtstruct import write_rtstruct

    ct = ct_factory(patient_name="Müller^Jürgen")
    numbered = dataclasses.replace(info, series_number=42)
    mask = lesions(ct)
    for name, ds, number in (
        ("seg.dcm", write_seg(mask, ct.volume, numbered), 42),
        ("rtstruct.dcm", write_rtstruct(mask, ct.volume, numbered), 43),
    ):
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        back = dcmread(path)
        assert str(back.PatientName) == "Müller^Jürgen"
        assert back.SeriesNumber == number


def test_patient_values_highdicom_cannot_parse_still_give_a_seg(small_ct, info, tmp_path):
    # senders write "00000000" for an unknown birth date; highdicom parses it and stopped the SEG
    ct = small_ct.volume
    for header in ct.headers:
        header.PatientBirthDate = "00000000"
        header.PatientSex = "Male"
        del header.StudyTime
    seg_read, _ = read_back(write_seg(lesions(small_ct), ct, info), tmp_path)
    # the SEG carries the CT's own values, and the CT headers are left as they were
    assert seg_read.PatientBirthDate == "00000000" and seg_read.PatientSex == "Male"
    assert seg_read.StudyTime == ""
    assert ct.headers[0].PatientBirthDate == "00000000" and "StudyTime" not in ct.headers[0]
    np.testing.assert_array_equal(pixels_per_source(seg_read, small_ct)[..., 0].astype(bool), lesions(small_ct) == 1)
