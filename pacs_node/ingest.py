"""One entry point for received instances (DIMSE C-STORE and STOW-RS): check, spool, index.

An instance counts as received only when :meth:`Ingest.store` returns, and then
its bytes are durable: with an ack journal (the node's default) the instance is
appended to it and flushed (one ``fdatasync``), and a background thread writes the
spool file and the index row moments later (:meth:`Ingest.flush` waits for that;
the listener does before it answers an association release, STOW before it
answers); without one, the spool file and its folder are fsynced and the row is
committed before :meth:`Ingest.store` returns. After a crash the journal is
replayed at startup (:meth:`Ingest.replay_journal`); a new instance's index row is
committed without an fsync of its own, and should a power loss take it,
:func:`pacs_node.reconcile.reconcile_spool` rebuilds it from the spool file.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread

from pacs_node.events import NodeEvents
from pacs_node.index import Index, InstanceRecord
from pacs_node.journal import AckJournal, JournalError
from pacs_node.materialiser import Materialiser, Pending
from pacs_node.spool import Spool, SpoolError, SpoolFullError, StoredInstance
from pipeline.errors import IgtvError, InvalidUidError

log = logging.getLogger(__name__)

# DICOM status codes used when an instance is refused.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122

#: Storing one instance taking longer than this is logged (senders time out at 10-60 s).
SLOW_ACK_S = 2.0
#: Acknowledged instances not yet in the spool and index beyond which an acknowledgement waits.
MAX_BACKLOG = 64
#: Journal records written to the spool and indexed per transaction at startup.
REPLAY_BATCH = 64

_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "Modality", "SeriesDescription", "PatientID", "StudyDate",
]


class IngestRejected(IgtvError):
    """An instance was refused; ``status`` is the DICOM status to answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class IngestResult:
    """An accepted instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    duplicate: bool


@dataclass(frozen=True)
class InstanceHeader:
    """What the node reads from an instance's header before storing or indexing it."""

    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    series_description: str
    patient_id: str
    study_date: str
    transfer_syntax: str
    meta_sop_uid: str

    def record(self, path: Path, size: int, source: str, patient_key: bytes) -> InstanceRecord:
        """The index row of this instance stored at ``path`` (the patient ID only as a keyed hash)."""
        return InstanceRecord(
            study_uid=self.study_uid, series_uid=self.series_uid, sop_uid=self.sop_uid,
            sop_class_uid=self.sop_class_uid, transfer_syntax=self.transfer_syntax, modality=self.modality,
            series_description=self.series_description, path=str(path), size=int(size), source=source,
            patient_hash=patient_hash(self.patient_id, patient_key), study_date=self.study_date,
        )


def read_header(source: BinaryIO | Path) -> InstanceHeader:
    """Read the header of a DICOM Part-10 instance (file meta and data set, no pixels).

    Raises
    ------
    IngestRejected
        With status 0xC000 when the header cannot be parsed.
    """
    try:
        ds = dcmread(source, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        tags = {t: str(ds.get(t, "") or "") for t in _HEADER_TAGS}
        return InstanceHeader(
            sop_class_uid=tags["SOPClassUID"], sop_uid=tags["SOPInstanceUID"], study_uid=tags["StudyInstanceUID"],
            series_uid=tags["SeriesInstanceUID"], modality=tags["Modality"],
            series_description=tags["SeriesDescription"], patient_id=tags["PatientID"], study_date=tags["StudyDate"],
            transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
            meta_sop_uid=str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")),
        )
    except RecursionError:  # e.g. sequences nested hundreds deep
        raise IngestRejected("cannot parse the DICOM header: sequences nested too deeply",
                             STATUS_CANNOT_UNDERSTAND) from None
    except Exception as exc:  # any parse failure is the sender's data, never a transient 0xA7xx
        raise IngestRejected(f"cannot parse the DICOM header: {type(exc).__name__}: {exc}"[:300],
                             STATUS_CANNOT_UNDERSTAND) from None


#: Name of the index secret that keys patient hashes.
PATIENT_KEY = "patient_hash"


def patient_hash(patient_id: str, key: bytes) -> str:
    """Short keyed hash (HMAC-SHA256) of a patient ID for de-identified display.

    Keyed with the node's secret, so it cannot be reversed by hashing candidate
    IDs (patient IDs are short numbers); it still groups one patient's studies.
    """
    if not patient_id:
        return ""
    return hmac.new(key, patient_id.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:12]


class Ingest:
    """Checks, spools and indexes received instances.

    Parameters
    ----------
    spool, index:
        Where instances are written and recorded.
    max_instance_bytes:
        Larger instances are refused with 0xA700.
    max_instances_per_study:
        New instances beyond this count in one study are refused with 0xA700.
    sop_classes:
        When given, other SOP classes are refused with 0x0122 (as DIMSE does at association).
    journal:
        When given, an instance is acknowledged once it is durable in this ack journal
        (one flush); the spool file and the index row follow in a background thread
        (:meth:`start`, :meth:`flush`, :meth:`stop`; :meth:`replay_journal` at startup).
        Without it, each instance is written to the spool and indexed before
        :meth:`store` returns.
    """

    def __init__(self, spool: Spool, index: Index, max_instance_bytes: int, max_instances_per_study: int,
                 events: NodeEvents | None = None, sop_classes: Collection[str] | None = None,
                 journal: AckJournal | None = None) -> None:
        self.events = events or NodeEvents()
        self.spool = spool
        self.index = index
        self.max_instance_bytes = int(max_instance_bytes)
        self.max_instances_per_study = int(max_instances_per_study)
        self.sop_classes = frozenset(str(c) for c in sop_classes) if sop_classes else None
        self.journal = journal
        self.materialiser = Materialiser(journal, self._apply, self.spool.sync) if journal is not None else None
        self._local = threading.local()  # place of the calling thread's last journaled instance

    # -- lifecycle (journal only) ----------------------------------------------------------
    def replay_journal(self) -> int:
        """Write what the ack journal holds from before a crash into the spool and index, then free it.

        Call before :meth:`start` and before anything listens; returns the number of records
        replayed (already materialised ones are found identical and left alone).
        """
        if self.journal is None:
            return 0
        records = self.journal.records()
        received: list[_Received] = []
        for rec in records:
            try:
                received.append(_Received(rec.payload, read_header(io.BytesIO(rec.payload)), rec.source))
            except IngestRejected as exc:  # it was parsed before it was journaled: a damaged record
                log.error("journal record %d cannot be read (%s); not replayed", rec.seq, exc)
        stored: list[StoredInstance] = []
        for i in range(0, len(received), REPLAY_BATCH):
            stored += self._apply(received[i:i + REPLAY_BATCH])
        self.spool.sync(stored)  # durable in the spool before the records are dropped
        self.journal.reset(max((rec.seq for rec in records), default=0))
        if records:
            log.info("replayed %d journaled instance(s) into the spool", len(records))
        return len(records)

    def unapplied_studies(self) -> set[str]:
        """Studies with acknowledged instances that are not in the index yet (their completion must wait)."""
        if self.materialiser is None:
            return set()
        return {received.header.study_uid for received in self.materialiser.queued()}

    def start(self) -> None:
        """Start writing journaled instances to the spool (no-op without a journal)."""
        if self.materialiser is not None:
            self.materialiser.start()

    def flush(self, timeout: float = 60.0, this_thread: bool = False) -> bool:
        """Wait until every instance acknowledged so far is in the spool and the index.

        With ``this_thread``, only those acknowledged by the calling thread (one DIMSE
        association or STOW request), and the ones before them: a thread that stored
        nothing does not wait.
        """
        if self.materialiser is None:
            return True
        if not this_thread:
            return self.materialiser.wait(timeout)
        upto = getattr(self._local, "place", 0)
        return upto == 0 or self.materialiser.wait(timeout, upto)

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is pending and stop; the journal keeps anything left for the next start."""
        if self.materialiser is not None:
            assert self.journal is not None
            if self.materialiser.stop(timeout):
                self.journal.reset()  # all durable in the spool: nothing to replay at the next start
            else:
                log.warning("%d journaled instance(s) not yet in the spool; replayed at the next start",
                            self.materialiser.backlog)
            self.journal.close()

    # -- storing ----------------------------------------------------------------------------
    def store(self, part10: bytes, source: str, expected_study: str | None = None) -> IngestResult:
        """Store one instance (see :meth:`_store`), telling ``events`` what happened."""
        start = time.perf_counter()
        try:
            res, modality, size = self._store(part10, source, expected_study)
        except IngestRejected as exc:
            self.events.emit("instance_refused", source=source, status=exc.status, reason=str(exc))
            raise
        seconds = time.perf_counter() - start
        if seconds > SLOW_ACK_S:
            log.warning("storing instance %s took %.1f s (the disk is slow to flush, or the spool is stalled)",
                        res.sop_uid, seconds)
        self.events.emit("instance_stored", study_uid=res.study_uid, series_uid=res.series_uid, sop_uid=res.sop_uid,
                         modality=modality, size=size, source=source, duplicate=res.duplicate, seconds=seconds)
        return res

    def _store(self, part10: bytes, source: str, expected_study: str | None) -> tuple[IngestResult, str, int]:
        """Store one DICOM Part-10 byte string durably; raise :class:`IngestRejected` when refused.

        Parameters
        ----------
        part10:
            Preamble, ``DICM``, file meta and data set, exactly as received.
        source:
            Who sent it (``dimse:AET`` or ``stow``), kept in the index.
        expected_study:
            When set, the instance must belong to this study (STOW ``/studies/{uid}``).
        """
        header = self._check(part10, expected_study)
        journal = self.journal
        if journal is not None and len(part10) + len(source) <= journal.max_payload:
            return self._journal(part10, header, source), header.modality, len(part10)
        if journal is not None:  # too large for a segment: keep the order, then write it directly
            self.flush()
        with _refused_on_write_errors(header.sop_uid):
            stored = self.spool.store(part10, header.study_uid, header.series_uid, header.sop_uid)
        try:
            self._record([(header, stored, source)])
        except sqlite3.Error as exc:
            log.error("cannot index instance %s: %s", header.sop_uid, exc)
            raise IngestRejected(f"cannot record the instance in the index: {exc}", STATUS_OUT_OF_RESOURCES) from None
        log.debug("stored %s (%s) from %s", header.sop_uid, header.modality, source)
        return self._result(header, stored.duplicate), header.modality, stored.size

    def _check(self, part10: bytes, expected_study: str | None) -> InstanceHeader:
        """Parse and check an instance before anything is written; raise :class:`IngestRejected`."""
        if len(part10) > self.max_instance_bytes:
            raise IngestRejected(
                f"instance of {len(part10)} bytes exceeds the {self.max_instance_bytes}-byte limit",
                STATUS_OUT_OF_RESOURCES,
            )
        header = read_header(io.BytesIO(part10))
        study, sop = header.study_uid, header.sop_uid
        if not header.sop_class_uid:
            raise IngestRejected(
                "the data set has no SOP Class UID (0008,0016): not a storable instance (truncated, or not DICOM?)",
                STATUS_CANNOT_UNDERSTAND,
            )
        if self.sop_classes is not None and header.sop_class_uid not in self.sop_classes:
            raise IngestRejected(
                f"SOP class {header.sop_class_uid} is not accepted by this node (CT, PET, SEG, RTSTRUCT)",
                STATUS_SOP_CLASS_NOT_SUPPORTED,
            )
        if header.meta_sop_uid and sop and header.meta_sop_uid != sop:
            raise IngestRejected(
                f"SOPInstanceUID {sop!r} differs from the file meta's {header.meta_sop_uid!r}", STATUS_DATASET_MISMATCH
            )
        if expected_study is not None and study != expected_study:
            raise IngestRejected(
                f"instance {sop!r} belongs to study {study!r}, not {expected_study!r}", STATUS_DATASET_MISMATCH
            )
        known = self.index.instance(sop) if sop else None
        if known and (known["study_uid"], known["series_uid"]) != (study, header.series_uid):
            raise IngestRejected(
                f"SOP Instance UID {sop} is already stored in series {known['series_uid']} of study "
                f"{known['study_uid']}; an instance cannot move to series {header.series_uid} of study {study} "
                f"(send it with a new SOP Instance UID)", STATUS_DATASET_MISMATCH,
            )
        count = self.index.study_instance_count(study) if study else 0
        if count >= self.max_instances_per_study and not known:
            raise IngestRejected(
                f"study {study} already holds {count} instances (limit {self.max_instances_per_study})",
                STATUS_OUT_OF_RESOURCES,
            )
        return header

    def _journal(self, part10: bytes, header: InstanceHeader, source: str) -> IngestResult:
        """Acknowledge through the ack journal: checks, one durable append, then hand it to the materialiser."""
        assert self.journal is not None and self.materialiser is not None
        with _refused_on_write_errors(header.sop_uid):
            self.spool.instance_path(header.study_uid, header.series_uid, header.sop_uid)  # UIDs fit for paths
            self.spool.check_space(len(part10))
            entry = self.journal.append(part10, source)
        duplicate = self.index.instance(header.sop_uid) is not None  # as far as the index knows yet
        self._local.place = self.materialiser.submit(Pending(entry, _Received(part10, header, source), len(part10)))
        if self.materialiser.backlog > MAX_BACKLOG:  # the spool fell behind (many associations): let it catch up
            self.materialiser.wait()
        log.debug("journaled %s (%s) from %s", header.sop_uid, header.modality, source)
        return self._result(header, duplicate)

    def _apply(self, items: Sequence[_Received]) -> list[StoredInstance]:
        """Write journaled instances to the spool (not flushed: see :meth:`Spool.sync`) and index them.

        Idempotent: an instance already spooled with the same bytes is left alone.
        """
        stored = [self.spool.store(r.part10, r.header.study_uid, r.header.series_uid, r.header.sop_uid,
                                   durable=False) for r in items]
        self._record([(r.header, inst, r.source) for r, inst in zip(items, stored, strict=True)])
        return stored

    def _record(self, items: Sequence[tuple[InstanceHeader, StoredInstance, str]]) -> None:
        """Index spooled instances (one transaction); a study's first instance emits ``study_received``."""
        studies = {h.study_uid for h, _, _ in items}  # usually one: ask the index once per study, not per item
        unseen = {uid for uid in studies if self.index.study_instance_count(uid) == 0}
        key = self.index.secret(PATIENT_KEY)
        news = self.index.record_instances(
            [(header.record(inst.path, inst.size, source, key), inst.changed) for header, inst, source in items])
        for (header, _, source), new in zip(items, news, strict=True):
            if new and header.study_uid in unseen:
                unseen.discard(header.study_uid)
                self.events.emit("study_received", study_uid=header.study_uid, source=source)

    @staticmethod
    def _result(header: InstanceHeader, duplicate: bool) -> IngestResult:
        return IngestResult(header.study_uid, header.series_uid, header.sop_uid, header.sop_class_uid, duplicate)


@contextmanager
def _refused_on_write_errors(sop_uid: str) -> Iterator[None]:
    """Turn a failure to write an instance (spool or journal) into the refusal its sender sees."""
    try:
        yield
    except InvalidUidError as exc:
        raise IngestRejected(str(exc), STATUS_DATASET_MISMATCH) from None
    except SpoolFullError as exc:
        log.warning("refusing instance: %s", exc)
        raise IngestRejected(str(exc), STATUS_OUT_OF_RESOURCES) from None
    except (SpoolError, JournalError, OSError) as exc:
        log.error("cannot write instance %s: %s", sop_uid, exc)
        raise IngestRejected(f"cannot write the instance: {exc}", STATUS_OUT_OF_RESOURCES) from None


@dataclass(frozen=True)
class _Received:
    """A checked instance on its way from the journal to the spool."""

    part10: bytes
    header: InstanceHeader
    source: str
