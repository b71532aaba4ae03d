"""The whole node: storescu in, worker process, results out to a dcmtk storescp; CLI serve; restart."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nodetest_helpers import (
    echoscu,
    free_port,
    make_study,
    node_config,
    storescu,
    wait_for,
    wait_port,
)
from pydicom import dcmread

from model.checkpoint import metadata_path, shipped_checkpoint_path
from pacs_node.config import Destination

pytestmark = pytest.mark.peers

REPO = Path(__file__).resolve().parents[2]


def _done_job(node, study_uid, timeout=60):
    def done():
        jobs = node.jobs.jobs_of_study(study_uid)
        return jobs and jobs[-1].state in ("done", "failed") and jobs[-1]
    return wait_for(done, timeout, what=f"job of study {study_uid} to finish")


def test_study_in_results_out(tmp_path, node_factory, storescp):
    dest = Destination(name="pacs", kind="dimse", ae_title="DEST", host="127.0.0.1", port=storescp.port)
    node = node_factory(node_config(tmp_path / "data", export__destinations=[dest]))
    seen: list[tuple[str, dict]] = []
    for name in ("association_accepted", "instance_stored", "job_started", "job_finished", "export_sent"):
        node.events.subscribe(name, lambda name=name, **kw: seen.append((name, kw)))
    study = make_study(tmp_path / "s", n_ct=5, n_pet=3)
    rle = make_study(tmp_path / "rle", n_ct=2, n_pet=0, rle_ct=True, study_uid=study.study_uid)
    assert storescu(node.dimse_port, study.files).returncode == 0
    assert storescu(node.dimse_port, rle.ct_files, extra=["-xr"]).returncode == 0
    job = _done_job(node, study.study_uid)
    assert job.state == "done", job.reason
    arrived = {dcmread(p).SOPInstanceUID: dcmread(p) for p in storescp.files()}
    assert set(arrived) == set(job.result_uids) and len(arrived) == 2
    assert {d.Modality for d in arrived.values()} == {"SEG", "RTSTRUCT"}
    assert all(d.StudyInstanceUID == study.study_uid for d in arrived.values())
    (export,) = node.jobs.exports_of_job(job.id)
    assert export["state"] == "done"
    wait_for(lambda: any(n == "export_sent" for n, _ in seen), 10, what="export_sent event")
    names = [n for n, _ in seen]
    assert names.count("instance_stored") == 10 and names.count("association_accepted") == 2
    assert names.index("job_started") < names.index("job_finished") < names.index("export_sent")
    (sent_event,) = [kw for n, kw in seen if n == "export_sent"]
    assert sent_event["destination"] == "pacs" and sorted(sent_event["sop_uids"]) == sorted(job.result_uids)
    assert node.index.study(study.study_uid)["state"] == "processed"
    # a late instance re-opens the study; the re-run gives the same result UIDs (replaces, not duplicates)
    late = make_study(tmp_path / "late", n_ct=1, n_pet=0, study_uid=study.study_uid)
    assert storescu(node.dimse_port, late.ct_files).returncode == 0
    wait_for(lambda: len(node.jobs.jobs_of_study(study.study_uid)) == 2, 30, what="re-run job")
    rerun = _done_job(node, study.study_uid)
    assert rerun.id != job.id and rerun.state == "done"
    assert sorted(rerun.result_uids) == sorted(job.result_uids)


def test_failed_job_quarantines_inputs_with_reason(tmp_path, node_factory):
    cfg = node_config(tmp_path / "data", worker__process_function="nodetest_helpers:failing_process")
    node = node_factory(cfg)
    study = make_study(tmp_path / "s", n_ct=3, n_pet=2)
    assert storescu(node.dimse_port, study.files).returncode == 0
    job = _done_job(node, study.study_uid)
    assert job.state == "failed" and "slice spacing varies" in job.reason
    q = node.spool.quarantine_dir(study.study_uid)
    assert len(list(q.rglob("*.dcm"))) == 5
    assert "slice spacing varies" in (q / "REASON.txt").read_text()
    assert node.index.study(study.study_uid)["reason"] == job.reason


def test_cli_serve_answers_echoscu_and_stops_on_sigterm(tmp_path):
    port, http_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{Path(__file__).parent}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacs_node", "serve", "--port", str(port), "--http-port", str(http_port),
         "--data-dir", str(tmp_path / "data"), "--allow-aet", "ECHOSCU"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_port(port, 30)
        res = echoscu(port)
        assert res.returncode == 0, res.stderr
        assert echoscu(port, aet="OTHER").returncode != 0
        res = subprocess.run([sys.executable, "-m", "pacs_node", "echo", f"IGTV@127.0.0.1:{port}",
                              "--ae-title", "ECHOSCU"], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "success" in res.stdout, res.stdout + res.stderr
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "igtv-node stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_restart_resumes_a_running_job(tmp_path, node_factory):
    data = tmp_path / "data"
    cfg = node_config(data, spool__stable_age_s=0.5)
    from pacs_node.server import NodeServer

    node = NodeServer(cfg)
    node.workers.start = lambda: None  # a node that receives but never processes (crash before the job runs)
    node.start()
    study = make_study(tmp_path / "s", n_ct=3, n_pet=2)
    assert storescu(node.dimse_port, study.files).returncode == 0
    wait_for(lambda: node.jobs.jobs_of_study(study.study_uid), 20, what="job queued")
    claimed = node.jobs.claim()  # the job was running when the node died
    assert claimed.state == "running"
    node.stop()
    node2 = node_factory(node_config(data))
    job = _done_job(node2, study.study_uid)
    assert job.id == claimed.id and job.state == "done", job.reason
    assert job.attempts == 2 and len(job.result_uids) == 2


def test_synthetic_study_with_rle_ct_through_storescu(tmp_path, node_factory, storescp, small_study):
    """A synthetic PET/CT study (CT compressed to RLE by dcmtk dcmcrle) sent by storescu, processed, exported."""
    dest = Destination(name="pacs", kind="dimse", ae_title="DEST", host="127.0.0.1", port=storescp.port)
    node = node_factory(node_config(tmp_path / "data", export__destinations=[dest]))
    rle_dir = tmp_path / "ct-rle"
    rle_dir.mkdir()
    ct_files = sorted((small_study / "CT").iterdir())
    pet_files = sorted((small_study / "PT").iterdir())
    for f in ct_files:
        subprocess.run(["dcmcrle", str(f), str(rle_dir / f.name)], check=True, capture_output=True, timeout=30)
    assert storescu(node.dimse_port, pet_files).returncode == 0
    res = storescu(node.dimse_port, sorted(rle_dir.iterdir()), extra=["-xr"])
    assert res.returncode == 0, res.stderr
    study_uid = dcmread(ct_files[0], stop_before_pixels=True).StudyInstanceUID
    info = node.index.study(study_uid)
    assert info["instance_count"] == len(ct_files) + len(pet_files)
    assert info["modalities"] == ["CT", "PT"]
    syntaxes = {r["transfer_syntax"] for r in node.index.query(
        "SELECT transfer_syntax FROM instances i JOIN series s USING(series_uid) WHERE s.modality='CT'")}
    assert syntaxes == {"1.2.840.10008.1.2.5"}  # stored as received, decoded later by the pipeline
    job = _done_job(node, study_uid)
    assert job.state == "done", job.reason
    assert {dcmread(p).SOPInstanceUID for p in storescp.files()} == set(job.result_uids)


def test_one_node_per_data_directory_and_ports_in_use_are_explained(tmp_path, node_factory):
    from pacs_node.server import NodeServer, NodeStartError

    data = tmp_path / "data"
    first = node_factory(node_config(data))
    with pytest.raises(NodeStartError, match="in use by another igtv-node"):
        NodeServer(node_config(data))  # would replay the first node's journal
    with pytest.raises(NodeStartError, match=r"cannot listen for DICOM .*\(listener\.port\)"):
        NodeServer(node_config(tmp_path / "other", listener__port=first.dimse_port)).start()
    with pytest.raises(NodeStartError, match=r"cannot listen for HTTP .*\(http\.port\)"):
        NodeServer(node_config(tmp_path / "third", http__port=first.http_port))
    first.stop()
    node_factory(node_config(tmp_path / "other"))  # the failed starts left no lock behind
    node_factory(node_config(data))


def test_serve_refuses_a_missing_checkpoint_before_it_listens(tmp_path):
    from pacs_node.server import NodeServer
    from pipeline.errors import IgtvError

    cfg = node_config(tmp_path / "data", worker__process_function="pipeline.process:process_study")
    cfg.processing.checkpoint = tmp_path / "none.safetensors"
    with pytest.raises(IgtvError, match="none.safetensors does not exist"):
        NodeServer(cfg)
    cfg.processing.checkpoint = None
    cfg.processing.device = "gpu"
    with pytest.raises(IgtvError, match="unknown device 'gpu'"):
        NodeServer(cfg)
    shipped = shipped_checkpoint_path()
    copy = tmp_path / "net.safetensors"
    shutil.copy(shipped, copy)
    shutil.copy(metadata_path(shipped), metadata_path(copy))
    (tmp_path / "net.refiner.safetensors").write_bytes(b"not weights")
    (tmp_path / "net.refiner.json").write_text("{")
    cfg.processing.checkpoint, cfg.processing.device = copy, "cpu"
    with pytest.raises(IgtvError, match="refiner .*net.refiner.safetensors"):
        NodeServer(cfg)
    for name in ("net.refiner.safetensors", "net.refiner.json"):
        (tmp_path / name).unlink()
    (tmp_path / "net.outline.safetensors").write_bytes(b"not weights")
    (tmp_path / "net.outline.json").write_text("{")
    with pytest.raises(IgtvError, match="refiner .*net.outline.safetensors"):
        NodeServer(cfg)
