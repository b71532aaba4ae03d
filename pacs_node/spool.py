"""Durable spool of received instances.

Layout under ``data_dir``::

    spool/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm   received instances
    spool/.tmp/                                         partial writes (same file system)
    quarantine/<StudyUID>/...  + REASON.txt             inputs of failed jobs (never deleted)

A durable write (the default) is: temporary file, ``fsync``, ``rename`` into
place, ``fsync`` of the directory. With the ack journal the instance is already
durable in the journal, so the materialiser writes without flushing and makes a
whole batch durable with :meth:`Spool.sync` before the journal records are freed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import IgtvError
from pipeline.uids import is_valid_uid, validate_uid

log = logging.getLogger(__name__)


class SpoolError(IgtvError):
    """The spool cannot take or move data."""


class SpoolFullError(SpoolError):
    """Free space is below the configured watermark: the instance is refused (0xA700)."""


@dataclass(frozen=True)
class StoredInstance:
    """Where an instance landed and whether it was already there."""

    path: Path
    duplicate: bool
    size: int
    changed: bool = True  # False: an identical copy was already stored (nothing written)
    new_dirs: tuple[Path, ...] = ()  # folders this write created (their parents need an fsync)


def _free_mb(path: Path) -> float:
    """Free megabytes on the file system holding ``path``."""
    return shutil.disk_usage(path).free / (1024 * 1024)


def fsync_dir(path: Path) -> None:
    """``fsync`` a directory so a rename inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable, idempotent file store of received DICOM instances.

    Parameters
    ----------
    data_dir:
        The node's data folder; ``spool/`` and ``quarantine/`` are created in it.
    min_free_mb:
        Refuse new instances when less space than this is free.
    free_mb:
        Function returning the free megabytes of a path (patchable in tests).
    """

    def __init__(
        self,
        data_dir: Path,
        min_free_mb: float = 500.0,
        free_mb: Callable[[Path], float] = _free_mb,
    ) -> None:
        self.root = Path(data_dir) / "spool"
        self.quarantine_root = Path(data_dir) / "quarantine"
        self.tmp = self.root / ".tmp"
        self.min_free_mb = float(min_free_mb)
        self._free_mb = free_mb
        for d in (self.root, self.quarantine_root, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()

    def _clean_tmp(self) -> None:
        """Remove partial writes left by a crash (they were never acknowledged)."""
        for p in self.tmp.iterdir():
            try:
                p.unlink()
            except OSError:  # pragma: no cover - best effort
                pass

    # -- paths ----------------------------------------------------------------
    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Final path of an instance; every UID is validated before it becomes a name."""
        validate_uid(study_uid, "StudyInstanceUID")
        validate_uid(series_uid, "SeriesInstanceUID")
        validate_uid(sop_uid, "SOPInstanceUID")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def study_dir(self, study_uid: str) -> Path:
        """Spool folder of a study (may not exist)."""
        return self.root / validate_uid(study_uid, "StudyInstanceUID")

    def quarantine_dir(self, study_uid: str) -> Path:
        """Quarantine folder of a study (may not exist)."""
        return self.quarantine_root / validate_uid(study_uid, "StudyInstanceUID")

    def study_files(self, study_uid: str) -> list[Path]:
        """All instance files of a study in the spool, sorted."""
        d = self.study_dir(study_uid)
        return sorted(d.rglob("*.dcm")) if d.is_dir() else []

    def instance_files(self) -> Iterator[tuple[str, str, Path]]:
        """Every ``(study UID, series UID, path)`` of an instance file in the spool.

        Only ``<study>/<series>/<sop>.dcm`` entries whose folder names are valid
        UIDs are listed; partial writes in ``.tmp`` are not.
        """
        for study in _subdirs(self.root):
            for series in _subdirs(study):
                with os.scandir(series) as entries:
                    for entry in entries:
                        if entry.name.endswith(".dcm") and entry.is_file(follow_symlinks=False):
                            yield study.name, series.name, Path(entry.path)

    def free_mb(self) -> float:
        """Free megabytes on the spool's file system."""
        return self._free_mb(self.root)

    def check_space(self, incoming_bytes: int = 0) -> None:
        """Raise :class:`SpoolFullError` when the watermark would be crossed."""
        free = self.free_mb()
        if free - incoming_bytes / (1024 * 1024) < self.min_free_mb:
            raise SpoolFullError(
                f"spool {self.root}: {free:.0f} MB free, below the {self.min_free_mb:.0f} MB watermark; "
                "free disk space or lower spool.min_free_mb"
            )

    # -- writing --------------------------------------------------------------
    def store(self, data: bytes, study_uid: str, series_uid: str, sop_uid: str,
              durable: bool = True) -> StoredInstance:
        """Write one instance; with ``durable`` (the default) return once it is on disk.

        An identical copy already in the spool is left as it is (idempotent);
        a different instance with the same SOP Instance UID replaces it
        atomically (the sender may resend a corrected version). Both are
        reported as duplicates. ``durable=False`` skips every ``fsync``: the
        caller holds a durable copy elsewhere and calls :meth:`sync` later.
        """
        final = self.instance_path(study_uid, series_uid, sop_uid)
        duplicate = final.exists()
        if duplicate and final.stat().st_size == len(data) and final.read_bytes() == data:
            return StoredInstance(path=final, duplicate=True, size=len(data), changed=False)
        if durable:  # a journaled instance passed this check when it was acknowledged
            self.check_space(len(data))
        new_dirs = [d for d in (final.parent.parent, final.parent) if not d.exists()]
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
            raise
        stored = StoredInstance(path=final, duplicate=duplicate, size=len(data), new_dirs=tuple(new_dirs))
        if durable:
            _sync_dirs([stored])
        return stored

    def sync(self, stored: Sequence[StoredInstance]) -> None:
        """Make instances written with ``durable=False`` durable: ``fsync`` each file, then the folders.

        Unchanged ones too (an identical copy found by a replay may be in memory only).
        A file moved away meanwhile (quarantine) is skipped.
        """
        for inst in stored:
            try:
                fd = os.open(inst.path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dirs(stored)

    # -- quarantine -------------------------------------------------------------
    def quarantine(self, study_uid: str, reason: str) -> Path:
        """Move a study's spooled files into quarantine with a reason file (never deletes).

        Files already in quarantine for the same study are kept; newer copies
        of the same instance replace older ones.
        """
        src = self.study_dir(study_uid)
        dst = self.quarantine_dir(study_uid)
        dst.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            _merge_move(src, dst)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(dst / "REASON.txt", "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {reason}\n")
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(dst)
        fsync_dir(self.root)
        log.info("study %s quarantined: %s", study_uid, reason)
        return dst

    def restore(self, study_uid: str) -> int:
        """Move a quarantined study's instances back into the spool (a late instance re-opened it).

        An instance received again after the quarantine is newer than its quarantined copy:
        the spool keeps the new one and the old copy stays in quarantine, with the reason
        file, as history. Returns the number of files moved.
        """
        src = self.quarantine_dir(study_uid)
        if not src.is_dir():
            return 0
        moved = _merge_move(src, self.study_dir(study_uid), skip={"REASON.txt"}, replace=False)
        fsync_dir(self.root)
        return moved


def _sync_dirs(stored: Sequence[StoredInstance]) -> None:
    """``fsync`` each instance's folder and the parents of folders the writes created, once each."""
    folders = dict.fromkeys([s.path.parent for s in stored] + [d.parent for s in stored for d in s.new_dirs])
    for folder in folders:
        try:
            fsync_dir(folder)
        except FileNotFoundError:  # moved away meanwhile (quarantine)
            continue


def _subdirs(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` named like UIDs, sorted (``.tmp`` and strays are skipped)."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    return [folder / n for n in names if is_valid_uid(n)]


def _merge_move(src: Path, dst: Path, skip: set[str] | None = None, replace: bool = True) -> int:
    """Move every file under ``src`` into the same relative place under ``dst``.

    ``replace`` False leaves a file in ``src`` where ``dst`` already has one of that name.
    Each moved file is ``fsync``-ed: it may be a journaled instance whose deferred
    :meth:`Spool.sync` will find it gone and skip it.
    """
    moved = 0
    for path in sorted(src.rglob("*")):
        if not path.is_file() or (skip and path.name in skip):
            continue
        target = dst / path.relative_to(src)
        if not replace and target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        moved += 1
    for d in sorted((p for p in src.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass
    if src.is_dir() and not any(src.iterdir()):
        src.rmdir()
    if dst.is_dir():
        fsync_dir(dst)
    return moved
