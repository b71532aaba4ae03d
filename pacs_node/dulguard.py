"""Bounds on what one peer can make the DIMSE listener wait for or hold in memory.

pynetdicom's acceptor reads a PDU by trusting its declared length (up to 4 GiB) and
blocks in ``recv`` without a socket timeout, so a peer that declares a huge PDU is
buffered in full, and a peer that stops mid-PDU holds a thread (and one of the
``maximum_associations`` slots) forever. The guarded socket used for every accepted
connection:

* gives the connection a socket timeout (the AE's network timeout): a stall inside a
  PDU ends the association instead of hanging it;
* refuses a PDU whose declared length exceeds our maximum PDU (the peer agreed to it
  at association) or a DIMSE data set larger than the instance limit, before reading
  it: the connection is closed (pynetdicom's "transport closed" path), nothing is acked;
* is a :class:`~pacs_node.dulwake.WakeableSocket`: the DUL reactor waits on it for data
  or a queued response instead of sleeping 1 ms between polls.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Any, cast

from pynetdicom.transport import RequestHandler

from pacs_node.dulwake import WakeableSocket

log = logging.getLogger(__name__)

#: Slack over the negotiated maximum for A-ASSOCIATE PDUs with many presentation contexts.
MIN_PDU_LIMIT = 1024 * 1024


class PeerLimitError(OSError):
    """The peer sent more than the node accepts; the connection is dropped."""


class GuardedSocket(WakeableSocket):
    """An association socket that checks PDU lengths and data-set sizes as it reads."""

    max_pdu_body: int = MIN_PDU_LIMIT
    max_message: int = 0  # 0: no limit on one DIMSE data set
    _header: bytes | None = None
    _message_bytes: int = 0

    def recv(self, nr_bytes: int) -> bytearray:
        header, self._header = self._header, None
        if header is None and nr_bytes == 6:
            data = super().recv(6)
            if len(data) == 6:
                self._header = bytes(data)
            return data
        if header is not None and nr_bytes > self.max_pdu_body:
            log.warning("peer %s declared a %d-byte PDU (type 0x%02X), above the %d-byte limit; closing",
                        self._peer(), nr_bytes, header[0], self.max_pdu_body)
            raise PeerLimitError(f"PDU of {nr_bytes} bytes exceeds the limit")
        data = self._recv_exact(nr_bytes)
        if header is not None and header[0] == 0x04 and self.max_message:
            with memoryview(data) as view:
                self._count_pdvs(view)
        return data

    def _recv_exact(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer when the peer closes) in large ``recv_into`` calls.

        After each read the socket is put back into quick-ACK mode: most senders
        (dcmtk since 3.6.2) keep Nagle's algorithm on, so the last partial segment
        of every message waits for our ACK, which Linux would otherwise delay by up
        to 40 ms: with one message in flight at a time that delay, not the disk,
        bounded the ingest rate.
        """
        sock = self.socket
        if sock is None:
            return bytearray()
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        try:
            while got < nr_bytes:
                n = sock.recv_into(view[got:], nr_bytes - got)
                if not n:
                    return buf[:got]
                got += n
                _quickack(sock)
        finally:
            view.release()
        return buf

    def _count_pdvs(self, body: bytes | memoryview) -> None:
        """Sum data-set fragment bytes of the current message; refuse once above ``max_message``."""
        pos = 0
        while pos + 6 <= len(body):
            (length,) = struct.unpack_from(">L", body, pos)
            control = body[pos + 5]
            if not control & 0x01:  # a data set fragment
                self._message_bytes += max(0, length - 2)
                if self._message_bytes > self.max_message:
                    log.warning("peer %s sent a data set above %d bytes; closing", self._peer(), self.max_message)
                    raise PeerLimitError("data set exceeds the instance size limit")
                if control & 0x02:
                    self._message_bytes = 0
            pos += 4 + length

    def _peer(self) -> str:
        try:
            return str(self.socket.getpeername()[0]) if self.socket else "?"
        except OSError:
            return "?"


def _quickack(sock: socket.socket) -> None:
    if _TCP_QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except (OSError, AttributeError, ValueError):  # not TCP (tests), or an SSL socket without it
            pass


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, with a :class:`GuardedSocket` per association."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = GuardedSocket
        sock = cast(GuardedSocket, assoc.dul.socket)
        limits = getattr(self.server, "igtv_limits", {})
        sock.max_pdu_body = max(int(limits.get("max_pdu") or 0), MIN_PDU_LIMIT)
        sock.max_message = int(limits.get("max_message") or 0)
        sock.attach_wakeup(assoc)
        timeout = limits.get("timeout")
        if sock.socket is not None:
            if timeout:
                sock.socket.settimeout(float(timeout))
            try:  # our responses are single small writes: send them at once
                sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        return assoc


def guard_server(server: Any, max_pdu: int, max_message: int, timeout: float | None) -> None:
    """Make ``server`` (a pynetdicom association server) use guarded sockets from now on."""
    server.igtv_limits = {"max_pdu": max_pdu, "max_message": max_message, "timeout": timeout}
    server.RequestHandlerClass = GuardedRequestHandler
