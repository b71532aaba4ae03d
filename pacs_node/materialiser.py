"""Background thread that turns journaled instances into spool files and index rows.

The acknowledgement path appends an instance to the :class:`~pacs_node.journal.AckJournal`
(durable) and submits it here. This thread works in two steps:

1. **apply**, in submission order and in batches: ``apply(items)`` writes the spool
   files (without flushing) and records the index rows, so the instances are visible
   to the rest of the node; it returns one token per item.
2. **sync**: ``sync(tokens)`` makes applied instances durable in the spool (one
   ``fsync`` per file and folder); then their journal records are done and the
   journal's segments can be reused.

Syncing is deferred while instances keep arriving (until ``sync_idle_s`` without a
new one, or ``sync_bytes`` applied but not synced): every flush costs the same on
a virtual disk, and during a burst the acknowledgements' own journal flushes should
not queue behind the spool's. The journal keeps every record until it is synced,
so a crash at any point loses nothing; whatever was not synced is replayed at the
next start. A step that fails is retried after ``retry_s`` (both must be idempotent):
an acknowledged instance is never dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pacs_node.journal import AckJournal, JournalEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pending:
    """One journaled instance waiting for the spool (``item`` is whatever ``apply`` needs)."""

    entry: JournalEntry
    item: Any
    size: int


class Materialiser:
    """Applies submitted instances in order in one background thread, then syncs them.

    Parameters
    ----------
    journal:
        Told when each record is durable in the spool; its spent segments are freed from this thread.
    apply:
        ``apply(items) -> tokens`` for a batch of :attr:`Pending.item`; raises to have the batch retried.
    sync:
        ``sync(tokens)`` makes applied items durable; raises to have it retried.
    max_batch, max_batch_bytes:
        Largest batch handed to ``apply`` at once.
    sync_idle_s, sync_bytes:
        Sync once no instance arrived for this long, or once this much is applied but not synced.
    """

    def __init__(self, journal: AckJournal, apply: Callable[[Sequence[Any]], Sequence[Any]],
                 sync: Callable[[Sequence[Any]], None], max_batch: int = 64, max_batch_bytes: int = 64 << 20,
                 sync_idle_s: float = 0.1, sync_bytes: int = 128 << 20, retry_s: float = 1.0) -> None:
        self.journal = journal
        self.apply = apply
        self.sync = sync
        self.max_batch = int(max_batch)
        self.max_batch_bytes = int(max_batch_bytes)
        self.sync_idle_s = float(sync_idle_s)
        self.sync_bytes = int(sync_bytes)
        self.retry_s = float(retry_s)
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._submitted = 0
        self._applied = 0
        self._last_submit = 0.0
        self._unsynced: list[tuple[JournalEntry, Any]] = []  # applied; the payloads are let go
        self._unsynced_bytes = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self._failures = 0

    def start(self) -> None:
        """Start the background thread."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="materialiser", daemon=True)
            self._thread.start()

    def submit(self, pending: Pending) -> int:
        """Queue one journaled instance (after its record is durable); return its place for :meth:`wait`."""
        with self._cond:
            self._queue.append(pending)
            self._submitted += 1
            self._last_submit = time.monotonic()
            self._cond.notify_all()
            return self._submitted

    def wait(self, timeout: float = 60.0, upto: int | None = None) -> bool:
        """Wait until the instances submitted up to place ``upto`` (default: all so far) are applied."""
        with self._cond:
            target = self._submitted if upto is None else upto
            return self._cond.wait_for(lambda: self._applied >= target, timeout=timeout)

    @property
    def backlog(self) -> int:
        """Submitted instances not applied yet."""
        with self._cond:
            return self._submitted - self._applied

    def queued(self) -> list[Any]:
        """The items submitted and not applied yet, oldest first."""
        with self._cond:
            return [p.item for p in self._queue]

    def stop(self, timeout: float = 30.0) -> bool:
        """Apply and sync what is queued (up to ``timeout``), then end the thread; True when nothing is left."""
        deadline = time.monotonic() + timeout
        drained = self.wait(timeout) if self._thread is not None else self.backlog == 0
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None
        return drained and not self._unsynced

    # -- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        self._maintain()  # the first journal segment, before the first instance needs it
        while True:
            batch, stopping = self._take()
            if batch:
                self._apply(batch)
            if self._unsynced and (stopping or self._sync_due()):
                self._sync()
            self._maintain()  # free spent segments, keep a spare ready (cheap when there is nothing to do)
            if stopping and not batch and not self._unsynced:
                return

    def _take(self) -> tuple[list[Pending], bool]:
        """The next batch (oldest first, still queued) and whether the thread is stopping."""
        with self._cond:
            if not self._queue and not self._stop:
                self._cond.wait(self.sync_idle_s if self._unsynced else 0.5)
            batch: list[Pending] = []
            size = 0
            for pending in self._queue:
                if batch and (len(batch) >= self.max_batch or size + pending.size > self.max_batch_bytes):
                    break
                batch.append(pending)
                size += pending.size
            return batch, self._stop

    def _sync_due(self) -> bool:
        with self._cond:
            idle = not self._queue and time.monotonic() - self._last_submit >= self.sync_idle_s
        return idle or self._unsynced_bytes >= self.sync_bytes

    def _apply(self, batch: list[Pending]) -> None:
        try:
            tokens = list(self.apply([p.item for p in batch]))
            if len(tokens) != len(batch):
                raise ValueError(f"apply returned {len(tokens)} tokens for {len(batch)} items")
        except Exception as exc:  # the instances are safe in the journal: retry, never drop
            self._failed(f"write {len(batch)} journaled instance(s) to the spool", exc)
            return
        self._recovered()
        self._unsynced.extend((p.entry, token) for p, token in zip(batch, tokens, strict=True))
        self._unsynced_bytes += sum(p.size for p in batch)
        with self._cond:
            for _ in batch:
                self._queue.popleft()
            self._applied += len(batch)
            self._cond.notify_all()

    def _sync(self) -> None:
        try:
            self.sync([token for _, token in self._unsynced])
        except Exception as exc:
            self._failed(f"make {len(self._unsynced)} spooled instance(s) durable", exc)
            return
        self._recovered()
        for entry, _ in self._unsynced:
            self.journal.done(entry)
        self._unsynced.clear()
        self._unsynced_bytes = 0

    def _maintain(self) -> None:
        try:
            self.journal.maintain()
        except OSError as exc:
            log.error("ack journal maintenance failed: %s", exc)

    def _failed(self, what: str, exc: Exception) -> None:
        self._failures += 1
        if self._failures == 1 or self._failures % 60 == 0:
            log.error("cannot %s (attempt %d), retrying: %s", what, self._failures, exc)
        time.sleep(self.retry_s)

    def _recovered(self) -> None:
        if self._failures:
            log.info("spool writes succeed again after %d failed attempt(s)", self._failures)
        self._failures = 0
