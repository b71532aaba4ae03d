"""Series reader: grouping, slice order, geometry, decoding and refusals."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from pipeline import reader
from pipeline.errors import GeometryError, PipelineError, PixelDataError
from tests.pipeline.conftest import (
    BQML_PER_SUV,
    CT_GRID,
    FFS,
    HFP,
    StudyIds,
    centred_grid,
    phantom_ct,
    phantom_suv,
    write_ct,
)

SMALL = centred_grid((40, 32, 12), (8.0, 8.0, 6.0))


def image_points(image: sitk.Image) -> np.ndarray:
    """Physical LPS coordinates (Z, Y, X, 3) of every voxel of ``image``."""
    nx, ny, nz = image.GetSize()
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    idx = np.stack([i, j, k], axis=-1).astype(float) * np.asarray(image.GetSpacing())
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    return idx @ d.T + np.asarray(image.GetOrigin())


def load_single(folder: Path) -> reader.SeriesVolume:
    scan = reader.scan_files([folder])
    assert len(scan.series) == 1, scan
    return reader.load_volume(scan.series[0])


def test_scan_groups_series_and_reports_unreadable(phantom_study, tmp_path):
    junk = phantom_study.root / "notes.txt"
    junk.write_text("not dicom")
    dup = phantom_study.root / "copy.dcm"
    shutil.copy(phantom_study.ct_files[0], dup)
    scan = reader.scan_files([phantom_study.root])
    assert sorted(s.modality for s in scan.series) == ["CT", "PT"]
    ct = next(s for s in scan.series if s.modality == "CT")
    assert len(ct.files) == CT_GRID.size[2]
    assert ct.frame_of_reference_uid == phantom_study.ids.for_uid
    assert ct.patient_id == phantom_study.ids.patient_id
    reasons = dict((p.name, why) for p, why in scan.unreadable)
    assert "not readable as DICOM" in reasons["notes.txt"]
    # Whichever of the two identical files was read second is the duplicate.
    assert any("duplicate of SOPInstanceUID" in why for why in reasons.values())


def test_load_ct_sorted_by_position_with_exact_geometry(phantom_study):
    scan = reader.scan_files(reversed(phantom_study.ct_files))
    vol = reader.load_volume(scan.series[0])
    g = phantom_study.ct_grid
    assert vol.image.GetSize() == g.size
    assert np.allclose(vol.image.GetSpacing(), g.spacing)
    assert np.allclose(vol.image.GetOrigin(), g.origin, atol=1e-3)
    assert np.allclose(np.asarray(vol.image.GetDirection()).reshape(3, 3), g.direction)
    assert vol.image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(vol.array, phantom_ct(g.points()))
    z = [float(h.ImagePositionPatient[2]) for h in vol.headers]
    assert z == sorted(z)
    assert all("PixelData" not in h for h in vol.headers)
    assert len(set(vol.sop_instance_uids)) == g.size[2]
    assert vol.units == "HU" and vol.modality == "CT"


@pytest.mark.parametrize("iop", [FFS, HFP], ids=["feet-first", "prone"])
def test_orientation_variants_place_anatomy_correctly(tmp_path, iop):
    grid = centred_grid(SMALL.size, SMALL.spacing, iop=iop)
    write_ct(tmp_path / "CT", grid, StudyIds())
    vol = load_single(tmp_path / "CT")
    np.testing.assert_array_equal(vol.array, phantom_ct(image_points(vol.image)))
    direction = np.asarray(vol.image.GetDirection()).reshape(3, 3)
    assert np.isclose(np.linalg.det(direction), 1.0)


def test_unsigned_ct(tmp_path):
    write_ct(tmp_path / "CT", SMALL, StudyIds(), unsigned=True)
    ds = pydicom.dcmread(next((tmp_path / "CT").iterdir()))
    assert ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) == -1024
    np.testing.assert_array_equal(load_single(tmp_path / "CT").array, phantom_ct(SMALL.points()))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=["rle", "j2k", "jpegls"])
def test_compressed_ct_decodes_exactly(tmp_path, syntax):
    write_ct(tmp_path / "CT", SMALL, StudyIds(), transfer_syntax=syntax)
    ds = pydicom.dcmread(next((tmp_path / "CT").iterdir()))
    assert ds.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_single(tmp_path / "CT").array, phantom_ct(SMALL.points()))


def test_pet_per_slice_slopes(phantom_study):
    scan = reader.scan_files(phantom_study.pet_files)
    vol = reader.load_volume(scan.series[0])
    slopes = {float(h.RescaleSlope) for h in vol.headers}
    assert len(slopes) > 5
    truth = phantom_suv(phantom_study.pet_grid.points()) * BQML_PER_SUV
    assert np.max(np.abs(vol.array - truth)) <= truth.max() / 65000.0
    assert vol.units == "BQML"


def _rewrite(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path)


def test_gap_is_refused_with_positions(tmp_path):
    files = write_ct(tmp_path / "CT", SMALL, StudyIds(), description="gappy")
    victim = next(f for f in files if float(pydicom.dcmread(f).ImagePositionPatient[2]) > 0)
    victim.unlink()
    with pytest.raises(GeometryError, match=r"'gappy'.*irregular slice spacing.*->"):
        load_single(tmp_path / "CT")


def test_duplicate_position_is_refused(tmp_path):
    files = write_ct(tmp_path / "CT", SMALL, StudyIds(), description="dups")
    copy = tmp_path / "CT" / "zz_copy.dcm"
    shutil.copy(files[3], copy)
    _rewrite(copy, SOPInstanceUID=generate_uid())
    with pytest.raises(GeometryError, match=r"'dups'.*duplicate slice position"):
        load_single(tmp_path / "CT")


def _with_z(path_z: list[tuple[Path, float]]) -> None:
    """Move each file's slice to z (mm), keeping x and y."""
    for f, z in path_z:
        ds = pydicom.dcmread(f)
        x, y, _z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, f"{z:.4f}"]
        ds.save_as(f)


def _by_z(files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))


def test_cumulative_spacing_drift_is_refused(tmp_path):
    """Every step is within 2 % of the median, but the slices drift > 0.1 slice from one uniform grid."""
    grid = centred_grid((16, 16, 41), (8.0, 8.0, 2.0))
    files = _by_z(write_ct(tmp_path / "CT", grid, StudyIds(), description="drifting"))
    steps = np.r_[np.full(20, 2.039), np.full(20, 1.961)]
    _with_z(list(zip(files, np.r_[0.0, np.cumsum(steps)], strict=True)))
    # Largest deviation: 20 * 0.039 = 0.78 mm at z = 40.78 mm, against 0.2 mm allowed.
    with pytest.raises(GeometryError, match=r"'drifting'.*drift up to 0\.78 mm \(at 40\.78 mm\).*2\.000 mm grid"):
        load_single(tmp_path / "CT")


def test_small_spacing_jitter_is_accepted(tmp_path):
    """Positions rounded or jittered around a uniform grid (no accumulation) are still one volume."""
    grid = centred_grid((16, 16, 41), (8.0, 8.0, 2.0))
    files = _by_z(write_ct(tmp_path / "CT", grid, StudyIds(), description="jitter"))
    z = 2.0 * np.arange(41) + np.where(np.arange(41) % 2 == 1, 0.03, 0.0)
    _with_z(list(zip(files, z, strict=True)))
    vol = load_single(tmp_path / "CT")
    assert vol.image.GetSpacing()[2] == pytest.approx(2.0)
    assert vol.image.GetSize()[2] == 41


def test_gantry_tilt_is_refused(tmp_path):
    files = write_ct(tmp_path / "CT", SMALL, StudyIds(), description="tilted")
    for f in files:
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.2 * z, z]
        ds.save_as(f)
    with pytest.raises(GeometryError, match=r"'tilted'.*gantry tilt"):
        load_single(tmp_path / "CT")


def test_non_axial_is_refused(tmp_path):
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    write_ct(tmp_path / "CT", centred_grid(SMALL.size, SMALL.spacing, iop=coronal), StudyIds(), description="cor")
    with pytest.raises(GeometryError, match=r"'cor'.*not axial"):
        load_single(tmp_path / "CT")


def test_mixed_sizes_are_refused(tmp_path):
    files = write_ct(tmp_path / "CT", SMALL, StudyIds(), description="mixed")
    ds = pydicom.dcmread(files[0])
    ds.Rows, ds.Columns = 16, 16
    ds.PixelData = np.zeros((16, 16), np.int16).tobytes()
    ds.save_as(files[0])
    with pytest.raises(GeometryError, match=r"'mixed'.*different sizes"):
        load_single(tmp_path / "CT")


def test_corrupt_pixels_raise_pixel_data_error(tmp_path):
    files = write_ct(tmp_path / "CT", SMALL, StudyIds(), description="broken", transfer_syntax=RLELossless)
    ds = pydicom.dcmread(files[5])
    ds.PixelData = ds.PixelData[:40]
    ds.save_as(files[5])
    with pytest.raises(PixelDataError, match=rf"'broken'.*{files[5].name}"):
        load_single(tmp_path / "CT")


def test_pydicom_corpus_never_crashes():
    """Every file that ships with pydicom goes through scan and, for CT/PET, load."""
    from pydicom.data import get_testdata_files

    files = [Path(f) for f in get_testdata_files() if Path(f).is_file()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan = reader.scan_files(files)
        assert len(scan.series) > 20
        assert all(reason for _p, reason in scan.unreadable)
        assert sum(len(s.files) for s in scan.series) + len(scan.unreadable) == len(files)
        for series in scan.series:
            if series.modality in ("CT", "PT"):
                try:
                    vol = reader.load_volume(series)
                except PipelineError as exc:
                    assert series.uid in str(exc)
                else:
                    assert vol.image.GetNumberOfPixels() > 0
