"""Append-only audit trail: one JSON object per line, fsync'd before the call returns.

Events say who connected, what was stored, what ran and what was sent where,
by UID and count only: no patient names, IDs or birth dates ever enter the
log (:meth:`AuditLog.record` refuses field names that look like patient
identifiers). The file is never rewritten or truncated by the node; rotate it
with an external tool that copies and truncates (``logrotate`` with
``copytruncate``) or by moving it away while the node is stopped.

Line format::

    {"ts": "2025-01-31T12:00:00.123Z", "event": "association_accepted", "calling_ae": "CT1", ...}
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EVENTS = frozenset(
    {
        "association_accepted",
        "association_rejected",
        "instances_stored",
        "instances_refused",
        "job_started",
        "job_finished",
        "job_failed",
        "job_requeued",
        "results_sent",
        "results_send_failed",
        "node_started",
        "node_stopped",
    }
)

# Field names that would carry patient identity; refused outright.
_FORBIDDEN_FIELD = re.compile(r"patient|birth|name$|^pn$|accession", re.IGNORECASE)
_ALLOWED_NAME_FIELDS = frozenset({"roi_name", "destination_name", "hostname"})


class AuditError(ValueError):
    """An audit event is malformed or would carry patient identifiers."""


def utc_timestamp() -> str:
    """Now, in UTC, ISO 8601 with milliseconds and a ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Writer of the audit file ``path`` (created with its folder if missing, mode 0640)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event and fsync it; returns the written object.

        Raises
        ------
        AuditError
            ``event`` is unknown, a field name looks like a patient identifier,
            or a value cannot be written as JSON.
        """
        if event not in EVENTS:
            raise AuditError(f"unknown audit event {event!r}; known: {sorted(EVENTS)}")
        for key in fields:
            if key in ("ts", "event"):
                raise AuditError(f"audit field {key!r} is reserved")
            if _FORBIDDEN_FIELD.search(key) and key not in _ALLOWED_NAME_FIELDS:
                raise AuditError(f"audit field {key!r} looks like a patient identifier; not logged")
        entry = {"ts": utc_timestamp(), "event": event, **fields}
        try:
            line = json.dumps(entry, ensure_ascii=False, separators=(",", ":"), default=_json_default)
        except (TypeError, ValueError) as exc:
            raise AuditError(f"audit event {event}: {exc}") from None
        data = (line + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
        return entry

    # One method per event kind: the call sites stay short and the fields uniform.
    def association_accepted(self, calling_ae: str, called_ae: str, peer: str) -> None:
        """A DIMSE association was accepted from ``peer`` (``host:port``)."""
        self.record("association_accepted", calling_ae=calling_ae, called_ae=called_ae, peer=peer)

    def association_rejected(self, calling_ae: str, called_ae: str, peer: str, reason: str) -> None:
        """A DIMSE association was rejected, with the reason."""
        self.record(
            "association_rejected", calling_ae=calling_ae, called_ae=called_ae, peer=peer, reason=reason
        )

    def instances_stored(
        self,
        study_uid: str,
        series_uid: str,
        modality: str,
        count: int,
        nbytes: int,
        source: str,
    ) -> None:
        """``count`` instances of one series were stored (``source``: calling AE or ``stow:<addr>``)."""
        self.record(
            "instances_stored",
            study_uid=study_uid,
            series_uid=series_uid,
            modality=modality,
            count=int(count),
            bytes=int(nbytes),
            source=source,
        )

    def instances_refused(self, source: str, reason: str, count: int = 1) -> None:
        """Instances were refused and not stored."""
        self.record("instances_refused", source=source, reason=reason, count=int(count))

    def job_started(self, job_id: int | str, study_uid: str) -> None:
        """A job started processing a study."""
        self.record("job_started", job_id=job_id, study_uid=study_uid)

    def job_finished(self, job_id: int | str, study_uid: str, seconds: float, outputs: Sequence[str]) -> None:
        """A job ended successfully; ``outputs`` are the SOPInstanceUIDs it produced."""
        self.record(
            "job_finished", job_id=job_id, study_uid=study_uid, seconds=round(float(seconds), 3),
            outputs=list(outputs),
        )

    def job_failed(self, job_id: int | str, study_uid: str, reason: str) -> None:
        """A job failed; ``reason`` is the operator-facing message (no patient identifiers)."""
        self.record("job_failed", job_id=job_id, study_uid=study_uid, reason=reason)

    def results_sent(
        self,
        job_id: int | str,
        destination: str,
        study_uid: str,
        sop_instance_uids: Sequence[str],
        target: str = "",
    ) -> None:
        """Results went to ``destination`` (its configured name; ``target``: AET@HOST:PORT or URL)."""
        self.record(
            "results_sent", job_id=job_id, destination=destination, target=target,
            study_uid=study_uid, sop_instance_uids=list(sop_instance_uids),
        )

    def results_send_failed(self, job_id: int | str, destination: str, reason: str) -> None:
        """Sending results to ``destination`` failed for good."""
        self.record("results_send_failed", job_id=job_id, destination=destination, reason=reason)


class SeriesTally:
    """Counts instances per series during one association, for one audit line per series.

    The listener calls :meth:`add` for every stored instance and :meth:`flush`
    when the association is released or aborted.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str, str], list[int]] = {}

    def add(self, study_uid: str, series_uid: str, modality: str, nbytes: int) -> None:
        """Count one stored instance of ``nbytes``."""
        with self._lock:
            entry = self._series.setdefault((study_uid, series_uid, modality), [0, 0])
            entry[0] += 1
            entry[1] += int(nbytes)

    def clear(self) -> None:
        """Forget the counts without writing them."""
        with self._lock:
            self._series = {}

    def flush(self, audit: AuditLog, source: str) -> int:
        """Write one ``instances_stored`` event per series and reset; returns the series count."""
        with self._lock:
            items, self._series = self._series, {}
        for (study, series, modality), (count, nbytes) in items.items():
            audit.instances_stored(study, series, modality, count, nbytes, source)
        return len(items)


def read_events(
    path: Path,
    limit: int | None = 200,
    events: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """The newest ``limit`` events of the audit file, newest first.

    Reads the file backwards in blocks, so the cost follows ``limit``, not the
    file size. ``events`` keeps only those event types. A torn or non-JSON
    line (e.g. from a crash mid-write on a file system without atomic appends)
    is skipped. A missing file gives an empty list.
    """
    wanted = set(events) if events is not None else None
    out: list[dict[str, Any]] = []
    try:
        lines = _lines_backwards(Path(path))
        for raw in lines:
            try:
                entry = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(entry, dict):
                continue
            if wanted is not None and entry.get("event") not in wanted:
                continue
            out.append(entry)
            if limit is not None and len(out) >= limit:
                break
    except FileNotFoundError:
        return []
    return out


def _lines_backwards(path: Path, block: int = 65536) -> Iterable[bytes]:
    """Yield the non-empty lines of ``path`` from last to first."""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        pos = fh.tell()
        tail = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            chunk = fh.read(step) + tail
            parts = chunk.split(b"\n")
            tail = parts[0]  # may be a partial line; completed by the next block
            for line in reversed(parts[1:]):
                if line.strip():
                    yield line
        if tail.strip():
            yield tail


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"value of type {type(value).__name__} is not JSON serialisable")
