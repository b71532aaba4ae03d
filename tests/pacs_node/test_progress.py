"""Job progress: the worker process writes the pipeline's stages into the index; the API shows them."""

from __future__ import annotations

import json
import sqlite3

from nodetest_helpers import STAGED_TIMINGS, make_study, wait_for
from test_metrics import parse

from pacs_node.dashboard import Dashboard
from pacs_node.events import NodeEvents
from pacs_node.http import Request
from pacs_node.index import SCHEMA_VERSION, Index
from pacs_node.jobs import JobQueue
from pacs_node.metrics import NodeMetrics
from pacs_node.observability import NodeObserver
from pacs_node.worker import JobProgress, WorkerPool
from pipeline.settings import ProcessSettings


def _job_api(dashboard: Dashboard, job_id: int) -> dict:
    request = Request("GET", f"/api/jobs/{job_id}", {"id": str(job_id)}, {}, {}, b"", "test")
    response = dashboard.job(request)
    assert response.status == 200
    return json.loads(response.body)


def test_worker_process_reports_stages_to_the_index_and_api(tmp_path, store) -> None:
    spool, index, ingest = store
    events, metrics = NodeEvents(), NodeMetrics()
    NodeObserver(metrics, None).subscribe(events)
    jobs = JobQueue(index, events=events)
    study = make_study(tmp_path / "s", n_ct=2, n_pet=1, rows=16)
    for f in study.files:
        ingest.store(f.read_bytes(), source="test")
    job_id = jobs.enqueue(study.study_uid, index.study(study.study_uid)["generation"])
    results = tmp_path / "results"
    pool = WorkerPool(jobs, spool, results, ProcessSettings(), destinations=[],
                      process_spec="nodetest_helpers:staged_process", poll_s=0.1, events=events)
    dashboard = Dashboard(index, jobs, destinations=[])
    pool.start()
    try:
        # staged_process holds in 'inference' until we let it go
        wait_for(lambda: jobs.jobs()[0]["stage"] == "inference", 60, what="the job to reach 'inference'")
        view = _job_api(dashboard, job_id)
        assert view["state"] == "running" and view["stage"] == "inference" and view["stage_fraction"] == 0.5
        assert view["progress"] == 0.5  # the running span 0.1-0.9, half way
        assert list(view["timings"]) == ["load"] and view["timings"]["load"] >= 0.05  # stages ended so far
        (results / study.study_uid).mkdir(parents=True, exist_ok=True)
        (results / study.study_uid / "go").touch()
        wait_for(lambda: jobs.job(job_id).state == "done", 30, what="the job to finish")
    finally:
        pool.stop()
    view = _job_api(dashboard, job_id)
    assert view["stage"] is None and view["stage_fraction"] == 1.0 and view["progress"] == 1.0
    assert view["timings"] == STAGED_TIMINGS  # the report's, once processed
    (row,) = index.query("SELECT stage_timings FROM jobs WHERE id=?", (job_id,))
    assert json.loads(row["stage_timings"]) == {k: v for k, v in STAGED_TIMINGS.items() if k != "total"}
    m = parse(metrics.render())
    assert m[("igtv_stage_duration_seconds_sum", (("stage", "inference"),))] == 2.5
    assert m[("igtv_stage_duration_seconds_count", (("stage", "writers"),))] == 1
    assert ("igtv_stage_duration_seconds_count", (("stage", "total"),)) not in m


def test_progress_only_touches_a_running_job_and_a_rerun_resets_it(tmp_path) -> None:
    index = Index(tmp_path / "index.sqlite")
    jobs = JobQueue(index)
    job_id = jobs.enqueue("1.2.3", 1)
    progress = JobProgress(str(index.path), job_id)
    progress("load", 0.0)  # still queued: ignored
    assert jobs.jobs()[0]["stage"] is None
    jobs.claim()
    progress("load", 0.0)
    progress("suv", 0.25)
    progress.close()
    (row,) = jobs.jobs()
    assert row["stage"] == "suv" and row["stage_fraction"] == 0.25
    assert list(json.loads(row["stage_timings"])) == ["load"]
    jobs.requeue(job_id, "worker process died")
    jobs.claim()
    (row,) = jobs.jobs()
    assert row["stage"] is None and row["stage_fraction"] == 0 and row["stage_timings"] is None
    index.close()


def test_index_of_schema_version_1_gains_the_progress_columns(tmp_path) -> None:
    path = tmp_path / "index.sqlite"
    Index(path).close()
    con = sqlite3.connect(path)
    for column in ("stage", "stage_fraction", "stage_timings"):
        con.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    index = Index(path)
    assert index.connection().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    columns = {r["name"] for r in index.query("PRAGMA table_info(jobs)")}
    assert {"stage", "stage_fraction", "stage_timings"} <= columns
    index.close()
