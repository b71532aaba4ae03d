import pytest

from pipeline.errors import InvalidUidError
from pipeline.uids import DEFAULT_UID_ROOT, derive_uid, is_valid_uid, validate_uid


@pytest.mark.parametrize(
    "uid",
    ["1.2.3", "0.1", "1.2.840.10008.5.1.4.1.1.2", "1." + "2" * 62],
)
def test_valid_uids(uid):
    assert is_valid_uid(uid)
    assert validate_uid(uid) == uid


@pytest.mark.parametrize(
    "uid",
    ["", "1..2", ".1.2", "1.2.", "1.02", "../../etc/passwd", "1.2/3", "1.2\x00", "1." + "2" * 63, "a.b", " 1.2"],
)
def test_invalid_uids_are_refused(uid):
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUidError, match="not a valid DICOM UID"):
        validate_uid(uid, "SOPInstanceUID")


def test_derived_uids_are_stable_valid_and_distinct():
    a = derive_uid(DEFAULT_UID_ROOT, "1.2.3", "model-1", "SEG")
    assert a == derive_uid(DEFAULT_UID_ROOT, "1.2.3", "model-1", "SEG")
    assert is_valid_uid(a)
    assert a.startswith(DEFAULT_UID_ROOT + ".")
    others = {
        derive_uid(DEFAULT_UID_ROOT, "1.2.3", "model-2", "SEG"),
        derive_uid(DEFAULT_UID_ROOT, "1.2.3", "model-1", "RTSTRUCT"),
        derive_uid(DEFAULT_UID_ROOT, "1.2.4", "model-1", "SEG"),
        derive_uid("1.2.3.4", "1.2.3", "model-1", "SEG"),
    }
    assert a not in others and len(others) == 4


def test_derive_uid_rejects_bad_roots():
    with pytest.raises(InvalidUidError):
        derive_uid("1.2.x", "a")
    with pytest.raises(InvalidUidError, match="longer than 40"):
        derive_uid("1." + "2" * 45, "a")
