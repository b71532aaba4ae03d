"""Study-level bad input through the real pipeline: the job fails with a reason in the index, inputs are kept."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from relhelpers import node_config
from variants import VARIANTS, write_variant

pytestmark = pytest.mark.slow

# what the operator must be able to read in the study's status
EXPECTED = {
    "ct_only": "no PET",
    "pet_only": "no CT",
    "pet_without_decay_data": "DecayCorrection",
    "different_patients": "different patients",
    "no_overlap": "covers only",
    "missing_slices": "irregular slice spacing",
    "gantry_tilt": "not axial",
}


@pytest.fixture(scope="module")
def bad_node(tmp_path_factory, synthetic_study_factory):
    """A node running the real pipeline (it fails on these inputs before the model is needed)."""
    from pacs_node.server import NodeServer

    root = tmp_path_factory.mktemp("bad-studies")
    cfg = node_config(root / "data", worker__process_function="pipeline.process:process_study")
    node = NodeServer(cfg)
    node.start()
    node.source = synthetic_study_factory(11, motion="static")
    node.root = root
    yield node
    node.stop()


def _settled(node, study_uid: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = node.index.study(study_uid)
        if st and st["state"] in ("failed", "incomplete", "processed") and st["generation"] <= st["handled_generation"]:
            jobs = node.jobs.jobs_of_study(study_uid)
            if st["state"] == "incomplete" or (jobs and jobs[-1].state in ("done", "failed")):
                return st
        time.sleep(0.2)
    raise AssertionError(f"study {study_uid} did not settle in {timeout:.0f} s")


def test_variants_cover_every_case():
    assert set(EXPECTED) == set(VARIANTS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_study_fails_with_reason_and_inputs_kept(bad_node, name):
    study_uid, files = write_variant(bad_node.source, name, bad_node.root / "variants" / name)
    for f in files:
        bad_node.ingest.store(f.read_bytes(), source="test")
    st = _settled(bad_node, study_uid)
    assert st["state"] in ("failed", "incomplete"), st
    assert EXPECTED[name] in (st["reason"] or ""), st["reason"]
    assert "Traceback" not in st["reason"] and "internal error" not in st["reason"]
    jobs = bad_node.jobs.jobs_of_study(study_uid)
    assert jobs and jobs[-1].state == "failed" and EXPECTED[name] in jobs[-1].reason
    kept = list(bad_node.spool.study_dir(study_uid).rglob("*.dcm")) + list(
        bad_node.spool.quarantine_dir(study_uid).rglob("*.dcm"))
    assert len(kept) == len(files)
    if st["state"] == "failed":  # the worker ran: inputs moved to quarantine with the reason
        q = bad_node.spool.quarantine_dir(study_uid)
        assert EXPECTED[name] in (Path(q) / "REASON.txt").read_text()
