"""STOW-RS ingest, the multipart parser, and DICOMweb export."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from nodetest_helpers import make_study, node_config, wait_for
from pydicom import dcmread

from pacs_node.config import Destination
from pacs_node.export import PermanentExportError, TransientExportError, send_dicomweb
from pacs_node.http import HttpServer, Response, Router
from pacs_node.multipart import MultipartError, encode_related, parse_related

TOKEN = "s3cret-token"


def _post(port, path, body, ctype, token=TOKEN):
    headers = {"Content-Type": ctype, "Accept": "application/dicom+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def stow_node(tmp_path, node_factory, storescp):
    dest = Destination(name="pacs", kind="dimse", ae_title="DEST", host="127.0.0.1", port=storescp.port)
    return node_factory(node_config(tmp_path / "data", http__token=TOKEN, export__destinations=[dest]))


def test_stow_study_ends_in_results(tmp_path, stow_node, storescp):
    study = make_study(tmp_path / "s", n_ct=4, n_pet=2)
    body, ctype = encode_related([p.read_bytes() for p in study.files])
    status, payload = _post(stow_node.http_port, "/dicomweb/studies", body, ctype)
    assert status == 200, payload
    doc = json.loads(payload)
    refs = doc["00081199"]["Value"]
    assert {r["00081155"]["Value"][0] for r in refs} == {dcmread(p).SOPInstanceUID for p in study.files}
    assert "00081198" not in doc
    assert len(stow_node.spool.study_files(study.study_uid)) == 6

    def done():
        jobs = stow_node.jobs.jobs_of_study(study.study_uid)
        return jobs and jobs[-1].state in ("done", "failed") and jobs[-1]
    job = wait_for(done, 60, what="job after STOW")
    assert job.state == "done", job.reason
    assert {dcmread(p).SOPInstanceUID for p in storescp.files()} == set(job.result_uids)


def test_stow_auth_and_errors(tmp_path, stow_node):
    port = stow_node.http_port
    study = make_study(tmp_path / "s", n_ct=2, n_pet=0)
    body, ctype = encode_related([p.read_bytes() for p in study.files])
    assert _post(port, "/dicomweb/studies", body, ctype, token=None)[0] == 401
    assert _post(port, "/dicomweb/studies", body, ctype, token="wrong")[0] == 401
    assert stow_node.spool.study_files(study.study_uid) == []
    # wrong media types
    assert _post(port, "/dicomweb/studies", body, "application/dicom")[0] == 415
    assert _post(port, "/dicomweb/studies", body, ctype.replace("application/dicom", "application/dicom+xml"))[0] == 415
    # a boundary that is not in the body, or a body cut short
    status, text = _post(port, "/dicomweb/studies", body, ctype.split("boundary=")[0] + "boundary=nothere")
    assert status == 400 and b"boundary" in text
    status, text = _post(port, "/dicomweb/studies", body[:-40], ctype)
    assert status == 400 and b"truncated" in text
    # all parts refused -> 409 with FailedSOPSequence
    garbage, gtype = encode_related([b"not dicom at all"])
    status, payload = _post(port, "/dicomweb/studies", garbage, gtype)
    assert status == 409
    assert json.loads(payload)["00081198"]["Value"][0]["00081197"]["Value"][0] == 0xC000
    # /studies/{uid}: an instance of another study is refused, the matching one stored -> 202
    other = make_study(tmp_path / "o", n_ct=1, n_pet=0)
    mixed, mtype = encode_related([study.files[0].read_bytes(), other.files[0].read_bytes()])
    status, payload = _post(port, f"/dicomweb/studies/{study.study_uid}", mixed, mtype)
    assert status == 202, payload
    doc = json.loads(payload)
    assert doc["00081198"]["Value"][0]["00081155"]["Value"][0] == dcmread(other.files[0]).SOPInstanceUID
    assert doc["00081198"]["Value"][0]["00081197"]["Value"][0] == 0xA900
    assert len(doc["00081199"]["Value"]) == 1
    assert _post(port, "/dicomweb/studies/..%2F..%2Fetc", body, ctype)[0] == 400
    assert _post(port, "/nothing", body, ctype)[0] == 404


def test_multipart_parser():
    body, ctype = encode_related([b"one", b"two\r\n--not-the-boundary"])
    assert [p.content for p in parse_related(body, ctype)[1]] == [b"one", b"two\r\n--not-the-boundary"]
    # preamble, transport padding and quoted boundary parameters are accepted
    raw = (b"preamble\r\n--b1  \r\nContent-Type: application/dicom\r\n\r\nAAA\r\n--b1\r\n\r\nBBB\r\n--b1--\r\nepilogue")
    typ, parts = parse_related(raw, 'multipart/related; type="application/dicom"; boundary="b1"')
    assert typ == "application/dicom" and [p.content for p in parts] == [b"AAA", b"BBB"]
    assert parts[0].content_type == "application/dicom"
    for bad_body, bad_type, message in [
        (raw, "multipart/related", "no boundary"),
        (raw, "multipart/related; boundary=" + "x" * 201, "invalid"),
        (raw, "multipart/related; boundary=zz", "does not contain"),
        (b"--b1\r\nContent-Type: a\r\n\r\nAAA", "multipart/related; boundary=b1", "no closing boundary"),
        (b"--b1\r\nBroken header\r\n\r\nAAA\r\n--b1--", "multipart/related; boundary=b1", "malformed header"),
        (b"--b1--\r\n", "multipart/related; boundary=b1", "no parts"),
        (b"--b1garbage\r\n\r\nx\r\n--b1--", "multipart/related; boundary=b1", "not followed by CRLF"),
        (raw, "text/plain", "not multipart"),
    ]:
        with pytest.raises(MultipartError, match=message):
            parse_related(bad_body, bad_type)


def test_dicomweb_export_to_our_stow_and_failure_classes(tmp_path, stow_node):
    study = make_study(tmp_path / "s", n_ct=2, n_pet=1)
    url = f"http://127.0.0.1:{stow_node.http_port}/dicomweb"
    ok = Destination(name="web", kind="dicomweb", url=url, token=TOKEN)
    sent = send_dicomweb(ok, study.files, timeout=10)
    assert set(sent) == {dcmread(p).SOPInstanceUID for p in stow_node.spool.study_files(study.study_uid)}
    with pytest.raises(PermanentExportError, match="HTTP 401"):
        send_dicomweb(Destination(name="web", kind="dicomweb", url=url, token="bad"), study.files, timeout=10)
    # a server answering 503 is transient; an unreachable one too
    router = Router()
    router.add("POST", r"/dw/studies", lambda req: Response.text("busy", 503), auth=False)
    busy = HttpServer("127.0.0.1", 0, router)
    busy.start()
    try:
        with pytest.raises(TransientExportError, match="HTTP 503"):
            send_dicomweb(Destination(name="b", kind="dicomweb", url=f"http://127.0.0.1:{busy.port}/dw"),
                          study.files, timeout=10)
    finally:
        busy.stop()
    with pytest.raises(TransientExportError, match="cannot reach"):
        send_dicomweb(Destination(name="b", kind="dicomweb", url=f"http://127.0.0.1:{busy.port}/dw"),
                      study.files, timeout=5)


def test_chunked_bodies_are_decoded_within_the_limit():
    import io

    from pacs_node.http import BodyTooLargeError, read_chunked

    framed = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nExpires: never\r\n\r\n"
    assert read_chunked(io.BytesIO(framed), 100) == b"Wikipedia"
    with pytest.raises(BodyTooLargeError):
        read_chunked(io.BytesIO(framed), 8)
    for bad in (b"zz\r\nWiki\r\n0\r\n\r\n", b"0x4\r\nWiki\r\n0\r\n\r\n", b"9\r\nWiki\r\n0\r\n\r\n", b"4\r\nWiki"):
        with pytest.raises(ValueError):
            read_chunked(io.BytesIO(bad), 100)


def test_stow_with_chunked_transfer_encoding(tmp_path, stow_node):
    import http.client

    study = make_study(tmp_path / "s", n_ct=2, n_pet=1)
    body, ctype = encode_related([p.read_bytes() for p in study.files])
    con = http.client.HTTPConnection("127.0.0.1", stow_node.http_port, timeout=20)
    chunks = (body[i:i + 1000] for i in range(0, len(body), 1000))
    con.request("POST", "/dicomweb/studies", body=chunks, encode_chunked=True,
                headers={"Content-Type": ctype, "Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"})
    resp = con.getresponse()
    assert resp.status == 200, resp.read()
    assert len(stow_node.spool.study_files(study.study_uid)) == 3
