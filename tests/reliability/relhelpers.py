"""Shared setup of the reliability tests: import paths for the harness in ``benchmarks/``."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for _p in (REPO / "benchmarks", REPO / "tests" / "pacs_node"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
