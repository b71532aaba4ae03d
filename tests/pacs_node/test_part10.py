"""The File Meta Information the listener writes is byte for byte pynetdicom's."""

from __future__ import annotations

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from pacs_node.part10 import PREAMBLE, file_meta


@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498." + "1" * 38, "9"])
@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless])
def test_file_meta_matches_pynetdicom(sop_uid, syntax):
    expected = encode_file_meta(create_file_meta(sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                                 sop_instance_uid=sop_uid, transfer_syntax=syntax))
    assert file_meta("1.2.840.10008.5.1.4.1.1.2", sop_uid, syntax) == expected


def test_file_meta_with_odd_implementation_version():
    expected = encode_file_meta(create_file_meta(sop_class_uid="1.2.3", sop_instance_uid="1.2.3.4",
                                                 transfer_syntax=ExplicitVRLittleEndian,
                                                 implementation_uid="1.2.3.4.5.6", implementation_version="ABC"))
    assert file_meta("1.2.3", "1.2.3.4", ExplicitVRLittleEndian, "1.2.3.4.5.6", "ABC") == expected
    assert len(PREAMBLE) == 132 and PREAMBLE.endswith(b"DICM")
