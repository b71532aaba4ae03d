"""Sending results: DIMSE C-STORE (optional TLS) and DICOMweb STOW-RS, with a retry policy.

Transient failures (connection refused, timeouts, 0xA7xx, HTTP 5xx/429/408)
raise :class:`TransientExportError` and are retried with capped exponential
backoff; permanent ones (association rejected permanently, SOP class not
supported, 0xA9xx/0x0122/0xCxxx, HTTP 4xx, a TLS certificate that fails
verification) raise :class:`PermanentExportError` at once.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pacs_node.config import ConfigError, Destination, ExportConfig, TlsConfig, parse_aet_address
from pacs_node.multipart import encode_related
from pacs_node.tls import client_context
from pipeline.errors import IgtvError

log = logging.getLogger(__name__)

WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}


class ExportError(IgtvError):
    """Results could not be sent to a destination."""


class TransientExportError(ExportError):
    """A failure that may pass (peer down, busy, out of resources): retry later."""


class PermanentExportError(ExportError):
    """A failure that will not pass by retrying (rejected, unsupported, refused data)."""


class EchoError(IgtvError):
    """C-ECHO failed; the message says how."""


def _ae(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def _tls_args(dest: Destination, tls: TlsConfig | None) -> tuple[ssl.SSLContext, str] | None:
    return (client_context(tls), str(dest.host)) if dest.tls else None


def _associate(ae: AE, dest: Destination, tls: TlsConfig | None):
    """Associate or raise the right kind of error."""
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    try:
        assoc = ae.associate(str(dest.host), int(dest.port), ae_title=str(dest.ae_title),
                             tls_args=_tls_args(dest, tls))
    except socket.gaierror as exc:  # DNS down or the name unknown: may pass
        raise TransientExportError(f"cannot resolve the host of {where}: {exc.strerror}") from None
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        detail = f"{rsp.result_str}, {rsp.source_str}: {rsp.reason_str}" if rsp is not None else "rejected"
        if rsp is not None and rsp.result == 0x02:
            raise TransientExportError(f"{where} rejected the association ({detail})")
        raise PermanentExportError(f"{where} rejected the association ({detail}); check AE titles on both sides")
    rejected = getattr(assoc, "rejected_contexts", [])
    if rejected:
        names = sorted({str(cx.abstract_syntax.name) for cx in rejected})
        raise PermanentExportError(f"{where} does not accept SOP class(es) {', '.join(names)}")
    if dest.tls:
        problem = _certificate_problem(dest, tls, ae.connection_timeout)
        if problem:
            raise PermanentExportError(f"{where}: TLS certificate check failed ({problem}); {_CA_HINT}")
    raise TransientExportError(f"cannot connect to {where} (refused, unreachable or timed out)")


_CA_HINT = "set export.tls.ca to the CA that signed the destination's certificate"


def _certificate_problem(dest: Destination, tls: TlsConfig | None, timeout: float | None) -> str | None:
    """Why the destination's certificate fails verification, or None (it passes, or no connection)."""
    try:
        with socket.create_connection((str(dest.host), int(dest.port)), timeout=timeout or 10.0) as raw:
            with client_context(tls).wrap_socket(raw, server_hostname=str(dest.host)):
                return None
    except ssl.SSLCertVerificationError as exc:
        return str(exc.verify_message or exc)
    except (OSError, ssl.SSLError):
        return None


def classify_status(status: int) -> str:
    """'ok', 'transient' or 'permanent' for a C-STORE response status."""
    if status == 0x0000 or status in WARNING_STATUSES:
        return "ok"
    if 0xA700 <= status <= 0xA7FF:
        return "transient"
    return "permanent"


def send_dimse(dest: Destination, files: list[Path], calling_ae: str, timeout: float = 30.0,
               tls: TlsConfig | None = None) -> list[str]:
    """C-STORE ``files`` in one association, checking each status; return the stored SOP Instance UIDs."""
    if not files:
        return []
    datasets = [dcmread(p) for p in files]
    ae = _ae(calling_ae, timeout)
    for cls in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}):
        syntaxes = list(dict.fromkeys([cls[1], ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        ae.add_requested_context(cls[0], syntaxes)
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    assoc = _associate(ae, dest, tls)
    sent: list[str] = []
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        for ds in datasets:
            if str(ds.SOPClassUID) not in accepted:
                raise PermanentExportError(
                    f"{where} does not accept SOP class {ds.SOPClassUID.name} ({ds.SOPClassUID})"
                )
            rsp = assoc.send_c_store(ds)
            if "Status" not in rsp:
                raise TransientExportError(f"{where}: no C-STORE response for {ds.SOPInstanceUID} (timeout or abort)")
            status = int(rsp.Status)
            kind = classify_status(status)
            if kind == "transient":
                raise TransientExportError(f"{where} answered 0x{status:04X} (out of resources) for {ds.SOPInstanceUID}")
            if kind == "permanent":
                raise PermanentExportError(f"{where} refused {ds.SOPInstanceUID} with status 0x{status:04X}")
            sent.append(str(ds.SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()
    return sent


def send_dicomweb(dest: Destination, files: list[Path], timeout: float = 30.0,
                  tls: TlsConfig | None = None) -> list[str]:
    """STOW-RS ``files`` to ``{url}/studies`` in one request; return the stored SOP Instance UIDs."""
    blobs = [Path(p).read_bytes() for p in files]
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    body, ctype = encode_related(blobs)
    url = f"{dest.url}/studies"
    headers = {"Content-Type": ctype, "Accept": "application/dicom+json"}
    if dest.token:
        headers["Authorization"] = f"Bearer {dest.token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    context = client_context(tls) if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            problem = exc.reason.verify_message or exc.reason
            raise PermanentExportError(f"{url}: TLS certificate check failed ({problem}); {_CA_HINT}") from None
        raise TransientExportError(f"cannot reach {url}: {exc.reason}") from None
    except (TimeoutError, ConnectionError, ssl.SSLError, OSError) as exc:
        raise TransientExportError(f"cannot reach {url}: {exc}") from None
    if status in (200, 201):
        return uids
    text = payload[:300].decode("utf-8", "replace")
    if status == 202:
        failed = _failed_uids(payload)
        raise PermanentExportError(f"{url} stored only some instances; refused: {failed or text}")
    if status >= 500 or status in (408, 429):
        raise TransientExportError(f"{url} answered HTTP {status}: {text}")
    raise PermanentExportError(f"{url} answered HTTP {status}: {text}")


def _failed_uids(payload: bytes) -> list[str]:
    try:
        doc = json.loads(payload)
        return [i["00081155"]["Value"][0] for i in doc.get("00081198", {}).get("Value", [])]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return []


def send_files(dest: Destination, files: list[Path], cfg: ExportConfig, calling_ae: str) -> list[str]:
    """One attempt to send ``files`` to ``dest``."""
    if dest.kind == "dimse":
        return send_dimse(dest, files, calling_ae, cfg.timeout_s, cfg.tls)
    if dest.kind == "dicomweb":
        return send_dicomweb(dest, files, cfg.timeout_s, cfg.tls)
    raise ConfigError(f"destination {dest.name}: unknown kind {dest.kind!r}")


def backoff_delay(attempt: int, initial: float, cap: float) -> float:
    """Delay before attempt ``attempt + 1`` (attempt counts from 1): initial * 2^(attempt-1), capped."""
    return min(cap, initial * (2 ** max(0, attempt - 1)))


def send_with_retries(dest: Destination, files: list[Path], cfg: ExportConfig, calling_ae: str,
                      sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Send with retries for transient failures (at most ``cfg.max_attempts``); permanent ones raise at once."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return send_files(dest, files, cfg, calling_ae)
        except TransientExportError as exc:
            if attempt >= cfg.max_attempts:
                raise TransientExportError(f"{exc} (gave up after {attempt} attempts)") from None
            delay = backoff_delay(attempt, cfg.backoff_initial_s, cfg.backoff_max_s)
            log.warning("export to %s failed (attempt %d), retrying in %.1f s: %s", dest.name, attempt, delay, exc)
            sleep(delay)


def echo_peer(target: str, calling_ae: str = "IGTV", timeout: float = 10.0, tls: TlsConfig | None = None,
              use_tls: bool = False) -> float:
    """C-ECHO ``AET@HOST:PORT``; return the round trip in milliseconds or raise :class:`EchoError`."""
    aet, host, port = parse_aet_address(target)
    dest = Destination(name="echo", kind="dimse", ae_title=aet, host=host, port=port, tls=use_tls)
    ae = _ae(calling_ae, timeout)
    ae.add_requested_context(Verification)
    start = time.perf_counter()
    try:
        assoc = _associate(ae, dest, tls)
    except ExportError as exc:
        raise EchoError(str(exc)) from None
    try:
        status = assoc.send_c_echo()
        elapsed = (time.perf_counter() - start) * 1000.0
        if "Status" not in status:
            raise EchoError(f"{target}: no C-ECHO response within {timeout:.0f} s")
        if int(status.Status) != 0:
            raise EchoError(f"{target}: C-ECHO answered status 0x{int(status.Status):04X}")
        return elapsed
    finally:
        if assoc.is_established:
            assoc.release()
