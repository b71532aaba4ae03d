"""A running node (storescu in, storescp out) serves the dashboard API, /metrics and an audit trail
that match what happened, without patient identifiers."""

from __future__ import annotations

import json
import urllib.request

import pytest
from nodetest_helpers import echoscu, make_study, node_config, storescu, wait_for
from test_metrics import check_lines, parse

from pacs_node.audit import read_events
from pacs_node.config import Destination

pytestmark = pytest.mark.peers
TOKEN = "node-test-token"


def get(node, path: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{node.http_port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_metrics_audit_and_dashboard_follow_a_study(tmp_path, node_factory, storescp) -> None:
    dest = Destination(name="pacs", kind="dimse", ae_title="DEST", host="127.0.0.1", port=storescp.port)
    cfg = node_config(tmp_path / "data", export__destinations=[dest], listener__allow_aet=["STORESCU"])
    cfg.http.token = TOKEN
    node = node_factory(cfg)
    study = make_study(tmp_path / "s", n_ct=5, n_pet=3)
    assert storescu(node.dimse_port, study.files).returncode == 0
    assert echoscu(node.dimse_port, aet="INTRUDER").returncode != 0  # not on the allow list

    def finished():
        jobs = node.jobs.jobs_of_study(study.study_uid)
        return jobs and jobs[-1].state in ("done", "failed") and jobs[-1]

    job = wait_for(finished, 60, what="the job to finish")
    assert job.state == "done", job.reason

    # /metrics: no token needed, valid exposition, counts match
    status, body = get(node, "/metrics", token=None)
    text = body.decode()
    check_lines(text)
    m = parse(text)
    assert m[("igtv_instances_received_total", (("transport", "dimse"),))] == 8
    spooled = node.index.query("SELECT SUM(size) AS n FROM instances")[0]["n"]  # bytes written to the spool
    assert m[("igtv_received_bytes_total", (("transport", "dimse"),))] == spooled
    assert m[("igtv_studies_received_total", ())] == 1
    assert m[("igtv_associations_accepted_total", ())] >= 1
    assert m[("igtv_associations_rejected_total", (("reason", "calling_AE_title_not_allowed"),))] == 1
    assert m[("igtv_jobs", (("state", "done"),))] == 1
    assert m[("igtv_jobs_finished_total", (("state", "done"),))] == 1
    assert m[("igtv_exports_total", (("destination", "pacs"), ("outcome", "sent")))] == 1
    assert m[("igtv_stage_duration_seconds_count", (("stage", "export"),))] == 1
    assert m[("igtv_spool_free_bytes", ())] > 0

    # audit trail: one line per series, the job, the results with their UIDs; no identifiers
    events = read_events(node.audit.path, limit=None)
    kinds = [e["event"] for e in events]
    for kind in ("association_accepted", "association_rejected", "instances_stored", "job_started",
                 "job_finished", "results_sent"):
        assert kind in kinds, kind
    stored = {e["modality"]: e for e in events if e["event"] == "instances_stored"}
    assert stored["CT"]["count"] == 5 and stored["PT"]["count"] == 3
    assert stored["CT"]["source"] == "dimse:STORESCU" and stored["CT"]["study_uid"] == study.study_uid
    rejected = next(e for e in events if e["event"] == "association_rejected")
    assert rejected["calling_ae"] == "INTRUDER" and rejected["reason"] == "calling AE title not allowed"
    assert rejected["peer"].startswith("127.0.0.1:")
    sent = next(e for e in events if e["event"] == "results_sent")
    assert sorted(sent["sop_instance_uids"]) == sorted(job.result_uids)
    assert sent["destination"] == "pacs" and sent["target"] == f"DEST@127.0.0.1:{storescp.port}"
    raw = node.audit.path.read_text()
    assert "TEST123" not in raw and "Test^Patient" not in raw

    # dashboard API: token required, shows the study de-identified and the job
    assert get(node, "/api/studies", token=None)[0] == 401
    status, body = get(node, "/api/studies")
    assert status == 200 and b"TEST123" not in body
    (shown,) = json.loads(body)["studies"]
    assert shown["study_uid"] == study.study_uid and shown["instances"] == 8
    assert shown["latest_job"]["state"] == "done"
    assert get(node, "/")[0] == 200
