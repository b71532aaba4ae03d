"""The DICOM Part-10 bytes of a received C-STORE data set, without building pydicom datasets.

pynetdicom's ``Event.encoded_dataset()`` makes the File Meta Information through a
pydicom ``FileMetaDataset`` (each element validated and encoded one by one): about
0.4 ms of every instance on the acknowledgement path. :func:`file_meta` encodes the
same seven elements directly (Explicit VR Little Endian, PS3.10 7.1), byte for byte
what pynetdicom writes; :func:`received_part10` puts preamble, meta and the data set
exactly as received together.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\0" * 128 + b"DICM"


def _short(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One element with a 2-byte length (UI, SH, UL)."""
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _ui(value: Any) -> bytes:
    raw = str(value).encode("latin-1", "replace")
    return raw + b"\0" if len(raw) % 2 else raw


def file_meta(sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any,
              implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
              implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION) -> bytes:
    """Encoded File Meta Information group (0002) for one instance, group length first."""
    version = implementation_version.encode("latin-1", "replace")
    if len(version) % 2:
        version += b" "
    body = b"".join((
        struct.pack("<HH2s2sI", 0x0002, 0x0001, b"OB", b"\0\0", 2) + b"\0\1",
        _short(0x0002, 0x0002, b"UI", _ui(sop_class_uid)),
        _short(0x0002, 0x0003, b"UI", _ui(sop_instance_uid)),
        _short(0x0002, 0x0010, b"UI", _ui(transfer_syntax)),
        _short(0x0002, 0x0012, b"UI", _ui(implementation_uid)),
        _short(0x0002, 0x0013, b"SH", version),
    ))
    return _short(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


def received_part10(event: Any) -> bytes:
    """Preamble, File Meta Information and the data set of a C-STORE request event, as received."""
    request = event.request
    meta = file_meta(request.AffectedSOPClassUID, request.AffectedSOPInstanceUID, event.context.transfer_syntax)
    return b"".join((PREAMBLE, meta, request.DataSet.getvalue()))
