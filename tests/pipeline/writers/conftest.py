"""Fixtures of the writer tests: synthetic CT series and result identity."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.writers.common import ResultInfo
from tests.pipeline.writers.ct_factory import CtSeries, make_ct_series

UID_ROOT = "1.2.826.0.1.3680043.10.1561"


@pytest.fixture
def info() -> ResultInfo:
    """Result identity of a test run."""
    return ResultInfo(uid_root=UID_ROOT, model_version="ckpt-2024.1", node_version="0.1.0")


@pytest.fixture
def ct_factory(tmp_path: Path) -> Callable[..., CtSeries]:
    """Make CT series on disk under ``tmp_path`` (keyword arguments of make_ct_series)."""
    counter = iter(range(1000))

    def make(**kwargs) -> CtSeries:
        return make_ct_series(tmp_path / f"ct{next(counter)}", **kwargs)

    return make


@pytest.fixture
def small_ct(ct_factory) -> CtSeries:
    """A 12-slice 96x96 HFS CT series."""
    return ct_factory()
