"""SUVbw: decay modes, injection times, vendor counts, and clear refusals."""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
import pytest
from pydicom.dataset import Dataset

from pipeline import reader, suv
from pipeline.errors import SuvCalibrationError
from tests.pipeline.conftest import (
    DOSE_BQ,
    F18_HALF_LIFE,
    WEIGHT_KG,
    StudyIds,
    pet_base,
    phantom_suv,
)

EXPECTED_START = WEIGHT_KG * 1000.0 / (DOSE_BQ * math.exp(-math.log(2) * 3600.0 / F18_HALF_LIFE))


def header(**changes) -> Dataset:
    ds = pet_base(StudyIds())
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def radio(ds: Dataset, **changes) -> Dataset:
    info = ds.RadiopharmaceuticalInformationSequence[0]
    for key, value in changes.items():
        if value is None:
            delattr(info, key)
        else:
            setattr(info, key, value)
    return ds


def test_bqml_start_matches_formula():
    assert suv.suv_factor(header()) == pytest.approx(EXPECTED_START, rel=1e-9)


def test_admin_uses_undecayed_dose():
    assert suv.suv_factor(header(DecayCorrection="ADMIN")) == pytest.approx(WEIGHT_KG * 1000.0 / DOSE_BQ, rel=1e-12)


def test_start_time_without_datetime_uses_series_date():
    ds = radio(header(), RadiopharmaceuticalStartDateTime=None)
    assert suv.suv_factor(ds) == pytest.approx(EXPECTED_START, rel=1e-9)


def test_injection_before_midnight():
    ds = radio(header(SeriesTime="003000", AcquisitionTime="003000"), RadiopharmaceuticalStartDateTime=None,
               RadiopharmaceuticalStartTime="233000")
    assert suv.suv_factor(ds) == pytest.approx(EXPECTED_START, rel=1e-9)


def test_series_time_after_acquisition_uses_earliest_acquisition():
    first = header(SeriesTime="131500", AcquisitionTime="110000")
    later = header(SeriesTime="131500", AcquisitionTime="110500")
    start = suv.scan_start_time([later, first])
    assert start == datetime(2024, 3, 15, 11, 0, 0)
    assert suv.suv_factor(first, scan_start=start) == pytest.approx(EXPECTED_START, rel=1e-9)


def test_decay_none_is_per_slice():
    ds = header(DecayCorrection="NONE", AcquisitionTime="113000")
    expected = WEIGHT_KG * 1000.0 / (DOSE_BQ * math.exp(-math.log(2) * 5400.0 / F18_HALF_LIFE))
    assert suv.suv_factor(ds) == pytest.approx(expected, rel=1e-9)


def test_philips_counts_with_suv_scale_factor():
    ds = header(Units="CNTS")
    block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
    block.add_new(0x00, "DS", "0.000123")
    assert suv.suv_factor(ds) == pytest.approx(0.000123)


def test_philips_counts_with_activity_scale_factor():
    ds = header(Units="CNTS")
    block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
    block.add_new(0x09, "DS", "2.5")
    assert suv.suv_factor(ds) == pytest.approx(2.5 * EXPECTED_START, rel=1e-9)


def test_gml_passthrough():
    assert suv.suv_factor(header(Units="GML", PatientWeight=None)) == 1.0


@pytest.mark.parametrize(
    "make, attribute",
    [
        (lambda: header(PatientWeight=None), "PatientWeight"),
        (lambda: header(PatientWeight="0"), "PatientWeight"),
        (lambda: radio(header(), RadionuclideTotalDose=None), "RadionuclideTotalDose"),
        (lambda: radio(header(), RadionuclideTotalDose="350"), "RadionuclideTotalDose"),
        (lambda: radio(header(), RadionuclideHalfLife=None), "RadionuclideHalfLife"),
        (lambda: radio(header(), RadiopharmaceuticalStartDateTime=None, RadiopharmaceuticalStartTime=None),
         "RadiopharmaceuticalStartTime"),
        (lambda: header(RadiopharmaceuticalInformationSequence=None), "RadiopharmaceuticalInformationSequence"),
        (lambda: header(Units=None), "Units missing"),
        (lambda: header(Units="PROPCNTS"), "Units PROPCNTS"),
        (lambda: header(Units="CNTS"), "(7053,1000)"),
        (lambda: header(DecayCorrection=None), "DecayCorrection missing"),
        (lambda: header(SeriesTime=None, AcquisitionTime=None), "SeriesDate/SeriesTime"),
        (lambda: radio(header(), RadiopharmaceuticalStartDateTime="20240314100000"), "implausible"),
    ],
)
def test_missing_information_names_attribute_and_series(make, attribute):
    ds = make()
    with pytest.raises(SuvCalibrationError) as info:
        suv.suv_factor(ds)
    assert attribute in str(info.value)
    assert "PET AC WB" in str(info.value) and str(ds.SeriesInstanceUID) in str(info.value)


def test_to_suv_matches_phantom_within_one_percent(phantom_study):
    pet = reader.load_volume(reader.scan_files(phantom_study.pet_files).series[0])
    out = suv.to_suv(pet)
    assert out.units == "GML" and pet.units == "BQML"
    truth = phantom_suv(phantom_study.pet_grid.points())
    got = out.array
    body = truth > 0.2
    assert np.max(np.abs(got[body] - truth[body]) / truth[body]) < 0.01
    assert np.all(got[~body] == 0)
    assert out.headers is pet.headers and out.image.GetOrigin() == pet.image.GetOrigin()


def test_to_suv_refuses_ct(phantom_study):
    ct = reader.load_volume(reader.scan_files(phantom_study.ct_files).series[0])
    with pytest.raises(SuvCalibrationError, match="needs a PET"):
        suv.to_suv(ct)


def test_start_time_a_few_seconds_ahead_is_clock_skew_not_the_day_before():
    # scan at 11:00:00; the injector's clock runs 12 s ahead of the scanner's
    ds = radio(header(), RadiopharmaceuticalStartDateTime=None, RadiopharmaceuticalStartTime="110012")
    skewed = WEIGHT_KG * 1000.0 / (DOSE_BQ * math.exp(math.log(2) * 12.0 / F18_HALF_LIFE))
    assert suv.suv_factor(ds) == pytest.approx(skewed, rel=1e-9)


def test_start_time_rolled_back_a_day_is_refused_as_too_many_half_lives():
    ds = radio(header(), RadiopharmaceuticalStartDateTime=None, RadiopharmaceuticalStartTime="111000")
    with pytest.raises(SuvCalibrationError, match="half-lives"):
        suv.suv_factor(ds)


def test_half_life_in_minutes_is_refused_with_a_hint():
    with pytest.raises(SuvCalibrationError, match="half-life of F-18: written in minutes"):
        suv.suv_factor(radio(header(), RadionuclideHalfLife="109.77"))


@pytest.mark.parametrize("half_life", ["6586", "6588.0", "4062.6", "282276"])
def test_half_lives_of_pet_radionuclides_are_accepted(half_life):
    assert suv.suv_factor(radio(header(DecayCorrection="ADMIN"), RadionuclideHalfLife=half_life)) > 0
    assert suv.suv_factor(radio(header(), RadionuclideHalfLife=half_life)) > 0


def test_gml_with_another_suv_type_is_refused():
    with pytest.raises(SuvCalibrationError, match="SUVType LBM"):
        suv.suv_factor(header(Units="GML", SUVType="LBM"))
    assert suv.suv_factor(header(Units="GML", SUVType="BW")) == 1.0
