"""DIMSE listener: Verification and Storage SCP that acknowledges only what is on disk.

A release request is answered once every acknowledged instance is in the spool and
the index (:meth:`~pacs_node.ingest.Ingest.flush`), so a sender that sees its
association end finds its study there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedPETImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
    PositronEmissionTomographyImageStorage,
    RTStructureSetStorage,
    SegmentationStorage,
    Verification,
)

from pacs_node.config import ListenerConfig
from pacs_node.dulguard import guard_server
from pacs_node.ingest import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, Ingest, IngestRejected
from pacs_node.part10 import received_part10
from pacs_node.tls import server_context

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    PositronEmissionTomographyImageStorage,
    EnhancedPETImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
    SegmentationStorage,
    RTStructureSetStorage,
)

Handler = tuple[Any, Callable[..., Any]]


def build_ae(cfg: ListenerConfig) -> AE:
    """An AE with our title, limits, calling-AE allow list and called-AE check."""
    ae = AE(ae_title=cfg.ae_title)
    ae.maximum_pdu_size = int(cfg.max_pdu)
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    ae.maximum_associations = 32
    if cfg.allow_aet:
        ae.require_calling_aet = list(cfg.allow_aet)
    ae.require_called_aet = bool(cfg.require_called_aet)
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    return ae


class Listener:
    """The running DIMSE server.

    Parameters
    ----------
    cfg:
        Listener settings (AE title, host, port: 0 picks a free one, TLS, limits).
    ingest:
        Where received instances go.
    extra_handlers:
        More ``(event, handler)`` pairs, e.g. for an audit log.
    """

    def __init__(self, cfg: ListenerConfig, ingest: Ingest, extra_handlers: list[Handler] | None = None) -> None:
        self.cfg = cfg
        self.ingest = ingest
        self.ae = build_ae(cfg)
        self._handlers: list[Handler] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_ACSE_RECV, self._on_acse_recv),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            *(extra_handlers or []),
        ]
        self._server: Any = None

    def start(self) -> int:
        """Start serving in background threads; return the bound port."""
        ssl_ctx = server_context(self.cfg.tls) if self.cfg.tls.enabled else None
        self._server = self.ae.start_server(
            (self.cfg.host, int(self.cfg.port)), block=False, evt_handlers=self._handlers, ssl_context=ssl_ctx
        )
        guard_server(self._server, int(self.cfg.max_pdu), self.ingest.max_instance_bytes, self.ae.network_timeout)
        port = int(self._server.server_address[1])
        log.info("DIMSE listener %s on %s:%d%s", self.cfg.ae_title, self.cfg.host, port,
                 " (TLS)" if ssl_ctx else "")
        return port

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop accepting, end the server's threads."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()

    def _on_store(self, event: Any) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            self.ingest.store(received_part10(event), source=f"dimse:{calling}")
        except IngestRejected as exc:
            log.warning("C-STORE from %s refused (0x%04X): %s", calling, exc.status, exc)
            return exc.status
        except Exception:  # never let the sender believe an unwritten instance is stored
            log.exception("C-STORE from %s failed", calling)
            return STATUS_OUT_OF_RESOURCES
        return STATUS_SUCCESS

    def _on_acse_recv(self, event: Any) -> None:
        """Before a release is answered, what this association stored is in the spool and the index."""
        primitive = event.primitive
        if isinstance(primitive, A_RELEASE) and primitive.result is None and not self.ingest.flush(this_thread=True):
            log.warning("association released before every acknowledged instance reached the spool "
                        "(they are safe in the ack journal)")

    def _peer(self, event: Any) -> dict[str, str]:
        rq = event.assoc.requestor
        called = getattr(rq.primitive, "called_ae_title", None) or event.assoc.acceptor.ae_title
        return {"calling_ae": str(rq.ae_title).strip(), "called_ae": str(called).strip(),
                "peer": f"{rq.address}:{rq.port}"}

    def _on_accepted(self, event: Any) -> None:
        self.ingest.events.emit("association_accepted", **self._peer(event))

    def _on_rejected(self, event: Any) -> None:
        peer = self._peer(event)
        reason = "rejected"
        if self.cfg.allow_aet and peer["calling_ae"] not in self.cfg.allow_aet:
            reason = "calling AE title not allowed"
        elif self.cfg.require_called_aet and peer["called_ae"] != self.cfg.ae_title:
            reason = "called AE title is not ours"
        log.warning("association from %s (%s) rejected: %s", peer["calling_ae"], peer["peer"], reason)
        self.ingest.events.emit("association_rejected", reason=reason, **peer)

    def _on_ended(self, event: Any) -> None:
        self.ingest.events.emit("association_ended", **self._peer(event))
