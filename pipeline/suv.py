"""Standardised uptake values (SUVbw) from PET pixel values.

``SUVbw = activity concentration [Bq/mL] * body weight [g] / injected dose [Bq]``
with the dose decayed to the time the images are decay-corrected to:

- ``DecayCorrection`` START: the dose decays from injection to the scan start
  (SeriesDate/SeriesTime, or the earliest AcquisitionTime when the series time
  is later than the acquisitions, as after a re-reconstruction).
- ADMIN: images are corrected to the injection time; the dose is used as is.
- NONE: each slice is decayed to its own AcquisitionDateTime/AcquisitionTime.

Units GML are already SUV (SUVType BW or absent; other SUV types are refused).
Units CNTS use the vendor SUV scale factor (Philips private (7053,1000)) or the
activity-concentration scale factor (7053,1009) and then the BQML formula.
Missing or implausible information (a half-life that is no PET radionuclide's,
more than 8 half-lives since injection) raises :class:`SuvCalibrationError`
naming the attribute; nothing is guessed.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime, timedelta

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from pipeline.errors import SuvCalibrationError
from pipeline.volume import SeriesVolume

_PHILIPS_CREATOR = "Philips PET Private Group"
#: Lowest plausible injected activity in Bq; smaller values are probably MBq or mCi.
MIN_DOSE_BQ = 1.0e5
#: Half-lives (s) of the radionuclides used in PET; RadionuclideHalfLife must match one.
PET_HALF_LIVES_S = {
    "Rb-82": 75.45, "O-15": 122.24, "N-13": 597.9, "C-11": 1223.4, "Ga-68": 4062.6, "F-18": 6586.2,
    "Sc-44": 14292.0, "Cu-64": 45720.0, "Zr-89": 282276.0, "I-124": 360806.0,
}
#: Relative tolerance of that match (vendors round F-18's 6586.2 s to 6586-6588).
HALF_LIFE_TOLERANCE = 0.02
#: Largest lead of the injection clock over the scanner's that counts as skew, not as an
#: injection the day before (StartTime without a date).
MAX_CLOCK_SKEW_S = 300.0
#: Most half-lives between injection and the decay reference time (1/256 of the dose left).
MAX_HALF_LIVES = 8


def _label(header: Dataset, series_label: str | None) -> str:
    if series_label:
        return series_label
    number = header.get("SeriesNumber", "?")
    text = header.get("SeriesDescription", "")
    return f"PT series {number} '{text}' ({header.get('SeriesInstanceUID', '?')})"


def parse_dicom_datetime(date: str | None, time: str | None) -> datetime | None:
    """Combine DA and TM strings (``YYYYMMDD``, ``HHMMSS.ffffff`` or ``HH:MM:SS``) into a datetime."""
    if not date or not time:
        return None
    date = str(date).strip().replace("-", "").replace(".", "")
    time = str(time).strip().replace(":", "")
    if len(date) < 8 or not date[:8].isdigit():
        return None
    whole, _, frac = time.partition(".")
    if not whole.isdigit() or len(whole) not in (2, 4, 6):
        return None
    whole = whole.ljust(6, "0")
    micro = int((frac + "000000")[:6]) if frac.isdigit() else 0
    try:
        return datetime.strptime(date[:8] + whole, "%Y%m%d%H%M%S") + timedelta(microseconds=micro)
    except ValueError:
        return None


def parse_dt(value: str | None) -> datetime | None:
    """Parse a DT value ``YYYYMMDDHHMMSS.ffffff`` (a timezone offset is ignored)."""
    if not value:
        return None
    text = str(value).strip()
    for sign in ("+", "-"):
        if sign in text[8:]:
            text = text[: 8 + text[8:].index(sign)]
    if len(text) < 10:
        return None
    return parse_dicom_datetime(text[:8], text[8:])


def _acquisition_datetime(header: Dataset) -> datetime | None:
    dt = parse_dt(header.get("AcquisitionDateTime"))
    if dt is not None:
        return dt
    date = header.get("AcquisitionDate") or header.get("SeriesDate")
    return parse_dicom_datetime(date, header.get("AcquisitionTime"))


def scan_start_time(headers: list[Dataset], series_label: str | None = None) -> datetime:
    """Time the PET series is decay-corrected to under DecayCorrection START.

    SeriesDate/SeriesTime, unless a slice was acquired earlier than that (the
    series time was rewritten, e.g. by a re-reconstruction); then the earliest
    acquisition time.
    """
    first = headers[0]
    series_dt = parse_dicom_datetime(first.get("SeriesDate"), first.get("SeriesTime"))
    acquisitions = [t for t in (_acquisition_datetime(h) for h in headers) if t is not None]
    earliest = min(acquisitions) if acquisitions else None
    if series_dt is not None and (earliest is None or series_dt <= earliest):
        return series_dt
    if earliest is not None:
        return earliest
    raise SuvCalibrationError(
        f"{_label(first, series_label)}: SeriesDate/SeriesTime and AcquisitionDate/AcquisitionTime "
        f"are missing or unreadable; the scan time is needed for decay correction"
    )


def _radiopharmaceutical(header: Dataset, label: str) -> Dataset:
    seq = header.get("RadiopharmaceuticalInformationSequence")
    if not seq:
        raise SuvCalibrationError(
            f"{label}: RadiopharmaceuticalInformationSequence is missing; "
            f"injected dose and injection time are unknown"
        )
    return seq[0]


def _number(ds: Dataset, keyword: str, label: str, unit: str) -> float:
    value = ds.get(keyword)
    try:
        number = float(value) if value not in (None, "") else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        shown = "missing" if value in (None, "") else repr(value)
        raise SuvCalibrationError(f"{label}: {keyword} ({unit}) is {shown}; cannot compute SUV")
    return number


def injection_time(header: Dataset, scan: datetime, series_label: str | None = None) -> datetime:
    """Injection time from RadiopharmaceuticalStartDateTime, or StartTime on the series date.

    A StartTime more than :data:`MAX_CLOCK_SKEW_S` after the scan means the injection was
    before midnight; a smaller lead is the injector's clock running ahead of the scanner's.
    """
    label = _label(header, series_label)
    info = _radiopharmaceutical(header, label)
    when = parse_dt(info.get("RadiopharmaceuticalStartDateTime"))
    if when is None:
        start = info.get("RadiopharmaceuticalStartTime")
        if not start:
            raise SuvCalibrationError(
                f"{label}: RadiopharmaceuticalStartDateTime and RadiopharmaceuticalStartTime are "
                f"missing; the injection time is needed for decay correction"
            )
        date = header.get("SeriesDate") or header.get("StudyDate") or header.get("AcquisitionDate")
        when = parse_dicom_datetime(date or scan.strftime("%Y%m%d"), start)
        if when is None:
            raise SuvCalibrationError(f"{label}: RadiopharmaceuticalStartTime {start!r} is unreadable")
        if (when - scan).total_seconds() > MAX_CLOCK_SKEW_S:
            when -= timedelta(days=1)
    return when


def _private_float(header: Dataset, element: int) -> float | None:
    """A Philips PET private value (group 7053) by creator, or at its usual tag."""
    value = None
    try:
        value = header.get_private_item(0x7053, element, _PHILIPS_CREATOR).value
    except (KeyError, ValueError):
        tag = (0x7053, 0x1000 | element)
        if tag in header:
            value = header[tag].value
    if value is None:
        return None
    if isinstance(value, bytes):
        text = value.decode("ascii", errors="ignore").strip("\x00 ")
        try:
            number = float(text)
        except ValueError:
            if len(value) == 8:
                number = float(np.frombuffer(value, dtype="<f8")[0])
            else:
                return None
    else:
        try:
            number = float(value[0] if isinstance(value, (list, tuple)) else value)
        except (TypeError, ValueError):
            return None
    return number if math.isfinite(number) and number > 0 else None


def _half_life(info: Dataset, label: str) -> float:
    """RadionuclideHalfLife in seconds, checked against the PET radionuclides."""
    half_life = _number(info, "RadionuclideHalfLife", label, "s")
    if any(abs(half_life / known - 1) <= HALF_LIFE_TOLERANCE for known in PET_HALF_LIVES_S.values()):
        return half_life
    in_minutes = [name for name, known in PET_HALF_LIVES_S.items()
                  if abs(half_life * 60 / known - 1) <= HALF_LIFE_TOLERANCE]
    hint = f"; {half_life:g} min is the half-life of {in_minutes[0]}: written in minutes?" if in_minutes else ""
    known = ", ".join(f"{name} {value:g} s" for name, value in PET_HALF_LIVES_S.items())
    raise SuvCalibrationError(
        f"{label}: RadionuclideHalfLife {half_life:g} s matches no PET radionuclide ({known}){hint}"
    )


def _bqml_factor(
    header: Dataset, label: str, reference: datetime | None, scan: datetime | None
) -> float:
    """Weight [g] / dose decayed to ``reference`` [Bq]; ``reference`` None means no decay."""
    info = _radiopharmaceutical(header, label)
    weight_kg = _number(header, "PatientWeight", label, "kg")
    if not 1.0 <= weight_kg <= 500.0:
        raise SuvCalibrationError(f"{label}: PatientWeight {weight_kg} kg is implausible")
    dose = _number(info, "RadionuclideTotalDose", label, "Bq")
    if dose < MIN_DOSE_BQ:
        raise SuvCalibrationError(
            f"{label}: RadionuclideTotalDose {dose:g} is implausibly small for Bq "
            f"(MBq or mCi written instead?); correct the header"
        )
    if reference is not None and scan is not None:
        half_life = _half_life(info, label)
        injected = injection_time(header, scan, label)
        elapsed = (reference - injected).total_seconds()
        if elapsed < -MAX_CLOCK_SKEW_S or elapsed > MAX_HALF_LIVES * half_life:
            raise SuvCalibrationError(
                f"{label}: {elapsed / 60:.0f} min between injection ({injected:%Y-%m-%d %H:%M:%S}) and "
                f"the decay reference time ({reference:%Y-%m-%d %H:%M:%S}) is implausible (expected 0 to "
                f"{MAX_HALF_LIVES * half_life / 60:.0f} min, {MAX_HALF_LIVES} half-lives); "
                f"check RadiopharmaceuticalStartDateTime/StartTime and SeriesTime"
            )
        dose *= math.exp(-math.log(2.0) * elapsed / half_life)
    return weight_kg * 1000.0 / dose


def suv_factor(
    header: Dataset,
    series_label: str | None = None,
    scan_start: datetime | None = None,
) -> float:
    """Factor that turns this slice's rescaled pixel values into SUVbw.

    Parameters
    ----------
    header:
        A PET slice header (pixel data not needed).
    series_label:
        Text naming the series in error messages (default: built from the header).
    scan_start:
        Decay reference time of DecayCorrection START (default: from this header).

    Raises
    ------
    SuvCalibrationError
        Unknown units or missing/implausible weight, dose, half-life or times.
    """
    label = _label(header, series_label)
    units = str(header.get("Units", "")).strip().upper()
    if units == "GML":
        suv_type = str(header.get("SUVType", "")).strip().upper()
        if suv_type not in ("", "BW"):
            raise SuvCalibrationError(
                f"{label}: Units GML with SUVType {suv_type}; the model reads body-weight SUV (BW). "
                f"Send the PET in BQML or as SUVbw"
            )
        return 1.0
    if units == "CNTS":
        suv_scale = _private_float(header, 0x00)
        if suv_scale is not None:
            return suv_scale
        activity_scale = _private_float(header, 0x09)
        if activity_scale is None:
            raise SuvCalibrationError(
                f"{label}: Units CNTS without a vendor SUV scale factor (Philips (7053,1000)) or "
                f"activity concentration scale factor (7053,1009); cannot convert counts to SUV"
            )
        return activity_scale * _bqml_with_decay(header, label, scan_start)
    if units != "BQML":
        shown = units or "missing"
        raise SuvCalibrationError(
            f"{label}: Units {shown} cannot be converted to SUV (expected BQML, CNTS or GML)"
        )
    return _bqml_with_decay(header, label, scan_start)


def _bqml_with_decay(header: Dataset, label: str, scan_start: datetime | None) -> float:
    decay = str(header.get("DecayCorrection", "")).strip().upper()
    if decay == "ADMIN":
        return _bqml_factor(header, label, None, None)
    if decay == "START":
        scan = scan_start or scan_start_time([header], label)
        return _bqml_factor(header, label, scan, scan)
    if decay == "NONE":
        acquired = _acquisition_datetime(header)
        if acquired is None:
            raise SuvCalibrationError(
                f"{label}: DecayCorrection NONE needs each slice's AcquisitionTime, which is missing"
            )
        return _bqml_factor(header, label, acquired, scan_start or acquired)
    shown = decay or "missing"
    raise SuvCalibrationError(
        f"{label}: DecayCorrection {shown} is not START, ADMIN or NONE; cannot decay-correct the dose"
    )


def to_suv(pet: SeriesVolume) -> SeriesVolume:
    """Return ``pet`` converted to SUVbw (units "GML"), slice by slice.

    Raises
    ------
    SuvCalibrationError
        See :func:`suv_factor`; the message names the series.
    """
    if pet.modality != "PT":
        raise SuvCalibrationError(f"{pet.description}: SUV needs a PET series, got {pet.modality}")
    if not pet.headers:
        raise SuvCalibrationError(f"{pet.description}: no slice headers to read calibration from")
    label = pet.description
    units = str(pet.headers[0].get("Units", "")).strip().upper()
    scan = None if units == "GML" else _scan_start_or_none(pet.headers, label)
    factors = np.asarray(
        [suv_factor(h, label, scan) for h in pet.headers], dtype=np.float64
    )
    if np.allclose(factors, factors[0], rtol=1e-9, atol=0.0):
        image = sitk.Cast(pet.image * float(factors[0]), sitk.sitkFloat32)
    else:
        array = sitk.GetArrayFromImage(pet.image)
        array *= factors.astype(np.float32)[:, None, None]
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(pet.image)
    return replace(pet, image=image, units="GML")


def _scan_start_or_none(headers: list[Dataset], label: str) -> datetime | None:
    units = str(headers[0].get("Units", "")).strip().upper()
    decay = str(headers[0].get("DecayCorrection", "")).strip().upper()
    if units == "CNTS" and _private_float(headers[0], 0x00) is not None:
        return None
    if decay == "START":
        return scan_start_time(headers, label)
    return None
