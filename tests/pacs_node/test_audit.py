"""The audit log appends one fsync'd JSON line per event, never patient identifiers."""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pacs_node import audit as audit_mod
from pacs_node.audit import AuditError, AuditLog, SeriesTally, read_events


def test_events_are_json_lines_with_utc_timestamps(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "sub" / "audit.jsonl")
    log.association_accepted("CT_SCANNER", "IGTV", "10.0.0.5:40000")
    log.association_rejected("EVIL", "IGTV", "10.0.0.6:40001", "calling AE not allowed")
    log.job_started(7, "1.2.3")
    log.job_finished(7, "1.2.3", 12.34567, ["1.2.3.4", "1.2.3.5"])
    log.job_failed(8, "1.2.9", "no PET series with decay data")
    log.results_sent(7, "pacs", "1.2.3", ["1.2.3.4", "1.2.3.5"], target="ORTHANC@127.0.0.1:4242")
    raw = (tmp_path / "sub" / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(raw) == 6
    entries = [json.loads(line) for line in raw]
    assert [e["event"] for e in entries] == [
        "association_accepted", "association_rejected", "job_started", "job_finished", "job_failed",
        "results_sent",
    ]
    for e in entries:
        ts = datetime.fromisoformat(e["ts"].replace("Z", "+00:00"))
        assert ts.tzinfo is not None and ts.utcoffset().total_seconds() == 0
        assert abs((datetime.now(UTC) - ts).total_seconds()) < 60
    assert entries[0]["calling_ae"] == "CT_SCANNER" and entries[0]["peer"] == "10.0.0.5:40000"
    assert entries[1]["reason"] == "calling AE not allowed"
    assert entries[3]["seconds"] == 12.346 and entries[3]["outputs"] == ["1.2.3.4", "1.2.3.5"]
    assert entries[5]["destination"] == "pacs" and entries[5]["sop_instance_uids"] == ["1.2.3.4", "1.2.3.5"]
    assert oct(os.stat(tmp_path / "sub" / "audit.jsonl").st_mode & 0o777) == "0o640"


def test_appends_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(audit_mod.os, "fsync", spy)
    log = AuditLog(tmp_path / "a.jsonl")
    log.job_started(1, "1.2")
    log.job_started(2, "1.2")
    assert len(synced) == 2


def test_patient_identifiers_are_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    for key in ("patient_id", "PatientName", "patient_birth_date", "name", "accession_number"):
        with pytest.raises(AuditError, match="patient identifier"):
            log.record("job_started", **{key: "x"})
    with pytest.raises(AuditError, match="unknown audit event"):
        log.record("something_else")
    with pytest.raises(AuditError):
        log.record("job_started", ts="forged")
    assert not (tmp_path / "a.jsonl").exists() or (tmp_path / "a.jsonl").read_text() == ""


def test_series_tally_writes_one_line_per_series(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    tally = SeriesTally()
    for _ in range(3):
        tally.add("1.2", "1.2.1", "CT", 100)
    tally.add("1.2", "1.2.2", "PT", 50)
    assert tally.flush(log, "SCANNER") == 2
    assert tally.flush(log, "SCANNER") == 0  # reset after flush
    events = read_events(tmp_path / "a.jsonl")
    by_series = {e["series_uid"]: e for e in events}
    assert by_series["1.2.1"]["count"] == 3 and by_series["1.2.1"]["bytes"] == 300
    assert by_series["1.2.2"]["modality"] == "PT" and by_series["1.2.2"]["count"] == 1
    assert all(e["source"] == "SCANNER" for e in events)


def test_reader_newest_first_limit_filter_and_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    # > one 64 KiB block, so the backwards reader crosses blocks (bulk lines written
    # directly: 2000 fsyncs would only slow the test down)
    with path.open("w") as fh:
        for i in range(2000):
            fh.write(json.dumps({"ts": "2025-01-01T00:00:00.000Z", "event": "job_started", "job_id": i}) + "\n")
    AuditLog(path).job_failed(2000, "1.2.3", "bad")
    with path.open("ab") as fh:
        fh.write(b'{"ts": "2025-01-01T00:00:00Z", "event": "job_sta')  # torn final line
    assert path.stat().st_size > 65536
    newest = read_events(path, limit=3)
    assert [e["job_id"] for e in newest] == [2000, 1999, 1998]
    only_started = read_events(path, limit=None, events={"job_started"})
    assert len(only_started) == 2000
    assert [e["job_id"] for e in only_started[:2]] == [1999, 1998]
    assert only_started[-1]["job_id"] == 0
    assert read_events(tmp_path / "missing.jsonl") == []


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")

    def work(n: int) -> None:
        for i in range(50):
            log.results_sent(n, "pacs", "1.2", [f"1.2.{n}.{i}"] * 20)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(lines) == 200
    assert all(json.loads(line)["event"] == "results_sent" for line in lines)
