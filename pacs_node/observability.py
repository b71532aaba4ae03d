"""Connects the node's events to the metrics and the audit log.

The node's parts stay unaware of metrics and auditing: :class:`ObservedIngest`
and :class:`ObservedJobQueue` are drop-in subclasses of the ingest and job
queue that report what passed through them to a :class:`NodeObserver`, and
:meth:`NodeObserver.listener_handlers` gives pynetdicom event handlers for the
listener. Instances stored are audited once per series and association (or
per STOW request), not once per instance.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import evt

from pacs_node.audit import AuditError, AuditLog, SeriesTally
from pacs_node.config import Destination, ListenerConfig
from pacs_node.http import Request, Response, Router
from pacs_node.ingest import Ingest, IngestRejected, IngestResult
from pacs_node.jobs import Job, JobQueue
from pacs_node.metrics import NodeMetrics

log = logging.getLogger(__name__)

_REFUSAL_REASONS = {0xA700: "out_of_resources", 0xA900: "dataset_mismatch", 0xC000: "cannot_understand"}


class NodeObserver:
    """Turns node events into metric updates and audit lines.

    Parameters
    ----------
    metrics, audit:
        Where events go; ``audit`` may be None (metrics only).
    listener:
        The listener settings (to name the reason of a rejected association).
    destinations:
        The export destinations (to name the target of sent results).
    """

    def __init__(self, metrics: NodeMetrics, audit: AuditLog | None, listener: ListenerConfig | None = None,
                 destinations: list[Destination] | None = None) -> None:
        self.metrics = metrics
        self.audit = audit
        self.listener = listener
        self.destinations = {d.name: d for d in destinations or []}
        self._local = threading.local()
        self._export_started: dict[int, float] = {}
        self._lock = threading.Lock()

    # -- audit helper -----------------------------------------------------------------
    def _audit(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Write an audit event; a failing audit write is logged, never breaks the node."""
        if self.audit is None:
            return
        try:
            getattr(self.audit, method)(*args, **kwargs)
        except (OSError, AuditError) as exc:
            log.error("audit log write failed (%s): %s", method, exc)

    # -- storage ----------------------------------------------------------------------
    def _tally(self) -> tuple[SeriesTally, dict[str, int]]:
        if not hasattr(self._local, "tally"):
            self._local.tally, self._local.refused = SeriesTally(), {}
        return self._local.tally, self._local.refused

    def stored(self, result: IngestResult, modality: str, nbytes: int, source: str, new_study: bool) -> None:
        """One instance stored (counted now, audited at the end of its association or request)."""
        transport = "stow" if source.startswith("stow") else "dimse"
        self.metrics.instance_received(transport, nbytes)
        if new_study:
            self.metrics.study_received()
        self._tally()[0].add(result.study_uid, result.series_uid, modality, nbytes)

    def refused(self, status: int) -> None:
        """One instance refused with DICOM ``status``."""
        reason = _REFUSAL_REASONS.get(status, f"0x{status:04X}")
        self.metrics.instance_refused(reason)
        refused = self._tally()[1]
        refused[reason] = refused.get(reason, 0) + 1

    def flush(self, source: str) -> None:
        """Audit what this thread stored and refused since the last flush."""
        tally, refused = self._tally()
        if self.audit is None:
            tally.clear()  # nothing to write to
        else:
            try:
                tally.flush(self.audit, source)
            except (OSError, AuditError) as exc:
                log.error("audit log write failed: %s", exc)
        for reason, count in refused.items():
            self._audit("instances_refused", source, reason, count)
        refused.clear()

    # -- associations -----------------------------------------------------------------
    def listener_handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        """pynetdicom ``(event, handler)`` pairs for the listener's ``extra_handlers``."""
        return [
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
        ]

    @staticmethod
    def _peer(event: Any) -> tuple[str, str, str]:
        requestor = event.assoc.requestor
        calling = str(requestor.ae_title).strip()
        called = str(event.assoc.acceptor.ae_title).strip()
        # the called AE title the peer asked for is in the request primitive
        request = getattr(requestor, "primitive", None)
        if request is not None and getattr(request, "called_ae_title", None):
            called = str(request.called_ae_title).strip()
        return calling, called, f"{requestor.address}:{requestor.port}"

    def _on_accepted(self, event: Any) -> None:
        calling, called, peer = self._peer(event)
        self.metrics.association_accepted()
        self._audit("association_accepted", calling, called, peer)

    def _on_rejected(self, event: Any) -> None:
        calling, called, peer = self._peer(event)
        reason = "rejected"
        if self.listener is not None:
            if self.listener.allow_aet and calling not in self.listener.allow_aet:
                reason = "calling AE title not allowed"
            elif self.listener.require_called_aet and called != self.listener.ae_title:
                reason = "called AE title is not ours"
        self.metrics.association_rejected(reason.replace(" ", "_"))
        self._audit("association_rejected", calling, called, peer, reason)

    def _on_ended(self, event: Any) -> None:
        calling, _, _ = self._peer(event)
        self.flush(f"dimse:{calling}")

    def wrap_stow_routes(self, router: Router, prefix: str = "/dicomweb") -> int:
        """Audit each STOW-RS request's instances when it ends; returns how many routes were wrapped."""
        wrapped = 0
        for route in router.routes:
            if route.method == "POST" and route.pattern.pattern.startswith(prefix):
                route.handler = self._stow_wrapper(route.handler)
                wrapped += 1
        return wrapped

    def _stow_wrapper(self, handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def wrapped(request: Request) -> Response:
            try:
                return handler(request)
            finally:
                self.flush(f"stow:{request.client}")

        return wrapped

    # -- jobs -------------------------------------------------------------------------
    def job_started(self, job: Job) -> None:
        """A worker took ``job``."""
        self._audit("job_started", job.id, job.study_uid)

    def job_processed(self, job_id: int, study_uid: str, result: dict[str, Any], destinations: list[str],
                      seconds: float | None = None) -> None:
        """A job's results are written; stage timings become histogram observations."""
        report = result.get("report") or {}
        timings = report.get("timings_s") if isinstance(report, dict) else None
        if isinstance(timings, dict):
            self.metrics.observe_stages({k: v for k, v in timings.items() if k != "total"
                                         and isinstance(v, (int, float))})
        now = time.monotonic()
        with self._lock:
            self._export_started[job_id] = now
        if not destinations:
            self.job_done(job_id, study_uid, result.get("result_uids", []), seconds)

    def job_done(self, job_id: int, study_uid: str, outputs: list[str], seconds: float | None = None) -> None:
        """A job ended ``done``."""
        self.metrics.job_finished("done")
        self._audit("job_finished", job_id, study_uid, seconds or 0.0, outputs)

    def job_failed(self, job_id: int, study_uid: str, reason: str) -> None:
        """A job ended ``failed``."""
        self.metrics.job_finished("failed")
        self._audit("job_failed", job_id, study_uid, reason)

    # -- exports ----------------------------------------------------------------------
    def export_sent(self, job_id: int, destination: str, study_uid: str, uids: list[str]) -> None:
        """Results reached ``destination``."""
        self.metrics.export_attempt(destination, "sent")
        with self._lock:
            started = self._export_started.get(job_id)
        if started is not None:
            self.metrics.observe_stage("export", time.monotonic() - started)
        dest = self.destinations.get(destination)
        target = ""
        if dest is not None:
            target = dest.url or f"{dest.ae_title}@{dest.host}:{dest.port}"
        self._audit("results_sent", job_id, destination, study_uid, uids, target=target)

    def export_retry(self, destination: str) -> None:
        """A transient failure; the export is retried later."""
        self.metrics.export_attempt(destination, "transient")
        self.metrics.export_retry(destination)

    def export_failed(self, job_id: int, destination: str, reason: str) -> None:
        """An export failed for good."""
        self.metrics.export_attempt(destination, "failed")
        self._audit("results_send_failed", job_id, destination, reason)


class ObservedIngest(Ingest):
    """:class:`Ingest` that reports stored and refused instances to a :class:`NodeObserver`."""

    def __init__(self, observer: NodeObserver, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.observer = observer

    def store(self, part10: bytes, source: str, expected_study: str | None = None) -> IngestResult:
        """Store as :meth:`Ingest.store` does, then report it."""
        try:
            result = super().store(part10, source, expected_study)
        except IngestRejected as exc:
            self.observer.refused(exc.status)
            raise
        rows = self.index.query("SELECT modality FROM series WHERE series_uid=?", (result.series_uid,))
        modality = (rows[0]["modality"] if rows else "") or ""
        new_study = not result.duplicate and self.index.study_instance_count(result.study_uid) == 1
        self.observer.stored(result, modality, len(part10), source, new_study)
        return result


class ObservedJobQueue(JobQueue):
    """:class:`JobQueue` that reports job and export transitions to a :class:`NodeObserver`."""

    def __init__(self, index: Any, observer: NodeObserver) -> None:
        super().__init__(index)
        self.observer = observer

    def claim(self) -> Job | None:
        job = super().claim()
        if job is not None:
            self.observer.job_started(job)
        return job

    def record_failed(self, study_uid: str, generation: int, reason: str) -> int:
        job_id = super().record_failed(study_uid, generation, reason)
        self.observer.job_failed(job_id, study_uid, reason)
        return job_id

    def processed(self, job_id: int, result: dict[str, Any], destinations: list[str]) -> None:
        super().processed(job_id, result, destinations)
        job = self.job(job_id)
        self.observer.job_processed(job_id, job.study_uid if job else "", result, destinations,
                                    self._duration(job_id))

    def fail(self, job_id: int, reason: str) -> None:
        super().fail(job_id, reason)
        job = self.job(job_id)
        self.observer.job_failed(job_id, job.study_uid if job else "", reason)

    def export_sent(self, export_id: int, sent_uids: list[str]) -> None:
        super().export_sent(export_id, sent_uids)
        row, job = self._export_and_job(export_id)
        self.observer.export_sent(row["job_id"], row["destination"], job.study_uid if job else "", sent_uids)
        self._job_ended(job)

    def export_retry(self, export_id: int, reason: str, next_at: float) -> None:
        super().export_retry(export_id, reason, next_at)
        row, _ = self._export_and_job(export_id)
        self.observer.export_retry(row["destination"])

    def export_failed(self, export_id: int, reason: str) -> None:
        super().export_failed(export_id, reason)
        row, job = self._export_and_job(export_id)
        self.observer.export_failed(row["job_id"], row["destination"], reason)
        self._job_ended(job)

    def _duration(self, job_id: int) -> float | None:
        """Seconds from a job's start to its last update."""
        rows = self.index.query("SELECT started, updated FROM jobs WHERE id=?", (job_id,))
        if not rows or rows[0]["started"] is None:
            return None
        return max(0.0, float(rows[0]["updated"]) - float(rows[0]["started"]))

    def _export_and_job(self, export_id: int) -> tuple[dict[str, Any], Job | None]:
        row = self.index.query("SELECT * FROM exports WHERE id=?", (export_id,))[0]
        return row, self.job(row["job_id"])

    def _job_ended(self, job: Job | None) -> None:
        """After the last export of a job: report the job's final state."""
        if job is None:
            return
        current = self.job(job.id)
        if current is None or current.state not in ("done", "failed"):
            return
        if current.state == "done":
            self.observer.job_done(current.id, current.study_uid, current.result_uids, self._duration(job.id))
        else:
            self.observer.job_failed(current.id, current.study_uid, current.reason or "")
