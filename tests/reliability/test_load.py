"""Concurrent storescu associations while jobs run: all stored, all done, C-ECHO answers within 1 s."""

from __future__ import annotations

import pytest
import relhelpers  # noqa: F401  (import paths)
from bench_load import run_load

pytestmark = [pytest.mark.slow, pytest.mark.peers]


def test_concurrent_associations_while_jobs_run(tmp_path):
    r = run_load(tmp_path, studies=4, n_ct=12, n_pet=6, rows=64, process_delay_s=1.0)
    assert r["storescu_failures"] == 0
    assert r["stored"] == r["instances"] == 4 * 18, r["missing"]
    assert r["jobs_done"] == 4
    assert not r["echo_errors"], r["echo_errors"][:3]
    assert r["echo_count"] >= 5
    assert r["echo_max_s"] < 1.0, r
    assert 0 < r["peak_rss_mb"] < 2048
