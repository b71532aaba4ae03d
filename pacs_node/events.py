"""In-process event hooks, so the audit log, metrics and dashboard can observe the node without patching it.

Events and their keyword arguments (who emits them):

- ``association_accepted`` (calling_ae, called_ae, peer): listener
- ``association_rejected`` (calling_ae, called_ae, peer, reason): listener
- ``association_ended`` (calling_ae, called_ae, peer): listener, when released or aborted
- ``instance_stored`` (study_uid, series_uid, sop_uid, modality, size, source, duplicate, seconds): ingest
- ``instance_refused`` (source, status, reason): ingest
- ``study_received`` (study_uid, source): ingest, for the first instance of a study
- ``stow_request`` (source, status): STOW-RS service, after each request (whatever its outcome)
- ``job_started`` (job_id, study_uid): worker
- ``job_finished`` (job_id, study_uid, seconds, result_uids, report, timings): worker, when the
  results are written (``timings``: the report's stage seconds, without ``total``)
- ``job_done`` (job_id, study_uid, seconds, result_uids): job queue, when a job ends done (after its exports)
- ``job_failed`` (job_id, study_uid, reason): job queue, when a job ends failed (processing or export)
- ``export_sent`` (job_id, destination, target, study_uid, sop_uids, seconds): exporter
- ``export_retry`` (job_id, destination, reason, delay): exporter
- ``export_failed`` (job_id, destination, reason): exporter

Subscribers run in the emitting thread (a listener association, an HTTP
request, a dispatcher or the exporter), so they must be quick.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Subscriber = Callable[..., None]


class NodeEvents:
    """Subscribers per event name; a failing subscriber is logged, never breaks the node."""

    def __init__(self) -> None:
        self._subs: dict[str, list[Subscriber]] = defaultdict(list)
        self._lock = threading.Lock()

    def subscribe(self, event: str, fn: Subscriber) -> None:
        """Call ``fn(**kwargs)`` whenever ``event`` is emitted."""
        with self._lock:
            self._subs[event].append(fn)

    def emit(self, event: str, **kwargs: Any) -> None:
        """Tell every subscriber of ``event``."""
        with self._lock:
            subs = list(self._subs.get(event, ()))
        for fn in subs:
            try:
                fn(**kwargs)
            except Exception:
                log.exception("event subscriber of %s failed", event)
