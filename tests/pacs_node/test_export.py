"""Export to real peers: dcmtk storescp and our own listener; C-ECHO."""

from __future__ import annotations

import subprocess

import pytest
from nodetest_helpers import free_port, make_study
from pydicom import dcmread

from pacs_node.config import Destination, ExportConfig
from pacs_node.export import (
    EchoError,
    PermanentExportError,
    TransientExportError,
    backoff_delay,
    classify_status,
    echo_peer,
    send_dimse,
    send_with_retries,
)

pytestmark = pytest.mark.peers


def test_send_dimse_to_storescp(tmp_path, storescp):
    study = make_study(tmp_path / "s", n_ct=2, n_pet=1, rle_ct=False)
    dest = Destination(name="d", kind="dimse", ae_title="DEST", host="127.0.0.1", port=storescp.port)
    sent = send_dimse(dest, study.files, "IGTV", timeout=10)
    assert len(sent) == 3
    got = {dcmread(p).SOPInstanceUID for p in storescp.files()}
    assert got == set(sent)
    for p in storescp.files():  # the files are readable DICOM
        assert subprocess.run(["dcmdump", "-q", str(p)], capture_output=True).returncode == 0


def test_connection_refused_is_transient_and_retried_with_backoff(tmp_path):
    study = make_study(tmp_path / "s", n_ct=1, n_pet=0)
    dest = Destination(name="d", kind="dimse", ae_title="X", host="127.0.0.1", port=free_port())
    sleeps: list[float] = []
    cfg = ExportConfig(max_attempts=4, backoff_initial_s=2, backoff_max_s=5, timeout_s=3)
    with pytest.raises(TransientExportError, match="gave up after 4 attempts"):
        send_with_retries(dest, study.files, cfg, "IGTV", sleep=sleeps.append)
    assert sleeps == [2, 4, 5]


def test_status_classes_and_backoff():
    assert classify_status(0x0000) == "ok" and classify_status(0xB000) == "ok"
    assert classify_status(0xA700) == "transient" and classify_status(0xA7FF) == "transient"
    assert classify_status(0xA900) == "permanent" and classify_status(0x0122) == "permanent"
    assert classify_status(0xC000) == "permanent"
    assert [backoff_delay(a, 2, 20) for a in (1, 2, 3, 4, 5)] == [2, 4, 8, 16, 20]


def test_rejected_association_is_permanent(tmp_path, listener):
    study = make_study(tmp_path / "s", n_ct=1, n_pet=0)
    wrong_called = Destination(name="d", kind="dimse", ae_title="NOTIGTV", host="127.0.0.1", port=listener.port)
    with pytest.raises(PermanentExportError, match="rejected the association"):
        send_dimse(wrong_called, study.files, "IGTV", timeout=5)
    sleeps: list[float] = []
    with pytest.raises(PermanentExportError):
        send_with_retries(wrong_called, study.files, ExportConfig(timeout_s=5), "IGTV", sleep=sleeps.append)
    assert sleeps == []  # never retried


def test_echo_peer(listener):
    ms = echo_peer(f"IGTV@127.0.0.1:{listener.port}", calling_ae="ECHOSCU")
    assert 0 < ms < 5000
    with pytest.raises(EchoError, match="rejected"):
        echo_peer(f"IGTV@127.0.0.1:{listener.port}", calling_ae="STRANGER")
    with pytest.raises(EchoError, match="cannot connect"):
        echo_peer(f"IGTV@127.0.0.1:{free_port()}", calling_ae="ECHOSCU", timeout=3)
