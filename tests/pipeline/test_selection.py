"""Series selection: candidates, skip reasons, choice rules and errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from pipeline import geometry, reader
from pipeline.errors import CoverageError, MissingCtError, MissingPetError, PatientMismatchError
from pipeline.reader import InstanceInfo, SeriesInfo
from pipeline.selection import (
    CT_IMAGE_STORAGE,
    PET_IMAGE_STORAGE,
    header_coverage,
    reject_reason,
    select_pet_ct,
)
from tests.pipeline.conftest import PET_GRID, centred_grid, make_study

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def series(
    modality: str = "CT",
    n: int = 40,
    *,
    description: str = "",
    number: int = 1,
    sop_class: str | None = None,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    frame: str = "1.2.3",
    study: str = "1.2.9",
    patient: str = "P1",
    corrected: tuple[str, ...] = ("ATTN", "DECY"),
    orientation: tuple[float, ...] = AXIAL,
    time: str = "110000",
    spacing: float = 2.0,
    z0: float = 0.0,
) -> SeriesInfo:
    """A SeriesInfo as the scanner would produce, without files (slices at z0 + k * spacing)."""
    if sop_class is None:
        sop_class = CT_IMAGE_STORAGE if modality == "CT" else PET_IMAGE_STORAGE
    info = SeriesInfo(
        uid=generate_uid(),
        modality=modality,
        sop_class_uid=sop_class,
        description=description,
        number=number,
        frame_of_reference_uid=frame,
        study_instance_uid=study,
        patient_id=patient,
        image_type=image_type,
        series_date="20240315",
        series_time=time,
        acquisition_time=time,
        units="BQML" if modality == "PT" else "",
        corrected_image=corrected if modality == "PT" else (),
    )
    info.instances = [
        InstanceInfo(
            path=Path(f"/nowhere/{info.uid}/{k}.dcm"),
            sop_instance_uid=generate_uid(),
            instance_number=k,
            position=(0.0, 0.0, z0 + spacing * k),
            orientation=orientation,
            rows=64,
            columns=64,
            pixel_spacing=(2.0, 2.0),
            number_of_frames=1,
            has_pixel_data=True,
            acquisition_time=time,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        for k in range(n)
    ]
    return info


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: series("CT", 2, description="Topogram 0.6 T20f", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "localizer"),
        (lambda: series("CT", 1, description="Scout"), "localizer"),
        (lambda: series("CT", 3, description="Dose Report", sop_class="1.2.840.10008.5.1.4.1.1.7"), "secondary capture"),
        (lambda: series("CT", 1, description="Patient Protocol"), "dose report"),
        (lambda: series("PT", 90, corrected=("DECY", "NORM")), "not attenuation-corrected"),
        (lambda: series("PT", 90, corrected=(), description="PET NAC WB"), "not attenuation-corrected"),
        (lambda: series("PT", 36, description="MIP rotating", image_type=("DERIVED", "SECONDARY", "MIP")), "MIP"),
        (lambda: series("SEG", 1, sop_class="1.2.840.10008.5.1.4.1.1.66.4"), "not an image series"),
        (lambda: series("RTSTRUCT", 1, sop_class="1.2.840.10008.5.1.4.1.1.481.3"), "not an image series"),
        (lambda: series("SR", 1, sop_class="1.2.840.10008.5.1.4.1.1.88.67"), "not an image series"),
        (lambda: series("MR", 40, sop_class="1.2.840.10008.5.1.4.1.1.4"), "neither PET"),
        (lambda: series("CT", 4), "too few slices"),
        (lambda: series("CT", 100, orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0), description="COR MPR"), "not axial"),
        (lambda: series("CT", 100, sop_class="1.2.840.10008.5.1.4.1.1.2.1"), "multi-frame"),
    ],
)
def test_reject_reasons(make, reason):
    why = reject_reason(make())
    assert why is not None and reason.lower() in why.lower()


def test_plain_ct_and_pet_are_candidates():
    assert reject_reason(series("CT", 200)) is None
    assert reject_reason(series("PT", 200)) is None


def test_chooses_and_reports_every_skipped_series():
    ct = series("CT", 200, number=2, description="CT AC")
    pet = series("PT", 250, number=3, description="PET AC")
    scout = series("CT", 1, number=1, description="Topogram")
    nac = series("PT", 250, number=4, description="PET NAC", corrected=("DECY",))
    seg = series("SEG", 1, number=90, sop_class="1.2.840.10008.5.1.4.1.1.66.4")
    sel = select_pet_ct([scout, ct, pet, nac, seg])
    assert sel.ct is ct and sel.pet is pet
    skipped = {s.uid: why for s, why in sel.skipped}
    assert set(skipped) == {scout.uid, nac.uid, seg.uid}
    assert any("share the FrameOfReferenceUID" in n for n in sel.notes)


def test_rules_prefer_same_frame_then_more_slices_then_closer_time():
    ct = series("CT", 200, frame="1.1")
    pet_same = series("PT", 150, frame="1.1", number=5)
    pet_other = series("PT", 300, frame="9.9", number=4)
    sel = select_pet_ct([ct, pet_other, pet_same])
    assert sel.pet is pet_same
    assert any(s is pet_other and "preferred" in why for s, why in sel.skipped)

    thin = series("CT", 400, frame="1.1", number=6, spacing=1.0)
    assert select_pet_ct([ct, thin, pet_same]).ct is thin

    early = series("CT", 200, frame="1.1", number=2, time="090000")
    late = series("CT", 200, frame="1.1", number=7, time="105500")
    assert select_pet_ct([early, late, pet_same]).ct is late
    assert any("chosen by" in n for n in select_pet_ct([early, late, pet_same]).notes)


def test_ct_outside_the_pet_loses_to_fewer_slices_inside():
    """A head-neck CT 450 mm away (same frame, more slices) must not beat the thorax CT."""
    thorax = series("CT", 165, number=2, description="CT thorax", frame="1.1")
    head_neck = series("CT", 175, number=4, description="CT head neck", frame="1.1", z0=450.0)
    pet = series("PT", 94, number=3, description="PET AC", frame="1.1", spacing=3.6)
    assert header_coverage(pet, thorax) == 1.0 and header_coverage(pet, head_neck) == 0.0
    sel = select_pet_ct([thorax, head_neck, pet])
    assert sel.ct is thorax
    assert any(s is head_neck and "covers only 0%" in why for s, why in sel.skipped)
    assert any("covers 100% of the CT slices" in n for n in sel.notes)


def test_coverage_below_the_limit_loses_to_coverage_above_it():
    pet = series("PT", 50, frame="1.1")  # z 0..98 mm, slab -1..99 mm
    # 40 % inside (20 of 50 slices) but same frame and more slices than the usable CT.
    partial = series("CT", 50, frame="1.1", number=2, z0=60.0)
    usable = series("CT", 30, frame="1.1", number=3, z0=20.0)
    assert header_coverage(pet, partial) == pytest.approx(0.4)
    assert header_coverage(pet, usable) == 1.0
    assert select_pet_ct([partial, usable, pet]).ct is usable
    # A pair in another frame (coverage unknown until registration) beats a known miss.
    elsewhere = series("CT", 30, frame="2.2", number=5, z0=900.0)
    assert header_coverage(pet, elsewhere) is None
    assert select_pet_ct([partial, elsewhere, pet]).ct is elsewhere


def test_no_overlapping_pair_names_every_ct_considered():
    pet = series("PT", 94, number=3, description="PET AC", frame="1.1")
    head = series("CT", 175, number=4, description="CT head neck", frame="1.1", z0=450.0)
    legs = series("CT", 120, number=5, description="CT legs", frame="1.1", z0=-900.0)
    with pytest.raises(CoverageError) as info:
        select_pet_ct([head, legs, pet])
    text = str(info.value)
    assert "covers only 0%" in text and "at least 50%" in text
    assert head.uid in text and legs.uid in text and pet.uid in text
    assert "CT series considered" in text and "'CT head neck'" in text and "'CT legs'" in text


@pytest.mark.parametrize("shift_mm", [0.0, 60.0, 110.0, 150.0, 400.0])
def test_header_coverage_matches_the_volume_check(tmp_path, shift_mm):
    """Header-only coverage agrees with :func:`geometry.slice_coverage` on the read volumes."""
    pet_grid = centred_grid(PET_GRID.size, PET_GRID.spacing, shift=(0.0, 0.0, shift_mm))
    study = make_study(tmp_path / "s", pet_grid=pet_grid)
    scan = reader.scan_files([study.root])
    ct = next(s for s in scan.series if s.modality == "CT")
    pet = next(s for s in scan.series if s.modality == "PT")
    expected = geometry.slice_coverage(reader.load_volume(ct).image, reader.load_volume(pet).image)
    assert header_coverage(pet, ct) == pytest.approx(expected)


def test_missing_pet_names_skipped_series():
    nac = series("PT", 200, description="PET NAC WB", corrected=("DECY",))
    with pytest.raises(MissingPetError, match=rf"PET NAC WB.*{nac.uid}.*not attenuation-corrected"):
        select_pet_ct([series("CT", 200), nac])


def test_missing_ct():
    scout = series("CT", 1, description="Scout")
    with pytest.raises(MissingCtError, match=rf"Scout.*{scout.uid}.*localizer"):
        select_pet_ct([series("PT", 200), scout])


def test_patient_mismatch_names_both_series():
    ct = series("CT", 200, patient="A")
    pet = series("PT", 200, patient="B")
    with pytest.raises(PatientMismatchError, match=rf"PatientID.*{pet.uid}.*{ct.uid}"):
        select_pet_ct([ct, pet])
    other_study = series("PT", 200, study="7.7.7", patient="A")
    with pytest.raises(PatientMismatchError, match="StudyInstanceUID"):
        select_pet_ct([ct, other_study])


def test_written_study_is_selected(phantom_study):
    sel = select_pet_ct(reader.scan_files([phantom_study.root]).series)
    assert sel.ct.modality == "CT" and sel.pet.modality == "PT"
    assert not sel.skipped


def test_pydicom_corpus_skips_everything_with_reasons():
    from pydicom.data import get_testdata_files

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan = reader.scan_files([Path(f) for f in get_testdata_files()])
    for s in scan.series:
        if s.modality not in ("CT", "PT"):
            assert reject_reason(s)
    with pytest.raises(MissingPetError) as info:
        select_pet_ct(scan.series)
    assert "no attenuation-corrected PET" in str(info.value)
