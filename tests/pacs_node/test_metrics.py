"""The metrics registry renders valid Prometheus text format 0.0.4 with correct values."""

from __future__ import annotations

import re
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pacs_node.metrics import JOB_STATES, STAGES, Counter, Histogram, NodeMetrics, Registry

# One sample line of the 0.0.4 text format: name, optional {labels}, value.
SAMPLE_RE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*'
    r'(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\[\\"n])*")(,[a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\[\\"n])*")*\})?'
    r' (NaN|[+-]Inf|-?[0-9.]+(e[+-]?[0-9]+)?)$'
)


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse exposition text with prometheus_client's parser into {(sample, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def check_lines(text: str) -> None:
    """Every line is a HELP, a TYPE (before its samples) or a well-formed sample."""
    assert text.endswith("\n")
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"}
            assert name not in typed, f"TYPE repeated for {name}"
            typed.add(name)
            continue
        assert SAMPLE_RE.match(line), f"malformed sample line: {line!r}"
        base = re.sub(r"(_bucket|_sum|_count)$", "", line.split("{")[0].split(" ")[0])
        assert base in typed or line.split("{")[0].split(" ")[0] in typed, f"sample before TYPE: {line}"


def test_counter_labels_and_escaping() -> None:
    r = Registry()
    c = r.counter("x_events_total", 'Events with "quotes" and \\ backslash\nnewline.', ["peer"])
    c.inc(peer='a"b\\c\nd')
    c.inc(2.5, peer="plain")
    text = r.render()
    check_lines(text)
    assert "# HELP x_events_total Events with \"quotes\" and \\\\ backslash\\nnewline." in text
    values = parse(text)
    assert values[("x_events_total", (("peer", 'a"b\\c\nd'),))] == 1
    assert values[("x_events_total", (("peer", "plain"),))] == 2.5


def test_counter_rejects_bad_use() -> None:
    c = Counter("y_total", "y", ["a"])
    with pytest.raises(ValueError):
        c.inc(-1, a="1")
    with pytest.raises(ValueError):
        c.inc(b="1")  # wrong label name
    with pytest.raises(ValueError):
        Counter("bad name", "x")
    r = Registry()
    r.counter("dup_total", "d")
    with pytest.raises(ValueError):
        r.counter("dup_total", "d")


def test_histogram_buckets_are_cumulative() -> None:
    r = Registry()
    h = r.histogram("d_seconds", "durations", ["stage"], buckets=[0.1, 1, 10])
    for v in (0.05, 0.1, 0.5, 2, 20, 30):
        h.observe(v, stage="load")
    text = r.render()
    check_lines(text)
    values = parse(text)
    lab = lambda le: (("le", le), ("stage", "load"))  # noqa: E731
    assert values[("d_seconds_bucket", lab("0.1"))] == 2  # 0.05 and 0.1 (le is inclusive)
    assert values[("d_seconds_bucket", lab("1.0"))] == 3
    assert values[("d_seconds_bucket", lab("10.0"))] == 4
    assert values[("d_seconds_bucket", lab("+Inf"))] == 6
    assert values[("d_seconds_count", (("stage", "load"),))] == 6
    assert values[("d_seconds_sum", (("stage", "load"),))] == pytest.approx(52.65)
    with pytest.raises(ValueError):
        Histogram("h", "h", ["le"])


def test_histogram_time_context_manager() -> None:
    h = Histogram("t_seconds", "t", buckets=[1000])
    with h.time():
        pass
    assert h.count() == 1


def test_gauge_callback_and_failure_is_nan() -> None:
    r = Registry()
    g = r.gauge("free_bytes", "free")
    g.set_function(lambda: 123456789)
    assert parse(r.render())[("free_bytes", ())] == 123456789

    def broken() -> float:
        raise OSError("disk gone")

    g.set_function(broken)
    text = r.render()
    check_lines(text)
    assert "free_bytes NaN" in text


def test_counter_is_thread_safe() -> None:
    c = Counter("n_total", "n")

    def work() -> None:
        for _ in range(5000):
            c.inc()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value() == 40000


def test_node_metrics_cover_the_node_events() -> None:
    m = NodeMetrics()
    m.association_accepted()
    m.association_rejected("calling_ae")
    m.instance_received("dimse", 1000)
    m.instance_received("dimse", 24)
    m.instance_received("stow", 500)
    m.instance_refused("disk_full")
    m.study_received()
    m.observe_stages({"load": 0.3, "inference": 4.0, "export": 1.2})
    m.job_finished("done")
    m.export_attempt("pacs", "transient")
    m.export_retry("pacs")
    m.export_attempt("pacs", "sent")
    m.bind_job_counts(lambda: {"queued": 2, "done": 5})
    m.bind_spool_free(lambda: 5e9)
    text = m.render()
    check_lines(text)
    v = parse(text)
    # prometheus_client strips _total from family names but keeps it on samples
    assert v[("igtv_instances_received_total", (("transport", "dimse"),))] == 2
    assert v[("igtv_received_bytes_total", (("transport", "dimse"),))] == 1024
    assert v[("igtv_received_bytes_total", (("transport", "stow"),))] == 500
    assert v[("igtv_associations_accepted_total", ())] == 1
    assert v[("igtv_associations_rejected_total", (("reason", "calling_ae"),))] == 1
    assert v[("igtv_instances_refused_total", (("reason", "disk_full"),))] == 1
    assert v[("igtv_studies_received_total", ())] == 1
    assert v[("igtv_stage_duration_seconds_count", (("stage", "inference"),))] == 1
    assert v[("igtv_stage_duration_seconds_sum", (("stage", "inference"),))] == 4.0
    assert v[("igtv_jobs_finished_total", (("state", "done"),))] == 1
    assert v[("igtv_exports_total", (("destination", "pacs"), ("outcome", "sent")))] == 1
    assert v[("igtv_export_retries_total", (("destination", "pacs"),))] == 1
    assert v[("igtv_spool_free_bytes", ())] == 5e9
    for state in JOB_STATES:  # every state is present, 0 when absent from the index
        expected = {"queued": 2, "done": 5}.get(state, 0)
        assert v[("igtv_jobs", (("state", state),))] == expected
    assert v[("igtv_up", ())] == 1
    assert set(STAGES) >= {"load", "inference", "export"}


def test_job_report_timings_become_stage_histograms(tmp_path) -> None:
    """The observer reads the stage timings of a real report (not its 'total') into the histogram."""
    from pacs_node.audit import AuditLog, read_events
    from pacs_node.events import NodeEvents
    from pacs_node.jobs import stage_timings
    from pacs_node.observability import NodeObserver
    from pipeline.writers.report import build_report

    m = NodeMetrics()
    audit = AuditLog(tmp_path / "audit.jsonl")
    events = NodeEvents()
    NodeObserver(m, audit).subscribe(events)
    report = build_report([], {"load": 0.5, "inference": 3.0}, {"version": "t"}, {})
    events.emit("job_finished", job_id=7, study_uid="1.2.3", seconds=4.0, result_uids=["1.2.3.9"], report=report,
                timings=stage_timings(report))
    events.emit("job_done", job_id=7, study_uid="1.2.3", seconds=4.0, result_uids=["1.2.3.9"])
    v = parse(m.render())
    assert v[("igtv_stage_duration_seconds_count", (("stage", "load"),))] == 1
    assert v[("igtv_stage_duration_seconds_sum", (("stage", "inference"),))] == 3.0
    assert ("igtv_stage_duration_seconds_count", (("stage", "total"),)) not in v
    assert v[("igtv_jobs_finished_total", (("state", "done"),))] == 1  # no destinations: done at once
    (event,) = read_events(tmp_path / "audit.jsonl")
    assert event["event"] == "job_finished" and event["outputs"] == ["1.2.3.9"] and event["seconds"] == 4.0
