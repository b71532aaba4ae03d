"""Malformed PDUs, stalls and aborts from a raw socket: the listener refuses them, keeps serving, stores nothing partial."""

from __future__ import annotations

import io
import os
import socket
import struct
import time
from types import SimpleNamespace

import pytest
import relhelpers  # noqa: F401  (import paths)
from pydicom.filereader import read_dataset
from rawdicom import (
    CT_STORAGE,
    EXPLICIT_LE,
    associate_rq,
    c_echo_rq,
    c_store_rq,
    closed_within,
    pdata,
    pdu,
    read_pdu,
)

from pacs_node.config import ListenerConfig
from pacs_node.export import echo_peer
from pacs_node.index import Index
from pacs_node.ingest import Ingest
from pacs_node.listener import Listener
from pacs_node.spool import Spool

ACSE_TIMEOUT = 1.0
NETWORK_TIMEOUT = 2.0


@pytest.fixture
def node(tmp_path):
    """An in-process listener with short ARTIM/network timeouts and a small max PDU."""
    data = tmp_path / "data"
    spool = Spool(data, min_free_mb=0)
    index = Index(data / "index.sqlite")
    ingest = Ingest(spool, index, max_instance_bytes=8 * 1024 * 1024, max_instances_per_study=1000)
    cfg = ListenerConfig(ae_title="IGTV", host="127.0.0.1", port=0, max_pdu=16384)
    lst = Listener(cfg, ingest)
    lst.ae.acse_timeout = ACSE_TIMEOUT
    lst.ae.network_timeout = NETWORK_TIMEOUT
    lst.ae.dimse_timeout = NETWORK_TIMEOUT
    lst.start()
    yield SimpleNamespace(port=lst.port, spool=spool, index=index, data=data, root=tmp_path)
    lst.stop()
    index.close()


def assert_serving(node) -> None:
    """C-ECHO answers within a second, and nothing was spooled."""
    assert echo_peer(f"IGTV@127.0.0.1:{node.port}", calling_ae="ECHOSCU", timeout=5) < 1000
    assert node.index.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0
    assert not [p for p in node.spool.root.rglob("*") if p.is_file()]


def connect(node) -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.port), timeout=5)


def associate(node, contexts=None) -> socket.socket:
    s = connect(node)
    s.sendall(pdu(0x01, associate_rq(contexts=contexts)))
    reply = read_pdu(s)
    assert reply is not None and reply[0] == 0x02, f"expected A-ASSOCIATE-AC, got {reply!r}"
    return s


def _assoc_body() -> bytes:
    return associate_rq(contexts=[(1, CT_STORAGE, [EXPLICIT_LE])])


MALFORMED_FIRST = {
    "unknown_pdu_type": pdu(0x42, b"\x00" * 10),
    "pdata_before_association": pdata(1, c_echo_rq(), command=True, last=True),
    "declared_length_short": pdu(0x01, _assoc_body(), declared=len(_assoc_body()) - 30),
    "item_length_beyond_body": pdu(0x01, _assoc_body()[:-8] + struct.pack(">BBH", 0x51, 0, 0xFFF0) + b"\0" * 4),
    "unknown_item_type": pdu(0x01, _assoc_body() + struct.pack(">BBH", 0x99, 0, 4) + b"abcd"),
    "zero_length_associate": pdu(0x01, b""),
    "three_bytes": b"\x01\x00\x00",
}


@pytest.mark.parametrize("name", sorted(MALFORMED_FIRST))
def test_malformed_first_pdu_is_refused_and_node_keeps_serving(node, name):
    s = connect(node)
    try:
        s.sendall(MALFORMED_FIRST[name])
        if name == "three_bytes":
            s.shutdown(socket.SHUT_WR)
        reply = read_pdu(s, timeout=ACSE_TIMEOUT + 4)
        # never an association: a reject (0x03), an abort (0x07) or a closed connection
        assert reply is None or reply[0] in (0x03, 0x07), reply
        assert closed_within(s, ACSE_TIMEOUT + 4)
    finally:
        s.close()
    assert_serving(node)


def test_truncated_associate_then_eof(node):
    s = connect(node)
    body = _assoc_body()
    s.sendall(pdu(0x01, body)[: 6 + len(body) // 2])
    s.shutdown(socket.SHUT_WR)
    assert closed_within(s, ACSE_TIMEOUT + 4)
    s.close()
    assert_serving(node)


def test_silent_connection_is_closed_by_artim(node):
    s = connect(node)
    t0 = time.monotonic()
    assert closed_within(s, ACSE_TIMEOUT + 5)
    assert time.monotonic() - t0 >= ACSE_TIMEOUT * 0.8
    s.close()
    assert_serving(node)


def test_idle_association_is_closed_by_network_timeout(node):
    s = associate(node)
    assert closed_within(s, NETWORK_TIMEOUT + 5)
    s.close()
    assert_serving(node)


def test_stall_inside_a_pdu_is_closed(node):
    """A PDU header promising 1000 bytes followed by silence does not hold the association forever."""
    s = associate(node, [(1, CT_STORAGE, [EXPLICIT_LE])])
    s.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\0" * 10)
    assert closed_within(s, NETWORK_TIMEOUT + 8)
    s.close()
    assert_serving(node)


def test_oversized_declared_pdu_length_is_not_buffered(node):
    """A P-DATA declaring ~4 GB (far above our max PDU) is refused at the header, not read into memory."""
    s = associate(node, [(1, CT_STORAGE, [EXPLICIT_LE])])
    s.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFF00))
    sent, chunk = 0, os.urandom(65536)
    s.settimeout(2)
    try:
        while sent < 64 * 1024 * 1024:
            s.sendall(chunk)
            sent += len(chunk)
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass
    finally:
        s.close()
    # loopback socket buffers take a few MB; a listener that keeps reading would take all 64 MB
    assert sent < 16 * 1024 * 1024, f"the listener read {sent} bytes of an oversized PDU"
    assert_serving(node)


def _store_fragments(ds_bytes: bytes, sop_uid: str) -> list[bytes]:
    frags = [pdata(1, c_store_rq(CT_STORAGE, sop_uid), command=True, last=True)]
    step = 8000
    for i in range(0, len(ds_bytes), step):
        frags.append(pdata(1, ds_bytes[i:i + step], command=False, last=i + step >= len(ds_bytes)))
    return frags


def _dataset_bytes(tmp_path) -> tuple[bytes, str]:
    from nodetest_helpers import make_study
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    study = make_study(tmp_path / "s", n_ct=1, n_pet=0, rows=96)
    ds = dcmread(study.ct_files[0])
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue(), str(ds.SOPInstanceUID)


@pytest.mark.parametrize("ending", ["abort", "close"])
def test_abort_mid_transfer_stores_nothing(node, ending):
    body, sop = _dataset_bytes(node.root)
    frags = _store_fragments(body, sop)
    assert len(frags) > 3
    s = associate(node, [(1, CT_STORAGE, [EXPLICIT_LE])])
    for f in frags[:-2]:  # command + all but the last data fragments
        s.sendall(f)
    if ending == "abort":
        s.sendall(pdu(0x07, b"\0\0\0\0"))
    s.close()
    time.sleep(0.5)
    assert_serving(node)


def _response_status(s: socket.socket) -> int:
    reply = read_pdu(s)
    assert reply is not None and reply[0] == 0x04, reply
    cmd = reply[1][6:]  # PDV length (4), context id, control header
    ds = read_dataset(io.BytesIO(cmd), is_implicit_VR=True, is_little_endian=True)
    return int(ds.Status)


def test_garbage_dataset_gets_a_failure_status_not_an_ack(node):
    s = associate(node, [(1, CT_STORAGE, [EXPLICIT_LE])])
    try:
        for f in _store_fragments(os.urandom(5000), "1.2.3.4"):
            s.sendall(f)
        status = _response_status(s)
    finally:
        s.close()
    assert status != 0x0000 and not 0xA700 <= status <= 0xA7FF, f"0x{status:04X}"
    assert_serving(node)


def test_complete_store_after_hostile_traffic_is_acknowledged(node):
    """Control: the same raw path with a well-formed data set is stored (the tests above can fail)."""
    body, sop = _dataset_bytes(node.root)
    s = associate(node, [(1, CT_STORAGE, [EXPLICIT_LE])])
    try:
        for f in _store_fragments(body, sop):
            s.sendall(f)
        assert _response_status(s) == 0x0000
    finally:
        s.close()
    assert node.index.instance(sop) is not None


def test_data_set_above_the_instance_limit_is_cut_off_while_streaming(node):
    """Fragments of one data set beyond the 8 MB instance limit end the association before all is read."""
    s = associate(node, [(1, CT_STORAGE, [EXPLICIT_LE])])
    s.sendall(pdata(1, c_store_rq(CT_STORAGE, "1.2.3.4.5"), command=True, last=True))
    sent, frag = 0, pdata(1, b"\0" * 16000, command=False, last=False)
    s.settimeout(2)
    try:
        while sent < 64 * 1024 * 1024:
            s.sendall(frag)
            sent += len(frag)
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass
    finally:
        s.close()
    assert sent < 24 * 1024 * 1024, f"the listener read {sent} bytes of an over-limit data set"
    assert_serving(node)
