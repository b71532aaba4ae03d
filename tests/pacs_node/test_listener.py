"""The DIMSE listener against real dcmtk peers."""

from __future__ import annotations

import pytest
from nodetest_helpers import echoscu, make_study, scu_store_status, storescu
from pydicom import dcmread

from pacs_node.ingest import STATUS_OUT_OF_RESOURCES

pytestmark = pytest.mark.peers


def test_echoscu_succeeds(listener):
    res = echoscu(listener.port)
    assert res.returncode == 0, res.stderr


def test_storescu_study_with_rle_ct_is_stored_byte_exact(tmp_path, listener):
    spool, index = listener.ingest.spool, listener.ingest.index
    plain = make_study(tmp_path / "plain", n_ct=4, n_pet=3)
    rle = make_study(tmp_path / "rle", n_ct=4, n_pet=0, rle_ct=True, study_uid=plain.study_uid)
    res = storescu(listener.port, plain.files)
    assert res.returncode == 0, res.stderr
    res = storescu(listener.port, rle.ct_files, extra=["-xr"])  # propose RLE Lossless
    assert res.returncode == 0, res.stderr
    info = index.study(plain.study_uid)
    assert info["instance_count"] == 11
    assert info["modalities"] == ["CT", "PT"]
    stored = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in spool.study_files(plain.study_uid)}
    assert len(stored) == 11
    for src in rle.ct_files:
        ds = dcmread(src)
        out = dcmread(stored[ds.SOPInstanceUID])
        assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"  # kept as received: RLE
        assert (out.pixel_array == ds.pixel_array).all()
    for src in plain.files:
        ds = dcmread(src)
        assert dcmread(stored[ds.SOPInstanceUID]).PixelData == ds.PixelData


def test_unknown_calling_ae_is_rejected(tmp_path, listener):
    res = echoscu(listener.port, aet="INTRUDER")
    assert res.returncode != 0
    assert "Calling AE Title Not Recognized" in (res.stdout + res.stderr)


def test_wrong_called_ae_is_rejected(listener):
    res = echoscu(listener.port, aec="OTHER")
    assert res.returncode != 0
    assert "Called AE Title Not Recognized" in (res.stdout + res.stderr)


def test_low_disk_is_refused_not_acknowledged(tmp_path, listener):
    spool, index = listener.ingest.spool, listener.ingest.index
    spool._free_mb = lambda path: 1.0
    spool.min_free_mb = 50.0
    study = make_study(tmp_path / "s", n_ct=1, n_pet=0)
    res = storescu(listener.port, study.files, extra=["-v"])
    out = res.stdout + res.stderr
    assert "Refused: OutOfResources" in out or "0xa700" in out.lower(), out
    assert scu_store_status(listener.port, study.ct_files[0]) == STATUS_OUT_OF_RESOURCES
    assert index.study(study.study_uid) is None
    assert spool.study_files(study.study_uid) == []


def test_no_ack_when_the_index_write_fails(tmp_path, listener, monkeypatch):
    """The sender sees success only after spool AND index committed."""
    import sqlite3

    index = listener.ingest.index

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(index, "record_instances", broken)
    study = make_study(tmp_path / "s", n_ct=1, n_pet=0)
    assert scu_store_status(listener.port, study.ct_files[0]) == STATUS_OUT_OF_RESOURCES
    monkeypatch.undo()
    assert scu_store_status(listener.port, study.ct_files[0]) == 0x0000
    assert index.study(study.study_uid)["instance_count"] == 1
