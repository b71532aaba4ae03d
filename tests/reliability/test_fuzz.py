"""Property-based fuzzing (hypothesis, fixed small budget) of the parsers that see network input."""

from __future__ import annotations

import pytest
import relhelpers  # noqa: F401  (import paths)
from fuzz_targets import (
    IngestTarget,
    check_multipart,
    check_reader,
    multipart_bodies,
    mutated_instances,
)
from hypothesis import HealthCheck, given, settings

BUDGET = settings(max_examples=150, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def ingest_target():
    target = IngestTarget()
    yield target
    target.close()


def test_ingest_header_parser(ingest_target):
    @BUDGET
    @given(mutated_instances())
    def prop(blob):
        ingest_target.check(blob)

    prop()


@BUDGET
@given(mutated_instances())
def test_pipeline_reader_scan(blob):
    check_reader(blob)


@BUDGET
@given(multipart_bodies())
def test_stow_multipart_parser(case):
    check_multipart(*case)
