"""The shipped Orthanc config + Lua script route stable PET/CT studies, and only the right series.

A real Orthanc (Debian package) runs deploy/orthanc/orthanc.json with ports and
folders rewritten for the test; a dcmtk ``storescp`` plays the node's AE. The
test uploads tiny studies through Orthanc's REST API and checks what arrives.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.system_tools import system_tool

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "orthanc"
ORTHANC = shutil.which("Orthanc")
STORESCP = system_tool("storescp")
pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(ORTHANC is None or STORESCP is None, reason="needs Orthanc and dcmtk storescp"),
]
STABLE_AGE = 1
CT, PET, SEG = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.66.4"


def strip_json_comments(text: str) -> str:
    """Drop // and /* */ comments (Orthanc accepts them, json does not), sparing strings."""
    return re.sub(
        r'("(?:\\.|[^"\\])*")|//[^\n]*|/\*.*?\*/', lambda m: m.group(1) or "", text, flags=re.S
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def instance(study: str, series: str, sop_class: str, modality: str, number: int, **extra: str) -> bytes:
    """A minimal, valid-enough image instance encoded as a Part 10 file."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.InstanceNumber = modality, number
    ds.PatientID, ds.PatientName, ds.StudyDate = "TEST", "Test^Routing", "20250101"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.zeros((4, 4), np.uint16).tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    from io import BytesIO

    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class OrthancRest:
    """Tiny client for the REST API of the test Orthanc."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(self, method: str, path: str, body: bytes | None = None) -> object:
        req = urllib.request.Request(self.base + path, data=body, method=method)
        req.add_header("Authorization", self.auth)
        with urllib.request.urlopen(req, timeout=10) as resp:
            data = resp.read()
        return json.loads(data) if data else None

    def upload(self, dicom: bytes) -> None:
        self.call("POST", "/instances", dicom)


@pytest.fixture
def orthanc_and_node(tmp_path: Path) -> Iterator[tuple[OrthancRest, Path]]:
    """Orthanc with the shipped config (ports/folders rewritten) and storescp as the node."""
    cfg = json.loads(strip_json_comments((DEPLOY / "orthanc.json").read_text()))
    http_port, dicom_port, node_port = free_port(), free_port(), free_port()
    cfg.update(
        HttpPort=http_port, DicomPort=dicom_port, StableAge=STABLE_AGE,
        StorageDirectory=str(tmp_path / "db"), IndexDirectory=str(tmp_path / "db"),
        LuaScripts=[str(DEPLOY / "route-to-igtv.lua")], RemoteAccessAllowed=False,
    )
    cfg["DicomModalities"]["igtv"]["Port"] = node_port
    user, password = next(iter(cfg["RegisteredUsers"].items()))
    (tmp_path / "orthanc.json").write_text(json.dumps(cfg))
    received = tmp_path / "received"
    received.mkdir()
    node = subprocess.Popen(
        [STORESCP, "+uf", "-aet", cfg["DicomModalities"]["igtv"]["AET"], "-od", str(received), str(node_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    log = (tmp_path / "orthanc.log").open("w")
    orthanc = subprocess.Popen([ORTHANC, str(tmp_path / "orthanc.json")], stdout=log, stderr=log)
    rest = OrthancRest(http_port, user, password)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                rest.call("GET", "/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if orthanc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("Orthanc did not start:\n" + (tmp_path / "orthanc.log").read_text()[-3000:])
                time.sleep(0.2)
        yield rest, received
    finally:
        for proc in (orthanc, node):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def received_series(folder: Path) -> dict[str, int]:
    """SeriesInstanceUID -> number of files storescp wrote."""
    out: dict[str, int] = {}
    for f in folder.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out[ds.SeriesInstanceUID] = out.get(ds.SeriesInstanceUID, 0) + 1
    return out


def wait_for(folder: Path, count: int, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(folder.iterdir())) >= count:
            time.sleep(0.5)  # let an over-delivery show up too
            break
        time.sleep(0.2)
    return received_series(folder)


def test_stable_pet_ct_study_is_routed_once_with_only_ct_and_ac_pet(
    orthanc_and_node: tuple[OrthancRest, Path],
) -> None:
    rest, received = orthanc_and_node
    study, ct, ct_scout, pt_ac, pt_nac = (generate_uid() for _ in range(5))
    for i in range(3):
        rest.upload(instance(study, ct, CT, "CT", i + 1, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"]))
    rest.upload(instance(study, ct_scout, CT, "CT", 1, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    for i in range(2):
        rest.upload(instance(study, pt_ac, PET, "PT", i + 1, CorrectedImage=["DECY", "ATTN", "SCAT"]))
    rest.upload(instance(study, pt_nac, PET, "PT", 1, CorrectedImage=["DECY"]))
    ct_only_study, ct_only = generate_uid(), generate_uid()
    rest.upload(instance(ct_only_study, ct_only, CT, "CT", 1, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"]))

    got = wait_for(received, 5, timeout=STABLE_AGE + 20)
    assert got == {ct: 3, pt_ac: 2}, "only the axial CT and the attenuation-corrected PET are sent"

    # The node's results arrive in the same study: it becomes stable again, nothing is re-sent.
    rest.upload(instance(study, generate_uid(), SEG, "SEG", 1))
    time.sleep(STABLE_AGE + 4)
    assert received_series(received) == {ct: 3, pt_ac: 2}, "results arriving must not re-route the study"

    # A late CT slice changes the routed set: the study is sent again so the node re-runs it.
    rest.upload(instance(study, ct, CT, "CT", 4, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"]))
    got = wait_for(received, 11, timeout=STABLE_AGE + 20)
    assert got == {ct: 3 + 4, pt_ac: 2 + 2}
