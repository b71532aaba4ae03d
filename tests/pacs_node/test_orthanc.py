"""The node between a real Orthanc PACS: routed in by Lua OnStableStudy, results back by C-STORE and STOW-RS."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from nodetest_helpers import make_study, node_config, wait_for
from orthanc_peer import Orthanc
from pydicom import dcmread

from pacs_node.config import Destination
from pacs_node.export import send_dicomweb

pytestmark = [pytest.mark.peers, pytest.mark.orthanc, pytest.mark.slow]


@pytest.fixture
def orthanc_and_node(tmp_path, node_factory):
    # The node must know Orthanc's port and Orthanc the node's: give the node a fixed free port first.
    from nodetest_helpers import free_port

    from pacs_node.server import NodeServer  # noqa: F401 - node_factory builds it

    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_aet="IGTV", node_port=node_port, stable_age=1)
    dest = Destination(name="orthanc", kind="dimse", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
    cfg = node_config(tmp_path / "data", listener__port=node_port, listener__allow_aet=["ORTHANC"],
                      export__destinations=[dest])
    node = node_factory(cfg)
    yield orthanc, node
    orthanc.stop()


def _check_results_in_orthanc(orthanc, study, result_uids):
    ct_uids = {dcmread(p).SOPInstanceUID for p in study.ct_files}
    modalities = set()
    for uid in result_uids:
        instance_id = wait_for(lambda uid=uid: orthanc.find_instance(uid), 20, what=f"{uid} in Orthanc")
        ds = dcmread(io.BytesIO(orthanc.get(f"/instances/{instance_id}/file")))
        assert ds.StudyInstanceUID == study.study_uid  # the same study as the routed CT and PET
        modalities.add(ds.Modality)
        if ds.Modality == "SEG":
            refs = {i.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
        else:
            refs = {img.ReferencedSOPInstanceUID for rc in ds.ROIContourSequence for c in rc.ContourSequence
                    for img in c.ContourImageSequence}
        assert refs and refs <= ct_uids  # references the CT that Orthanc sent
    studies = orthanc.get("/studies")
    assert len(studies) == 1
    assert orthanc.get(f"/studies/{studies[0]}")["MainDicomTags"]["StudyInstanceUID"] == study.study_uid
    assert modalities == {"SEG", "RTSTRUCT"}


def test_orthanc_routes_study_and_receives_results(tmp_path, orthanc_and_node):
    orthanc, node = orthanc_and_node
    study = make_study(tmp_path / "s", n_ct=5, n_pet=3)
    for path in study.files:
        orthanc.upload(path)

    def done():
        jobs = node.jobs.jobs_of_study(study.study_uid)
        return jobs and jobs[-1].state in ("done", "failed") and jobs[-1]
    job = wait_for(done, 60, what="Orthanc -> node -> job done")
    assert job.state == "done", job.reason
    assert node.index.study(study.study_uid)["instance_count"] == 8
    # results came back by C-STORE
    _check_results_in_orthanc(orthanc, study, job.result_uids)
    # remove them from Orthanc, then send the same results by STOW-RS
    mark = time.time()
    for uid in job.result_uids:
        orthanc.request("DELETE", f"/instances/{orthanc.find_instance(uid)}")
    assert all(orthanc.find_instance(uid) is None for uid in job.result_uids)
    web = Destination(name="orthanc-web", kind="dicomweb", url=f"{orthanc.url}/dicom-web")
    sent = send_dicomweb(web, [Path(p) for p in job.dicom_outputs], timeout=20)
    assert sorted(sent) == sorted(job.result_uids)
    _check_results_in_orthanc(orthanc, study, job.result_uids)
    # Orthanc re-routes the (unchanged) CT and PET when the study settles again; that must not loop
    rerouted = "SELECT COUNT(*) AS n FROM instances WHERE study_uid=? AND received_at>?"
    wait_for(lambda: node.index.query(rerouted, (study.study_uid, mark))[0]["n"] == 8, 20,
             what="Orthanc to route the study again")
    time.sleep(2)  # longer than the node's stable age
    assert [j.state for j in node.jobs.jobs_of_study(study.study_uid)] == ["done"]


def test_orthanc_stow_client_sends_a_study_to_the_node(tmp_path, node_factory):
    """Orthanc's DICOMweb client sends with chunked transfer encoding (its default)."""
    from nodetest_helpers import free_port

    http_port, token = free_port(), "orthanc-token"
    server = {"Url": f"http://127.0.0.1:{http_port}/dicomweb/",
              "HttpHeaders": {"Authorization": f"Bearer {token}"}, "ChunkedTransfers": True}
    # the node refuses Orthanc's C-STORE route (allow list), so the study can only come by STOW-RS
    node = node_factory(node_config(tmp_path / "data", http__port=http_port, http__token=token,
                                    listener__allow_aet=["NOBODY"]))
    orthanc = Orthanc(tmp_path / "orthanc", node_aet="IGTV", node_port=node.listener.port,
                      dicomweb_servers={"igtv": server})
    try:
        study = make_study(tmp_path / "s", n_ct=3, n_pet=2)
        ids = {orthanc.upload(path)["ParentStudy"] for path in study.files}
        answer = orthanc.request("POST", "/dicom-web/servers/igtv/stow",
                                 json.dumps({"Resources": sorted(ids), "Synchronous": True}).encode())
        assert isinstance(answer, dict), answer
        rows = node.index.query("SELECT source FROM instances WHERE study_uid=?", (study.study_uid,))
        assert len(rows) == 5 and all(r["source"].startswith("stow") for r in rows)
        assert len(node.spool.study_files(study.study_uid)) == 5
    finally:
        orthanc.stop()
