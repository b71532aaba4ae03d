"""Web dashboard: a JSON API over the node's index and the static page that uses it.

Routes (registered on the node's :class:`pacs_node.http.Router`; ``auth`` ones
need ``Authorization: Bearer <token>`` when ``http.token`` is set):

======  ===============================  =====  ==============================================
method  path                             auth   answer
======  ===============================  =====  ==============================================
GET     /  and /static/{file}            no     the page, its script and style (no data)
GET     /metrics                         no     Prometheus text format
GET     /api/summary                     yes    node name, destinations, jobs by state
GET     /api/studies                     yes    studies, newest first, de-identified
GET     /api/studies/{study_uid}         yes    one study with its series and jobs
GET     /api/jobs[?state=S]              yes    jobs, newest first
GET     /api/jobs/{id}                   yes    one job: timings, report numbers, exports
GET     /api/jobs/{id}/preview.png       yes    the job's preview image
GET     /api/jobs/{id}/report            yes    the job's full JSON report
POST    /api/jobs/{id}/rerun             yes    queue the study again -> 202 {"job_id": new}
POST    /api/jobs/{id}/resend            yes    send results again -> 202 {"destinations": [...]}
GET     /api/audit[?limit=N&event=E]     yes    newest audit events
======  ===============================  =====  ==============================================

Studies are shown de-identified: the index keeps only a truncated SHA-256 of
the patient ID (never the name or the ID itself), the study date, modalities
and counts. The API is documented in docs/operations.md.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from pacs_node.audit import read_events
from pacs_node.http import Request, Response, Router
from pacs_node.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pacs_node.metrics import JOB_STATES, NodeMetrics
from pipeline.uids import is_valid_uid

log = logging.getLogger(__name__)

STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# Share of the work done when a job enters a state (for the progress bar).
_STATE_PROGRESS = {"queued": 0.0, "running": 0.1, "exporting": 0.9, "done": 1.0, "failed": 1.0}
# While running, the pipeline's own fraction (reported per stage by the worker process) spans this range.
_RUNNING_PROGRESS = (0.1, 0.9)


def _json(data: Any, status: int = 200) -> Response:
    resp = Response.json(data, status)
    resp.headers.update(SECURITY_HEADERS)
    return resp


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def _loads(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return default


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def report_numbers(report: dict[str, Any] | None) -> dict[str, Any]:
    """The headline numbers of a job report (``pipeline.writers.report`` schema).

    IGTV volume and SUVmax are the report's totals over all kept lesions; the
    superior-inferior extent (the breathing motion the IGTV covers) is the
    largest of the lesions' ``si_extent_mm``.
    """
    if not report:
        return {"igtv_volume_cc": None, "suv_max": None, "si_extent_mm": None, "lesions": None}
    total = report.get("total") if isinstance(report.get("total"), dict) else {}
    lesions = [x for x in report.get("lesions") or [] if isinstance(x, dict)]
    extents = [v for v in (_number(x.get("si_extent_mm")) for x in lesions) if v is not None]
    count = report.get("lesion_count")
    return {
        "igtv_volume_cc": _number(total.get("volume_cc")),
        "suv_max": _number(total.get("suv_max")),
        "si_extent_mm": max(extents) if extents else None,
        "lesions": int(count) if isinstance(count, int) else len(lesions),
    }


class Dashboard:
    """JSON API handlers and static files of the dashboard.

    Parameters
    ----------
    index:
        The node's :class:`pacs_node.index.Index`.
    jobs:
        The node's :class:`pacs_node.jobs.JobQueue`.
    destinations:
        Names of the configured export destinations.
    node_name:
        Shown in the page header (the AE title).
    audit_path:
        The audit log (``<data_dir>/audit.jsonl``); None hides the audit view.
    metrics:
        Served on ``/metrics`` when given.
    wake_workers, wake_exporter:
        Called after a re-run or re-send is queued, so it starts at once.
    """

    def __init__(
        self,
        index: Any,
        jobs: Any,
        destinations: list[str],
        node_name: str = "IGTV",
        audit_path: Path | None = None,
        metrics: NodeMetrics | None = None,
        wake_workers: Callable[[], None] | None = None,
        wake_exporter: Callable[[], None] | None = None,
    ) -> None:
        self.index = index
        self.jobs = jobs
        self.destinations = list(destinations)
        self.node_name = node_name
        self.audit_path = audit_path
        self.metrics = metrics
        self.wake_workers = wake_workers
        self.wake_exporter = wake_exporter

    def register(self, router: Router) -> None:
        """Add the dashboard's routes to ``router``."""
        router.add("GET", r"/", self.page, auth=False)
        router.add("GET", r"/static/(?P<name>[a-z]+\.(?:js|css|html|svg))", self.static, auth=False)
        if self.metrics is not None:
            router.add("GET", r"/metrics", self.metrics_text, auth=False)
        router.add("GET", r"/api/summary", self.summary)
        router.add("GET", r"/api/studies", self.studies)
        router.add("GET", r"/api/studies/(?P<study_uid>[0-9.]+)", self.study)
        router.add("GET", r"/api/jobs", self.job_list)
        router.add("GET", r"/api/jobs/(?P<id>[0-9]+)", self.job)
        router.add("GET", r"/api/jobs/(?P<id>[0-9]+)/preview\.png", self.preview)
        router.add("GET", r"/api/jobs/(?P<id>[0-9]+)/report", self.report)
        router.add("POST", r"/api/jobs/(?P<id>[0-9]+)/rerun", self.rerun)
        router.add("POST", r"/api/jobs/(?P<id>[0-9]+)/resend", self.resend)
        router.add("GET", r"/api/audit", self.audit)

    # -- static ---------------------------------------------------------------------
    def page(self, request: Request) -> Response:
        """The dashboard page."""
        return self._static_file("index.html")

    def static(self, request: Request) -> Response:
        """A static asset of the page."""
        return self._static_file(request.params["name"])

    def _static_file(self, name: str) -> Response:
        if name not in STATIC_FILES:
            return Response.text("not found\n", 404)
        data = resources.files("pacs_node").joinpath("web", name).read_bytes()
        resp = Response(200, data, STATIC_FILES[name])
        resp.headers.update(SECURITY_HEADERS)
        return resp

    def metrics_text(self, request: Request) -> Response:
        """Prometheus exposition of the node's metrics."""
        assert self.metrics is not None
        return Response(200, self.metrics.render().encode("utf-8"), METRICS_CONTENT_TYPE)

    # -- read -----------------------------------------------------------------------
    def summary(self, request: Request) -> Response:
        """Node name, destinations and job counts by state."""
        return _json(
            {
                "node": self.node_name,
                "destinations": self.destinations,
                "jobs_by_state": self.job_counts(),
                "studies": int(self.index.query("SELECT COUNT(*) AS n FROM studies")[0]["n"]),
                "audit": self.audit_path is not None,
                "time": time.time(),
            }
        )

    def job_counts(self) -> dict[str, int]:
        """Number of jobs per state (every known state present)."""
        return self.job_counts_of(self.index)

    @staticmethod
    def job_counts_of(index: Any) -> dict[str, int]:
        """Number of jobs per state in ``index`` (also read by the ``igtv_jobs`` metric)."""
        rows = index.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        counts = {state: 0 for state in JOB_STATES}
        counts.update({r["state"]: int(r["n"]) for r in rows})
        return counts

    def studies(self, request: Request) -> Response:
        """Studies, newest first, with their latest job."""
        limit = _int_param(request, "limit", 200, 1, 1000)
        rows = self.index.studies(limit=limit)
        latest = self._latest_jobs([r["study_uid"] for r in rows])
        return _json({"studies": [self._study_view(r, latest.get(r["study_uid"])) for r in rows]})

    def study(self, request: Request) -> Response:
        """One study with its series and all its jobs."""
        uid = request.params["study_uid"]
        row = self.index.study(uid) if is_valid_uid(uid) else None
        if row is None:
            return _error(404, f"study {uid} is not in the index")
        view = self._study_view(row, None)
        view["series"] = [
            {k: s.get(k) for k in ("series_uid", "modality", "description", "instance_count", "last_received")}
            for s in row.get("series", [])
        ]
        view["jobs"] = [
            self._job_view(r) for r in self.index.query("SELECT * FROM jobs WHERE study_uid=? ORDER BY id DESC", (uid,))
        ]
        return _json(view)

    def job_list(self, request: Request) -> Response:
        """Jobs, newest first (``?state=`` filters, ``?limit=`` caps)."""
        state = (request.query.get("state") or [None])[0]
        if state is not None and state not in JOB_STATES:
            return _error(400, f"unknown state {state!r}; known: {list(JOB_STATES)}")
        limit = _int_param(request, "limit", 200, 1, 1000)
        return _json({"jobs": [self._job_view(r) for r in self.jobs.jobs(limit=limit, state=state)]})

    def job(self, request: Request) -> Response:
        """One job with exports and report numbers."""
        row = self._job_row(request)
        if row is None:
            return _error(404, f"job {request.params['id']} does not exist")
        view = self._job_view(row)
        view["exports"] = [
            {
                "destination": e["destination"], "state": e["state"], "attempts": e["attempts"],
                "reason": e["reason"], "updated": e["updated"], "sent_uids": _loads(e.get("sent_uids"), []),
            }
            for e in self.jobs.exports_of_job(row["id"])
        ]
        view["result_uids"] = _loads(row.get("result_uids"), [])
        return _json(view)

    def preview(self, request: Request) -> Response:
        """The job's preview PNG (404 until the job produced one)."""
        row = self._job_row(request)
        path = self._output(row, "preview.png") if row else None
        if path is None:
            return _error(404, "no preview for this job")
        resp = Response(200, path.read_bytes(), "image/png")
        resp.headers.update(SECURITY_HEADERS)
        return resp

    def report(self, request: Request) -> Response:
        """The job's full JSON report."""
        row = self._job_row(request)
        report = _loads(row.get("report"), None) if row else None
        if report is None:
            return _error(404, "no report for this job")
        return _json(report)

    def audit(self, request: Request) -> Response:
        """Newest audit events (``?limit=``, ``?event=`` repeatable)."""
        if self.audit_path is None:
            return _error(404, "the audit log is not enabled")
        limit = _int_param(request, "limit", 100, 1, 5000)
        events = request.query.get("event") or None
        return _json({"events": read_events(self.audit_path, limit=limit, events=events)})

    # -- actions --------------------------------------------------------------------
    def rerun(self, request: Request) -> Response:
        """Queue the job's study again with its current instances."""
        row = self._job_row(request)
        if row is None:
            return _error(404, f"job {request.params['id']} does not exist")
        if row["state"] in ("queued", "running"):
            return _error(409, f"job {row['id']} is {row['state']}; wait for it to finish")
        study = self.index.study(row["study_uid"])
        if study is None:
            return _error(409, f"study of job {row['id']} is no longer in the index")
        new_id = self.jobs.enqueue(row["study_uid"], int(study["generation"]))
        log.info("dashboard: job %d re-run as job %d", row["id"], new_id)
        if self.wake_workers:
            self.wake_workers()
        return _json({"job_id": new_id, "study_uid": row["study_uid"]}, 202)

    def resend(self, request: Request) -> Response:
        """Send the job's results again, to every destination or to those named in the body."""
        row = self._job_row(request)
        if row is None:
            return _error(404, f"job {request.params['id']} does not exist")
        if not _loads(row.get("dicom_outputs"), []):
            return _error(409, f"job {row['id']} has no results to send (state {row['state']})")
        if row["state"] in ("queued", "running", "exporting"):
            return _error(409, f"job {row['id']} is {row['state']}; wait for it to finish")
        body = _loads(request.body.decode("utf-8", "replace"), {}) if request.body else {}
        wanted = body.get("destinations") if isinstance(body, dict) else None
        if wanted is None:
            wanted = self.destinations
        unknown = [d for d in wanted if d not in self.destinations]
        if unknown or not wanted:
            return _error(400, f"unknown or no destinations {unknown or wanted}; configured: {self.destinations}")
        self.jobs.resend(row["id"], list(wanted))
        log.info("dashboard: job %d results queued for %s", row["id"], ", ".join(wanted))
        if self.wake_exporter:
            self.wake_exporter()
        return _json({"job_id": row["id"], "destinations": list(wanted)}, 202)

    # -- helpers --------------------------------------------------------------------
    def _job_row(self, request: Request) -> dict[str, Any] | None:
        rows = self.index.query("SELECT * FROM jobs WHERE id=?", (int(request.params["id"]),))
        return rows[0] if rows else None

    def _latest_jobs(self, study_uids: list[str]) -> dict[str, dict[str, Any]]:
        if not study_uids:
            return {}
        marks = ",".join("?" * len(study_uids))
        rows = self.index.query(
            f"SELECT * FROM jobs WHERE id IN (SELECT MAX(id) FROM jobs WHERE study_uid IN ({marks}) "
            "GROUP BY study_uid)",
            tuple(study_uids),
        )
        return {r["study_uid"]: self._job_view(r) for r in rows}

    @staticmethod
    def _study_view(row: dict[str, Any], latest_job: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "study_uid": row["study_uid"],
            "patient": row.get("patient_hash") or "",
            "study_date": row.get("study_date") or "",
            "modalities": row.get("modalities", []),
            "instances": row.get("instance_count", 0),
            "bytes": row.get("bytes", 0),
            "first_received": row.get("first_received"),
            "last_received": row.get("last_received"),
            "state": row.get("state"),
            "reason": row.get("reason"),
            "latest_job": latest_job,
        }

    def _job_view(self, row: dict[str, Any]) -> dict[str, Any]:
        report = _loads(row.get("report"), None)
        timings = report.get("timings_s") if isinstance(report, dict) else None
        if not isinstance(timings, dict):  # still running: the stages the worker process finished so far
            timings = _loads(row.get("stage_timings"), None)
        timings = timings if isinstance(timings, dict) else {}
        started, finished = row.get("started"), row.get("finished")
        end = finished or (time.time() if row["state"] in ("running", "exporting") else None)
        progress = _STATE_PROGRESS.get(row["state"], 0.0)
        stage_fraction = _number(row.get("stage_fraction"))
        if row["state"] == "running" and stage_fraction is not None:
            progress = _RUNNING_PROGRESS[0] + (_RUNNING_PROGRESS[1] - _RUNNING_PROGRESS[0]) * stage_fraction
        if row["state"] == "exporting":
            exports = self.jobs.exports_of_job(row["id"])
            if exports:
                progress = 0.9 + 0.1 * sum(e["state"] != "pending" for e in exports) / len(exports)
        return {
            "id": row["id"],
            "study_uid": row["study_uid"],
            "state": row["state"],
            "reason": row.get("reason"),
            "attempts": row.get("attempts", 0),
            "created": row.get("created"),
            "started": started,
            "finished": finished,
            "elapsed_s": round(end - started, 3) if started and end else None,
            "progress": round(progress, 3),
            "stage": row.get("stage") if row["state"] == "running" else None,
            "stage_fraction": stage_fraction,
            "timings": timings,
            "numbers": report_numbers(report if isinstance(report, dict) else None),
            "has_preview": self._output(row, "preview.png") is not None,
        }

    @staticmethod
    def _output(row: dict[str, Any] | None, name: str) -> Path | None:
        """The output file called ``name`` of a job, when recorded and present."""
        if not row:
            return None
        for p in _loads(row.get("outputs"), []):
            path = Path(p)
            if path.name == name and path.is_file():
                return path
        return None


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    try:
        value = int((request.query.get(name) or [default])[0])
    except (TypeError, ValueError):
        value = default
    return max(low, min(high, value))
