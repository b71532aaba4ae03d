"""Study completion: a study is complete when nothing arrived for stable-age seconds and it holds PET and CT."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection

from pacs_node.index import Index
from pacs_node.jobs import JobQueue

log = logging.getLogger(__name__)

PET_MODALITIES = {"PT"}
CT_MODALITIES = {"CT"}


def missing_modalities(modalities: list[str]) -> list[str]:
    """Which of PET and CT a study still lacks."""
    have = set(modalities)
    missing = []
    if not have & PET_MODALITIES:
        missing.append("PET")
    if not have & CT_MODALITIES:
        missing.append("CT")
    return missing


def scan_once(index: Index, jobs: JobQueue, stable_age_s: float, now: float | None = None,
              receiving: Collection[str] = ()) -> list[str]:
    """Queue a job for every study that settled since its last job; return their UIDs.

    A settled study without PET or CT gets a failed job whose reason says what
    is missing; a late series re-opens it (its generation rises again). Studies in
    ``receiving`` have acknowledged instances not in the index yet: they wait.
    """
    now = time.time() if now is None else now
    queued: list[str] = []
    for row in index.pending_studies():
        if now - row["last_received"] < stable_age_s or row["study_uid"] in receiving:
            continue
        study = index.study(row["study_uid"])
        if study is None:  # pragma: no cover - rows are never deleted
            continue
        generation = row["generation"]
        missing = missing_modalities(study["modalities"])
        if missing:
            reason = (
                f"study has no {' and no '.join(missing)} series after {stable_age_s:.0f} s without new "
                f"instances (received: {', '.join(study['modalities']) or 'nothing usable'}); "
                "send the missing series to re-open it"
            )
            jobs.record_failed(row["study_uid"], generation, reason)
            log.warning("study %s incomplete: %s", row["study_uid"], reason)
            continue
        job_id = jobs.enqueue(row["study_uid"], generation)
        log.info("study %s complete (%d instances): job %d queued", row["study_uid"], study["instance_count"], job_id)
        queued.append(row["study_uid"])
    return queued


class CompletionScanner:
    """Background thread calling :func:`scan_once` periodically."""

    def __init__(self, index: Index, jobs: JobQueue, stable_age_s: float,
                 on_queued: Callable[[], None] | None = None,
                 receiving: Callable[[], Collection[str]] = frozenset) -> None:
        self.index = index
        self.jobs = jobs
        self.stable_age_s = float(stable_age_s)
        self.on_queued = on_queued
        self.receiving = receiving  # studies with acknowledged instances not yet indexed
        self.interval = min(1.0, max(0.1, self.stable_age_s / 4))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="igtv-completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if scan_once(self.index, self.jobs, self.stable_age_s,
                             receiving=self.receiving()) and self.on_queued:
                    self.on_queued()
            except Exception:
                log.exception("completion scan failed")
