"""Persistent job queue and export schedule in the SQLite index.

A job moves ``queued -> running -> exporting -> done`` or ends ``failed`` with
a reason. Exports are rows per (job, destination) with their own attempts and
next-attempt time, so retries survive a restart.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from pacs_node.events import NodeEvents
from pacs_node.index import Index, dumps

JOB_STATES = ("queued", "running", "exporting", "done", "failed")


def stage_timings(report: Any) -> dict[str, float]:
    """The stage seconds of a pipeline report (its ``timings_s``), without the ``total``."""
    timings = report.get("timings_s") if isinstance(report, dict) else None
    if not isinstance(timings, dict):
        return {}
    return {str(k): float(v) for k, v in timings.items()
            if k != "total" and isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class Job:
    """One row of the jobs table."""

    id: int
    study_uid: str
    generation: int
    state: str
    attempts: int
    reason: str | None
    out_dir: str | None
    dicom_outputs: list[str]
    result_uids: list[str]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        return cls(
            id=row["id"], study_uid=row["study_uid"], generation=row["generation"], state=row["state"],
            attempts=row["attempts"], reason=row["reason"], out_dir=row["out_dir"],
            dicom_outputs=json.loads(row["dicom_outputs"] or "[]"),
            result_uids=json.loads(row["result_uids"] or "[]"),
        )


class JobQueue:
    """Jobs and exports over an :class:`Index`.

    Parameters
    ----------
    index:
        Where jobs and exports are kept.
    events:
        Receives ``job_done`` and ``job_failed`` when a job reaches its final state.
    """

    def __init__(self, index: Index, events: NodeEvents | None = None) -> None:
        self.index = index
        self.events = events or NodeEvents()

    # -- jobs -----------------------------------------------------------------------
    def enqueue(self, study_uid: str, generation: int) -> int:
        """Queue processing of a study; a job still waiting for the study is reused."""
        now = time.time()
        with self.index.write() as con:
            row = con.execute(
                "SELECT id FROM jobs WHERE study_uid=? AND state='queued' ORDER BY id LIMIT 1", (study_uid,)
            ).fetchone()
            if row:
                con.execute("UPDATE jobs SET generation=?, updated=? WHERE id=?", (generation, now, row[0]))
                job_id = int(row[0])
            else:
                cur = con.execute(
                    "INSERT INTO jobs(study_uid, generation, state, created, updated) VALUES(?,?,?,?,?)",
                    (study_uid, generation, "queued", now, now),
                )
                job_id = int(cur.lastrowid)
            con.execute(
                "UPDATE studies SET state='queued', reason=NULL, handled_generation=MAX(handled_generation, ?) "
                "WHERE study_uid=?",
                (generation, study_uid),
            )
        return job_id

    def record_failed(self, study_uid: str, generation: int, reason: str) -> int:
        """Record a job that failed without running (e.g. the study lacks a PET series)."""
        now = time.time()
        with self.index.write() as con:
            cur = con.execute(
                "INSERT INTO jobs(study_uid, generation, state, reason, created, updated, finished) "
                "VALUES(?,?,?,?,?,?,?)",
                (study_uid, generation, "failed", reason, now, now, now),
            )
            con.execute(
                "UPDATE studies SET state='incomplete', reason=?, handled_generation=MAX(handled_generation, ?) "
                "WHERE study_uid=?",
                (reason, generation, study_uid),
            )
        job_id = int(cur.lastrowid)
        self.events.emit("job_failed", job_id=job_id, study_uid=study_uid, reason=reason)
        return job_id

    def claim(self) -> Job | None:
        """Take the oldest queued job (-> running, attempts + 1), or None.

        A job whose study already has a running job waits: two jobs of one study would
        share its spool folder and results, and one's quarantine would take the other's inputs.
        """
        now = time.time()
        with self.index.write() as con:
            row = con.execute(
                "SELECT id FROM jobs AS q WHERE state='queued' AND NOT EXISTS "
                "(SELECT 1 FROM jobs AS r WHERE r.study_uid=q.study_uid AND r.state='running') "
                "ORDER BY id LIMIT 1"
            ).fetchone()
            if not row:
                return None
            con.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, started=?, updated=?, reason=NULL, "
                "stage=NULL, stage_fraction=0, stage_timings=NULL WHERE id=?",
                (now, now, row[0]),
            )
        return self.job(int(row[0]))

    def set_progress(self, job_id: int, stage: str, fraction: float, timings: dict[str, float]) -> None:
        """A running job entered ``stage`` with ``fraction`` of the pipeline done; ``timings``: stages so far.

        Called from the worker process (a second connection to the WAL index).
        """
        with self.index.write() as con:
            con.execute(
                "UPDATE jobs SET stage=?, stage_fraction=?, stage_timings=? WHERE id=? AND state='running'",
                (stage, min(1.0, max(0.0, float(fraction))), dumps(timings), job_id),
            )

    def job(self, job_id: int) -> Job | None:
        """One job, or None."""
        rows = self.index.query("SELECT * FROM jobs WHERE id=?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    def jobs(self, limit: int = 200, state: str | None = None) -> list[dict[str, Any]]:
        """Newest jobs first (rows as dicts), optionally of one state."""
        if state:
            return self.index.query("SELECT * FROM jobs WHERE state=? ORDER BY id DESC LIMIT ?", (state, limit))
        return self.index.query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))

    def jobs_of_study(self, study_uid: str) -> list[Job]:
        """All jobs of a study, oldest first."""
        rows = self.index.query("SELECT * FROM jobs WHERE study_uid=? ORDER BY id", (study_uid,))
        return [Job.from_row(r) for r in rows]

    def requeue(self, job_id: int, reason: str | None = None) -> None:
        """Put a job back in the queue (e.g. its worker process died)."""
        with self.index.write() as con:
            con.execute(
                "UPDATE jobs SET state='queued', reason=?, updated=? WHERE id=?", (reason, time.time(), job_id)
            )

    def resume_unfinished(self) -> int:
        """After a restart: running jobs go back to queued. Returns how many."""
        with self.index.write() as con:
            cur = con.execute(
                "UPDATE jobs SET state='queued', updated=?, reason='resumed after restart' WHERE state='running'",
                (time.time(),),
            )
        return int(cur.rowcount)

    def processed(self, job_id: int, result: dict[str, Any], destinations: list[str]) -> None:
        """Store a job's outputs; -> exporting (one pending export per destination) or done."""
        now = time.time()
        state = "exporting" if destinations else "done"
        timings = stage_timings(result.get("report"))
        with self.index.write() as con:
            con.execute(
                "UPDATE jobs SET state=?, updated=?, finished=?, out_dir=?, outputs=?, dicom_outputs=?, "
                "result_uids=?, report=?, stage=NULL, stage_fraction=1, "
                "stage_timings=COALESCE(?, stage_timings) WHERE id=?",
                (state, now, None if destinations else now, str(result["out_dir"]), dumps(result["outputs"]),
                 dumps(result["dicom_outputs"]), dumps(result["result_uids"]), dumps(result.get("report")),
                 dumps(timings) if timings else None, job_id),
            )
            for name in destinations:
                con.execute(
                    "INSERT INTO exports(job_id, destination, state, next_at, updated) VALUES(?,?,?,?,?)",
                    (job_id, name, "pending", now, now),
                )
            if not destinations:
                self._study_done(con, job_id)
        if not destinations:
            self._emit_final(job_id)

    def fail(self, job_id: int, reason: str) -> None:
        """-> failed with ``reason``; the study shows the reason too."""
        now = time.time()
        with self.index.write() as con:
            con.execute(
                "UPDATE jobs SET state='failed', reason=?, updated=?, finished=? WHERE id=?",
                (reason, now, now, job_id),
            )
            con.execute(
                "UPDATE studies SET state='failed', reason=? WHERE study_uid=(SELECT study_uid FROM jobs WHERE id=?)",
                (reason, job_id),
            )
        self._emit_final(job_id)

    def _emit_final(self, job_id: int) -> None:
        """Emit ``job_done`` or ``job_failed`` for a job that reached its final state."""
        rows = self.index.query(
            "SELECT study_uid, state, reason, started, finished, result_uids FROM jobs WHERE id=?", (job_id,)
        )
        if not rows or rows[0]["state"] not in ("done", "failed"):
            return
        row = rows[0]
        if row["state"] == "failed":
            self.events.emit("job_failed", job_id=job_id, study_uid=row["study_uid"], reason=row["reason"] or "")
            return
        started, finished = row["started"], row["finished"]
        seconds = max(0.0, float(finished) - float(started)) if started is not None and finished else 0.0
        self.events.emit("job_done", job_id=job_id, study_uid=row["study_uid"], seconds=seconds,
                         result_uids=json.loads(row["result_uids"] or "[]"))

    def _study_done(self, con: Any, job_id: int) -> None:
        con.execute(
            "UPDATE studies SET state='processed', reason=NULL "
            "WHERE study_uid=(SELECT study_uid FROM jobs WHERE id=?) AND generation<=handled_generation",
            (job_id,),
        )

    # -- exports --------------------------------------------------------------------
    def due_exports(self, now: float | None = None) -> list[dict[str, Any]]:
        """Pending exports whose next attempt is due, oldest first."""
        now = time.time() if now is None else now
        return self.index.query(
            "SELECT * FROM exports WHERE state='pending' AND next_at<=? ORDER BY next_at, id", (now,)
        )

    def exports_of_job(self, job_id: int) -> list[dict[str, Any]]:
        """All export rows of a job."""
        return self.index.query("SELECT * FROM exports WHERE job_id=? ORDER BY id", (job_id,))

    def export_sent(self, export_id: int, sent_uids: list[str]) -> None:
        """An export succeeded."""
        self._export_update(export_id, "done", None, None, sent_uids)

    def export_retry(self, export_id: int, reason: str, next_at: float) -> None:
        """A transient failure: try again at ``next_at``."""
        self._export_update(export_id, "pending", reason, next_at, None)

    def export_failed(self, export_id: int, reason: str) -> None:
        """A permanent failure, or attempts exhausted."""
        self._export_update(export_id, "failed", reason, None, None)

    def _export_update(self, export_id: int, state: str, reason: str | None, next_at: float | None,
                       sent: list[str] | None) -> None:
        now = time.time()
        with self.index.write() as con:
            con.execute(
                "UPDATE exports SET state=?, reason=?, attempts=attempts+1, next_at=COALESCE(?, next_at), "
                "sent_uids=COALESCE(?, sent_uids), updated=? WHERE id=?",
                (state, reason, next_at, dumps(sent) if sent is not None else None, now, export_id),
            )
            job_id = con.execute("SELECT job_id FROM exports WHERE id=?", (export_id,)).fetchone()[0]
            rows = con.execute(
                "SELECT destination, state, reason FROM exports WHERE job_id=?", (job_id,)
            ).fetchall()
            if any(r["state"] == "pending" for r in rows):
                return
            failed = [f"{r['destination']}: {r['reason']}" for r in rows if r["state"] == "failed"]
            if failed:
                reason_all = "export failed: " + "; ".join(failed)
                con.execute(
                    "UPDATE jobs SET state='failed', reason=?, updated=?, finished=? WHERE id=?",
                    (reason_all, now, now, job_id),
                )
                con.execute(
                    "UPDATE studies SET state='failed', reason=? "
                    "WHERE study_uid=(SELECT study_uid FROM jobs WHERE id=?)",
                    (reason_all, job_id),
                )
            else:
                con.execute(
                    "UPDATE jobs SET state='done', reason=NULL, updated=?, finished=? WHERE id=?", (now, now, job_id)
                )
                self._study_done(con, job_id)
        self._emit_final(job_id)

    def resend(self, job_id: int, destinations: list[str]) -> None:
        """Queue the outputs of a finished job for sending again (dashboard 'resend')."""
        now = time.time()
        with self.index.write() as con:
            for name in destinations:
                con.execute(
                    "INSERT INTO exports(job_id, destination, state, next_at, updated) VALUES(?,?,?,?,?)",
                    (job_id, name, "pending", now, now),
                )
            con.execute("UPDATE jobs SET state='exporting', updated=? WHERE id=?", (now, job_id))
