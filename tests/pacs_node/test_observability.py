"""The node's parts emit events on one bus; the observer turns them into metrics and audit lines."""

from __future__ import annotations

from nodetest_helpers import make_study
from test_metrics import parse

from pacs_node.audit import AuditLog, read_events
from pacs_node.events import NodeEvents
from pacs_node.http import Request
from pacs_node.index import Index
from pacs_node.ingest import Ingest
from pacs_node.jobs import JobQueue
from pacs_node.metrics import NodeMetrics
from pacs_node.multipart import encode_related
from pacs_node.observability import NodeObserver
from pacs_node.spool import Spool
from pacs_node.stow import StowService


def _observed(tmp_path):
    events = NodeEvents()
    metrics = NodeMetrics()
    audit = AuditLog(tmp_path / "audit.jsonl")
    NodeObserver(metrics, audit).subscribe(events)
    seen: list[str] = []
    for name in ("study_received", "stow_request", "job_done", "job_failed"):
        events.subscribe(name, lambda name=name, **kw: seen.append(name))
    return events, metrics, audit, seen


def test_stow_request_is_audited_per_series_with_refusals(tmp_path) -> None:
    events, metrics, audit, seen = _observed(tmp_path)
    index = Index(tmp_path / "data" / "index.sqlite")
    ingest = Ingest(Spool(tmp_path / "data", min_free_mb=0), index, max_instance_bytes=10**7,
                    max_instances_per_study=100, events=events)
    study = make_study(tmp_path / "s", n_ct=3, n_pet=2, rows=16)
    parts = [p.read_bytes() for p in study.files] + [b"not DICOM at all"]
    body, ctype = encode_related(parts)
    request = Request("POST", "/dicomweb/studies", {}, {}, {"content-type": ctype}, body, "127.0.0.1:5000")
    assert StowService(ingest).handle(request).status == 202  # some stored, one refused
    assert seen == ["study_received", "stow_request"]  # one new study, one request
    m = parse(metrics.render())
    assert m[("igtv_instances_received_total", (("transport", "stow"),))] == 5
    assert m[("igtv_studies_received_total", ())] == 1
    assert m[("igtv_instances_refused_total", (("reason", "cannot_understand"),))] == 1
    lines = read_events(audit.path, limit=None)
    stored = {e["modality"]: e for e in lines if e["event"] == "instances_stored"}
    assert stored["CT"]["count"] == 3 and stored["PT"]["count"] == 2
    assert stored["CT"]["source"] == "stow:127.0.0.1:5000"
    (refused,) = [e for e in lines if e["event"] == "instances_refused"]
    assert refused["count"] == 1 and refused["reason"] == "cannot_understand"
    # the same instances again: duplicates count as received, but no new study
    assert StowService(ingest).handle(request).status == 202
    assert seen.count("study_received") == 1
    index.close()


def test_job_queue_emits_final_states(tmp_path) -> None:
    events, metrics, audit, seen = _observed(tmp_path)
    index = Index(tmp_path / "index.sqlite")
    jobs = JobQueue(index, events=events)
    jobs.record_failed("1.2.3", 1, "no PET series")
    done_id = jobs.enqueue("1.2.4", 1)
    jobs.claim()
    result = {"out_dir": "/r", "outputs": [], "dicom_outputs": [], "result_uids": ["1.2.4.9"], "report": {}}
    jobs.processed(done_id, result, ["pacs", "tps"])
    assert seen == ["job_failed"]  # exporting is not final
    first, second = jobs.exports_of_job(done_id)
    jobs.export_sent(first["id"], ["1.2.4.9"])
    assert seen == ["job_failed"]  # one export still pending
    jobs.export_failed(second["id"], "refused")
    assert seen == ["job_failed", "job_failed"]
    m = parse(metrics.render())
    assert m[("igtv_jobs_finished_total", (("state", "failed"),))] == 2
    failed = [e for e in read_events(audit.path, limit=None) if e["event"] == "job_failed"]
    assert {e["reason"] for e in failed} == {"no PET series", "export failed: tps: refused"}
    # a job without destinations is done when processed
    other = jobs.enqueue("1.2.5", 1)
    jobs.claim()
    jobs.processed(other, result, [])
    assert seen[-1] == "job_done"
    (finished,) = [e for e in read_events(audit.path, limit=None) if e["event"] == "job_finished"]
    assert finished["job_id"] == other and finished["outputs"] == ["1.2.4.9"] and finished["seconds"] >= 0
    index.close()
