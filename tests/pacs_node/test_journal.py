"""The ack journal: durable appends, replay after a crash, torn and stale records, segment reuse."""

from __future__ import annotations

import os
import threading

import pytest

from pacs_node import journal as journal_mod
from pacs_node.journal import HEADER_BLOCK, AckJournal, JournalError

SEG = 64 * 1024


def _journal(folder, **kw) -> AckJournal:
    j = AckJournal(folder, segment_bytes=kw.pop("segment_bytes", SEG), **kw)
    j.records()
    j.reset()
    return j


def _reopen(folder, **kw) -> AckJournal:
    """What the next start sees (the previous object was abandoned, as by kill -9)."""
    return AckJournal(folder, segment_bytes=kw.pop("segment_bytes", SEG), **kw)


def test_records_survive_a_crash_in_order_with_their_source(tmp_path):
    j = _journal(tmp_path)
    payloads = [os.urandom(n) for n in (100, 5000, 1, 20000)]
    entries = [j.append(p, source=f"dimse:CT{i}") for i, p in enumerate(payloads)]
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    found = _reopen(tmp_path).records()
    assert [r.payload for r in found] == payloads
    assert [r.source for r in found] == [f"dimse:CT{i}" for i in range(4)]
    assert [r.seq for r in found] == [e.seq for e in entries]


def test_append_is_flushed_before_it_returns(tmp_path, monkeypatch):
    j = _journal(tmp_path)
    calls: list[tuple[str, int]] = []
    real_pwritev, real_fdatasync = os.pwritev, os.fdatasync
    monkeypatch.setattr(journal_mod.os, "pwritev", lambda fd, b, o: (calls.append(("write", fd)), real_pwritev(fd, b, o))[1])
    monkeypatch.setattr(journal_mod.os, "fdatasync", lambda fd: (calls.append(("flush", fd)), real_fdatasync(fd))[1])
    entry = j.append(b"instance", "t")
    assert calls[-2:] == [("write", entry.segment.fd), ("flush", entry.segment.fd)]


def test_a_torn_record_and_everything_after_it_are_not_replayed(tmp_path):
    j = _journal(tmp_path)
    first, second, third = j.append(b"a" * 300), j.append(b"b" * 300), j.append(b"c" * 300)
    assert first.segment is second.segment is third.segment
    # the second record's payload only partly reached the disk
    record2 = HEADER_BLOCK + (32 + 300)
    os.pwrite(second.segment.fd, b"\0" * 10, record2 + 32 + 200)
    assert [r.payload for r in _reopen(tmp_path).records()] == [b"a" * 300]


def test_reset_and_freed_segments_forget_their_records(tmp_path):
    j = _journal(tmp_path)
    j.append(b"old" * 100)
    j2 = _reopen(tmp_path)
    assert len(j2.records()) == 1
    j2.reset()  # replayed: nothing is replayed twice
    assert _reopen(tmp_path).records() == []
    # a segment reused after its records were done holds only the new records
    entries = [j2.append(bytes([i]) * 28000) for i in range(2)]  # nearly fill a 64 kB segment
    assert entries[0].segment is entries[1].segment
    old_epoch = entries[0].segment.epoch
    for e in entries:
        j2.done(e)
    fresh = j2.append(b"n" * 8000)  # does not fit: the spent segment is invalidated and reused
    assert fresh.segment.epoch != old_epoch
    # the old records' bytes are still there after the new one; they do not count
    assert [r.payload for r in _reopen(tmp_path).records()] == [b"n" * 8000]


def test_segments_are_reused_not_multiplied(tmp_path):
    j = _journal(tmp_path, max_segments=3)
    for i in range(60):  # 60 x 20 kB = 1.2 MB through 64 kB segments
        j.done(j.append(bytes([i % 256]) * 20000))
        j.maintain()
    assert j.stats()["segments"] <= 3 and j.stats()["pending"] == 0
    assert len(list(tmp_path.glob("*.seg"))) <= 3


def test_a_full_journal_waits_then_refuses(tmp_path):
    j = _journal(tmp_path, max_segments=2, wait_s=0.3)
    kept = [j.append(b"x" * 20000) for _ in range(6)]  # two segments, nothing done
    with pytest.raises(JournalError, match="no free journal segment"):
        j.append(b"x" * 20000)
    # once the spool caught up, appends go on (a waiting append is woken by the release)
    result: list[object] = []
    waiter = threading.Thread(target=lambda: result.append(j.append(b"y" * 20000)))
    j.wait_s = 10
    waiter.start()
    for e in kept:
        j.done(e)
    j.maintain()
    waiter.join(10)
    assert result and result[0].seq > kept[-1].seq


def test_a_segment_given_up_by_a_refused_append_takes_no_more_records(tmp_path):
    j = _journal(tmp_path, max_segments=2, wait_s=0.2)
    kept = [j.append(b"x" * 20000) for _ in range(6)]  # both segments full, nothing done
    with pytest.raises(JournalError, match="no free journal segment"):
        j.append(b"x" * 20000)
    for e in kept:  # the spool catches up: both segments are spent
        j.done(e)
    small = j.append(b"small")  # fits in the last segment's remaining space, which is spent
    j.maintain()  # invalidates spent segments: a record written into one would be lost
    assert [r.payload for r in _reopen(tmp_path).records()] == [b"small"]
    assert small.segment.pending == 1


def test_appends_waiting_for_a_segment_share_the_one_they_get(tmp_path):
    j = _journal(tmp_path, max_segments=2, wait_s=10)
    kept = [j.append(b"x" * 20000) for _ in range(6)]
    results: list[object] = []
    waiters = [threading.Thread(target=lambda: results.append(j.append(b"y" * 100))) for _ in range(2)]
    for w in waiters:
        w.start()
    for e in kept:
        j.done(e)
    j.maintain()
    for w in waiters:
        w.join(10)
    assert len(results) == 2 and results[0].segment is results[1].segment
    for e in results:
        j.done(e)
    j.maintain()
    stats = j.stats()
    assert stats["segments"] == 2 and stats["pending"] == 0
    assert len(set(map(id, j._free))) == len(j._free)  # no segment listed twice


def test_misuse_is_refused(tmp_path):
    fresh = AckJournal(tmp_path, segment_bytes=SEG)
    with pytest.raises(JournalError, match="replayed and reset"):
        fresh.append(b"x")
    fresh.reset()
    with pytest.raises(JournalError, match="does not fit"):
        fresh.append(b"x" * SEG)
    with pytest.raises(ValueError):
        AckJournal(tmp_path / "other", segment_bytes=5000)


def test_concurrent_appends_share_flushes_and_all_survive(tmp_path, monkeypatch):
    j = _journal(tmp_path, segment_bytes=1 << 20)
    flushes: list[int] = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(journal_mod.os, "fdatasync", lambda fd: (flushes.append(fd), real_fdatasync(fd))[1])
    payloads = {f"t{t}-{i}".encode() * 50 for t in range(8) for i in range(10)}
    chunks = [sorted(payloads)[i::8] for i in range(8)]
    threads = [threading.Thread(target=lambda c=c: [j.append(p) for p in c]) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert {r.payload for r in _reopen(tmp_path, segment_bytes=1 << 20).records()} == payloads
    assert len(flushes) <= len(payloads)  # never more than one flush per record (fewer when they overlap)


def test_after_a_failed_flush_the_journal_takes_nothing_more(tmp_path, monkeypatch):
    j = _journal(tmp_path)
    j.append(b"before")

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal_mod.os, "fdatasync", broken)
    with pytest.raises(OSError):
        j.append(b"lost")
    monkeypatch.undo()
    with pytest.raises(JournalError, match="write error"):  # even though the disk answers again
        j.append(b"after")
    assert j.stats()["pending"] == 1  # only the acknowledged record waits for the spool
