"""Durable append-only log of received instances: one ``fdatasync`` per acknowledgement.

Writing an instance durably into the spool takes two flushes on the acknowledgement
path (the file, then its directory after the rename), each a file-system journal
commit. The ack journal takes one: instances are appended to a segment file that was
preallocated and made durable with its name when it was created, and ``fdatasync``
makes the append durable. Segments are reused: an append into a segment used before
overwrites written blocks, so its flush carries data only (no metadata to commit, and
no wait for other programs' data that an ext4 journal commit would flush first); only
a segment's first use commits metadata with each flush, as a spool file would.
Concurrent appends share flushes. The spool file and the index row are written
afterwards, off the acknowledgement path (:class:`~pacs_node.materialiser.Materialiser`);
a segment is reused once every record in it is durable in the spool. At startup
:meth:`AckJournal.records` returns what a crash left, in acknowledgement order, for
replay.

Layout under ``folder``: ``000001.seg``, ... fixed-size segments, each a 4 kB header
block and then records back to back. Segment header (little-endian): magic
``IGTVJRN1``, epoch (random u64), CRC-32 of both. Record: magic ``REC1``, the
segment's epoch, sequence number (u64), metadata length (u16), 0 (u16), payload
length (u32), CRC-32 (u32) of the metadata and payload followed by the fields before
it; then the metadata (the source, UTF-8) and the payload. A record counts only when
its epoch is the segment's and its CRC matches, so zeros, a torn write, and the
records of an earlier use of the segment (a new random epoch is written when a
segment is freed) all end the scan.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from pacs_node.spool import fsync_dir
from pipeline.errors import IgtvError

log = logging.getLogger(__name__)

HEADER_BLOCK = 4096
_SEG = struct.Struct("<8sQI")  # magic, epoch, crc
_SEG_MAGIC = b"IGTVJRN1"
_REC = struct.Struct("<4sQQHHII")  # magic, epoch, seq, meta length, 0, payload length, crc
_REC_MAGIC = b"REC1"


class JournalError(IgtvError):
    """The ack journal cannot take a record (no free segment in time, or not replayed yet)."""


@dataclass(eq=False)
class Segment:
    """One segment file; ``pending`` counts its records not yet durable in the spool."""

    path: Path
    fd: int
    epoch: int
    offset: int = HEADER_BLOCK  # end of the records written (to the page cache)
    synced: int = HEADER_BLOCK  # end of the records known to be on disk
    pending: int = 0


@dataclass(frozen=True)
class JournalEntry:
    """Where an appended record went (hand it back to :meth:`AckJournal.done`)."""

    segment: Segment
    seq: int


@dataclass(frozen=True)
class JournalRecord:
    """A record found at startup."""

    seq: int
    source: str
    payload: bytes = field(repr=False)


def _new_epoch() -> int:
    return int.from_bytes(os.urandom(8), "little")


class AckJournal:
    """Segments under ``folder``; thread-safe appends, each durable when :meth:`append` returns.

    Parameters
    ----------
    folder:
        Created if missing; on the same file system as the spool is best (one disk to flush).
    segment_bytes:
        Size of each segment file (preallocated when created).
    max_segments:
        Segments kept at most; an append waits up to ``wait_s`` for one to be freed.
    """

    def __init__(self, folder: Path, segment_bytes: int = 16 << 20, max_segments: int = 16,
                 wait_s: float = 30.0) -> None:
        if segment_bytes < 2 * HEADER_BLOCK or segment_bytes % HEADER_BLOCK:
            raise ValueError(f"segment_bytes must be a multiple of {HEADER_BLOCK} and at least {2 * HEADER_BLOCK}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = int(segment_bytes)
        self.max_segments = max(2, int(max_segments))
        self.wait_s = float(wait_s)
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._sync_lock = threading.Lock()  # one fdatasync at a time: it covers every record written before it
        self._failed: OSError | None = None
        self._segments: list[Segment] = []
        self._free: list[Segment] = []  # invalidated, ready to use
        self._spent: list[Segment] = []  # full and all records done: to invalidate, then free
        self._creating = 0
        self._numbers = 0  # the last segment file number used
        self._active: Segment | None = None
        self._next_seq = 1
        self._ready = False  # set by reset(): records of a previous run must be replayed first
        for path in sorted(self.folder.glob("*.seg")):
            if path.stem.isdigit():
                self._numbers = max(self._numbers, int(path.stem))
            fd = os.open(path, os.O_RDWR)
            if os.fstat(fd).st_size != self.segment_bytes:  # another size: made with another setting
                os.close(fd)
                log.warning("journal segment %s has another size than %d bytes; ignored", path, self.segment_bytes)
                continue
            self._segments.append(Segment(path, fd, self._read_epoch(fd)))

    @property
    def max_payload(self) -> int:
        """Largest payload (with its source) one record can hold."""
        return self.segment_bytes - HEADER_BLOCK - _REC.size - 256

    # -- startup ----------------------------------------------------------------------
    def records(self) -> list[JournalRecord]:
        """Every valid record in the segments, in sequence (acknowledgement) order."""
        found: list[JournalRecord] = []
        for seg in self._segments:
            found.extend(self._scan(seg))
        found.sort(key=lambda r: r.seq)
        return found

    def reset(self, last_seq: int | None = None) -> None:
        """Invalidate every record (they are replayed or durable elsewhere); all segments become free.

        ``last_seq``: the highest sequence number in use (found by scanning when not given at startup).
        """
        with self._lock:
            if last_seq is not None:
                last = last_seq
            elif self._ready:
                last = self._next_seq - 1
            else:
                last = max((r.seq for r in self.records()), default=0)
            for seg in self._segments:
                self._invalidate(seg)
            self._free = list(self._segments)
            self._spent = []
            self._active = None
            self._next_seq = last + 1
            self._ready = True

    # -- appending --------------------------------------------------------------------
    def append(self, payload: bytes, source: str = "") -> JournalEntry:
        """Append one record and ``fdatasync`` it; return its entry once it is durable.

        Raises
        ------
        JournalError
            No segment became free within ``wait_s``, the record is too large, or the
            journal was not reset after startup.
        OSError
            The write or the flush failed (the record may or may not be durable).
        """
        meta = source.encode("utf-8", "replace")[:255]
        size = _REC.size + len(meta) + len(payload)
        if len(meta) + len(payload) > self.max_payload:
            raise JournalError(f"a {len(payload)}-byte instance does not fit a {self.segment_bytes}-byte segment")
        body_crc = zlib.crc32(payload, zlib.crc32(meta))  # outside the lock: the costly part
        with self._lock:
            if not self._ready:
                raise JournalError("the journal must be replayed and reset before appending")
            if self._failed is not None:
                raise JournalError(f"the ack journal had a write error ({self._failed}); check the disk and "
                                   "restart the node")
            seg = self._active
            while seg is None or seg.offset + size > self.segment_bytes:
                seg = self._rotate()
            seq = self._next_seq
            self._next_seq += 1
            head = _REC.pack(_REC_MAGIC, seg.epoch, seq, len(meta), 0, len(payload), 0)[:-4]
            crc = zlib.crc32(head, body_crc)
            offset = seg.offset
            seg.offset += size
            seg.pending += 1
            # written under the lock: a later record never reaches the page cache before an earlier one
            try:
                _pwrite_all(seg.fd, [head, struct.pack("<I", crc), meta, payload], offset)
            except BaseException:
                seg.pending -= 1
                seg.offset = offset
                raise
        entry = JournalEntry(seg, seq)
        try:
            self._sync(seg, offset + size)
        except BaseException:
            self.done(entry)  # never acknowledged; a replay may still apply it (harmless)
            raise
        return entry

    def _sync(self, seg: Segment, end: int) -> None:
        """Return once ``seg`` is on disk up to ``end``: one ``fdatasync`` serves every waiting writer.

        After a failed flush the kernel may report the lost pages to nobody else, so the
        journal takes no more records: appends raise until the node is restarted.
        """
        with self._sync_lock:
            if self._failed is not None:
                raise JournalError(f"the ack journal had a write error ({self._failed}); check the disk and "
                                   "restart the node") from self._failed
            if seg.synced >= end:
                return  # an fdatasync that started after this record was written has finished
            with self._lock:
                target = seg.offset
            try:
                os.fdatasync(seg.fd)
            except OSError as exc:
                self._failed = exc
                log.critical("ack journal flush failed, refusing new instances until restart: %s", exc)
                raise
            seg.synced = max(seg.synced, target)

    def done(self, entry: JournalEntry) -> None:
        """The record of ``entry`` is durable elsewhere (a full segment with none left is freed by :meth:`maintain`)."""
        with self._lock:
            seg = entry.segment
            seg.pending -= 1
            if seg.pending == 0 and seg is not self._active:
                self._spent.append(seg)
                self._freed.notify_all()  # an append waiting for space can reuse it at once

    def maintain(self) -> None:
        """Free spent segments; create a spare when none is free and the active segment is half full.

        A background thread calls this (it writes and flushes); the first segment too is
        created here, so the first acknowledgement does not wait for it.
        """
        while True:
            with self._lock:
                if not self._spent:
                    break
                seg = self._spent.pop(0)
            self._invalidate(seg)
            with self._lock:
                self._free.append(seg)
                self._freed.notify_all()
        with self._lock:
            active = self._active
            if (not self._ready or self._free or self._creating
                    or len(self._segments) >= self.max_segments
                    or (active is not None and active.offset < self.segment_bytes // 2)):
                return  # a spare is ready, on its way, not allowed, or not needed yet
            self._creating += 1
            self._numbers += 1
            number = self._numbers
        try:
            seg = self._create(number)
        finally:
            with self._lock:
                self._creating -= 1
                self._freed.notify_all()
        with self._lock:
            self._segments.append(seg)
            self._free.append(seg)
            self._freed.notify_all()

    def close(self) -> None:
        """Close the segment files (records stay for the next start)."""
        with self._lock:
            for seg in self._segments:
                try:
                    os.close(seg.fd)
                except OSError:  # pragma: no cover
                    pass
            self._segments.clear()
            self._free.clear()
            self._spent.clear()
            self._active = None
            self._ready = False

    def stats(self) -> dict[str, int]:
        """Segment counts (for tests and metrics)."""
        with self._lock:
            return {"segments": len(self._segments), "free": len(self._free),
                    "pending": sum(s.pending for s in self._segments)}

    # -- internals ----------------------------------------------------------------------
    def _rotate(self) -> Segment:
        """Make a free (or new) segment the active one; the old one is freed once its records are done.

        Normally :meth:`maintain` has a spare ready; otherwise this invalidates a spent
        segment or creates one here (on the acknowledgement path), or waits for one. The
        old segment stops being active at once, so no append writes into it while this
        one waits (or after it gives up); an append that rotated meanwhile is shared.
        """
        old, self._active = self._active, None
        if old is not None and old.pending == 0:
            self._spent.append(old)
        deadline = time.monotonic() + self.wait_s
        while not self._free:
            if self._active is not None:
                return self._active  # another append got a segment while this one waited
            if self._spent:
                seg = self._spent.pop(0)
                self._invalidate(seg)
                self._free.append(seg)
            elif len(self._segments) + self._creating < self.max_segments:
                self._numbers += 1  # no spare ready (rare): make one here
                seg = self._create(self._numbers)
                self._segments.append(seg)
                self._free.append(seg)
            else:  # at the limit: the spool must catch up first
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise JournalError(f"no free journal segment within {self.wait_s:.0f} s "
                                       "(the spool is not keeping up)")
                self._freed.wait(remaining)
        if self._active is not None:
            return self._active
        seg = self._free.pop(0)
        seg.offset, seg.synced = HEADER_BLOCK, HEADER_BLOCK
        self._active = seg
        return seg

    def _create(self, number: int) -> Segment:
        """A new preallocated segment file ``<number>.seg`` with a fresh epoch, durable with its name."""
        path = self.folder / f"{number:06d}.seg"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.segment_bytes)  # reads as zeros until written
            seg = Segment(path, fd, 0)
            self._invalidate(seg, sync=False)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        fsync_dir(self.folder)
        return seg

    def _invalidate(self, seg: Segment, sync: bool = True) -> None:
        """Give ``seg`` a new random epoch: every record written under the old one stops counting."""
        seg.epoch = _new_epoch()
        seg.offset = HEADER_BLOCK
        head = _SEG.pack(_SEG_MAGIC, seg.epoch, 0)[:-4]
        _pwrite_all(seg.fd, [head, struct.pack("<I", zlib.crc32(head))], 0)
        if sync:
            os.fdatasync(seg.fd)

    @staticmethod
    def _read_epoch(fd: int) -> int:
        """The segment's epoch, or a fresh random one when its header is torn or missing."""
        raw = os.pread(fd, _SEG.size, 0)
        if len(raw) == _SEG.size:
            magic, epoch, crc = _SEG.unpack(raw)
            if magic == _SEG_MAGIC and zlib.crc32(raw[:-4]) == crc:
                return int(epoch)
        return _new_epoch()  # matches no record: the segment holds nothing to replay

    def _scan(self, seg: Segment) -> list[JournalRecord]:
        """The valid records of one segment, from the start up to the first invalid one."""
        found: list[JournalRecord] = []
        offset = HEADER_BLOCK
        while offset + _REC.size <= self.segment_bytes:
            raw = os.pread(seg.fd, _REC.size, offset)
            magic, epoch, seq, meta_len, _, length, crc = _REC.unpack(raw)
            end = offset + _REC.size + meta_len + length
            if magic != _REC_MAGIC or epoch != seg.epoch or end > self.segment_bytes:
                break
            body = os.pread(seg.fd, meta_len + length, offset + _REC.size)
            if len(body) != meta_len + length or zlib.crc32(raw[:-4], zlib.crc32(body)) != crc:
                break  # torn: never acknowledged
            found.append(JournalRecord(int(seq), body[:meta_len].decode("utf-8", "replace"), body[meta_len:]))
            offset = end
        return found


def _pwrite_all(fd: int, parts: list[bytes], offset: int) -> None:
    """Write ``parts`` contiguously at ``offset`` (one ``pwritev``; short writes are completed)."""
    total = sum(len(p) for p in parts)
    done = os.pwritev(fd, parts, offset)
    if done < total:  # rare for regular files: finish from a joined copy
        rest = memoryview(b"".join(parts))[done:]
        while rest:
            n = os.pwrite(fd, rest, offset + done)
            done += n
            rest = rest[n:]
