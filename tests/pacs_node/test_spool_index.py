"""Durability and safety of the spool, the index and the ingest path."""

from __future__ import annotations

import os
import threading

import pytest
from nodetest_helpers import make_study
from pydicom import dcmread

from pacs_node import spool as spool_mod
from pacs_node.index import Index
from pacs_node.ingest import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    Ingest,
    IngestRejected,
)
from pacs_node.spool import Spool, SpoolFullError
from pipeline.errors import InvalidUidError


def _received_study(tmp_path, ingest):
    """A study of 2 CT and 1 PET instances, stored through ``ingest``."""
    study = make_study(tmp_path / "s", n_ct=2, n_pet=1)
    for f in study.files:
        ingest.store(f.read_bytes(), source="t")
    return study


def test_store_is_durable_before_return(tmp_path, monkeypatch):
    """The file is fsynced, renamed into place and its directory fsynced before store() returns."""
    spool = Spool(tmp_path, min_free_mb=0)
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(spool_mod.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(spool_mod.os, "replace", lambda a, b: (calls.append("rename"), real_replace(a, b))[1])
    stored = spool.store(b"DATA", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert stored.path == tmp_path / "spool" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert stored.path.read_bytes() == b"DATA"
    # file fsync, then rename, then directory fsyncs (the instance's folder and the new folders' parents)
    assert calls[0] == "fsync" and calls[1] == "rename" and calls[2:] and set(calls[2:]) == {"fsync"}
    assert list((tmp_path / "spool" / ".tmp").iterdir()) == []


@pytest.mark.parametrize("bad", ["../../etc", "1.2/3", "1.2.3\x00", "a.b", "1." * 40, "", "1.02"])
def test_uids_with_path_characters_are_refused(tmp_path, bad):
    spool = Spool(tmp_path, min_free_mb=0)
    with pytest.raises(InvalidUidError):
        spool.store(b"x", "1.2.3", bad, "1.2.3.4")
    with pytest.raises(InvalidUidError):
        spool.store(b"x", bad, "1.2.3", "1.2.3.4")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_low_disk_refuses_with_a700(tmp_path, store):
    spool, index, ingest = store
    study = make_study(tmp_path / "s", n_ct=1, n_pet=0)
    spool._free_mb = lambda path: 10.0
    spool.min_free_mb = 100.0
    with pytest.raises(IngestRejected) as exc:
        ingest.store(study.ct_files[0].read_bytes(), source="test")
    assert exc.value.status == STATUS_OUT_OF_RESOURCES
    assert "watermark" in str(exc.value)
    assert spool.study_files(study.study_uid) == []
    assert index.study(study.study_uid) is None
    with pytest.raises(SpoolFullError):
        spool.check_space()


def test_duplicates_are_idempotent(tmp_path, store):
    spool, index, ingest = store
    study = make_study(tmp_path / "s", n_ct=2, n_pet=1)
    for _ in range(3):
        for f in study.files:
            ingest.store(f.read_bytes(), source="test")
    info = index.study(study.study_uid)
    assert info["instance_count"] == 3
    assert info["generation"] == 3  # identical resends do not re-open the study (no routing loops)
    assert info["modalities"] == ["CT", "PT"]
    assert len(spool.study_files(study.study_uid)) == 3
    assert sum(s["instance_count"] for s in info["series"]) == 3
    for f in spool.study_files(study.study_uid):  # the stored bytes are exactly what was sent
        ds = dcmread(f)
        src = next(p for p in study.files if dcmread(p).SOPInstanceUID == ds.SOPInstanceUID)
        assert f.read_bytes() == src.read_bytes()
    # a corrected instance with the same SOP Instance UID replaces the stored one and re-opens the study
    ds = dcmread(study.ct_files[0])
    ds.SeriesDescription = "corrected"
    ds.save_as(study.ct_files[0])
    assert ingest.store(study.ct_files[0].read_bytes(), source="test").duplicate
    info = index.study(study.study_uid)
    assert info["instance_count"] == 3 and info["generation"] == 4
    assert dcmread(spool.instance_path(study.study_uid, ds.SeriesInstanceUID, ds.SOPInstanceUID)).SeriesDescription \
        == "corrected"


def test_an_instance_resent_in_another_series_is_refused_and_the_stored_one_kept(tmp_path, store):
    spool, index, ingest = store
    study = _received_study(tmp_path, ingest)
    moved = dcmread(study.ct_files[0])
    old_series = moved.SeriesInstanceUID
    moved.SeriesInstanceUID = old_series + ".9"
    path = tmp_path / "moved.dcm"
    moved.save_as(path)
    with pytest.raises(IngestRejected, match="already stored in series") as exc:
        ingest.store(path.read_bytes(), source="test")
    assert exc.value.status == STATUS_DATASET_MISMATCH
    assert index.instance(moved.SOPInstanceUID)["series_uid"] == old_series
    assert len(spool.study_files(study.study_uid)) == 3 and index.study(study.study_uid)["instance_count"] == 3


def test_instance_with_path_uid_is_refused_by_ingest(tmp_path, store):
    spool, index, ingest = store
    study = make_study(tmp_path / "s", n_ct=1, n_pet=0)
    ds = dcmread(study.ct_files[0])
    ds.SeriesInstanceUID = "../../../tmp/evil"
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    with pytest.raises(IngestRejected) as exc:
        ingest.store(bad.read_bytes(), source="test")
    assert exc.value.status == STATUS_DATASET_MISMATCH
    assert not (tmp_path / "tmp" / "evil").exists()
    assert index.study(study.study_uid) is None


def test_limits(tmp_path):
    spool = Spool(tmp_path / "d", min_free_mb=0)
    index = Index(tmp_path / "d" / "index.sqlite")
    study = make_study(tmp_path / "s", n_ct=3, n_pet=0)
    small = Ingest(spool, index, max_instance_bytes=100, max_instances_per_study=10)
    with pytest.raises(IngestRejected, match="exceeds") as exc:
        small.store(study.ct_files[0].read_bytes(), source="t")
    assert exc.value.status == STATUS_OUT_OF_RESOURCES
    few = Ingest(spool, index, max_instance_bytes=10**7, max_instances_per_study=2)
    few.store(study.ct_files[0].read_bytes(), source="t")
    few.store(study.ct_files[1].read_bytes(), source="t")
    few.store(study.ct_files[1].read_bytes(), source="t")  # a resend of a stored instance is still fine
    with pytest.raises(IngestRejected, match="limit 2"):
        few.store(study.ct_files[2].read_bytes(), source="t")
    index.close()


def test_garbage_is_refused(store):
    spool, index, ingest = store
    with pytest.raises(IngestRejected) as exc:
        ingest.store(b"\x00" * 128 + b"DICM" + b"\xff" * 50, source="t")
    assert exc.value.status in (0xC000, STATUS_DATASET_MISMATCH)


def test_instance_without_sop_class_is_refused_as_unreadable(tmp_path, store):
    import io

    spool, index, ingest = store
    study = make_study(tmp_path / "s", n_ct=1, n_pet=0)
    ds = dcmread(study.ct_files[0])
    del ds.SOPClassUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    with pytest.raises(IngestRejected, match=r"no SOP Class UID \(0008,0016\)") as exc:
        ingest.store(buf.getvalue(), source="t")
    assert exc.value.status == STATUS_CANNOT_UNDERSTAND
    assert index.study(study.study_uid) is None


def test_quarantine_moves_and_restore_brings_back(tmp_path, store):
    spool, index, ingest = store
    study = _received_study(tmp_path, ingest)
    q = spool.quarantine(study.study_uid, "no PET decay data")
    assert spool.study_files(study.study_uid) == []
    assert len(list(q.rglob("*.dcm"))) == 3
    assert "no PET decay data" in (q / "REASON.txt").read_text()
    assert spool.restore(study.study_uid) == 3
    assert len(spool.study_files(study.study_uid)) == 3
    assert (q / "REASON.txt").exists()  # the history stays


def test_index_is_wal_full_sync_and_thread_safe(tmp_path, store):
    spool, index, ingest = store
    con = index.connection()
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert con.execute("PRAGMA user_version").fetchone()[0] >= 1
    study = make_study(tmp_path / "s", n_ct=8, n_pet=4)
    errors: list[BaseException] = []

    def send(files):
        try:
            for f in files:
                ingest.store(f.read_bytes(), source="t")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(study.files[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    reopened = Index(tmp_path / "data" / "index.sqlite")
    assert reopened.study(study.study_uid)["instance_count"] == 12
    reopened.close()


def test_restore_keeps_an_instance_received_again_after_the_quarantine(tmp_path, store):
    spool, index, ingest = store
    study = _received_study(tmp_path, ingest)
    q = spool.quarantine(study.study_uid, "bad PET")
    corrected = dcmread(study.ct_files[0])
    corrected.ImageComments = "CORRECTED VERSION"
    path = tmp_path / "corrected.dcm"
    corrected.save_as(path)
    ingest.store(path.read_bytes(), source="t")
    assert spool.restore(study.study_uid) == 2
    spooled = [dcmread(p) for p in spool.study_files(study.study_uid)]
    assert len(spooled) == 3
    again = [ds for ds in spooled if ds.SOPInstanceUID == corrected.SOPInstanceUID]
    assert [ds.get("ImageComments") for ds in again] == ["CORRECTED VERSION"]
    kept = list(q.rglob("*.dcm"))  # the older copy stays in quarantine, not deleted
    assert len(kept) == 1 and dcmread(kept[0]).SOPInstanceUID == corrected.SOPInstanceUID


def test_patient_hash_is_keyed_per_node_and_stable(tmp_path):
    from pacs_node.ingest import PATIENT_KEY, patient_hash

    one, other = Index(tmp_path / "a.sqlite"), Index(tmp_path / "b.sqlite")
    key = one.secret(PATIENT_KEY)
    assert len(key) == 32 and key == Index(tmp_path / "a.sqlite").secret(PATIENT_KEY)  # kept across restarts
    assert patient_hash("12345", key) != patient_hash("12345", other.secret(PATIENT_KEY))
    assert patient_hash("12345", key) == patient_hash("12345", key) and patient_hash("", key) == ""


def test_schema_2_index_drops_its_unkeyed_patient_hashes(tmp_path):
    import sqlite3

    path = tmp_path / "index.sqlite"
    Index(path).connection().execute(
        "INSERT INTO studies(study_uid, patient_hash, first_received, last_received) VALUES('1.2.3', 'abc', 0, 0)")
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version = 2")
    con.commit()
    con.close()
    assert Index(path).study("1.2.3")["patient_hash"] is None


def test_quarantine_makes_each_moved_file_durable(tmp_path, monkeypatch):
    """A journaled instance written without fsync may be quarantined before its deferred sync."""
    spool = Spool(tmp_path, min_free_mb=0)
    stored = spool.store(b"DATA", "1.2.3", "1.2.3.4", "1.2.3.4.5", durable=False)
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(spool_mod.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                           real_fsync(fd))[1])
    q = spool.quarantine("1.2.3", "bad PET")
    moved = q / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert moved.read_bytes() == b"DATA" and str(moved) in synced
    spool.sync([stored])  # the deferred sync finds the file gone and skips it
