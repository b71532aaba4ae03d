"""Runs studies through the processing function in separate worker processes.

The listener never waits for inference: a dispatcher thread per worker takes a
job from the persistent queue and hands it to a ``spawn`` process pool; the
process imports the processing function (``module:function``, by default
``pipeline.process:process_study``) and returns plain data.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import multiprocessing
import os
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from pacs_node.events import NodeEvents
from pacs_node.index import Index
from pacs_node.jobs import Job, JobQueue, stage_timings
from pacs_node.spool import Spool
from pipeline.errors import IgtvError, PipelineError
from pipeline.settings import ProcessSettings

log = logging.getLogger(__name__)

MAX_CRASHES = 2  # a job whose worker process dies this often fails instead of looping


class WorkerError(IgtvError):
    """The processing function cannot be loaded."""


def load_process_function(spec: str) -> Callable[..., Any]:
    """Import ``module:function``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise WorkerError(f"worker.process_function {spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WorkerError(f"cannot import {module_name} for worker.process_function: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise WorkerError(f"{module_name} has no function {attr!r}") from None


class JobProgress:
    """Progress callback ``(stage, fraction)`` that writes a job's stage into the index.

    Built in the node process and pickled to the worker process, where it
    opens its own connection to the (WAL) index on the first call. It keeps
    the seconds of each stage that ended (a stage ends when the next begins).
    """

    def __init__(self, index_path: str, job_id: int) -> None:
        self.index_path = str(index_path)
        self.job_id = int(job_id)
        self._queue: JobQueue | None = None
        self._stage: str | None = None
        self._since = 0.0
        self.timings: dict[str, float] = {}

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        if stage != self._stage:
            if self._stage is not None:
                self.timings[self._stage] = round(now - self._since, 3)
            self._stage, self._since = stage, now
        try:
            if self._queue is None:
                self._queue = JobQueue(Index(Path(self.index_path)))
            self._queue.set_progress(self.job_id, stage, fraction, self.timings)
        except (sqlite3.Error, IgtvError, OSError) as exc:  # progress is informative: never fail the job
            log.warning("job %d: cannot record progress (%s): %s", self.job_id, stage, exc)

    def close(self) -> None:
        """Close the index connection (in the process that used it)."""
        if self._queue is not None:
            self._queue.index.close()
            self._queue = None


def _takes_progress(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` accepts a ``progress`` keyword (process_study does; simple stand-ins may not)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "progress" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def run_study(process_spec: str, paths: list[str], out_dir: str, settings: ProcessSettings,
              progress: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Process one study and return plain data (runs in the worker process, or in-process for replay).

    ``progress(stage, fraction)`` is passed on to a processing function that takes it.
    Returns ``{"ok": True, ...result}`` or ``{"ok": False, "reason": ..., "expected": bool}``;
    ``expected`` is True for the pipeline's bad-input errors (no stack trace needed).
    """
    from pydicom import dcmread

    try:
        process = load_process_function(process_spec)
        extra = {"progress": progress} if progress is not None and _takes_progress(process) else {}
        result = process([Path(p) for p in paths], Path(out_dir), settings, **extra)
    except PipelineError as exc:
        return {"ok": False, "reason": str(exc), "expected": True, "error": type(exc).__name__}
    except IgtvError as exc:
        return {"ok": False, "reason": str(exc), "expected": True, "error": type(exc).__name__}
    except Exception as exc:  # a bug or a broken input the pipeline did not anticipate
        return {"ok": False, "reason": f"internal error: {type(exc).__name__}: {exc}", "expected": False,
                "error": type(exc).__name__, "traceback": traceback.format_exc()}
    finally:
        close = getattr(progress, "close", None)
        if callable(close):
            close()
    dicom_outputs = [str(p) for p in result.dicom_outputs]
    return {
        "ok": True,
        "study_instance_uid": str(result.study_instance_uid),
        "out_dir": str(result.out_dir),
        "outputs": [str(p) for p in result.outputs],
        "dicom_outputs": dicom_outputs,
        "result_uids": [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in dicom_outputs],
        "report": result.report,
        "found": list(result.found),
        "skipped": [list(s) for s in result.skipped],
    }


def _init_worker(torch_threads: int) -> None:
    """Limit the threads of numeric libraries in the worker process."""
    if torch_threads > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(torch_threads)
        try:
            import torch

            torch.set_num_threads(torch_threads)
        except ImportError:  # torch is only needed by the real pipeline
            pass


def _warm(process_spec: str) -> bool:
    """Import the processing function in the worker process ahead of the first job."""
    try:
        load_process_function(process_spec)
    except IgtvError:
        return False
    return True


class WorkerPool:
    """Dispatcher threads feeding a ``spawn`` process pool from the job queue.

    Parameters
    ----------
    jobs, spool:
        The persistent queue and the spool holding inputs.
    results_dir:
        Results land in ``results_dir/<StudyUID>/`` (a re-run replaces them).
    settings:
        Passed to the processing function.
    destinations:
        Names of the export destinations (each finished job gets one export per name).
    process_spec:
        ``module:function`` of the processing function.
    workers, torch_threads:
        Number of worker processes; thread limit inside each.
    on_processed:
        Called after a job's results are recorded (wakes the exporter).
    events:
        Receives job_started and job_finished (the job queue emits job_done and job_failed).
    """

    def __init__(self, jobs: JobQueue, spool: Spool, results_dir: Path, settings: ProcessSettings,
                 destinations: list[str], process_spec: str, workers: int = 1, torch_threads: int = 0,
                 poll_s: float = 0.5, on_processed: Callable[[], None] | None = None,
                 events: NodeEvents | None = None) -> None:
        self.events = events or NodeEvents()
        self.jobs = jobs
        self.spool = spool
        self.results_dir = Path(results_dir)
        self.settings = settings
        self.destinations = list(destinations)
        self.process_spec = process_spec
        self.workers = max(1, int(workers))
        self.torch_threads = int(torch_threads)
        self.poll_s = poll_s
        self.on_processed = on_processed
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pool_lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._busy: set[int] = set()  # ids of jobs being processed now

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(self.torch_threads,),
        )
        pool.submit(_warm, self.process_spec)
        return pool

    def _get_pool(self) -> ProcessPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = self._new_pool()
            return self._pool

    def start(self) -> None:
        """Resume unfinished jobs and start the dispatcher threads."""
        resumed = self.jobs.resume_unfinished()
        if resumed:
            log.info("resuming %d unfinished job(s)", resumed)
        self._get_pool()
        for i in range(self.workers):
            t = threading.Thread(target=self._loop, name=f"igtv-dispatch-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        """A job was queued: look now instead of at the next poll."""
        self._wake.set()

    def running_jobs(self) -> list[int]:
        """Ids of the jobs being processed right now."""
        return sorted(self._busy)

    def alive(self) -> bool:
        """True while the dispatcher threads run."""
        return any(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; a running job is abandoned to be resumed on the next start."""
        self._stop.set()
        self._wake.set()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.jobs.claim()
            except Exception:  # the index is busy or broken: do not kill the thread
                log.exception("cannot claim a job")
                job = None
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            self._busy.add(job.id)
            try:
                self._run(job)
            except Exception:
                log.exception("job %d of study %s: unexpected dispatcher error", job.id, job.study_uid)
                if not self._stop.is_set():
                    self.jobs.fail(job.id, "internal error in the dispatcher; see the node log")
            finally:
                self._busy.discard(job.id)

    def _run(self, job: Job) -> None:
        restored = self.spool.restore(job.study_uid)
        if restored:
            log.info("study %s: %d quarantined instance(s) back in the spool for a re-run", job.study_uid, restored)
        paths = [str(p) for p in self.spool.study_files(job.study_uid)]
        out_dir = self.results_dir / job.study_uid
        log.info("job %d: processing study %s (%d instances, attempt %d)", job.id, job.study_uid, len(paths),
                 job.attempts)
        self.events.emit("job_started", job_id=job.id, study_uid=job.study_uid)
        start = time.perf_counter()
        try:
            progress = JobProgress(str(self.jobs.index.path), job.id)
            future = self._get_pool().submit(run_study, self.process_spec, paths, str(out_dir), self.settings,
                                             progress)
            result = future.result()
        except (BrokenProcessPool, RuntimeError) as exc:
            if self._stop.is_set():
                return  # shutting down: the job stays 'running' and resumes on restart
            with self._pool_lock:
                self._pool = None
            if job.attempts >= MAX_CRASHES:
                reason = f"worker process died {job.attempts} times on this study ({exc}); inputs quarantined"
                self.spool.quarantine(job.study_uid, reason)
                self.jobs.fail(job.id, reason)
            else:
                log.warning("job %d: worker process died (%s); re-queued", job.id, exc)
                self.jobs.requeue(job.id, f"worker process died: {exc}")
            return
        if self._stop.is_set():
            return
        if not result["ok"]:
            if not result["expected"]:
                log.error("job %d: %s\n%s", job.id, result["reason"], result.get("traceback", ""))
            else:
                log.warning("job %d: study %s failed: %s", job.id, job.study_uid, result["reason"])
            self.spool.quarantine(job.study_uid, result["reason"])
            self.jobs.fail(job.id, result["reason"])
            return
        report = result.get("report") or {}
        # before the queue records it: subscribers see job_finished ahead of the exports and job_done
        self.events.emit("job_finished", job_id=job.id, study_uid=job.study_uid,
                         seconds=time.perf_counter() - start, result_uids=result["result_uids"], report=report,
                         timings=stage_timings(report))
        self.jobs.processed(job.id, result, self.destinations)
        if self.on_processed:
            self.on_processed()
        log.info("job %d: study %s processed, %d result(s)%s", job.id, job.study_uid, len(result["dicom_outputs"]),
                 ", exporting" if self.destinations else "")
