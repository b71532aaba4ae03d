"""Turns the node's events (:mod:`pacs_node.events`) into metric updates and audit lines.

The node's parts know nothing of metrics or auditing: they emit events on a
:class:`~pacs_node.events.NodeEvents` bus, and :meth:`NodeObserver.subscribe`
connects a :class:`~pacs_node.metrics.NodeMetrics` and an
:class:`~pacs_node.audit.AuditLog` to it. Instances stored are audited once
per series and association (or per STOW request), not once per instance.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pacs_node.audit import AuditError, AuditLog, SeriesTally
from pacs_node.events import NodeEvents
from pacs_node.metrics import NodeMetrics

log = logging.getLogger(__name__)

_REFUSAL_REASONS = {0xA700: "out_of_resources", 0xA900: "dataset_mismatch", 0xC000: "cannot_understand",
                    0x0122: "sop_class_not_supported"}


class NodeObserver:
    """Subscriber of node events that updates ``metrics`` and writes ``audit`` (None: metrics only)."""

    def __init__(self, metrics: NodeMetrics, audit: AuditLog | None) -> None:
        self.metrics = metrics
        self.audit = audit
        self._local = threading.local()
        self._export_started: dict[int, float] = {}
        self._lock = threading.Lock()

    def subscribe(self, events: NodeEvents) -> None:
        """Listen to every event this observer turns into metrics or audit lines."""
        for name in ("association_accepted", "association_rejected", "association_ended", "instance_stored",
                     "instance_refused", "study_received", "stow_request", "job_started", "job_finished",
                     "job_done", "job_failed", "export_sent", "export_retry", "export_failed"):
            events.subscribe(name, getattr(self, f"on_{name}"))

    def _audit(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Write an audit event; a failing audit write is logged, never breaks the node."""
        if self.audit is None:
            return
        try:
            getattr(self.audit, method)(*args, **kwargs)
        except (OSError, AuditError) as exc:
            log.error("audit log write failed (%s): %s", method, exc)

    # -- storage (counted now, audited when the association or STOW request ends) ---------
    def _tally(self) -> tuple[SeriesTally, dict[str, int]]:
        """This thread's stored and refused counts (one association or request per thread)."""
        if not hasattr(self._local, "tally"):
            self._local.tally, self._local.refused = SeriesTally(), {}
        return self._local.tally, self._local.refused

    def on_instance_stored(self, study_uid: str, series_uid: str, modality: str, size: int, source: str,
                           **_: Any) -> None:
        transport = "stow" if source.startswith("stow") else "dimse"
        self.metrics.instance_received(transport, size)
        self._tally()[0].add(study_uid, series_uid, modality or "", size)

    def on_study_received(self, **_: Any) -> None:
        self.metrics.study_received()

    def on_instance_refused(self, status: int, **_: Any) -> None:
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

    def on_stow_request(self, source: str, **_: Any) -> None:
        self.flush(source)

    # -- associations ---------------------------------------------------------------------
    def on_association_accepted(self, calling_ae: str, called_ae: str, peer: str, **_: Any) -> None:
        self.metrics.association_accepted()
        self._audit("association_accepted", calling_ae, called_ae, peer)

    def on_association_rejected(self, calling_ae: str, called_ae: str, peer: str, reason: str = "rejected",
                                **_: Any) -> None:
        self.metrics.association_rejected(reason.replace(" ", "_"))
        self._audit("association_rejected", calling_ae, called_ae, peer, reason)

    def on_association_ended(self, calling_ae: str, **_: Any) -> None:
        self.flush(f"dimse:{calling_ae}")

    # -- jobs -----------------------------------------------------------------------------
    def on_job_started(self, job_id: int, study_uid: str, **_: Any) -> None:
        self._audit("job_started", job_id, study_uid)

    def on_job_finished(self, job_id: int, timings: dict[str, float] | None = None, **_: Any) -> None:
        """Results written: stage timings become histogram observations; the export stage starts."""
        self.metrics.observe_stages(timings or {})
        with self._lock:
            self._export_started[job_id] = time.monotonic()

    def on_job_done(self, job_id: int, study_uid: str, seconds: float, result_uids: list[str], **_: Any) -> None:
        with self._lock:
            self._export_started.pop(job_id, None)
        self.metrics.job_finished("done")
        self._audit("job_finished", job_id, study_uid, seconds or 0.0, result_uids)

    def on_job_failed(self, job_id: int, study_uid: str, reason: str, **_: Any) -> None:
        with self._lock:
            self._export_started.pop(job_id, None)
        self.metrics.job_finished("failed")
        self._audit("job_failed", job_id, study_uid, reason)

    # -- exports --------------------------------------------------------------------------
    def on_export_sent(self, job_id: int, destination: str, sop_uids: list[str], study_uid: str = "",
                       target: str = "", **_: Any) -> None:
        self.metrics.export_attempt(destination, "sent")
        with self._lock:
            started = self._export_started.get(job_id)
        if started is not None:
            self.metrics.observe_stage("export", time.monotonic() - started)
        self._audit("results_sent", job_id, destination, study_uid, sop_uids, target=target)

    def on_export_retry(self, destination: str, **_: Any) -> None:
        self.metrics.export_attempt(destination, "transient")
        self.metrics.export_retry(destination)

    def on_export_failed(self, job_id: int, destination: str, reason: str, **_: Any) -> None:
        self.metrics.export_attempt(destination, "failed")
        self._audit("results_send_failed", job_id, destination, reason)
