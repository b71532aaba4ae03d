"""Prometheus metrics: a small thread-safe registry and the node's metric definitions.

The text exposition format 0.0.4 is written here directly (no prometheus_client
dependency). Metrics are objects held by a :class:`Registry`; the node's own
metrics live in one place, :class:`NodeMetrics`, which the listener, the job
runner and the exporter call. Values that are cheaper to read at scrape time
than to track (jobs by state, spool free space) are gauges with a callback.

Example
-------
>>> m = NodeMetrics()
>>> m.instance_received(transport="dimse", nbytes=1024)
>>> "igtv_instances_received_total" in m.render()
True
"""

from __future__ import annotations

import math
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = tuple[str, ...]


def format_value(value: float) -> str:
    """Format a sample value as the exposition format expects (``+Inf``, ``NaN``, ...)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


class Metric:
    """Common part of all metric kinds: name, help text, label names, a lock."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_RE.match(label) or label.startswith("__"):
                raise ValueError(f"metric {name}: invalid label name {label!r}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, object]) -> LabelValues:
        """Label values in declaration order; every declared label must be given."""
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"metric {self.name}: expected labels {list(self.labelnames)}, got {sorted(labels)}"
            )
        return tuple(str(labels[n]) for n in self.labelnames)

    def samples(self) -> list[tuple[str, tuple[str, ...], LabelValues, float]]:
        """(sample name, label names, label values, value) rows of this metric."""
        raise NotImplementedError

    def render(self) -> str:
        """This metric's block of the exposition text."""
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for sample, names, values, value in self.samples():
            lines.append(f"{sample}{_labels_text(names, values)} {format_value(value)}")
        return "\n".join(lines) + "\n"


class _StoredMetric(Metric):
    """A metric whose series are numbers kept per label-value tuple."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[LabelValues, float] = {}

    def _add(self, amount: float, labels: Mapping[str, object]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        """Current stored value of one series (0 if never changed)."""
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)


class Counter(_StoredMetric):
    """A monotonically increasing count; the name should end in ``_total``."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        if not self.labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        """Add ``amount`` (>= 0) to the series selected by ``labels``."""
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot decrease (amount {amount})")
        self._add(amount, labels)

    def samples(self) -> list[tuple[str, tuple[str, ...], LabelValues, float]]:
        with self._lock:
            items = sorted(self._values.items())
        return [(self.name, self.labelnames, k, v) for k, v in items]


class Gauge(_StoredMetric):
    """A value that goes up and down, set directly or read from a callback at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._function: Callable[[], object] | None = None

    def set(self, value: float, **labels: object) -> None:
        """Set the series selected by ``labels`` to ``value``."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        """Add ``amount`` (may be negative) to one series; a callback, if set, is not consulted."""
        self._add(amount, labels)

    def set_function(self, fn: Callable[[], object] | None) -> None:
        """Read the value(s) from ``fn`` at each scrape instead of stored values.

        For an unlabelled gauge ``fn`` returns a number; for a gauge with one
        label it returns ``{label_value: number}``; with several labels,
        ``{(value, value, ...): number}``.
        """
        with self._lock:
            self._function = fn

    def samples(self) -> list[tuple[str, tuple[str, ...], LabelValues, float]]:
        with self._lock:
            fn = self._function
            stored = dict(self._values)
        if fn is not None:
            try:
                result = fn()
            except Exception:  # a scrape must not fail because one source is down
                result = float("nan") if not self.labelnames else {}
            if isinstance(result, Mapping):
                stored = {}
                for k, v in result.items():
                    key = (str(k),) if not isinstance(k, tuple) else tuple(str(x) for x in k)
                    if len(key) != len(self.labelnames):
                        raise ValueError(f"gauge {self.name}: callback key {k!r} does not match labels")
                    stored[key] = float(v)
            else:
                stored = {(): float(result)}  # type: ignore[arg-type]
        return [(self.name, self.labelnames, k, v) for k, v in sorted(stored.items())]


DEFAULT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Histogram(Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        if "le" in labelnames:
            raise ValueError(f"histogram {name}: 'le' is reserved")
        super().__init__(name, help, labelnames)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"histogram {name}: buckets must be distinct and non-empty")
        self.buckets = tuple(bounds)
        # per series: counts per finite bucket (non-cumulative) + overflow, sum
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, **labels: object) -> None:
        """Record one observation (e.g. a duration in seconds)."""
        key = self._key(labels)
        idx = bisect_left(self.buckets, value)  # first bucket with bound >= value
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            counts[idx] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    @contextmanager
    def time(self, **labels: object) -> Iterator[None]:
        """Observe the wall-clock duration of the ``with`` block."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - start, **labels)

    def count(self, **labels: object) -> int:
        """Number of observations of one series."""
        key = self._key(labels)
        with self._lock:
            return sum(self._counts.get(key, ()))

    def samples(self) -> list[tuple[str, tuple[str, ...], LabelValues, float]]:
        with self._lock:
            snapshot = {k: (list(c), self._sums[k]) for k, c in self._counts.items()}
        rows: list[tuple[str, tuple[str, ...], LabelValues, float]] = []
        names_le = self.labelnames + ("le",)
        for key in sorted(snapshot):
            counts, total = snapshot[key]
            running = 0
            for bound, c in zip(self.buckets, counts[:-1], strict=True):
                running += c
                rows.append((f"{self.name}_bucket", names_le, key + (repr(bound),), running))
            running += counts[-1]
            rows.append((f"{self.name}_bucket", names_le, key + ("+Inf",), running))
            rows.append((f"{self.name}_sum", self.labelnames, key, total))
            rows.append((f"{self.name}_count", self.labelnames, key, running))
        return rows


class Registry:
    """A named set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: Metric) -> Metric:
        """Add ``metric``; names must be unique."""
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        """Create and register a :class:`Counter`."""
        return self.register(Counter(name, help, labelnames))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Create and register a :class:`Gauge`."""
        return self.register(Gauge(name, help, labelnames))  # type: ignore[return-value]

    def histogram(
        self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = DEFAULT_BUCKETS
    ) -> Histogram:
        """Create and register a :class:`Histogram`."""
        return self.register(Histogram(name, help, labelnames, buckets))  # type: ignore[return-value]

    def get(self, name: str) -> Metric:
        """The metric called ``name``."""
        return self._metrics[name]

    def render(self) -> str:
        """All metrics in the text exposition format 0.0.4."""
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(m.render() for m in metrics)


# The stages a job passes through, in order; used as the ``stage`` label.
STAGES = ("load", "suv", "register", "stacks", "inference", "postprocess", "writers", "export")
JOB_STATES = ("queued", "running", "exporting", "done", "failed")
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


class NodeMetrics:
    """Every metric the node exposes on ``/metrics``, with one call per event.

    :class:`pacs_node.observability.NodeObserver` calls these from the node's
    events (:mod:`pacs_node.events`): associations, instances and studies
    received, :meth:`observe_stages` with the stage timings of a finished job,
    :meth:`export_attempt` and :meth:`export_retry`. The server
    binds :meth:`bind_job_counts` and :meth:`bind_spool_free` to read those at
    scrape time. Stage timings measured in the worker process travel back with
    the job result and are observed here, in the server process.
    """

    def __init__(self, registry: Registry | None = None) -> None:
        r = registry if registry is not None else Registry()
        self.registry = r
        self.instances_received = r.counter(
            "igtv_instances_received_total", "DICOM instances received and stored.", ["transport"]
        )
        self.bytes_received = r.counter(
            "igtv_received_bytes_total", "Bytes of DICOM instances stored in the spool.", ["transport"]
        )
        self.instances_refused = r.counter(
            "igtv_instances_refused_total", "Instances refused (not stored), by reason.", ["reason"]
        )
        self.associations_accepted = r.counter(
            "igtv_associations_accepted_total", "DIMSE associations accepted."
        )
        self.associations_rejected = r.counter(
            "igtv_associations_rejected_total", "DIMSE associations rejected, by reason.", ["reason"]
        )
        self.studies_received = r.counter(
            "igtv_studies_received_total", "Studies seen for the first time."
        )
        self.jobs = r.gauge("igtv_jobs", "Jobs in the index by state.", ["state"])
        self.jobs_finished = r.counter(
            "igtv_jobs_finished_total", "Jobs that reached a final state.", ["state"]
        )
        self.stage_duration = r.histogram(
            "igtv_stage_duration_seconds", "Duration of one processing stage of a job.", ["stage"], STAGE_BUCKETS
        )
        self.exports = r.counter(
            "igtv_exports_total", "Export attempts by destination and outcome.", ["destination", "outcome"]
        )
        self.export_retries = r.counter(
            "igtv_export_retries_total", "Export retries after a transient failure.", ["destination"]
        )
        self.spool_free_bytes = r.gauge(
            "igtv_spool_free_bytes", "Free bytes on the file system holding the spool."
        )
        self.up = r.gauge("igtv_up", "1 while the node process runs.")
        self.up.set(1)

    # --- listener -----------------------------------------------------------------
    def association_accepted(self) -> None:
        """One association was accepted."""
        self.associations_accepted.inc()

    def association_rejected(self, reason: str) -> None:
        """One association was rejected (``reason``: e.g. ``calling_ae``, ``called_ae``)."""
        self.associations_rejected.inc(reason=reason)

    def instance_received(self, transport: str, nbytes: int) -> None:
        """One instance of ``nbytes`` was stored (``transport``: ``dimse`` or ``stow``)."""
        self.instances_received.inc(transport=transport)
        self.bytes_received.inc(nbytes, transport=transport)

    def instance_refused(self, reason: str) -> None:
        """One instance was refused (``reason``: e.g. ``disk_full``, ``too_large``, ``bad_uid``)."""
        self.instances_refused.inc(reason=reason)

    def study_received(self) -> None:
        """A study was seen for the first time."""
        self.studies_received.inc()

    # --- jobs ---------------------------------------------------------------------
    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record the duration of one stage."""
        self.stage_duration.observe(seconds, stage=stage)

    def observe_stages(self, timings: Mapping[str, float]) -> None:
        """Record a job's stage timings ``{stage: seconds}``; unknown stages are kept as given."""
        for stage, seconds in timings.items():
            if seconds is not None:
                self.observe_stage(stage, float(seconds))

    def job_finished(self, state: str) -> None:
        """A job ended in ``state`` (``done`` or ``failed``)."""
        self.jobs_finished.inc(state=state)

    def bind_job_counts(self, fn: Callable[[], Mapping[str, int]]) -> None:
        """Read jobs by state from ``fn`` at scrape time; known states absent from it read 0."""

        def counts() -> dict[str, float]:
            got = dict(fn())
            return {state: float(got.get(state, 0)) for state in (*JOB_STATES, *got)}

        self.jobs.set_function(counts)

    # --- export -------------------------------------------------------------------
    def export_attempt(self, destination: str, outcome: str) -> None:
        """One export attempt ended (``outcome``: ``sent``, ``transient``, ``permanent``)."""
        self.exports.inc(destination=destination, outcome=outcome)

    def export_retry(self, destination: str) -> None:
        """An export to ``destination`` is retried after a transient failure."""
        self.export_retries.inc(destination=destination)

    # --- spool --------------------------------------------------------------------
    def bind_spool_free(self, fn: Callable[[], float]) -> None:
        """Read free spool bytes from ``fn`` (e.g. ``shutil.disk_usage(dir).free``) at scrape time."""
        self.spool_free_bytes.set_function(fn)

    def render(self) -> str:
        """The exposition text of all node metrics."""
        return self.registry.render()
