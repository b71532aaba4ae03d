"""SQLite index of received instances, series, studies, jobs and exports.

WAL journal, one connection per thread. Commits are ``synchronous=FULL`` (the
WAL is fsynced: a committed row survives power loss), except the one that adds
an instance the index did not know: it is ``NORMAL`` (no fsync; it survives a
crash of the process, and the next FULL commit or checkpoint makes it durable).
That row can be rebuilt: the instance's spool file was fsynced before the
commit, and :mod:`pacs_node.reconcile` indexes spooled files the index lacks
at startup. The schema version lives in ``PRAGMA user_version``.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import IgtvError

SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    patient_hash TEXT,
    study_date TEXT,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 0,      -- bumped by every new or replaced instance
    handled_generation INTEGER NOT NULL DEFAULT 0, -- generation a job was last queued for
    state TEXT NOT NULL DEFAULT 'receiving',    -- receiving | queued | incomplete | processed | failed
    reason TEXT
);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES studies(study_uid),
    modality TEXT,
    description TEXT,
    instance_count INTEGER NOT NULL DEFAULT 0,
    last_received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT,
    transfer_syntax TEXT,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    source TEXT
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,              -- queued | running | exporting | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL,
    out_dir TEXT,
    outputs TEXT,                     -- JSON list of paths
    dicom_outputs TEXT,               -- JSON list of paths
    result_uids TEXT,                 -- JSON list of SOP Instance UIDs
    report TEXT,                      -- JSON
    stage TEXT,                       -- pipeline stage running now (worker process writes it)
    stage_fraction REAL,              -- share of the pipeline done, 0..1
    stage_timings TEXT                -- JSON {stage: seconds}; the report's timings once processed
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study_uid);
CREATE TABLE IF NOT EXISTS exports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL,              -- pending | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    reason TEXT,
    sent_uids TEXT,                   -- JSON list
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS exports_state ON exports(state, next_at);
CREATE TABLE IF NOT EXISTS node_secrets (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL               -- random bytes made by this node, never shown
);
"""

# Statements that bring an index of version N to version N + 1.
_MIGRATIONS = {
    1: "ALTER TABLE jobs ADD COLUMN stage TEXT; ALTER TABLE jobs ADD COLUMN stage_fraction REAL; "
       "ALTER TABLE jobs ADD COLUMN stage_timings TEXT;",
    # patient hashes made before the node had a key can be reversed by hashing candidate IDs
    2: "UPDATE studies SET patient_hash=NULL;",
}


class IndexSchemaError(IgtvError):
    """The SQLite index cannot be opened or has an unknown schema."""


@dataclass(frozen=True)
class InstanceRecord:
    """What the index stores about one received instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str
    series_description: str
    path: str
    size: int
    source: str
    patient_hash: str = ""
    study_date: str = ""


class Index:
    """Thread-safe access to the node's SQLite index.

    Parameters
    ----------
    path:
        SQLite file; created with the current schema if missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: dict[threading.Thread, sqlite3.Connection] = {}
        self._all_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._secrets: dict[str, bytes] = {}
        con = self.connection()
        with self._write_lock:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if not 0 <= version <= SCHEMA_VERSION:
                raise IndexSchemaError(
                    f"index {self.path} has schema version {version}, this node knows {SCHEMA_VERSION}"
                )
            # a new file gets the current schema; an older one its missing migrations
            steps = "".join(_MIGRATIONS[v] for v in range(version, SCHEMA_VERSION)) if version else ""
            con.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}{steps}PRAGMA user_version = {SCHEMA_VERSION};COMMIT;")

    def secret(self, name: str) -> bytes:
        """This node's random secret ``name`` (32 bytes, made on first use and kept in the index).

        Read from the index once per name; ingest asks for it with every instance.
        """
        known = self._secrets.get(name)
        if known is not None:
            return known
        con = self.connection()
        row = con.execute("SELECT value FROM node_secrets WHERE name=?", (name,)).fetchone()
        if row is None:
            with self.write() as wcon:
                wcon.execute("INSERT OR IGNORE INTO node_secrets(name, value) VALUES(?, ?)",
                             (name, secrets.token_bytes(32)))
            row = con.execute("SELECT value FROM node_secrets WHERE name=?", (name,)).fetchone()
        self._secrets[name] = bytes(row[0])
        return self._secrets[name]

    # -- connections --------------------------------------------------------------
    def connection(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use)."""
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            self._local.con = con
            self._local.sync = "FULL"
            with self._all_lock:
                self._close_orphans()
                self._all[threading.current_thread()] = con
        return con

    def _close_orphans(self) -> None:
        """Close the connections of threads that ended (one per finished association or request)."""
        for thread in [t for t in self._all if not t.is_alive()]:
            try:
                self._all.pop(thread).close()
            except sqlite3.Error:  # pragma: no cover
                pass

    @contextmanager
    def write(self, sync: str = "FULL") -> Iterator[sqlite3.Connection]:
        """A serialised write transaction (BEGIN IMMEDIATE ... COMMIT).

        Parameters
        ----------
        sync:
            ``FULL``: the commit fsyncs the WAL (survives power loss). ``NORMAL``:
            no fsync (survives a crash of the process only); use it only for rows
            that can be rebuilt from durable data.
        """
        if sync not in ("FULL", "NORMAL"):
            raise ValueError(f"sync must be FULL or NORMAL, not {sync!r}")
        con = self.connection()
        if self._local.sync != sync:  # a pragma, not allowed inside a transaction
            con.execute(f"PRAGMA synchronous={sync}")
            self._local.sync = sync
        with self._write_lock:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        """Run a read-only query and return rows as dicts."""
        return [dict(r) for r in self.connection().execute(sql, params).fetchall()]

    def close(self) -> None:
        """Close every connection opened by any thread."""
        with self._all_lock:
            for con in self._all.values():
                try:
                    con.close()
                except sqlite3.Error:  # pragma: no cover
                    pass
            self._all.clear()
        self._local = threading.local()

    # -- instances ----------------------------------------------------------------
    def record_instance(self, rec: InstanceRecord, now: float | None = None, changed: bool = True) -> bool:
        """Record a stored instance; return True when it is new (False: a duplicate).

        A new or changed instance bumps the study's ``generation`` and
        ``last_received`` so the study is processed again after it settles; an
        identical resend (``changed=False``, not new) leaves the study as it is,
        so routing loops between a PACS and the node die out.

        The commit of an instance new to the index, or of an identical resend, is
        not fsynced (``NORMAL``): the caller has made the spool file durable, and
        startup reconciliation (:func:`pacs_node.reconcile.reconcile_spool`) indexes
        it again should a power loss take the row. A changed instance the index
        already knew bumps the study's generation, which reconciliation cannot
        see, so that commit is ``FULL``.
        """
        return self.record_instances([(rec, changed)], now)[0]

    def record_instances(self, items: Sequence[tuple[InstanceRecord, bool]], now: float | None = None) -> list[bool]:
        """Record several stored instances (``(record, changed)``) in one transaction, in order.

        Each as :meth:`record_instance` would; returns which were new. The commit
        is ``FULL`` when any of them is a changed instance the index already knew.
        """
        if not items:
            return []
        now = time.time() if now is None else now
        con = self.connection()
        known = {r[0] for r in con.execute(
            f"SELECT sop_uid FROM instances WHERE sop_uid IN ({','.join('?' * len(items))})",
            [rec.sop_uid for rec, _ in items])}
        full = any(rec.sop_uid in known and changed for rec, changed in items)
        news: list[bool] = []
        with self.write(sync="FULL" if full else "NORMAL") as con:
            for rec, changed in items:
                news.append(self._record(con, rec, changed, now))
        return news

    @staticmethod
    def _record(con: sqlite3.Connection, rec: InstanceRecord, changed: bool, now: float) -> bool:
        """The statements of one instance inside a write transaction; True when it is new."""
        existing = con.execute("SELECT sop_uid FROM instances WHERE sop_uid=?", (rec.sop_uid,)).fetchone()
        con.execute(
            "INSERT INTO studies(study_uid, patient_hash, study_date, first_received, last_received) "
            "VALUES(?,?,?,?,?) ON CONFLICT(study_uid) DO NOTHING",
            (rec.study_uid, rec.patient_hash, rec.study_date, now, now),
        )
        con.execute(
            "INSERT INTO series(series_uid, study_uid, modality, description, last_received) "
            "VALUES(?,?,?,?,?) ON CONFLICT(series_uid) DO UPDATE SET last_received=excluded.last_received",
            (rec.series_uid, rec.study_uid, rec.modality, rec.series_description, now),
        )
        con.execute(
            "INSERT INTO instances(sop_uid, series_uid, study_uid, sop_class_uid, transfer_syntax, path, "
            "size, received_at, source) VALUES(?,?,?,?,?,?,?,?,?) ON CONFLICT(sop_uid) DO UPDATE SET "
            "path=excluded.path, size=excluded.size, received_at=excluded.received_at, "
            "transfer_syntax=excluded.transfer_syntax, source=excluded.source",
            (rec.sop_uid, rec.series_uid, rec.study_uid, rec.sop_class_uid, rec.transfer_syntax,
             rec.path, rec.size, now, rec.source),
        )
        new = existing is None
        if not new and not changed:
            return False
        con.execute(
            "UPDATE studies SET last_received=?, generation=generation+1, state='receiving', reason=NULL, "
            "instance_count=instance_count+?, bytes=bytes+? WHERE study_uid=?",
            (now, 1 if new else 0, rec.size if new else 0, rec.study_uid),
        )
        if new:
            con.execute("UPDATE series SET instance_count=instance_count+1 WHERE series_uid=?", (rec.series_uid,))
        return new

    def known_sop_uids(self) -> set[str]:
        """SOP Instance UIDs of every indexed instance."""
        return {row[0] for row in self.connection().execute("SELECT sop_uid FROM instances")}

    def study_instance_count(self, study_uid: str) -> int:
        """Number of distinct instances of a study."""
        row = self.connection().execute(
            "SELECT instance_count FROM studies WHERE study_uid=?", (study_uid,)
        ).fetchone()
        return int(row[0]) if row else 0

    def instance(self, sop_uid: str) -> dict[str, Any] | None:
        """The row of one instance, or None."""
        rows = self.query("SELECT * FROM instances WHERE sop_uid=?", (sop_uid,))
        return rows[0] if rows else None

    # -- studies ------------------------------------------------------------------
    def study(self, study_uid: str) -> dict[str, Any] | None:
        """One study with its modalities (list) and series (list of dicts)."""
        rows = self.query("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
        if not rows:
            return None
        study = rows[0]
        study["series"] = self.query(
            "SELECT series_uid, modality, description, instance_count, last_received FROM series "
            "WHERE study_uid=? ORDER BY modality, series_uid",
            (study_uid,),
        )
        study["modalities"] = sorted({s["modality"] for s in study["series"] if s["modality"]})
        return study

    def studies(self, limit: int = 200) -> list[dict[str, Any]]:
        """Most recently received studies first, with modalities."""
        rows = self.query("SELECT * FROM studies ORDER BY last_received DESC LIMIT ?", (limit,))
        for row in rows:
            mods = self.connection().execute(
                "SELECT DISTINCT modality FROM series WHERE study_uid=?", (row["study_uid"],)
            ).fetchall()
            row["modalities"] = sorted(m[0] for m in mods if m[0])
        return rows

    def pending_studies(self) -> list[dict[str, Any]]:
        """Studies with instances newer than their last queued job."""
        return self.query(
            "SELECT study_uid, last_received, generation FROM studies WHERE generation > handled_generation"
        )

    def set_study_state(self, study_uid: str, state: str, reason: str | None = None,
                        handled_generation: int | None = None) -> None:
        """Set a study's state (and optionally the generation now handled)."""
        with self.write() as con:
            if handled_generation is None:
                con.execute("UPDATE studies SET state=?, reason=? WHERE study_uid=?", (state, reason, study_uid))
            else:
                con.execute(
                    "UPDATE studies SET state=?, reason=?, handled_generation=? WHERE study_uid=?",
                    (state, reason, handled_generation, study_uid),
                )


def dumps(value: Any) -> str:
    """JSON for a column (paths become strings)."""
    return json.dumps(value, default=str)
