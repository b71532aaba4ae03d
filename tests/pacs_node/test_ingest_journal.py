"""Ingest through the ack journal: acknowledged means durable; spool and index follow; replay after a crash."""

from __future__ import annotations

import time

import pytest
from nodetest_helpers import make_study, storescu, wait_for
from pydicom import dcmread

from pacs_node.config import ListenerConfig
from pacs_node.index import Index
from pacs_node.ingest import Ingest
from pacs_node.journal import AckJournal
from pacs_node.listener import Listener
from pacs_node.spool import Spool


def _open(data, segment_bytes=1 << 20, start=True):
    spool = Spool(data, min_free_mb=0)
    index = Index(data / "index.sqlite")
    journal = AckJournal(data / "journal", segment_bytes=segment_bytes)
    ingest = Ingest(spool, index, max_instance_bytes=64 << 20, max_instances_per_study=1000, journal=journal)
    ingest.replay_journal()
    if start:
        ingest.start()
    return spool, index, ingest


@pytest.fixture
def journaled(tmp_path):
    spool, index, ingest = _open(tmp_path / "data")
    yield spool, index, ingest
    ingest.stop()
    index.close()


def _sop(path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_acknowledged_instances_reach_spool_and_index(tmp_path, journaled):
    spool, index, ingest = journaled
    study = make_study(tmp_path / "s", n_ct=4, n_pet=2)
    for f in study.files:
        ingest.store(f.read_bytes(), source="dimse:CT1")
    assert ingest.flush(10)
    info = index.study(study.study_uid)
    assert info["instance_count"] == 6 and info["modalities"] == ["CT", "PT"]
    stored = {_sop(p): p for p in spool.study_files(study.study_uid)}
    for f in study.files:
        assert stored[_sop(f)].read_bytes() == f.read_bytes()
        assert index.instance(_sop(f))["source"] == "dimse:CT1"
    # synced once the instances stop coming: then the journal records are done
    wait_for(lambda: ingest.journal.stats()["pending"] == 0, 10, what="the journal records to be done")


def test_acknowledged_but_never_spooled_instances_are_replayed_after_a_crash(tmp_path):
    """The materialiser never ran (the node died right after the acks): the next start replays the journal."""
    data = tmp_path / "data"
    study = make_study(tmp_path / "s", n_ct=5, n_pet=2)
    spool, index, ingest = _open(data, start=False)
    for f in study.files:
        ingest.store(f.read_bytes(), source="dimse:PACS")  # each returned: acknowledged
    assert spool.study_files(study.study_uid) == [] and index.study(study.study_uid) is None
    index.close()  # abandoned like a killed process: no stop(), the journal is not reset
    spool2, index2, ingest2 = _open(data, start=False)
    info = index2.study(study.study_uid)
    assert info is not None and info["instance_count"] == 7
    stored = {_sop(p): p for p in spool2.study_files(study.study_uid)}
    assert {_sop(f): f.read_bytes() for f in study.files} == {k: p.read_bytes() for k, p in stored.items()}
    assert {r["source"] for r in index2.query("SELECT source FROM instances")} == {"dimse:PACS"}
    # replayed once: a third start finds nothing left in the journal
    index2.close()
    _, index3, ingest3 = _open(data, start=False)
    assert ingest3.journal.records() == []
    index3.close()


def test_replay_keeps_the_newest_version_of_an_instance(tmp_path):
    data = tmp_path / "data"
    study = make_study(tmp_path / "s", n_ct=1, n_pet=0)
    src = study.ct_files[0]
    _, index, ingest = _open(data, start=False)
    ingest.store(src.read_bytes(), source="t")
    ds = dcmread(src)
    ds.SeriesDescription = "corrected"
    ds.save_as(src)
    ingest.store(src.read_bytes(), source="t")
    index.close()
    spool2, index2, _ = _open(data, start=False)
    (path,) = spool2.study_files(study.study_uid)
    assert dcmread(path).SeriesDescription == "corrected"
    index2.close()


def test_a_failing_spool_is_retried_and_nothing_is_dropped(tmp_path, journaled, monkeypatch):
    spool, index, ingest = journaled
    ingest.materialiser.retry_s = 0.05
    study = make_study(tmp_path / "s", n_ct=3, n_pet=0)
    real_store, failures = spool.store, []

    def flaky(*args, **kwargs):
        if len(failures) < 3:
            failures.append(1)
            raise OSError(28, "No space left on device")
        return real_store(*args, **kwargs)

    monkeypatch.setattr(spool, "store", flaky)
    for f in study.files:
        ingest.store(f.read_bytes(), source="t")
    assert ingest.flush(10)
    assert len(failures) == 3 and index.study(study.study_uid)["instance_count"] == 3


def test_an_instance_too_large_for_a_segment_is_stored_directly_in_order(tmp_path):
    spool, index, ingest = _open(tmp_path / "data", segment_bytes=64 * 1024)
    study = make_study(tmp_path / "s", n_ct=0, n_pet=1)
    small = study.pet_files[0].read_bytes()
    large = make_study(tmp_path / "l", n_ct=1, n_pet=0, rows=256, study_uid=study.study_uid).ct_files[0]
    assert len(large.read_bytes()) > ingest.journal.max_payload > len(small)
    ingest.store(small, source="t")
    ingest.store(large.read_bytes(), source="t")  # direct: on disk and indexed when store returns
    assert index.instance(_sop(large)) is not None
    assert spool.instance_path(study.study_uid, dcmread(large).SeriesInstanceUID, _sop(large)).exists()
    assert index.instance(_sop(study.pet_files[0])) is not None  # the journaled one went first
    ingest.stop()
    index.close()


def test_release_waits_until_the_association_is_in_the_spool(tmp_path, journaled, monkeypatch):
    """storescu sees its association end only once the node's spool and index hold the whole study."""
    spool, index, ingest = journaled
    real_apply = ingest.materialiser.apply

    def slow_apply(items):
        time.sleep(0.2)
        return real_apply(items)

    ingest.materialiser.apply = slow_apply
    lst = Listener(ListenerConfig(ae_title="IGTV", host="127.0.0.1", port=0, allow_aet=["STORESCU"]), ingest)
    lst.start()
    try:
        study = make_study(tmp_path / "s", n_ct=4, n_pet=2)
        res = storescu(lst.port, study.files)
        assert res.returncode == 0, res.stderr
        assert index.study(study.study_uid)["instance_count"] == 6  # no waiting here
        assert len(spool.study_files(study.study_uid)) == 6
    finally:
        lst.stop()


def test_a_clean_stop_leaves_nothing_to_replay(tmp_path):
    data = tmp_path / "data"
    study = make_study(tmp_path / "s", n_ct=3, n_pet=0)
    spool, index, ingest = _open(data)
    for f in study.files:
        ingest.store(f.read_bytes(), source="t")
    ingest.stop()
    index.close()
    assert len(spool.study_files(study.study_uid)) == 3
    assert AckJournal(data / "journal", segment_bytes=1 << 20).records() == []


def test_study_received_once_per_study_whatever_the_batches(tmp_path, journaled):
    spool, index, ingest = journaled
    seen: list[str] = []
    ingest.events.subscribe("study_received", lambda study_uid, **_: seen.append(study_uid))
    a = make_study(tmp_path / "a", n_ct=5, n_pet=2)
    b = make_study(tmp_path / "b", n_ct=3, n_pet=0)
    for f in [*a.files, *b.files, *a.files]:
        ingest.store(f.read_bytes(), source="t")
    assert ingest.flush(10)
    assert sorted(seen) == sorted([a.study_uid, b.study_uid])


def test_no_ack_when_the_journal_write_fails(tmp_path, journaled, monkeypatch):
    from pacs_node.ingest import STATUS_OUT_OF_RESOURCES, IngestRejected

    spool, index, ingest = journaled
    study = make_study(tmp_path / "s", n_ct=1, n_pet=0)

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ingest.journal, "append", broken)
    with pytest.raises(IngestRejected) as exc:
        ingest.store(study.ct_files[0].read_bytes(), source="t")
    assert exc.value.status == STATUS_OUT_OF_RESOURCES
    assert ingest.flush(5) and index.study(study.study_uid) is None and spool.study_files(study.study_uid) == []


def _slow_apply(ingest, seconds: float) -> None:
    real_apply = ingest.materialiser.apply

    def slow(items):
        time.sleep(seconds)
        return real_apply(items)

    ingest.materialiser.apply = slow


def test_a_thread_that_stored_nothing_does_not_wait_for_the_others(tmp_path, journaled):
    spool, index, ingest = journaled
    _slow_apply(ingest, 0.5)
    study = make_study(tmp_path / "s", n_ct=3, n_pet=0)
    for f in study.files:
        ingest.store(f.read_bytes(), source="t")
    waited: list[float] = []

    def other_association() -> None:  # e.g. a C-ECHO association being released
        t0 = time.monotonic()
        assert ingest.flush(10, this_thread=True)
        waited.append(time.monotonic() - t0)

    import threading

    t = threading.Thread(target=other_association)
    t.start()
    t.join(10)
    assert waited and waited[0] < 0.3
    assert ingest.flush(10, this_thread=True)  # this thread stored: it waits until its instances are in
    assert index.study(study.study_uid)["instance_count"] == 3


def test_acknowledgements_wait_when_the_spool_falls_far_behind(tmp_path, journaled, monkeypatch):
    from pacs_node import ingest as ingest_mod

    spool, index, ingest = journaled
    monkeypatch.setattr(ingest_mod, "MAX_BACKLOG", 3)
    _slow_apply(ingest, 0.05)
    study = make_study(tmp_path / "s", n_ct=12, n_pet=0)
    backlog = []
    for f in study.files:
        ingest.store(f.read_bytes(), source="t")
        backlog.append(ingest.materialiser.backlog)
    assert max(backlog) <= 4  # bounded: the index never lags far behind the acknowledgements


def test_completion_waits_for_studies_not_yet_in_the_index(tmp_path, journaled):
    from pacs_node.completion import scan_once
    from pacs_node.jobs import JobQueue

    spool, index, ingest = journaled
    _slow_apply(ingest, 0.5)
    study = make_study(tmp_path / "s", n_ct=2, n_pet=2)
    for f in study.ct_files:  # the CT series reaches the index ...
        ingest.store(f.read_bytes(), source="t")
    assert ingest.flush(10)
    for f in study.pet_files:  # ... the PET series is acknowledged, still on its way
        ingest.store(f.read_bytes(), source="t")
    assert study.study_uid in ingest.unapplied_studies()
    jobs = JobQueue(index)
    assert scan_once(index, jobs, 0.0, now=time.time() + 60, receiving=ingest.unapplied_studies()) == []
    assert jobs.jobs_of_study(study.study_uid) == []  # no "no PET series" failure
    assert ingest.flush(10)
    assert scan_once(index, jobs, 0.0, now=time.time() + 60, receiving=ingest.unapplied_studies()) == [study.study_uid]
