"""Drive a real ``igtv-node serve`` subprocess: start, kill -9, restart; acknowledging SCU; recording SCP.

Shared by the crash, load and ingest scripts in ``benchmarks/`` and by ``tests/reliability``.
The node runs in its own process group so ``kill -9`` reaches its worker processes too
(what systemd does to a crashed unit's cgroup).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
NODE_TESTS = REPO / "tests" / "pacs_node"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# dcmtk's programs for the benchmarks, never pynetdicom's apps of the same names (re-exported)
from tests.system_tools import dcmtk  # noqa: E402, F401

#: Seconds the slow fake processing function sleeps (read per call, in the worker process).
DELAY_ENV = "IGTV_FAKE_PROCESS_DELAY_S"


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until truthy; raise ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts TCP connections on loopback ``port``."""
    def is_open() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False
    wait_for(is_open, timeout, f"port {port}")


def slow_fake_process(paths, out_dir, settings):
    """The node tests' fake processing (real SEG + RTSTRUCT, deterministic UIDs) after a delay.

    The delay (seconds, environment variable ``IGTV_FAKE_PROCESS_DELAY_S``) stands in for inference.
    """
    if str(NODE_TESTS) not in sys.path:
        sys.path.insert(0, str(NODE_TESTS))
    from nodetest_helpers import fake_process

    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    return fake_process(paths, out_dir, settings)


# -- the node as a subprocess ------------------------------------------------------------------


@dataclass
class NodeProcess:
    """One ``python -m pacs_node serve`` with a TOML config in ``work``.

    Parameters
    ----------
    work:
        Folder for the config, the log and (by default) the data dir.
    stable_age_s, process_delay_s:
        Study completion age; fake processing delay.
    destinations:
        ``NAME=AET@HOST:PORT`` strings.
    process_function:
        ``module:function`` run per study (default: the slow fake).
    extra_listener_toml, extra_spool_toml:
        Lines added to the ``[listener]`` and ``[spool]`` sections.
    extra_toml:
        Appended to the generated config (extra sections).
    """

    work: Path
    stable_age_s: float = 0.5
    process_delay_s: float = 0.0
    destinations: list[str] = field(default_factory=list)
    process_function: str = "nodeharness:slow_fake_process"
    ae_title: str = "IGTV"
    allow_aet: list[str] = field(default_factory=list)
    extra_listener_toml: str = ""
    extra_spool_toml: str = ""
    extra_toml: str = ""
    log_level: str = "INFO"
    port: int = 0
    http_port: int = 0
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.work = Path(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.work / "data"
        self.log_path = self.work / "node.log"

    def write_config(self) -> Path:
        """(Re)write ``node.toml`` with fresh free ports unless fixed."""
        self.port = self.port or free_port()
        self.http_port = self.http_port or free_port()
        dests = json.dumps(self.destinations)
        allow = json.dumps(self.allow_aet)
        text = f"""log_level = "{self.log_level}"
[listener]
ae_title = "{self.ae_title}"
host = "127.0.0.1"
port = {self.port}
allow_aet = {allow}
{self.extra_listener_toml}
[http]
host = "127.0.0.1"
port = {self.http_port}
[spool]
data_dir = "{self.data_dir}"
stable_age_s = {self.stable_age_s}
min_free_mb = 0
{self.extra_spool_toml}
[worker]
workers = 1
torch_threads = 1
process_function = "{self.process_function}"
[export]
destinations = {dests}
backoff_initial_s = 0.5
backoff_max_s = 2.0
max_attempts = 20
timeout_s = 10
{self.extra_toml}
"""
        path = self.work / "node.toml"
        path.write_text(text, encoding="utf-8")
        return path

    def env(self) -> dict[str, str]:
        paths = [str(REPO), str(HERE), str(NODE_TESTS)]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), DELAY_ENV: str(self.process_delay_s),
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def start(self, wait: bool = True, timeout: float = 60.0) -> NodeProcess:
        """Start the node (own process group); wait until ``/health`` answers 200."""
        cfg = self.write_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacs_node", "serve", "--config", str(cfg)],
            cwd=self.work, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            return self.healthy()
        wait_for(ready, timeout, "the node to answer /health")

    def kill9(self) -> None:
        """SIGKILL the node's whole process group (listener, dispatcher, worker processes)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self.proc = None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait; SIGKILL the group if it does not end in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        self.kill9()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_idle(self, timeout: float = 30.0, busy_cpu_s: float = 0.05, window_s: float = 0.5) -> float:
        """Wait until the node and its worker processes use under ``busy_cpu_s`` of CPU per ``window_s``.

        After ``/health`` answers, the worker process is still importing the processing function
        (torch for the real pipeline): a second or more of CPU that a node that has been up a while
        does not spend. Returns the seconds waited.
        """
        import psutil

        t0 = time.monotonic()

        def cpu() -> float:
            try:
                procs = [psutil.Process(self.proc.pid)] if self.proc else []
                procs += procs[0].children(recursive=True) if procs else []
            except psutil.Error:
                return 0.0
            total = 0.0
            for p in procs:
                try:
                    times = p.cpu_times()
                    total += times.user + times.system
                except psutil.Error:
                    pass
            return total

        before = cpu()
        while time.monotonic() - t0 < timeout:
            time.sleep(window_s)
            now = cpu()
            if now - before < busy_cpu_s:
                break
            before = now
        return time.monotonic() - t0

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- reading the node's state straight from its SQLite index (WAL: safe beside the node) --------
    def query(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        path = self.data_dir / "index.sqlite"
        if not path.exists():
            return []
        con = sqlite3.connect(path, timeout=30)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(sql, params).fetchall()]
        except sqlite3.OperationalError:  # schema not created yet
            return []
        finally:
            con.close()

    def indexed_uids(self) -> set[str]:
        return {r["sop_uid"] for r in self.query("SELECT sop_uid FROM instances")}

    def jobs(self, study_uid: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM jobs WHERE study_uid=? ORDER BY id", (study_uid,))

    def study(self, study_uid: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
        return rows[0] if rows else None

    def spool_files(self) -> dict[str, Path]:
        """SOPInstanceUID (file stem) -> path, for every instance file in the spool."""
        root = self.data_dir / "spool"
        return {p.stem: p for p in root.rglob("*.dcm") if ".tmp" not in p.parts} if root.is_dir() else {}

    def finished_job(self, study_uid: str, timeout: float = 90.0) -> dict[str, Any]:
        """Wait until the study's newest job is done or failed and the study is settled; return the job."""
        def settled() -> dict[str, Any] | None:
            if not self.alive():
                raise RuntimeError(f"node died; log:\n{self.log_tail()}")
            jobs = self.jobs(study_uid)
            st = self.study(study_uid)
            if jobs and st and jobs[-1]["state"] in ("done", "failed") and st["generation"] <= st["handled_generation"]:
                return jobs[-1]
            return None
        return wait_for(settled, timeout, f"the job of study {study_uid}", 0.2)


# -- a storage SCU that records what was acknowledged ------------------------------------------


#: :attr:`AckingScu.error` when a C-STORE got no response (the association was aborted).
NO_RESPONSE = "no response (aborted)"


class AckingScu:
    """Sends files in one association and records the SOP Instance UIDs answered with success.

    ``on_ack(count)`` is called after each acknowledged instance (e.g. to kill the node mid-association).
    """

    def __init__(self, port: int, aec: str = "IGTV", aet: str = "STORESCU",
                 on_ack: Callable[[int], None] | None = None, timeout: float = 20.0) -> None:
        self.port, self.aec, self.aet, self.on_ack, self.timeout = port, aec, aet, on_ack, timeout
        self.acked: list[str] = []
        self.statuses: dict[str, int] = {}
        self.error: str | None = None
        self.resent = 0

    def send(self, files: Iterable[Path], resend_unanswered: bool = False) -> list[str]:
        """Send ``files`` in one association; returns the acknowledged SOP Instance UIDs.

        ``resend_unanswered``: when a C-STORE gets no response (the association is
        aborted), send the instances not yet answered once more in a new association, as
        senders do. pynetdicom's requestor can lose a response to its own reactor thread
        under heavy CPU load (it then waits out the DIMSE timeout and aborts); ``resent``
        counts the instances sent again.
        """
        from pydicom import dcmread

        datasets = [dcmread(p) for p in files]
        self._send_once(datasets)
        if resend_unanswered and self.error == NO_RESPONSE:
            rest = [ds for ds in datasets if str(ds.SOPInstanceUID) not in self.statuses]
            self.resent, self.error = len(rest), None
            self._send_once(rest)
        return self.acked

    def _send_once(self, datasets: list[Any]) -> None:
        """Send ``datasets`` in one association, recording each answer."""
        from pynetdicom import AE

        ae = AE(ae_title=self.aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for cls, ts in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}):
            ae.add_requested_context(cls, ts)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.aec)
        if not assoc.is_established:
            self.error = "association not established"
            return
        try:
            for ds in datasets:
                try:
                    rsp = assoc.send_c_store(ds)
                except (RuntimeError, OSError, ValueError) as exc:
                    self.error = f"{type(exc).__name__}: {exc}"
                    break
                status = int(rsp.Status) if "Status" in rsp else None
                if status is None:
                    self.error = NO_RESPONSE
                    break
                self.statuses[str(ds.SOPInstanceUID)] = status
                if status == 0:
                    self.acked.append(str(ds.SOPInstanceUID))
                    if self.on_ack:
                        self.on_ack(len(self.acked))
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()


# -- a destination SCP that records every instance it receives ---------------------------------


class RecordingScp:
    """A pynetdicom Storage SCP (AE ``DEST``) in this process; records (SOPInstanceUID, modality).

    ``delay_s`` makes each C-STORE slow (a busy PACS); ``first_store`` is set when one arrives.
    """

    def __init__(self, aet: str = "DEST", delay_s: float = 0.0, out: Path | None = None) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.aet = aet
        self.delay_s = delay_s
        self.out = out
        self.received: list[tuple[str, str, float]] = []
        self.first_store = threading.Event()
        self._lock = threading.Lock()
        self.ae = AE(ae_title=aet)
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.ae.add_supported_context(Verification)
        self.ae.network_timeout = 30
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = int(self.server.server_address[1])

    @property
    def spec(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.port}"

    def _on_store(self, event) -> int:
        self.first_store.set()
        if self.delay_s:
            time.sleep(self.delay_s)
        ds = event.dataset
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            ds.file_meta = event.file_meta
            ds.save_as(self.out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        with self._lock:
            self.received.append((str(ds.SOPInstanceUID), str(ds.get("Modality", "")), time.time()))
        return 0x0000

    def uids(self) -> set[str]:
        with self._lock:
            return {u for u, _, _ in self.received}

    def stop(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process in MB, summed with its live children."""
    import psutil

    total = 0.0
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024.0
        except OSError:
            pass
    return total


class ThresholdPredictor:
    """Stand-in for ``model.predict.Predictor`` until the model lands: SUV threshold on the centre slice.

    Exercises every pipeline stage around the model (stacks, back-projection, post-processing, writers).
    """

    version = "threshold-stand-in"
    threshold = 0.5  # its output is already 0 or 1

    def __init__(self) -> None:
        from model.preprocessing import Preprocessing

        self.preprocessing = Preprocessing()

    def predict(self, inputs, flips="none"):
        import numpy as np

        centre = inputs.shape[2] // 2
        pet = np.asarray(inputs[:, 0, centre], dtype=np.float32)
        return (pet > 0.45).astype(np.float32)[:, None]


def pipeline_process(paths, out_dir, settings):
    """The real ``pipeline.process.process_study``; with the threshold stand-in while no model is shipped."""
    from pipeline.process import process_study

    return process_study(paths, out_dir, settings, predictor=load_predictor(settings)[0])


def load_predictor(settings):
    """(predictor, description): the shipped model, or the threshold stand-in and why."""
    from pipeline.errors import IgtvError

    try:
        from model.predict import Predictor

        return Predictor.load(settings.checkpoint, device=settings.device), "shipped model"
    except (ImportError, IgtvError) as exc:
        return ThresholdPredictor(), f"threshold stand-in (model not loadable: {str(exc)[:120]})"
