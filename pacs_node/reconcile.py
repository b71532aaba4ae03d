"""Startup reconciliation: index every spooled instance the index does not know.

An instance is acknowledged once its spool file is fsynced and its index row
committed; that commit is not fsynced (see :mod:`pacs_node.index`), so a power
loss may take the last rows while their files, fsynced before, survive. The
spool is the durable record and the index is rebuilt from it: before the node
listens, every ``spool/<study>/<series>/<sop>.dcm`` whose SOP Instance UID is
not in the index is read and recorded, which also re-opens its study (a new
generation) so it is processed with that instance. A file whose header cannot
be read, or does not match its place, is left where it is and reported.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pacs_node.index import Index
from pacs_node.ingest import PATIENT_KEY, IngestRejected, read_header
from pacs_node.spool import Spool

log = logging.getLogger(__name__)

#: ``source`` of rows added by reconciliation (the original sender is not recorded in the file).
RECONCILED_SOURCE = "reconciled"


@dataclass
class ReconcileReport:
    """What one reconciliation pass found."""

    scanned: int = 0
    indexed: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0


def reconcile_spool(spool: Spool, index: Index) -> ReconcileReport:
    """Index the spool's instance files that the index lacks; return what was done.

    Parameters
    ----------
    spool, index:
        The node's spool and index (before the listeners start).
    """
    start = time.monotonic()
    report = ReconcileReport()
    known = index.known_sop_uids()
    for study_uid, series_uid, path in spool.instance_files():
        report.scanned += 1
        sop_uid = path.name[: -len(".dcm")]
        if sop_uid in known:
            continue
        try:
            header = read_header(path)
        except IngestRejected as exc:
            report.unreadable.append((path, str(exc)))
            continue
        except OSError as exc:
            report.unreadable.append((path, f"cannot read: {exc}"))
            continue
        if (header.study_uid, header.series_uid, header.sop_uid) != (study_uid, series_uid, sop_uid):
            report.unreadable.append((path, "the header's study, series or SOP Instance UID does not match the path"))
            continue
        index.record_instance(header.record(path, path.stat().st_size, RECONCILED_SOURCE, index.secret(PATIENT_KEY)))
        known.add(sop_uid)
        report.indexed.append(path)
    report.seconds = time.monotonic() - start
    if report.indexed:
        log.warning("indexed %d spooled instance(s) the index did not know (commits lost in a crash or power loss)",
                    len(report.indexed))
    for path, reason in report.unreadable:
        log.error("spool file %s is not indexed and was left in place: %s", path, reason)
    log.info("spool reconciled: %d instance files, %d indexed, %d unreadable, %.2f s", report.scanned,
             len(report.indexed), len(report.unreadable), report.seconds)
    return report
