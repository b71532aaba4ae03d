"""The dashboard's JSON API over a real index, served by the node's HTTP server."""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from pacs_node.audit import AuditLog
from pacs_node.dashboard import Dashboard, report_numbers
from pacs_node.http import HttpServer, Router
from pacs_node.index import Index, InstanceRecord
from pacs_node.ingest import PATIENT_KEY, patient_hash
from pacs_node.jobs import JobQueue
from pacs_node.metrics import NodeMetrics
from pipeline.writers.report import build_report

TOKEN = "test-token-0123456789"
PATIENT_ID = "PAT-0042"
STUDY = "1.2.826.0.1.3680043.8.498.1001"
FAILED_STUDY = "1.2.826.0.1.3680043.8.498.1002"
# A report in the results' own format (built by the pipeline's report writer).
REPORT = build_report(
    [
        {"volume_cc": 12.5, "suv_max": 9.25, "suv_mean": 4.1, "si_extent_mm": 21.0, "ap_extent_mm": 30.0,
         "lr_extent_mm": 28.0, "centroid_mm_lps": [1.0, 2.0, 3.0]},
        {"volume_cc": 1.5, "suv_max": 3.0, "suv_mean": 2.0, "si_extent_mm": 8.0, "ap_extent_mm": 9.0,
         "lr_extent_mm": 7.0, "centroid_mm_lps": [5.0, 6.0, 7.0]},
    ],
    {"load": 1.2, "inference": 7.5, "writers": 0.4},
    {"version": "test"},
    {},
)


@dataclass
class DashboardNode:
    """A dashboard over an index with one processed and one failed study."""

    base: str
    index: Index
    jobs: JobQueue
    done_job: int
    failed_job: int
    preview_png: bytes
    woken: list[str]

    def call(self, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN):
        req = urllib.request.Request(self.base + path, data=body, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def json(self, method: str, path: str, body: dict | None = None, token: str | None = TOKEN):
        status, _, data = self.call(method, path, json.dumps(body).encode() if body is not None else None, token)
        return status, json.loads(data)


def _record(index: Index, study: str, series: str, modality: str, n: int, sop_class: str) -> None:
    for i in range(n):
        index.record_instance(
            InstanceRecord(
                study_uid=study, series_uid=series, sop_uid=f"{series}.{i + 1}", sop_class_uid=sop_class,
                transfer_syntax="1.2.840.10008.1.2.1", modality=modality, series_description=f"{modality} test",
                path=f"/spool/{series}.{i + 1}.dcm", size=1000, source="dimse:TEST",
                patient_hash=patient_hash(PATIENT_ID, index.secret(PATIENT_KEY)), study_date="20250131",
            )
        )


def build_node(tmp_path: Path) -> Iterator[DashboardNode]:
    """Index with a processed study (preview, report, sent) and a failed one, served over HTTP."""
    index = Index(tmp_path / "index.sqlite")
    jobs = JobQueue(index)
    _record(index, STUDY, STUDY + ".1", "CT", 3, "1.2.840.10008.5.1.4.1.1.2")
    _record(index, STUDY, STUDY + ".2", "PT", 2, "1.2.840.10008.5.1.4.1.1.128")
    _record(index, FAILED_STUDY, FAILED_STUDY + ".1", "CT", 2, "1.2.840.10008.5.1.4.1.1.2")

    out = tmp_path / "results" / STUDY
    out.mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
    (out / "preview.png").write_bytes(buf.getvalue())
    (out / "report.json").write_text(json.dumps(REPORT))
    for name in ("seg.dcm", "rtstruct.dcm"):
        (out / name).write_bytes(b"not really DICOM")
    generation = index.study(STUDY)["generation"]
    done_job = jobs.enqueue(STUDY, generation)
    assert jobs.claim().id == done_job
    jobs.processed(done_job, {
        "out_dir": str(out),
        "outputs": [str(out / n) for n in ("seg.dcm", "rtstruct.dcm", "preview.png", "report.json")],
        "dicom_outputs": [str(out / "seg.dcm"), str(out / "rtstruct.dcm")],
        "result_uids": ["1.2.3.4.1", "1.2.3.4.2"],
        "report": REPORT,
    }, ["pacs"])
    export = jobs.exports_of_job(done_job)[0]
    jobs.export_sent(export["id"], ["1.2.3.4.1", "1.2.3.4.2"])
    failed_job = jobs.record_failed(FAILED_STUDY, index.study(FAILED_STUDY)["generation"], "no PET series")

    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.job_finished(done_job, STUDY, 9.1, ["1.2.3.4.1", "1.2.3.4.2"])
    metrics = NodeMetrics()
    metrics.instance_received("dimse", 1000)
    woken: list[str] = []
    router = Router()
    Dashboard(
        index, jobs, destinations=["pacs", "tps"], node_name="IGTV_TEST", audit_path=tmp_path / "audit.jsonl",
        metrics=metrics, wake_workers=lambda: woken.append("workers"),
        wake_exporter=lambda: woken.append("exporter"),
    ).register(router)
    server = HttpServer("127.0.0.1", 0, router, token=TOKEN)
    port = server.start()
    try:
        yield DashboardNode(f"http://127.0.0.1:{port}", index, jobs, done_job, failed_job, buf.getvalue(), woken)
    finally:
        server.stop()
        index.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[DashboardNode]:
    yield from build_node(tmp_path)


def test_api_requires_the_token_but_page_and_metrics_do_not(node: DashboardNode) -> None:
    for path in ("/api/summary", "/api/studies", "/api/jobs", f"/api/jobs/{node.done_job}/preview.png"):
        assert node.call("GET", path, token=None)[0] == 401, path
        assert node.call("GET", path, token="wrong")[0] == 401, path
    assert node.call("POST", f"/api/jobs/{node.done_job}/rerun", b"{}", token=None)[0] == 401
    status, headers, body = node.call("GET", "/", token=None)
    assert status == 200 and b"<script src=\"/static/app.js\"" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    status, headers, body = node.call("GET", "/static/app.js", token=None)
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert node.call("GET", "/static/nothere.js", token=None)[0] == 404
    status, headers, body = node.call("GET", "/metrics", token=None)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b'igtv_instances_received_total{transport="dimse"} 1' in body


def test_studies_are_de_identified(node: DashboardNode) -> None:
    status, _, raw = node.call("GET", "/api/studies")
    assert status == 200
    assert PATIENT_ID.encode() not in raw and b"Test^" not in raw
    studies = {s["study_uid"]: s for s in json.loads(raw)["studies"]}
    s = studies[STUDY]
    assert s["patient"] == patient_hash(PATIENT_ID, node.index.secret(PATIENT_KEY))
    assert s["patient"] != hashlib.sha256(PATIENT_ID.encode()).hexdigest()[:12]  # keyed, not reversible
    assert s["study_date"] == "20250131"
    assert s["modalities"] == ["CT", "PT"] and s["instances"] == 5
    assert s["latest_job"]["id"] == node.done_job and s["latest_job"]["state"] == "done"
    assert studies[FAILED_STUDY]["latest_job"]["reason"] == "no PET series"
    status, one = node.json("GET", f"/api/studies/{STUDY}")
    assert status == 200 and {x["modality"] for x in one["series"]} == {"CT", "PT"}
    assert [j["id"] for j in one["jobs"]] == [node.done_job]
    assert node.json("GET", "/api/studies/1.2.3.999")[0] == 404


def test_jobs_list_detail_preview_and_report(node: DashboardNode) -> None:
    status, body = node.json("GET", "/api/jobs")
    assert status == 200
    by_id = {j["id"]: j for j in body["jobs"]}
    done, failed = by_id[node.done_job], by_id[node.failed_job]
    assert done["state"] == "done" and done["progress"] == 1.0 and done["has_preview"]
    assert done["numbers"] == {"igtv_volume_cc": 14.0, "suv_max": 9.25, "si_extent_mm": 21.0, "lesions": 2}
    assert done["timings"]["inference"] == 7.5 and done["elapsed_s"] is not None
    assert failed["state"] == "failed" and failed["reason"] == "no PET series" and not failed["has_preview"]
    assert [j["id"] for j in node.json("GET", "/api/jobs?state=failed")[1]["jobs"]] == [node.failed_job]
    assert node.json("GET", "/api/jobs?state=bogus")[0] == 400

    status, job = node.json("GET", f"/api/jobs/{node.done_job}")
    assert job["exports"][0]["destination"] == "pacs" and job["exports"][0]["state"] == "done"
    assert job["result_uids"] == ["1.2.3.4.1", "1.2.3.4.2"]
    status, headers, png = node.call("GET", f"/api/jobs/{node.done_job}/preview.png")
    assert status == 200 and headers["Content-Type"] == "image/png" and png == node.preview_png
    assert node.call("GET", f"/api/jobs/{node.failed_job}/preview.png")[0] == 404
    assert node.json("GET", f"/api/jobs/{node.done_job}/report") == (200, REPORT)
    assert node.json("GET", "/api/jobs/999")[0] == 404


def test_rerun_queues_a_new_job_for_the_study(node: DashboardNode) -> None:
    status, body = node.json("POST", f"/api/jobs/{node.done_job}/rerun", {})
    assert status == 202 and body["study_uid"] == STUDY
    new = node.jobs.job(body["job_id"])
    assert new is not None and new.state == "queued" and new.study_uid == STUDY and new.id != node.done_job
    assert node.woken == ["workers"]
    # a second re-run while it waits: refused for the queued job itself
    assert node.json("POST", f"/api/jobs/{new.id}/rerun", {})[0] == 409


def test_resend_queues_exports(node: DashboardNode) -> None:
    status, body = node.json("POST", f"/api/jobs/{node.done_job}/resend", {"destinations": ["tps"]})
    assert status == 202 and body["destinations"] == ["tps"]
    pending = [e for e in node.jobs.exports_of_job(node.done_job) if e["state"] == "pending"]
    assert [e["destination"] for e in pending] == ["tps"]
    assert node.jobs.job(node.done_job).state == "exporting"
    assert node.woken == ["exporter"]
    # while exporting, and for unknown destinations or jobs without results: refused
    assert node.json("POST", f"/api/jobs/{node.done_job}/resend", {})[0] == 409
    assert node.json("POST", f"/api/jobs/{node.failed_job}/resend", {})[0] == 409


def test_resend_rejects_unknown_destination(node: DashboardNode) -> None:
    status, body = node.json("POST", f"/api/jobs/{node.done_job}/resend", {"destinations": ["nowhere"]})
    assert status == 400 and "nowhere" in body["error"]
    status, body = node.json("POST", f"/api/jobs/{node.done_job}/resend", {})
    assert status == 202 and body["destinations"] == ["pacs", "tps"]


def test_summary_and_audit(node: DashboardNode) -> None:
    status, summary = node.json("GET", "/api/summary")
    assert summary["node"] == "IGTV_TEST" and summary["studies"] == 2
    assert summary["jobs_by_state"] == {"queued": 0, "running": 0, "exporting": 0, "done": 1, "failed": 1}
    status, audit = node.json("GET", "/api/audit?limit=5")
    assert status == 200 and audit["events"][0]["event"] == "job_finished"


def test_report_numbers_of_reports_without_a_target() -> None:
    assert report_numbers(None) == {"igtv_volume_cc": None, "suv_max": None, "si_extent_mm": None, "lesions": None}
    empty = build_report([], {"load": 1.0}, {"version": "test"}, {})
    assert report_numbers(empty) == {"igtv_volume_cc": 0.0, "suv_max": None, "si_extent_mm": None, "lesions": 0}


def test_every_api_route_and_metric_is_documented() -> None:
    """docs/operations.md lists each route the dashboard registers and each metric the node exposes."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    router = Router()
    metrics = NodeMetrics()
    Dashboard(None, None, destinations=[], metrics=metrics, audit_path=Path("a")).register(router)
    for route in router.routes:
        path = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", route.pattern.pattern).replace("\\", "")
        if path.startswith("/api") or path == "/metrics":
            assert f"`{path}" in doc, f"{route.method} {path} is not documented in docs/operations.md"
    for line in metrics.render().splitlines():
        if line.startswith("# TYPE "):
            assert f"`{line.split()[2]}`" in doc, f"metric {line.split()[2]} is not documented"
