"""``igtv-node serve``: wires listener, HTTP server, completion, workers and exporter together."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
from pathlib import Path
from typing import TextIO

from pacs_node.audit import AuditLog
from pacs_node.completion import CompletionScanner
from pacs_node.config import NodeConfig
from pacs_node.dashboard import Dashboard
from pacs_node.events import NodeEvents
from pacs_node.exporter import Exporter
from pacs_node.http import HttpServer, Response, Router
from pacs_node.index import Index
from pacs_node.ingest import Ingest
from pacs_node.jobs import JobQueue
from pacs_node.journal import AckJournal
from pacs_node.listener import STORAGE_SOP_CLASSES, Listener
from pacs_node.metrics import NodeMetrics
from pacs_node.observability import NodeObserver
from pacs_node.reconcile import reconcile_spool
from pacs_node.spool import Spool
from pacs_node.stow import StowService
from pacs_node.worker import WorkerPool
from pipeline.errors import IgtvError

log = logging.getLogger(__name__)

#: The worker's process function whose model ``serve`` checks before it starts.
PIPELINE_PROCESS = "pipeline.process:"


class NodeStartError(IgtvError):
    """The node cannot start: its data directory, a port, or its model is not usable."""


def lock_data_dir(data: Path) -> TextIO:
    """Create ``data`` and hold an exclusive lock on it for this process (released on exit).

    Raises
    ------
    NodeStartError
        The folder cannot be created, or another node holds it.
    """
    try:
        data.mkdir(parents=True, exist_ok=True)
        handle = open(data / "node.lock", "a+", encoding="ascii")
    except OSError as exc:
        raise NodeStartError(f"cannot use the data directory {data}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise NodeStartError(f"the data directory {data} is in use by another igtv-node (process {owner}); "
                             f"stop it or give this one another --data-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


class NodeServer:
    """All parts of a running node; :meth:`start` returns once everything listens.

    Attributes for extensions (dashboard, metrics, audit): ``cfg``, ``events`` (subscribe
    to :mod:`pacs_node.events` before :meth:`start`), ``spool``, ``index``, ``jobs``,
    ``ingest``, ``listener``, ``router`` (add HTTP routes before :meth:`start`), ``http``,
    ``workers``, ``exporter``.
    """

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        data = Path(cfg.spool.data_dir)
        if cfg.worker.process_function.startswith(PIPELINE_PROCESS):
            from pipeline.process import check_model

            check_model(cfg.processing.checkpoint, cfg.processing.device)
        self._lock = lock_data_dir(data)  # before the journal replay: one node per data directory
        self.data_dir = data
        self.events = NodeEvents()
        self.spool = Spool(data, cfg.spool.min_free_mb)
        self.index = Index(data / "index.sqlite")
        # metrics and audit trail: subscribers of the event bus
        self.metrics = NodeMetrics()
        self.audit = AuditLog(data / "audit.jsonl")
        self.observer = NodeObserver(self.metrics, self.audit)
        self.observer.subscribe(self.events)
        self.jobs = JobQueue(self.index, events=self.events)
        self.ingest = Ingest(
            self.spool, self.index,
            max_instance_bytes=int(cfg.listener.max_instance_mb * 1024 * 1024),
            max_instances_per_study=cfg.listener.max_instances_per_study, events=self.events,
            sop_classes=[str(c) for c in STORAGE_SOP_CLASSES],
            journal=AckJournal(data / "journal", segment_bytes=cfg.spool.journal_segment_mb << 20)
            if cfg.spool.journal else None,
        )
        # before anything listens: what a crash left in the journal, then rows a power loss took
        self.ingest.replay_journal()
        reconcile_spool(self.spool, self.index)
        self.listener = Listener(cfg.listener, self.ingest)
        self.router = Router()
        StowService(self.ingest).register(self.router)
        self.router.add("GET", r"/health", self._health, auth=False)
        # a STOW body may carry a whole study: allow twice the largest instance, in memory
        try:
            self.http = HttpServer(cfg.http.host, cfg.http.port, self.router, token=cfg.http.token,
                                   max_body=int(cfg.listener.max_instance_mb * 2 * 1024 * 1024))
        except OSError as exc:
            self._lock.close()
            raise NodeStartError(f"cannot listen for HTTP on {cfg.http.host}:{cfg.http.port} (http.port): "
                                 f"{exc.strerror or exc}") from None
        calling_ae = cfg.export.calling_ae_title or cfg.listener.ae_title
        self.exporter = Exporter(self.jobs, cfg.export, calling_ae, events=self.events)
        self.workers = WorkerPool(
            self.jobs, self.spool, data / "results", cfg.processing,
            destinations=[d.name for d in cfg.export.destinations],
            process_spec=cfg.worker.process_function, workers=cfg.worker.workers,
            torch_threads=cfg.worker.torch_threads, on_processed=self.exporter.wake, events=self.events,
        )
        self.completion = CompletionScanner(self.index, self.jobs, cfg.spool.stable_age_s,
                                            on_queued=self.workers.wake, receiving=self.ingest.unapplied_studies)
        Dashboard(
            self.index, self.jobs, destinations=[d.name for d in cfg.export.destinations],
            node_name=cfg.listener.ae_title, audit_path=self.audit.path, metrics=self.metrics,
            wake_workers=self.workers.wake, wake_exporter=self.exporter.wake,
        ).register(self.router)
        self.metrics.bind_job_counts(lambda: Dashboard.job_counts_of(self.index))
        self.metrics.bind_spool_free(lambda: self.spool.free_mb() * 1024 * 1024)
        self._started = False

    def _health(self, request) -> Response:
        ok_disk = self.spool.free_mb() >= self.spool.min_free_mb
        body = {"listener": self.listener._server is not None, "worker": self.workers.alive(),
                "disk_ok": ok_disk, "spool_free_mb": round(self.spool.free_mb(), 1)}
        return Response.json(body, 200 if all((body["listener"], body["worker"], ok_disk)) else 503)

    @property
    def dimse_port(self) -> int:
        return self.listener.port

    @property
    def http_port(self) -> int:
        return self.http.port

    def start(self) -> None:
        """Start workers, exporter, completion scanner, then the listeners."""
        self.ingest.start()
        self.workers.start()
        self.exporter.start()
        self.completion.start()
        try:
            self.listener.start()
        except OSError as exc:
            self._stop_parts((self.ingest, self.completion, self.workers, self.exporter))
            self.http.server.server_close()  # bound, never served
            self.index.close()
            self._lock.close()
            raise NodeStartError(f"cannot listen for DICOM on {self.cfg.listener.host}:{self.cfg.listener.port} "
                                 f"(listener.port): {exc.strerror or exc}") from None
        self.http.start()
        self._started = True
        log.info("igtv-node ready: DIMSE %s@%s:%d, HTTP %s:%d, data in %s", self.cfg.listener.ae_title,
                 self.cfg.listener.host, self.dimse_port, self.cfg.http.host, self.http_port, self.data_dir)

    def stop(self) -> None:
        """Stop accepting first, then background work; unfinished jobs resume on the next start."""
        if not self._started:
            self._lock.close()
            return
        self._started = False
        self._stop_parts((self.listener, self.http, self.ingest, self.completion, self.workers, self.exporter))
        self.index.close()
        self._lock.close()
        log.info("igtv-node stopped")

    @staticmethod
    def _stop_parts(parts: tuple) -> None:
        for part in parts:
            try:
                part.stop()
            except Exception:
                log.exception("stopping %s failed", type(part).__name__)


def run_server(cfg: NodeConfig) -> None:
    """Run the node until SIGTERM or SIGINT."""
    node = NodeServer(cfg)
    stop = threading.Event()

    def _signal(signum, frame) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    old = {s: signal.signal(s, _signal) for s in (signal.SIGTERM, signal.SIGINT)}
    node.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.stop()
        for s, h in old.items():
            signal.signal(s, h)
