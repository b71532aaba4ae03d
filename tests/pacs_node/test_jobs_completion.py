"""Study completion, the persistent job queue and the export schedule."""

from __future__ import annotations

import time

import pytest
from nodetest_helpers import make_study

from pacs_node.completion import scan_once
from pacs_node.config import Destination, ExportConfig
from pacs_node.exporter import Exporter
from pacs_node.jobs import JobQueue


def _ingest_files(ingest, files):
    for f in files:
        ingest.store(f.read_bytes(), source="test")


def test_complete_only_after_stable_age_with_pet_and_ct(tmp_path, store):
    spool, index, ingest = store
    jobs = JobQueue(index)
    study = make_study(tmp_path / "s", n_ct=3, n_pet=2)
    _ingest_files(ingest, study.files)
    now = time.time()
    assert scan_once(index, jobs, stable_age_s=30, now=now) == []  # not settled yet
    assert scan_once(index, jobs, stable_age_s=30, now=now + 31) == [study.study_uid]
    assert scan_once(index, jobs, stable_age_s=30, now=now + 62) == []  # queued once only
    (job,) = jobs.jobs_of_study(study.study_uid)
    assert job.state == "queued"
    assert index.study(study.study_uid)["state"] == "queued"


def test_ct_only_study_fails_with_reason_and_late_pet_reopens(tmp_path, store):
    spool, index, ingest = store
    jobs = JobQueue(index)
    study = make_study(tmp_path / "s", n_ct=3, n_pet=2)
    _ingest_files(ingest, study.ct_files)
    assert scan_once(index, jobs, stable_age_s=0, now=time.time() + 1) == []
    (failed,) = jobs.jobs_of_study(study.study_uid)
    assert failed.state == "failed" and "no PET" in failed.reason
    info = index.study(study.study_uid)
    assert info["state"] == "incomplete" and "no PET" in info["reason"]
    assert len(spool.study_files(study.study_uid)) == 3  # inputs kept
    _ingest_files(ingest, study.pet_files)  # the late series re-opens the study
    assert scan_once(index, jobs, stable_age_s=0, now=time.time() + 1) == [study.study_uid]
    assert [j.state for j in jobs.jobs_of_study(study.study_uid)] == ["failed", "queued"]


def test_late_instance_requeues_a_processed_study(tmp_path, store):
    spool, index, ingest = store
    jobs = JobQueue(index)
    study = make_study(tmp_path / "s", n_ct=3, n_pet=2)
    _ingest_files(ingest, study.files[:-1])
    scan_once(index, jobs, stable_age_s=0, now=time.time() + 1)
    job = jobs.claim()
    jobs.processed(job.id, {"out_dir": "x", "outputs": [], "dicom_outputs": [], "result_uids": ["1.2"]}, [])
    assert jobs.job(job.id).state == "done"
    assert index.study(study.study_uid)["state"] == "processed"
    _ingest_files(ingest, study.files[-1:])
    assert scan_once(index, jobs, stable_age_s=0, now=time.time() + 1) == [study.study_uid]
    assert [j.state for j in jobs.jobs_of_study(study.study_uid)] == ["done", "queued"]


def test_restart_resumes_running_jobs(tmp_path, store):
    spool, index, ingest = store
    jobs = JobQueue(index)
    jobs_id = jobs.enqueue("1.2.3", 1)
    assert jobs.claim().id == jobs_id
    assert jobs.claim() is None
    assert JobQueue(index).resume_unfinished() == 1
    again = jobs.claim()
    assert again.id == jobs_id and again.attempts == 2


def _job_with_outputs(jobs, tmp_path, dest_names):
    study = make_study(tmp_path / "out", n_ct=2, n_pet=0)
    job_id = jobs.enqueue(study.study_uid, 1)
    jobs.claim()
    jobs.processed(job_id, {"out_dir": str(tmp_path), "outputs": [], "dicom_outputs": [str(p) for p in study.ct_files],
                            "result_uids": []}, dest_names)
    return job_id


def test_export_transient_failures_back_off_then_give_up(tmp_path, store):
    from nodetest_helpers import free_port

    spool, index, ingest = store
    jobs = JobQueue(index)
    dead = Destination(name="dead", kind="dimse", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    cfg = ExportConfig(destinations=[dead], max_attempts=3, backoff_initial_s=10, backoff_max_s=15, timeout_s=3)
    job_id = _job_with_outputs(jobs, tmp_path, ["dead"])
    exporter = Exporter(jobs, cfg, "IGTV")
    t0 = time.time()
    assert exporter.run_due(t0) == 1
    (row,) = jobs.exports_of_job(job_id)
    assert row["state"] == "pending" and row["attempts"] == 1 and "cannot connect" in row["reason"]
    assert 9 <= row["next_at"] - t0 <= 12  # first backoff: 10 s
    assert exporter.run_due(t0 + 1) == 0  # not due yet
    exporter.run_due(row["next_at"] + 0.1)
    (row2,) = jobs.exports_of_job(job_id)
    assert row2["attempts"] == 2 and 14 <= row2["next_at"] - row["next_at"] <= 17  # 20 s capped at 15 s
    exporter.run_due(row2["next_at"] + 0.1)
    (row3,) = jobs.exports_of_job(job_id)
    assert row3["state"] == "failed" and "gave up after 3 attempts" in row3["reason"]
    job = jobs.job(job_id)
    assert job.state == "failed" and "dead" in job.reason
    assert exporter.run_due(time.time() + 1000) == 0  # never loops


def test_export_permanent_failure_fails_at_once(tmp_path, store, listener):
    """Our own listener refuses an unsupported SOP class: no retry."""
    spool, index, ingest = store
    jobs = JobQueue(index)
    dest = Destination(name="node", kind="dimse", ae_title="IGTV", host="127.0.0.1", port=listener.port)
    cfg = ExportConfig(destinations=[dest], max_attempts=5, backoff_initial_s=1, timeout_s=5)
    study = make_study(tmp_path / "sc", n_ct=1, n_pet=0)
    from pydicom import dcmread

    ds = dcmread(study.ct_files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    ds.save_as(study.ct_files[0])
    job_id = jobs.enqueue(study.study_uid, 1)
    jobs.claim()
    jobs.processed(job_id, {"out_dir": "x", "outputs": [], "dicom_outputs": [str(study.ct_files[0])],
                            "result_uids": []}, ["node"])
    Exporter(jobs, cfg, "IGTV").run_due()
    (row,) = jobs.exports_of_job(job_id)
    assert row["state"] == "failed" and row["attempts"] == 1
    assert "does not accept SOP class" in row["reason"]
    assert jobs.job(job_id).state == "failed"


def test_a_study_runs_one_job_at_a_time(tmp_path, store):
    spool, index, ingest = store
    jobs = JobQueue(index)
    first = jobs.enqueue("1.2.3", 1)
    assert jobs.claim().id == first
    second = jobs.enqueue("1.2.3", 2)  # a late instance while the first job runs
    other = jobs.enqueue("1.2.4", 1)
    assert jobs.claim().id == other  # the study's second job waits for its first
    assert jobs.claim() is None
    jobs.fail(first, "bad input")
    assert jobs.claim().id == second


def test_an_unexpected_export_error_is_recorded_once_not_looped_on(tmp_path, store):
    spool, index, ingest = store
    jobs = JobQueue(index)
    broken = Destination(name="broken", kind="dimse", ae_title=None, host="127.0.0.1", port=None)
    cfg = ExportConfig(destinations=[broken], max_attempts=5, backoff_initial_s=1, timeout_s=3)
    job_id = _job_with_outputs(jobs, tmp_path, ["broken"])
    exporter = Exporter(jobs, cfg, "IGTV")
    assert exporter.run_due() == 1
    (row,) = jobs.exports_of_job(job_id)
    assert row["state"] == "failed" and row["reason"].startswith("unexpected TypeError")
    assert jobs.job(job_id).state == "failed"
    assert exporter.run_due(time.time() + 1000) == 0


def test_an_unknown_host_is_a_transient_export_failure(tmp_path):
    from pacs_node.export import TransientExportError, send_dimse

    study = make_study(tmp_path / "s", n_ct=1, n_pet=0)
    dest = Destination(name="x", kind="dimse", ae_title="PACS", host="no-such-host.invalid", port=104)
    with pytest.raises(TransientExportError, match="cannot resolve the host"):
        send_dimse(dest, study.files, "IGTV", timeout=5)
