"""STOW-RS ingest: ``POST /dicomweb/studies[/{StudyUID}]`` into the same spool as DIMSE.

Answers the standard store-instances response: ReferencedSOPSequence
(0008,1199) for stored instances, FailedSOPSequence (0008,1198) with a
FailureReason (0008,1197) for refused ones; HTTP 200 (all stored), 202 (some
refused), 409 (none stored), 400 (malformed body), 415 (not application/dicom).
"""

from __future__ import annotations

import io
import logging

from pydicom import dcmread

from pacs_node.http import Request, Response, Router
from pacs_node.ingest import STATUS_CANNOT_UNDERSTAND, Ingest, IngestRejected
from pacs_node.multipart import MultipartError, parse_content_type, parse_related
from pipeline.errors import InvalidUidError
from pipeline.uids import validate_uid

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"


def _elem(vr: str, *values: object) -> dict:
    return {"vr": vr, "Value": list(values)}


def _uids_of(part10: bytes) -> tuple[str, str]:
    """Best-effort (SOPClassUID, SOPInstanceUID) of a refused part, for the failure list."""
    try:
        ds = dcmread(io.BytesIO(part10), stop_before_pixels=True, force=True,
                     specific_tags=["SOPClassUID", "SOPInstanceUID"])
        return str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    except Exception:  # anything unreadable simply has no UIDs to report
        return "", ""


class StowService:
    """Handles STOW-RS requests with an :class:`Ingest`."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest

    def register(self, router: Router, prefix: str = "/dicomweb") -> None:
        """Add the STOW-RS routes (bearer-token protected)."""
        router.add("POST", rf"{prefix}/studies", self.handle)
        router.add("POST", rf"{prefix}/studies/(?P<study>[^/]+)", self.handle)

    def handle(self, request: Request) -> Response:
        """Answer one STOW-RS request, then emit ``stow_request`` (whatever the outcome)."""
        source = f"stow:{request.client}"
        status = 500
        try:
            response = self._handle(request, source)
            status = response.status
            return response
        finally:
            self.ingest.events.emit("stow_request", source=source, status=status)

    def _handle(self, request: Request, source: str) -> Response:
        expected = request.params.get("study")
        if expected is not None:
            try:
                validate_uid(expected, "StudyInstanceUID in the URL")
            except InvalidUidError as exc:
                return Response.text(f"{exc}\n", 400)
        ctype = request.headers.get("content-type", "")
        media, params = parse_content_type(ctype)
        if media != "multipart/related":
            return Response.text(f"Content-Type must be multipart/related; type=\"application/dicom\", got {media!r}\n",
                                 415)
        related_type = params.get("type", "application/dicom").lower()
        if related_type != "application/dicom":
            return Response.text(f"only type=\"application/dicom\" is supported, got {related_type!r}\n", 415)
        try:
            _, parts = parse_related(request.body, ctype)
        except MultipartError as exc:
            return Response.text(f"malformed multipart body: {exc}\n", 400)
        bad = [i + 1 for i, p in enumerate(parts) if p.content_type not in ("", "application/dicom")]
        if bad:
            return Response.text(f"part(s) {bad} are not application/dicom\n", 415)
        referenced, failed = [], []
        base = f"http://{request.headers.get('host', 'localhost')}/dicomweb"
        for part in parts:
            try:
                res = self.ingest.store(part.content, source=source, expected_study=expected)
            except IngestRejected as exc:
                cls, sop = _uids_of(part.content)
                log.warning("STOW part %s refused (0x%04X): %s", sop or "?", exc.status, exc)
                failed.append({"00081150": _elem("UI", cls), "00081155": _elem("UI", sop),
                               "00081197": _elem("US", exc.status)})
                continue
            except Exception:  # report as a failure, never drop silently
                log.exception("STOW part failed")
                cls, sop = _uids_of(part.content)
                failed.append({"00081150": _elem("UI", cls), "00081155": _elem("UI", sop),
                               "00081197": _elem("US", STATUS_CANNOT_UNDERSTAND)})
                continue
            referenced.append({
                "00081150": _elem("UI", res.sop_class_uid),
                "00081155": _elem("UI", res.sop_uid),
                "00081190": _elem("UR", f"{base}/studies/{res.study_uid}/series/{res.series_uid}/instances/{res.sop_uid}"),
            })
        if referenced:  # the response follows once the stored parts are in the spool and the index
            self.ingest.flush(this_thread=True)
        doc: dict = {}
        if expected:
            doc["00081190"] = _elem("UR", f"{base}/studies/{expected}")
        if referenced:
            doc["00081199"] = _elem("SQ", *referenced)
        if failed:
            doc["00081198"] = _elem("SQ", *failed)
        status = 200 if not failed else (202 if referenced else 409)
        return Response.json(doc, status, DICOM_JSON)
