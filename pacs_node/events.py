"""In-process event hooks, so the audit log, metrics and dashboard can observe the node without patching it.

Events and their keyword arguments:

- ``association_accepted`` (calling_ae, called_ae, peer)
- ``association_rejected`` (calling_ae, called_ae, peer)
- ``instance_stored`` (study_uid, series_uid, sop_uid, modality, size, source, duplicate, seconds)
- ``instance_refused`` (source, status, reason)
- ``job_started`` (job_id, study_uid)
- ``job_finished`` (job_id, study_uid, seconds, result_uids, report, timings)
- ``job_failed`` (job_id, study_uid, reason)
- ``export_sent`` (job_id, destination, sop_uids, seconds)
- ``export_retry`` (job_id, destination, reason, delay)
- ``export_failed`` (job_id, destination, reason)
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
