"""Fixtures of the pacs_node tests: a data dir with spool, index and ingest; a running listener."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # nodetest_helpers, also for spawned worker processes

from pacs_node.config import ListenerConfig  # noqa: E402
from pacs_node.index import Index  # noqa: E402
from pacs_node.ingest import Ingest  # noqa: E402
from pacs_node.listener import Listener  # noqa: E402
from pacs_node.spool import Spool  # noqa: E402


@pytest.fixture
def store(tmp_path):
    """(spool, index, ingest) over a fresh data dir."""
    spool = Spool(tmp_path / "data", min_free_mb=0)
    index = Index(tmp_path / "data" / "index.sqlite")
    ingest = Ingest(spool, index, max_instance_bytes=64 * 1024 * 1024, max_instances_per_study=1000)
    yield spool, index, ingest
    index.close()


@pytest.fixture
def listener(store):
    """A running listener on a free loopback port (stopped at the end)."""
    spool, index, ingest = store
    cfg = ListenerConfig(ae_title="IGTV", host="127.0.0.1", port=0, allow_aet=["STORESCU", "ECHOSCU", "IGTV"])
    lst = Listener(cfg, ingest)
    lst.start()
    yield lst
    lst.stop()


@pytest.fixture
def storescp(tmp_path):
    """A dcmtk storescp destination (AE DEST) on a free port."""
    from nodetest_helpers import StoreScp

    scp = StoreScp(tmp_path / "storescp")
    yield scp
    scp.stop()


@pytest.fixture
def node_factory():
    """Start NodeServers from configs; all are stopped at the end."""
    from pacs_node.server import NodeServer

    started = []

    def start(cfg):
        node = NodeServer(cfg)
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def pytest_configure(config):
    config.addinivalue_line("markers", "orthanc: starts a real Orthanc PACS (Debian orthanc + orthanc-dicomweb)")
