"""Background thread that turns journaled instances into spool files and index rows.

The acknowledgement path appends an instance to the :class:`~pacs_node.journal.AckJournal`
(durable) and submits it here. This thread takes what was submitted in batches, in
order, and hands each batch to ``apply`` (write the spool files, make them durable,
record the index rows); then the journal records are done and their segments can be
reused. A batch whose ``apply`` fails is retried after ``retry_s`` (``apply`` must be
idempotent): an acknowledged instance is never dropped, and whatever has not been
applied when the node dies is replayed from the journal at the next start.
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
    """Applies submitted instances in order in one background thread.

    Parameters
    ----------
    journal:
        Told when each record is applied; its spent segments are freed from this thread.
    apply:
        ``apply(items)`` for a batch of :attr:`Pending.item`; raises to have the batch retried.
    max_batch, max_batch_bytes:
        Largest batch handed to ``apply`` at once.
    """

    def __init__(self, journal: AckJournal, apply: Callable[[Sequence[Any]], None], max_batch: int = 64,
                 max_batch_bytes: int = 64 << 20, retry_s: float = 1.0) -> None:
        self.journal = journal
        self.apply = apply
        self.max_batch = int(max_batch)
        self.max_batch_bytes = int(max_batch_bytes)
        self.retry_s = float(retry_s)
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._submitted = 0
        self._applied = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the background thread."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="materialiser", daemon=True)
            self._thread.start()

    def submit(self, pending: Pending) -> None:
        """Queue one journaled instance (after its record is durable)."""
        with self._cond:
            self._queue.append(pending)
            self._submitted += 1
            self._cond.notify_all()

    def wait(self, timeout: float = 60.0) -> bool:
        """Wait until everything submitted before this call is applied; False on timeout."""
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._applied >= target, timeout=timeout)

    @property
    def backlog(self) -> int:
        """Submitted instances not applied yet."""
        with self._cond:
            return self._submitted - self._applied

    def stop(self, timeout: float = 30.0) -> bool:
        """Apply what is queued (up to ``timeout``), then end the thread; True when nothing is left."""
        drained = self.wait(timeout) if self._thread is not None else self.backlog == 0
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        return drained

    def _take(self) -> list[Pending] | None:
        """The next batch (oldest first, not removed from the queue), or None when stopping."""
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait(0.5)
                if not self._queue:
                    return []  # idle: let the caller maintain the journal
            if self._stop and not self._queue:
                return None
            batch: list[Pending] = []
            size = 0
            for pending in self._queue:
                if batch and (len(batch) >= self.max_batch or size + pending.size > self.max_batch_bytes):
                    break
                batch.append(pending)
                size += pending.size
            return batch

    def _run(self) -> None:
        failures = 0
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                try:
                    self.apply([p.item for p in batch])
                except Exception as exc:  # the instances are safe in the journal: retry, never drop
                    failures += 1
                    if failures == 1 or failures % 60 == 0:
                        log.error("cannot write %d journaled instance(s) to the spool (attempt %d), retrying: %s",
                                  len(batch), failures, exc)
                    time.sleep(self.retry_s)
                    continue
                if failures:
                    log.info("journaled instances written to the spool again after %d failed attempt(s)", failures)
                failures = 0
                for pending in batch:
                    self.journal.done(pending.entry)
                with self._cond:
                    for _ in batch:
                        self._queue.popleft()
                    self._applied += len(batch)
                    self._cond.notify_all()
            try:
                self.journal.maintain()
            except OSError as exc:
                log.error("ack journal maintenance failed: %s", exc)
