"""The materialiser applies in order, syncs once a burst is over, retries failures and drops nothing."""

from __future__ import annotations

import threading

from nodetest_helpers import wait_for

from pacs_node.materialiser import Materialiser, Pending


class FakeJournal:
    """Records which entries were done."""

    def __init__(self) -> None:
        self.done_entries: list[object] = []
        self.lock = threading.Lock()

    def done(self, entry: object) -> None:
        with self.lock:
            self.done_entries.append(entry)

    def maintain(self) -> None:
        pass


def _pending(i: int) -> Pending:
    return Pending(entry=("entry", i), item=i, size=100)  # type: ignore[arg-type]


def test_a_burst_is_applied_in_order_and_synced_once_it_is_over():
    journal, applied, synced = FakeJournal(), [], []
    m = Materialiser(journal, apply=lambda items: (applied.extend(items), [f"t{i}" for i in items])[1],
                     sync=lambda tokens: synced.append(list(tokens)), sync_idle_s=2.0)  # type: ignore[arg-type]
    m.start()
    for i in range(20):
        m.submit(_pending(i))
    assert m.wait(10)
    assert applied == list(range(20))  # visible in order
    assert synced == [] and journal.done_entries == []  # durable in the spool later: the journal keeps them
    wait_for(lambda: synced, 10, what="the sync after the burst")
    assert synced == [[f"t{i}" for i in range(20)]]
    assert journal.done_entries == [("entry", i) for i in range(20)]
    assert m.stop(5)


def test_failures_are_retried_until_they_succeed():
    journal, calls = FakeJournal(), {"apply": 0, "sync": 0}

    def apply(items):
        calls["apply"] += 1
        if calls["apply"] < 3:
            raise OSError(28, "No space left on device")
        return list(items)

    def sync(tokens):
        calls["sync"] += 1
        if calls["sync"] < 2:
            raise OSError(5, "Input/output error")

    m = Materialiser(journal, apply, sync, sync_idle_s=0.01, retry_s=0.01)  # type: ignore[arg-type]
    m.start()
    for i in range(5):
        m.submit(_pending(i))
    assert m.wait(10)
    wait_for(lambda: len(journal.done_entries) == 5, 10, what="all entries done after the retries")
    assert calls["apply"] == 3 and calls["sync"] == 2
    assert m.stop(5)


def test_stop_applies_and_syncs_what_is_queued():
    journal, synced = FakeJournal(), []
    m = Materialiser(journal, apply=lambda items: list(items), sync=lambda t: synced.extend(t),  # type: ignore[arg-type]
                     sync_idle_s=60.0)
    m.start()
    for i in range(7):
        m.submit(_pending(i))
    assert m.stop(10)
    assert synced == list(range(7)) and len(journal.done_entries) == 7
