"""Bad data over STOW-RS and DIMSE: each part gets a clear status, the node stays up, nothing lands outside the spool."""

from __future__ import annotations

import io
import json
import os
import struct
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from relhelpers import files_under, node_config

from pacs_node.export import echo_peer
from pacs_node.multipart import encode_related

TOKEN = "s3cret-token"
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """An in-process node (no processing: stable age of an hour) with a bearer token."""
    from pacs_node.server import NodeServer

    root = tmp_path_factory.mktemp("hostile-data")
    cfg = node_config(root / "data", spool__stable_age_s=3600.0, http__token=TOKEN)
    cfg.listener.max_instance_mb = 16
    n = NodeServer(cfg)
    n.start()
    n.root = root
    yield n
    n.stop()


def post(node, body: bytes, ctype: str, token: str | None = TOKEN, path: str = "/dicomweb/studies"):
    req = urllib.request.Request(f"http://127.0.0.1:{node.http_port}{path}", data=body, method="POST",
                                 headers={"Content-Type": ctype, **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def stow(node, parts: list[bytes]):
    body, ctype = encode_related(parts)
    status, payload = post(node, body, ctype)
    doc = json.loads(payload) if payload.startswith(b"{") else {}
    failed = [item["00081197"]["Value"][0] for item in doc.get("00081198", {}).get("Value", [])]
    stored = [item["00081155"]["Value"][0] for item in doc.get("00081199", {}).get("Value", [])]
    return status, stored, failed


def assert_up(node) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/health", timeout=10) as r:
        assert r.status == 200
    assert echo_peer(f"IGTV@127.0.0.1:{node.dimse_port}", calling_ae="ECHOSCU", timeout=5) < 1000


def assert_nothing_outside_spool(node, before: set[Path]) -> None:
    data = Path(node.cfg.spool.data_dir)
    new = files_under(node.root) - before
    allowed = (data / "spool", data / "quarantine", data / "results")
    stray = [p for p in new if not any(p.is_relative_to(a) for a in allowed) and p.parent != data]
    assert not stray, stray
    assert not [p for p in files_under(node.root) if "escape" in p.name]


def instance(sop: str | None = None, study: str | None = None, sop_class: str = CT, **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def nested_sequences(depth: int) -> bytes:
    """ContentSequence items nested ``depth`` deep, undefined lengths (as a hostile sender writes them)."""
    sq = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + struct.pack("<L", 0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return (sq + item) * depth + end * depth


def huge_length(tag_bytes: bytes, blob: bytes, length: int, long_form: bool) -> bytes:
    i = blob.find(tag_bytes)
    assert i > 0
    if long_form:  # OB/UN...: 2 reserved bytes then a 4-byte length
        return blob[: i + 8] + struct.pack("<L", length) + blob[i + 12:]
    return blob[: i + 6] + struct.pack("<H", length) + blob[i + 8:]


def test_random_truncated_and_crafted_parts_are_refused_with_a_status(node):
    before = files_under(node.root)
    valid = encode(instance(PatientName="A^B"))
    ob = instance()
    ob.add_new(0x00091010, "OB", b"\0" * 4)
    parts = {
        "random": os.urandom(4000),
        "empty": b"",
        "truncated": valid[:180],
        "preamble_only": b"\0" * 128 + b"DICM",
        "pn_length_ffff": huge_length(b"\x10\x00\x10\x00PN", valid, 0xFFF0, long_form=False),
        "ob_length_4g": huge_length(b"\x09\x00\x10\x10OB", encode(ob), 0xFFFFFFF0, long_form=True),
        "nested_2000": encode(instance()) + nested_sequences(2000),
        "path_sop_uid": encode(instance(sop="1.2.3/../../../escape")),
        "dotdot_study_uid": encode(instance(study="..")),
        "long_uid": encode(instance(sop="1." * 40 + "1")),
    }
    for name, blob in parts.items():
        status, stored, failed = stow(node, [blob])
        assert status == 409 and not stored, (name, status, stored)
        (code,) = failed
        assert code in (0xC000, 0xA900, 0x0122), (name, hex(code))
    assert node.index.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0
    assert_nothing_outside_spool(node, before)
    assert_up(node)


def test_non_image_sop_class_is_refused_like_dimse_does(node):
    from pydicom.data import get_testdata_file

    mr = Path(get_testdata_file("MR_small.dcm"))
    status, stored, failed = stow(node, [mr.read_bytes()])
    assert status == 409 and failed == [0x0122]
    status, stored, failed = stow(node, [encode(instance())])  # control: a CT is stored
    assert status == 200 and len(stored) == 1
    assert_up(node)


def test_pydicom_corpus(node):
    """Every pydicom test file under 4 MB: stored (CT/PET/SEG/RTSTRUCT) or refused with a status; node up."""
    import pydicom.data

    before = files_under(node.root)
    # the files shipped with pydicom (get_testdata_files would try to download more)
    root = Path(pydicom.data.__file__).parent / "test_files"
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.stat().st_size < 4e6]
    files = [p for p in files if p.suffix.lower() in (".dcm", "") or "dcm" in p.name.lower()]
    assert len(files) > 50
    n_stored = n_failed = 0
    for i in range(0, len(files), 25):
        batch = files[i:i + 25]
        status, stored, failed = stow(node, [p.read_bytes() for p in batch])
        assert status in (200, 202, 409), status
        assert len(stored) + len(failed) == len(batch)
        assert all(code in (0x0122, 0xC000, 0xA900, 0xA700) for code in failed), failed
        for sop in stored:
            row = node.index.instance(sop)
            assert row is not None and Path(row["path"]).is_relative_to(node.spool.root)
            classes = {str(dcmread(row["path"], stop_before_pixels=True).SOPClassUID)}
            assert classes <= node.ingest.sop_classes
        n_stored += len(stored)
        n_failed += len(failed)
    assert n_stored > 0 and n_failed > 0
    assert_nothing_outside_spool(node, before)
    assert_up(node)


BAD_BODIES = {
    "no_boundary_param": (b"--x\r\n\r\nabc\r\n--x--\r\n", 'multipart/related; type="application/dicom"'),
    "boundary_not_in_body": (b"hello world", 'multipart/related; type="application/dicom"; boundary=abc'),
    "no_close_delimiter": (b"--abc\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * 100,
                           'multipart/related; type="application/dicom"; boundary=abc'),
    "boundary_too_long": (b"--" + b"b" * 210 + b"\r\n\r\nx\r\n--" + b"b" * 210 + b"--",
                          'multipart/related; type="application/dicom"; boundary=' + "b" * 210),
    "header_without_colon": (b"--abc\r\nnot a header\r\n\r\nx\r\n--abc--\r\n",
                             'multipart/related; type="application/dicom"; boundary=abc'),
    "empty_body": (b"", 'multipart/related; type="application/dicom"; boundary=abc'),
    "no_parts": (b"--abc--\r\n", 'multipart/related; type="application/dicom"; boundary=abc'),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_malformed_multipart_bodies_get_400(node, name):
    body, ctype = BAD_BODIES[name]
    status, payload = post(node, body, ctype)
    assert status == 400, (status, payload[:200])
    assert payload.strip()


def test_wrong_media_types_get_415_and_no_token_401(node):
    assert post(node, b"{}", "application/json")[0] == 415
    body, ctype = encode_related([b"x"], media_type="application/pdf")
    assert post(node, body, ctype.replace("application/pdf", "application/pdf"))[0] == 415
    body, ctype = encode_related([encode(instance())])
    status, payload = post(node, body, ctype, token=None)
    assert status == 401
    assert post(node, body, ctype, token="wrong")[0] == 401
    assert_up(node)
