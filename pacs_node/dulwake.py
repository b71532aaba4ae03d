"""Wake pynetdicom's DUL reactor when there is work, instead of on a 1 ms clock.

pynetdicom's DUL thread (one per association) loops: sleep ``_run_loop_delay``
(1 ms) when the last pass found nothing, then poll the socket with a zero
timeout and look for a primitive to send. With one C-STORE in flight at a time
an incoming request waits on average half a sleep before it is read, and the
C-STORE response the association thread queued waits another half before it is
sent: about 1 ms of every instance, with the CPU idle.

:class:`WakeableSocket` makes the socket poll itself the wait: ``ready`` blocks
in ``select`` on the peer's socket and on a wake-up socket pair for at most
``poll_s``, and :class:`WakingQueue` (the DUL's ``to_provider_queue``)
writes a byte to the pair whenever a primitive is queued. The DUL's own sleep
is set to 0, so the loop still turns at least every ``poll_s`` (timers, kill
flag) but reacts to data and to responses at once. Everything else (state machine, reads, errors) stays pynetdicom's.
When the transport closes (``EVT_CONN_CLOSE``, every way an association
ends) the pair is closed and the DUL gets its sleep back for its last turns.
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import weakref
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import AssociationSocket

#: Longest wait for data or a queued primitive per DUL loop: the loop checks its timers and
#: kill flag this often (both wake it on their own otherwise, so an idle association turns
#: 20 times a second instead of pynetdicom's 1000).
POLL_S = 0.05


class WakingQueue(queue.Queue):
    """A ``queue.Queue`` that calls ``on_put`` after every item put (the reactor's wake-up)."""

    def __init__(self, on_put: Any) -> None:
        super().__init__()
        self._on_put = on_put

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._on_put()


class WakeableSocket(AssociationSocket):
    """An :class:`AssociationSocket` whose ``ready`` waits for data or a wake-up, up to ``poll_s``."""

    poll_s: float = POLL_S
    _wake_r: socket.socket | None = None
    _wake_w: socket.socket | None = None
    _dul: Any = None

    def attach_wakeup(self, assoc: Any) -> None:
        """Let the DUL of ``assoc`` (not yet started) wait in :attr:`ready` and be woken by queued primitives."""
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._wake_r, self._wake_w, self._dul = r, w, assoc.dul
        assoc.dul.to_provider_queue = WakingQueue(self.wake)
        assoc.dul._run_loop_delay = 0.0
        assoc.bind(evt.EVT_CONN_CLOSE, self._on_conn_close)
        weakref.finalize(self, _close_all, r, w)  # should an association end without EVT_CONN_CLOSE

    def detach_wakeup(self) -> None:
        """Close the wake-up pair; the DUL sleeps between polls again (pynetdicom's default)."""
        if self._dul is not None:
            self._dul._run_loop_delay = self.poll_s
        r, w = self._wake_r, self._wake_w
        self._wake_r = self._wake_w = None
        _close_all(r, w)

    def _on_conn_close(self, event: Any) -> None:
        self.detach_wakeup()

    def wake(self) -> None:
        """Make a pending or the next :attr:`ready` wait return at once."""
        w = self._wake_w
        if w is not None:
            try:
                w.send(b"\0")
            except OSError:  # the pair is full (a wake-up is pending anyway) or closed
                pass

    @property
    def ready(self) -> bool:
        """``True`` if data can be read; first waits up to ``poll_s`` for data or a wake-up."""
        sock, wake_r = self.socket, self._wake_r
        if sock is not None and wake_r is not None and not _ssl_pending(sock):
            try:
                readable, _, _ = select.select([sock, wake_r], [], [], self.poll_s)
            except (OSError, ValueError):  # closed under us: pynetdicom's check below reports it
                readable = []
            if wake_r in readable:
                _drain(wake_r)
        return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]



def _close_all(*socks: socket.socket | None) -> None:
    for s in socks:
        if s is not None:
            s.close()


def _ssl_pending(sock: socket.socket) -> bool:
    """True when a TLS socket holds decrypted bytes that ``select`` cannot see."""
    return isinstance(sock, ssl.SSLSocket) and bool(sock.pending())


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except OSError:  # BlockingIOError: empty
        pass
