"""The DUL reactor wakes on data and on queued primitives; associations leave no descriptors behind."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from nodetest_helpers import echoscu, make_study, storescu, wait_for
from pynetdicom import AE
from pynetdicom.association import Association

from pacs_node.dulwake import WakeableSocket


@pytest.fixture
def wakeable():
    """A WakeableSocket over one end of a socket pair (the other end plays the peer)."""
    assoc = Association(AE(), "acceptor")
    ours, peer = socket.socketpair()
    sock = WakeableSocket(assoc, client_socket=ours)
    sock.attach_wakeup(assoc)
    yield sock, assoc, peer
    sock.detach_wakeup()
    ours.close()
    peer.close()


def _timed_ready(sock: WakeableSocket) -> tuple[bool, float]:
    t0 = time.monotonic()
    ready = sock.ready
    return ready, time.monotonic() - t0


def test_ready_waits_up_to_poll_s_when_idle(wakeable):
    sock, assoc, _ = wakeable
    assert assoc.dul._run_loop_delay == 0.0  # the wait replaces the DUL's sleep
    sock.poll_s = 0.05
    ready, waited = _timed_ready(sock)
    assert ready is False and 0.04 <= waited < 1.0


def test_incoming_data_ends_the_wait_at_once(wakeable):
    sock, _, peer = wakeable
    sock.poll_s = 5.0
    threading.Timer(0.05, peer.send, args=(b"\x04",)).start()
    ready, waited = _timed_ready(sock)
    assert ready is True and waited < 2.0


def test_a_queued_primitive_ends_the_wait_at_once(wakeable):
    sock, assoc, _ = wakeable
    sock.poll_s = 5.0
    threading.Timer(0.05, assoc.dul.to_provider_queue.put, args=("a response",)).start()
    ready, waited = _timed_ready(sock)
    assert ready is False and waited < 2.0  # woken: nothing to read, the DUL goes on to send
    assert assoc.dul.to_provider_queue.get_nowait() == "a response"
    sock.poll_s = 0.05
    assert _timed_ready(sock)[1] >= 0.04  # the wake-up was consumed


def test_detach_restores_the_sleep_and_closes_the_pair(wakeable):
    sock, assoc, _ = wakeable
    pair = (sock._wake_r, sock._wake_w)
    sock.detach_wakeup()
    assert assoc.dul._run_loop_delay > 0
    assert all(s.fileno() == -1 for s in pair)
    sock.wake()  # harmless after detach
    assert sock.ready is False


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_associations_leave_no_descriptors_behind(tmp_path, listener):
    study = make_study(tmp_path / "s", n_ct=2, n_pet=1)
    assert storescu(listener.port, study.files).returncode == 0  # first connections opened
    wait_for(lambda: not listener.ae.active_associations, 10, what="the association to end")
    before = _open_fds()
    for _ in range(6):
        assert storescu(listener.port, study.files).returncode == 0
        assert echoscu(listener.port).returncode == 0
    wait_for(lambda: not listener.ae.active_associations, 10, what="the associations to end")
    # each association had a socket, a wake-up pair and an index connection of its own
    wait_for(lambda: _open_fds() <= before + 3, 10, what=f"descriptors back near {before} (now {_open_fds()})")
