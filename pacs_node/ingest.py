"""One entry point for received instances (DIMSE C-STORE and STOW-RS): check, spool, index.

An instance counts as received only when :meth:`Ingest.store` returns: its
bytes are on disk (file and directory fsynced) and its row is committed in the
index. A new instance's row is committed without an fsync of its own; should a
power loss take it, :func:`pacs_node.reconcile.reconcile_spool` rebuilds it
from the durable spool file at the next start.
"""

from __future__ import annotations

import hashlib
import io
import logging
import sqlite3
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread

from pacs_node.events import NodeEvents
from pacs_node.index import Index, InstanceRecord
from pacs_node.spool import Spool, SpoolError, SpoolFullError
from pipeline.errors import IgtvError, InvalidUidError

log = logging.getLogger(__name__)

# DICOM status codes used when an instance is refused.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122

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

    def record(self, path: Path, size: int, source: str) -> InstanceRecord:
        """The index row of this instance stored at ``path`` (the patient ID only as a hash)."""
        return InstanceRecord(
            study_uid=self.study_uid, series_uid=self.series_uid, sop_uid=self.sop_uid,
            sop_class_uid=self.sop_class_uid, transfer_syntax=self.transfer_syntax, modality=self.modality,
            series_description=self.series_description, path=str(path), size=int(size), source=source,
            patient_hash=patient_hash(self.patient_id), study_date=self.study_date,
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


def patient_hash(patient_id: str) -> str:
    """Short one-way hash of a patient ID for de-identified display and logs."""
    if not patient_id:
        return ""
    return hashlib.sha256(patient_id.encode("utf-8", "replace")).hexdigest()[:12]


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
    """

    def __init__(self, spool: Spool, index: Index, max_instance_bytes: int, max_instances_per_study: int,
                 events: NodeEvents | None = None, sop_classes: Collection[str] | None = None) -> None:
        self.events = events or NodeEvents()
        self.spool = spool
        self.index = index
        self.max_instance_bytes = int(max_instance_bytes)
        self.max_instances_per_study = int(max_instances_per_study)
        self.sop_classes = frozenset(str(c) for c in sop_classes) if sop_classes else None

    def store(self, part10: bytes, source: str, expected_study: str | None = None) -> IngestResult:
        """Store one instance (see :meth:`_store`), telling ``events`` what happened."""
        start = time.perf_counter()
        try:
            res, modality, size = self._store(part10, source, expected_study)
        except IngestRejected as exc:
            self.events.emit("instance_refused", source=source, status=exc.status, reason=str(exc))
            raise
        self.events.emit("instance_stored", study_uid=res.study_uid, series_uid=res.series_uid, sop_uid=res.sop_uid,
                         modality=modality, size=size, source=source, duplicate=res.duplicate,
                         seconds=time.perf_counter() - start)
        if not res.duplicate and self.index.study_instance_count(res.study_uid) == 1:
            self.events.emit("study_received", study_uid=res.study_uid, source=source)
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
        if len(part10) > self.max_instance_bytes:
            raise IngestRejected(
                f"instance of {len(part10)} bytes exceeds the {self.max_instance_bytes}-byte limit",
                STATUS_OUT_OF_RESOURCES,
            )
        header = read_header(io.BytesIO(part10))
        study, series, sop = header.study_uid, header.series_uid, header.sop_uid
        if self.sop_classes is not None and header.sop_class_uid not in self.sop_classes:
            raise IngestRejected(
                f"SOP class {header.sop_class_uid or '(none)'} is not accepted by this node (CT, PET, SEG, RTSTRUCT)",
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
        count = self.index.study_instance_count(study) if study else 0
        if count >= self.max_instances_per_study and not (sop and self.index.instance(sop)):
            raise IngestRejected(
                f"study {study} already holds {count} instances (limit {self.max_instances_per_study})",
                STATUS_OUT_OF_RESOURCES,
            )
        try:
            stored = self.spool.store(part10, study, series, sop)
        except InvalidUidError as exc:
            raise IngestRejected(str(exc), STATUS_DATASET_MISMATCH) from None
        except SpoolFullError as exc:
            log.warning("refusing instance: %s", exc)
            raise IngestRejected(str(exc), STATUS_OUT_OF_RESOURCES) from None
        except (SpoolError, OSError) as exc:
            log.error("cannot write instance %s: %s", sop, exc)
            raise IngestRejected(f"cannot write the instance: {exc}", STATUS_OUT_OF_RESOURCES) from None
        try:
            self.index.record_instance(header.record(stored.path, stored.size, source), changed=stored.changed)
        except sqlite3.Error as exc:
            log.error("cannot index instance %s: %s", sop, exc)
            raise IngestRejected(f"cannot record the instance in the index: {exc}", STATUS_OUT_OF_RESOURCES) from None
        log.debug("stored %s (%s) from %s", sop, header.modality, source)
        return IngestResult(study, series, sop, header.sop_class_uid, stored.duplicate), header.modality, stored.size
