"""Index rows lost in a crash are rebuilt from the durable spool at startup."""

from __future__ import annotations

import shutil
import sqlite3

from nodetest_helpers import make_study, node_config, wait_for
from pydicom import dcmread

from pacs_node.index import Index
from pacs_node.ingest import PATIENT_KEY, patient_hash
from pacs_node.reconcile import RECONCILED_SOURCE, reconcile_spool
from pacs_node.spool import Spool


def _snapshot(index: Index, dst) -> None:
    """Copy the index as committed now (what a power loss right here would leave, at best)."""
    with sqlite3.connect(dst) as out:
        index.connection().backup(out)


def test_rows_lost_after_the_last_durable_commit_are_rebuilt(tmp_path, store):
    """Roll the index back to an earlier commit (a power loss took the unsynced tail): nothing is missing."""
    spool, index, ingest = store
    study = make_study(tmp_path / "s", n_ct=6, n_pet=3)
    for f in study.files[:4]:
        ingest.store(f.read_bytes(), source="dimse:CT1")
    index.set_study_state(study.study_uid, "processed", handled_generation=4)  # a job ran for these four
    _snapshot(index, tmp_path / "before.sqlite")
    for f in study.files[4:]:
        ingest.store(f.read_bytes(), source="dimse:CT1")  # acknowledged: spool fsynced, row committed
    index.close()
    db = tmp_path / "data" / "index.sqlite"
    for suffix in ("-wal", "-shm"):
        (db.parent / (db.name + suffix)).unlink(missing_ok=True)
    shutil.copy(tmp_path / "before.sqlite", db)

    rolled_back = Index(db)
    assert rolled_back.study(study.study_uid)["instance_count"] == 4
    report = reconcile_spool(spool, rolled_back)
    assert report.scanned == 9 and len(report.indexed) == 5 and report.unreadable == []
    info = rolled_back.study(study.study_uid)
    assert info["instance_count"] == 9
    assert sorted(s["instance_count"] for s in info["series"]) == [3, 6]
    # the study is re-opened so the instances the last job did not see get processed
    assert info["state"] == "receiving" and info["generation"] > info["handled_generation"]
    assert {r["study_uid"] for r in rolled_back.pending_studies()} == {study.study_uid}
    for f in study.files:
        sop = dcmread(f, stop_before_pixels=True).SOPInstanceUID
        row = rolled_back.instance(sop)
        assert row is not None and open(row["path"], "rb").read() == f.read_bytes()
    sources = {r["source"] for r in rolled_back.query("SELECT source FROM instances")}
    assert sources == {"dimse:CT1", RECONCILED_SOURCE}
    # a second pass finds nothing to do
    again = reconcile_spool(spool, rolled_back)
    assert again.indexed == [] and again.scanned == 9
    rolled_back.close()


def test_unreadable_or_misplaced_files_are_left_and_reported(tmp_path, store):
    spool, index, ingest = store
    study = make_study(tmp_path / "s", n_ct=2, n_pet=0)
    good = study.ct_files[0].read_bytes()
    ds = dcmread(study.ct_files[1], stop_before_pixels=True)
    spool.store(good, study.study_uid, ds.SeriesInstanceUID, "1.2.3.4.6")  # the header says another SOP
    spool.store(b"\0" * 200, study.study_uid, ds.SeriesInstanceUID, "1.2.3.4.5")  # not DICOM
    (spool.root / ".tmp" / "x.part").write_bytes(good)  # a partial write is never an instance
    (spool.root / "not-a-uid").mkdir()
    (spool.root / "not-a-uid" / "1.2.dcm").write_bytes(good)
    report = reconcile_spool(spool, index)
    assert report.indexed == []
    assert len(report.unreadable) == 2
    reasons = " ".join(r for _, r in report.unreadable)
    assert "does not match the path" in reasons and "cannot parse" in reasons
    assert all(p.exists() for p, _ in report.unreadable)  # inputs are never deleted
    assert index.study(study.study_uid) is None


def test_new_instance_commits_skip_the_fsync_changed_ones_do_not(tmp_path, store):
    """Only rows reconciliation can rebuild are committed without fsync (synchronous=NORMAL)."""
    spool, index, ingest = store
    study = make_study(tmp_path / "s", n_ct=1, n_pet=0)
    con = index.connection()  # this thread's connection, the one ingest.store commits on
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ingest.store(study.ct_files[0].read_bytes(), source="t")
    assert con.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: a new instance
    ingest.store(study.ct_files[0].read_bytes(), source="t")
    assert con.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: an identical resend changes nothing
    ds = dcmread(study.ct_files[0])
    ds.SeriesDescription = "corrected"
    ds.save_as(study.ct_files[0])
    ingest.store(study.ct_files[0].read_bytes(), source="t")
    assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a changed known instance
    index.set_study_state(study.study_uid, "processed")
    assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: every other write


def test_node_start_indexes_and_processes_spooled_files(tmp_path, node_factory):
    """A node that finds acknowledged files without rows at startup indexes them and runs the study."""
    data = tmp_path / "data"
    study = make_study(tmp_path / "s", n_ct=3, n_pet=2)
    spool = Spool(data, min_free_mb=0)
    for f in study.files:
        ds = dcmread(f, stop_before_pixels=True)
        spool.store(f.read_bytes(), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    node = node_factory(node_config(data, spool__stable_age_s=0.2))
    assert node.index.study(study.study_uid)["instance_count"] == 5

    def done():
        jobs = node.jobs.jobs_of_study(study.study_uid)
        return jobs and jobs[-1].state in ("done", "failed") and jobs[-1]
    job = wait_for(done, 60, what="the reconciled study's job")
    assert job.state == "done", job.reason


def test_ingest_and_reconciliation_write_the_same_row(tmp_path, store):
    spool, index, ingest = store
    study = make_study(tmp_path / "s", n_ct=1, n_pet=1)
    received = ingest.store(study.pet_files[0].read_bytes(), source="dimse:PET1")
    row = index.instance(received.sop_uid)
    other = Index(tmp_path / "other.sqlite")
    reconcile_spool(Spool(tmp_path / "data", min_free_mb=0), other)
    rebuilt = other.instance(received.sop_uid)
    keep = ("series_uid", "study_uid", "sop_class_uid", "transfer_syntax", "path", "size")
    assert {k: rebuilt[k] for k in keep} == {k: row[k] for k in keep}
    patient_id = str(dcmread(study.pet_files[0], stop_before_pixels=True).PatientID)
    for idx in (index, other):  # each index hashes with its own key
        assert idx.study(study.study_uid)["patient_hash"] == patient_hash(patient_id, idx.secret(PATIENT_KEY)) != ""
    other.close()
