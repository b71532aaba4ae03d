"""Hand-built DICOM upper-layer PDUs (PS3.8) for feeding exact, possibly malformed bytes to the listener."""

from __future__ import annotations

import socket
import struct

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

APP_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _uid(u: str) -> bytes:
    b = u.encode("ascii")
    return b + b"\0" if len(b) % 2 else b


def pdu(kind: int, body: bytes, declared: int | None = None) -> bytes:
    """A PDU: type, reserved byte, 4-byte length (``declared`` overrides the true one), body."""
    return struct.pack(">BBL", kind, 0, len(body) if declared is None else declared) + body


def associate_rq(called: str = "IGTV", calling: str = "RAWSCU",
                 contexts: list[tuple[int, str, list[str]]] | None = None, max_pdu: int = 16384) -> bytes:
    """A-ASSOCIATE-RQ body (without the PDU header)."""
    contexts = contexts or [(1, VERIFICATION, [IMPLICIT_LE])]
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
    body += _item(0x10, APP_CONTEXT.encode())
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        body += _item(0x20, struct.pack(">BBBB", cid, 0, 0, 0) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">L", max_pdu)))
    return body


def pdata(ctx_id: int, fragment: bytes, command: bool, last: bool) -> bytes:
    """A P-DATA-TF PDU with one PDV."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">LBB", len(fragment) + 2, ctx_id, control) + fragment
    return pdu(0x04, pdv)


def command_set(**elements) -> bytes:
    """A DIMSE command set, implicit VR little endian, with its group length."""
    ds = Dataset()
    for k, v in elements.items():
        setattr(ds, k, v)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    body = buf.getvalue()
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def c_store_rq(sop_class: str, sop_uid: str, msg_id: int = 1) -> bytes:
    return command_set(AffectedSOPClassUID=sop_class, CommandField=0x0001, MessageID=msg_id, Priority=0,
                       CommandDataSetType=0x0000, AffectedSOPInstanceUID=sop_uid)


def c_echo_rq(msg_id: int = 1) -> bytes:
    return command_set(AffectedSOPClassUID=VERIFICATION, CommandField=0x0030, MessageID=msg_id,
                       CommandDataSetType=0x0101)


def read_pdu(sock: socket.socket, timeout: float = 5.0) -> tuple[int, bytes] | None:
    """Read one PDU (type, body); None when the peer closed the connection."""
    sock.settimeout(timeout)
    head = _read_exact(sock, 6)
    if head is None:
        return None
    kind, _, length = struct.unpack(">BBL", head)
    body = _read_exact(sock, length)
    return kind, body or b""


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except (ConnectionResetError, BrokenPipeError):
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes (or resets) the connection within ``seconds`` (data is drained)."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False
