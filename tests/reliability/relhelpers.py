"""Shared setup of the reliability tests: import paths for the harness in ``benchmarks/``."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for _p in (REPO / "benchmarks", REPO / "tests" / "pacs_node"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def node_config(data_dir: Path, **overrides):
    """A NodeConfig on loopback with free ports, short stable age and the node tests' fake processing."""
    from pacs_node.config import NodeConfig

    cfg = NodeConfig()
    cfg.listener.host = cfg.http.host = "127.0.0.1"
    cfg.listener.port = cfg.http.port = 0
    cfg.spool.data_dir = data_dir
    cfg.spool.stable_age_s = 0.5
    cfg.spool.min_free_mb = 0
    cfg.worker.process_function = "nodetest_helpers:fake_process"
    cfg.worker.torch_threads = 1
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def files_under(root: Path) -> set[Path]:
    """Every regular file below ``root``."""
    return {p for p in root.rglob("*") if p.is_file()}
