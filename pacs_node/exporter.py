"""Background sender of finished jobs' results, following the retry schedule in the index."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from pacs_node.config import Destination, ExportConfig
from pacs_node.events import NodeEvents
from pacs_node.export import PermanentExportError, TransientExportError, backoff_delay, send_files
from pacs_node.jobs import JobQueue
from pipeline.errors import IgtvError

log = logging.getLogger(__name__)


class Exporter:
    """Sends due exports; transient failures are rescheduled with capped backoff, permanent ones fail."""

    def __init__(self, jobs: JobQueue, cfg: ExportConfig, calling_ae: str, poll_s: float = 0.5,
                 events: NodeEvents | None = None) -> None:
        self.events = events or NodeEvents()
        self.jobs = jobs
        self.cfg = cfg
        self.calling_ae = calling_ae
        self.destinations: dict[str, Destination] = {d.name: d for d in cfg.destinations}
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="igtv-export", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(self.cfg.timeout_s + 5)

    def run_due(self, now: float | None = None) -> int:
        """Attempt every due export once; return how many were attempted."""
        now = time.time() if now is None else now
        due = self.jobs.due_exports(now)
        for row in due:
            if self._stop.is_set():
                break
            self._attempt(row, now)
        return len(due)

    def _attempt(self, row: dict, now: float) -> None:
        what = {"job_id": row["job_id"], "destination": row["destination"]}
        dest = self.destinations.get(row["destination"])
        if dest is None:
            self._fail(row["id"], f"destination {row['destination']!r} is no longer configured", what)
            return
        job = self.jobs.job(row["job_id"])
        files = [Path(p) for p in job.dicom_outputs] if job else []
        missing = [str(p) for p in files if not p.exists()]
        if not files or missing:
            self._fail(row["id"], f"result files missing: {missing or 'none recorded'}", what)
            return
        attempt = row["attempts"] + 1
        start = time.perf_counter()
        try:
            sent = send_files(dest, files, self.cfg, self.calling_ae)
        except TransientExportError as exc:
            if attempt >= self.cfg.max_attempts:
                self._fail(row["id"], f"{exc} (gave up after {attempt} attempts)", what)
                log.error("export of job %d to %s failed for good: %s", row["job_id"], dest.name, exc)
            else:
                delay = backoff_delay(attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
                self.jobs.export_retry(row["id"], str(exc), now + delay)
                self.events.emit("export_retry", reason=str(exc), delay=delay, **what)
                log.warning("export of job %d to %s: %s; retry in %.1f s", row["job_id"], dest.name, exc, delay)
            return
        except (PermanentExportError, IgtvError, OSError) as exc:
            self._fail(row["id"], str(exc), what)
            log.error("export of job %d to %s failed: %s", row["job_id"], dest.name, exc)
            return
        except Exception as exc:  # a bug or a broken destination: record it once instead of looping on it
            self._fail(row["id"], f"unexpected {type(exc).__name__}: {exc}", what)
            log.exception("export of job %d to %s failed unexpectedly", row["job_id"], dest.name)
            return
        seconds = time.perf_counter() - start
        self.events.emit("export_sent", sop_uids=sent, seconds=seconds, study_uid=job.study_uid,
                         target=dest.url or f"{dest.ae_title}@{dest.host}:{dest.port}", **what)
        self.jobs.export_sent(row["id"], sent)
        log.info("job %d: sent %d result(s) to %s", row["job_id"], len(sent), dest.name)

    def _fail(self, export_id: int, reason: str, what: dict) -> None:
        """An export failed for good: record it, then tell subscribers."""
        self.jobs.export_failed(export_id, reason)
        self.events.emit("export_failed", reason=reason, **what)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_due()
            except Exception:
                log.exception("export loop failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()
