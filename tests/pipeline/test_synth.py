"""Physical truth of the synthetic PET/CT generator: SUV calibration, motion, truth, DICOM validity."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pipeline.synth.generate import SynthOptions, SynthOptionsError, birth_date, generate_study
from pipeline.synth.lesions import sample_diameter


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(f) for f in folder.glob("*.dcm")), key=lambda d: int(d.InstanceNumber))


def _dt(date: str, time: str) -> datetime:
    return datetime.strptime(date + time.split(".")[0].ljust(6, "0"), "%Y%m%d%H%M%S")


def _suv_from_files(pet: list[pydicom.Dataset]) -> np.ndarray:
    """SUVbw as a clinical viewer computes it from the written attributes."""
    first = pet[0]
    assert first.Units == "BQML" and first.DecayCorrection == "START"
    rp = first.RadiopharmaceuticalInformationSequence[0]
    injected = datetime.strptime(rp.RadiopharmaceuticalStartDateTime.split(".")[0], "%Y%m%d%H%M%S")
    start = _dt(first.SeriesDate, first.SeriesTime)
    decayed = float(rp.RadionuclideTotalDose) * 2 ** (-(start - injected).total_seconds() / float(rp.RadionuclideHalfLife))
    weight_g = float(first.PatientWeight) * 1000
    return np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in pet]) * weight_g / decayed


def test_suv_from_written_bqml_matches_generator(small_study, synthetic_study_object_factory):
    study = synthetic_study_object_factory(7, motion="breathing")
    suv = _suv_from_files(_read_series(small_study / "PT"))
    assert suv.shape == study.pet_suv.shape
    body = study.pet_suv > 0.2
    assert body.mean() > 0.1
    rel = np.abs(suv[body] - study.pet_suv[body]) / study.pet_suv[body]
    assert rel.max() <= 0.01
    # realistic uptake: liver-range values exist, lungs are low, the maximum is a lesion or the heart
    assert 2.0 < float(np.percentile(suv[body], 99.5)) < 16.0


def test_ct_hu_written_and_realistic(small_study, synthetic_study_object_factory):
    study = synthetic_study_object_factory(7, motion="breathing")
    ct = _read_series(small_study / "CT")
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in ct])
    np.testing.assert_array_equal(hu, study.ct_hu)
    assert ct[0].SOPClassUID == pydicom.uid.CTImageStorage and ct[0].PixelRepresentation == 1
    corner = hu[:, :6, :6]
    assert abs(float(np.median(corner)) + 1000) < 30  # air
    lung_like = ((hu > -950) & (hu < -750)).mean()
    assert lung_like > 0.04  # lungs fill a good part of the thorax
    assert (hu > 400).sum() > 200  # ribs, spine, sternum
    assert 25 < float(np.median(hu[study.gtv])) < 60  # tumour is soft tissue


def test_igtv_contains_gtv_and_grows_with_amplitude(synthetic_study_object_factory):
    volumes = []
    for amp in (0.0, 10.0, 20.0):
        s = synthetic_study_object_factory(11, diameter_mm=20.0, amplitude_mm=amp)
        assert s.gtv.any()
        assert not (s.gtv & ~s.igtv).any()
        volumes.append(int(s.igtv.sum()))
        assert s.case["igtv_volume_ml"] >= s.case["gtv_volume_ml"]
    assert volumes[0] < volumes[1] < volumes[2]
    static = synthetic_study_object_factory(11, diameter_mm=20.0, motion="static")
    np.testing.assert_array_equal(static.gtv, static.igtv)
    # the SI extent of the IGTV grows by about the amplitude (5 mm slices)
    moving = synthetic_study_object_factory(11, diameter_mm=20.0, amplitude_mm=20.0)
    def extent(mask: np.ndarray) -> int:
        return int(np.ptp(np.nonzero(mask.any(axis=(1, 2)))[0]))

    grown_mm = (extent(moving.igtv) - extent(static.gtv)) * moving.ct_spacing[2]
    assert 10.0 <= grown_mm <= 30.0


def _mask_on_pet(study, mask: np.ndarray) -> np.ndarray:
    """A CT-grid mask sampled (nearest neighbour) at the PET voxel centres (same frame, HFS)."""
    x, y, z = study.pet_grid.axes()
    cx, cy, cz = study.ct_grid.axes()
    pairs = ((z, cz), (y, cy), (x, cx))
    idx = [np.clip(np.rint((p - c[0]) / (c[1] - c[0])).astype(int), 0, c.size - 1) for p, c in pairs]
    iz, iy, ix = [(p >= c.min()) & (p <= c.max()) for p, c in pairs]
    return mask[np.ix_(*idx)] & iz[:, None, None] & iy[None, :, None] & ix[None, None, :]


@pytest.mark.parametrize("seed", [11, 14, 17])
def test_pet_is_motion_blurred_and_faint_at_si_extremes(synthetic_study_object_factory, seed):
    static = synthetic_study_object_factory(seed, diameter_mm=20.0, motion="static", lymph_nodes=False)
    moving = synthetic_study_object_factory(seed, diameter_mm=20.0, amplitude_mm=20.0, lymph_nodes=False)
    assert moving.case["tumours"][0]["abutting"] != "mediastinum"  # heart uptake would mask the effect
    on_static = _mask_on_pet(static, static.igtv)
    on_moving = _mask_on_pet(moving, moving.igtv)
    peak_static = static.pet_suv_ideal[on_static].max()
    peak_moving = moving.pet_suv_ideal[on_moving].max()
    # motion smears the uptake over the IGTV: the peak drops
    assert peak_moving < 0.8 * peak_static
    # at the inferior (inhale) end of the IGTV the tumour is rarely present: faint there
    z = moving.pet_grid.axes()[2]
    lowest = z[np.nonzero(on_moving.any(axis=(1, 2)))[0]].min()
    end = on_moving & (np.abs(z - lowest) < 1e-6)[:, None, None]
    assert moving.pet_suv_ideal[end].max() < 0.6 * peak_moving
    # the static PET there shows only lung background, the moving one a faint smear
    assert static.pet_suv_ideal[end].max() < moving.pet_suv_ideal[end].max()


def test_same_seed_gives_identical_pixels_and_uids():
    a = generate_study(3, SynthOptions(small=True))
    b = generate_study(3, SynthOptions(small=True))
    assert a.ct_hu.tobytes() == b.ct_hu.tobytes()
    assert all(x.PixelData == y.PixelData for x, y in zip(a.pet_datasets, b.pet_datasets, strict=False))
    assert [d.SOPInstanceUID for d in a.ct_datasets] == [d.SOPInstanceUID for d in b.ct_datasets]
    assert a.seg_igtv.SOPInstanceUID == b.seg_igtv.SOPInstanceUID
    c = generate_study(4, SynthOptions(small=True))
    assert c.ct_datasets[0].StudyInstanceUID != a.ct_datasets[0].StudyInstanceUID
    assert c.ct_hu.tobytes() != a.ct_hu.tobytes()


def test_a_leap_day_study_has_a_valid_birth_date():
    # seed 58 (and every seed 700 apart) is scanned on 29 February 2024; its 61-year-old patient
    # was born in a common year, so "19630229" failed pydicom's date conversion
    study = generate_study(58, SynthOptions(small=True))
    ct = study.ct_datasets[0]
    assert ct.StudyDate == "20240229"
    born = datetime.strptime(ct.PatientBirthDate, "%Y%m%d")
    assert born.year == 2024 - int(ct.PatientAge[:3]) and (born.month, born.day) == (2, 28)
    assert birth_date(datetime(2024, 3, 1).date(), 40) == "19840301"


def test_truth_seg_reads_back(small_study, synthetic_study_object_factory):
    study = synthetic_study_object_factory(7, motion="breathing")
    ct_uids = [d.SOPInstanceUID for d in study.ct_datasets]
    for name, label, mask in (("seg_gtv.dcm", "GTV", study.gtv), ("seg_igtv.dcm", "IGTV", study.igtv)):
        seg = hd.seg.segread(small_study / "truth" / name)
        assert [s.SegmentLabel for s in seg.SegmentSequence] == [label]
        assert seg.FrameOfReferenceUID == study.ct_datasets[0].FrameOfReferenceUID
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=ct_uids, segment_numbers=[1],
                                                   ignore_spatial_locations=True)
        np.testing.assert_array_equal(pixels[..., 0].astype(bool), mask)
    case = json.loads((small_study / "truth" / "case.json").read_text())
    assert case["seed"] == 7 and case["tumours"][0]["diameter_mm"] > 0


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("variant", [{}, {"feet_first": True, "compress": "rle", "pet_offset_mm": (12.0, -8.0, 20.0)}])
def test_dciodvfy_reports_no_errors(synthetic_study_factory, variant):
    folder = synthetic_study_factory(5, **variant)
    files = [sorted((folder / "CT").glob("*.dcm"))[3], sorted((folder / "PT").glob("*.dcm"))[3],
             folder / "truth" / "seg_igtv.dcm"]
    for f in files:
        out = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{f.name}: {errors}"


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmdump (dcmtk) not installed")
def test_dcmdump_reads_files(small_study):
    for f in (sorted((small_study / "CT").glob("*.dcm"))[0], sorted((small_study / "PT").glob("*.dcm"))[0],
              small_study / "truth" / "seg_igtv.dcm"):
        out = subprocess.run(["dcmdump", str(f)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "(0020,000d)" in out.stdout


def test_variants_geometry_and_compression(synthetic_study_factory, synthetic_study_object_factory):
    opts = {"feet_first": True, "compress": "rle", "pet_offset_mm": (12.0, -8.0, 20.0)}
    folder = synthetic_study_factory(5, **opts)
    study = synthetic_study_object_factory(5, **opts)
    ct = _read_series(folder / "CT")
    pet = _read_series(folder / "PT")
    assert ct[0].PatientPosition == "FFS"
    assert [float(v) for v in ct[0].ImageOrientationPatient] == [-1, 0, 0, 0, 1, 0]
    assert ct[0].file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    # compression keeps the instance UIDs that the truth SEG references
    seg = pydicom.dcmread(folder / "truth" / "seg_igtv.dcm")
    referenced = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    assert referenced == {d.SOPInstanceUID for d in ct}
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in ct])
    np.testing.assert_array_equal(hu, study.ct_hu)
    assert pet[0].FrameOfReferenceUID != ct[0].FrameOfReferenceUID
    # the same anatomy (spine) appears shifted by the offset in PET coordinates
    base = synthetic_study_object_factory(5, feet_first=True)
    assert study.pet_grid.origin == pytest.approx(tuple(np.add(base.pet_grid.origin, (12.0, -8.0, 20.0))))
    np.testing.assert_allclose(study.pet_suv_ideal, base.pet_suv_ideal, atol=1e-4)


def test_invalid_options_are_rejected():
    with pytest.raises(SynthOptionsError, match="motion"):
        generate_study(0, SynthOptions(motion="wobbly"))
    with pytest.raises(SynthOptionsError, match="compress"):
        generate_study(0, SynthOptions(compress="zip"))
    with pytest.raises(SynthOptionsError, match="amplitude_range_mm"):
        generate_study(0, SynthOptions(amplitude_range_mm=(20.0, 5.0)))
    with pytest.raises(SynthOptionsError, match="diameter_range_mm"):
        generate_study(0, SynthOptions(diameter_range_mm=(2.0, 10.0)))
    with pytest.raises(SynthOptionsError, match="not both"):
        generate_study(0, SynthOptions(diameter_mm=8.0, diameter_range_mm=(5.0, 10.0)))


def test_seeds_keep_their_uids_when_options_are_added():
    # seed 9000's study UID as generated before diameter_range_mm existed (the held-out set of
    # docs/model_card.md): training splits are drawn from sorted UIDs, so they must not move
    from pipeline.synth.generate import DEFAULT_UID_ROOT
    from pipeline.uids import derive_uid

    def study_uid(options: SynthOptions) -> str:
        return derive_uid(DEFAULT_UID_ROOT, "igtv-node-synth", "9000", options.fingerprint(), "study")

    assert study_uid(SynthOptions()) == "1.2.826.0.1.3680043.10.1561.244081557870229497021655926980740106"
    assert study_uid(SynthOptions(diameter_range_mm=(5.0, 16.0))) != study_uid(SynthOptions())


def test_diameter_range_draws_within_it(synthetic_study_object_factory):
    study = synthetic_study_object_factory(13, diameter_range_mm=(20.0, 24.0))
    assert 20.0 * 0.85**3 <= study.case["tumours"][0]["diameter_mm"] <= 24.0  # placement may shrink it
    rng = np.random.default_rng(0)
    drawn = [sample_diameter(rng, (5.0, 12.0)) for _ in range(200)]
    assert 5.0 <= min(drawn) and max(drawn) <= 12.0 and max(drawn) - min(drawn) > 5.0
    default = [sample_diameter(rng) for _ in range(200)]
    assert max(default) > 20.0  # the default draw is not confined to the range


def test_cli_synth_writes_studies(tmp_path):
    from typer.testing import CliRunner

    from pacs_node.cli import app

    result = CliRunner().invoke(app, ["synth", str(tmp_path / "out"), "--cases", "2", "--seed", "21", "--small"])
    assert result.exit_code == 0, result.output
    folders = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in folders] == ["case-0000-seed-21", "case-0001-seed-22"]
    for f in folders:
        assert len(list((f / "CT").glob("*.dcm"))) > 20 and len(list((f / "PT").glob("*.dcm"))) > 20
        assert (f / "truth" / "seg_igtv.dcm").is_file()
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "bad"), "--motion", "wobbly", "--small"])
    assert bad.exit_code == 2 and "motion" in bad.output


def test_truth_stays_inside_the_lungs_of_each_phase(synthetic_study_object_factory):
    from pipeline.synth.anatomy import AnatomyParams, ThoraxModel
    from pipeline.synth.breathing import BreathingTrace

    study = synthetic_study_object_factory(11, diameter_mm=20.0, amplitude_mm=20.0, lymph_nodes=False)
    case = study.case
    model = ThoraxModel(AnatomyParams(**case["anatomy"]))
    b = case["breathing"]
    trace = BreathingTrace(b["period_s"], b["shape_n"], b["hysteresis_fraction"], b["ct_time_fraction"])
    x, y, z = study.ct_grid.axes()
    ct_lung = model.lung_mask(x, y, z, -b["ct_inhale_fraction"] * b["diaphragm_amplitude_mm"])
    assert not (study.gtv & ~ct_lung).any()
    path = max(np.linalg.norm(t["inhale_displacement_mm"]) for t in case["tumours"])
    shifts = -trace.inhale_fraction(trace.envelope_times(path)) * b["diaphragm_amplitude_mm"]
    envelope = model.lung_masks(x, y, z, shifts).any(axis=0)
    assert not (study.igtv & ~envelope).any()
    assert study.igtv.sum() > 1.5 * study.gtv.sum()


def test_pet_slice_spacing_option_and_coverage(synthetic_study_factory, synthetic_study_object_factory):
    folder = synthetic_study_factory(5, pet_slice_mm=3.27)
    study = synthetic_study_object_factory(5, pet_slice_mm=3.27)
    pet = _read_series(folder / "PT")
    z = np.array([float(d.ImagePositionPatient[2]) for d in pet])
    np.testing.assert_allclose(np.diff(z), 3.27, atol=1e-3)
    assert float(pet[0].SliceThickness) == pytest.approx(3.27)
    ct_z = study.ct_grid.axes()[2]
    assert z.min() < ct_z.min() and z.max() > ct_z.max()  # the PET covers the whole CT range


def test_parallel_generation_writes_the_same_studies(tmp_path):
    from pipeline.synth.generate import generate_studies

    options = SynthOptions(small=True, motion="static")
    serial = generate_studies(tmp_path / "serial", seed=41, cases=2, options=options)
    parallel = generate_studies(tmp_path / "parallel", seed=41, cases=2, options=options, workers=2)
    assert [p.name for p in serial] == [p.name for p in parallel]
    for a, b in zip(serial, parallel, strict=True):
        files_a = sorted(p.relative_to(a) for p in a.rglob("*.dcm") if p.parent.name != "truth")
        files_b = sorted(p.relative_to(b) for p in b.rglob("*.dcm") if p.parent.name != "truth")
        assert files_a == files_b and files_a
        for rel in files_a:
            da, db = pydicom.dcmread(a / rel), pydicom.dcmread(b / rel)
            assert da.SOPInstanceUID == db.SOPInstanceUID
            assert da.PixelData == db.PixelData
