"""``replay``: the worker path on a folder, through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nodetest_helpers import make_study
from pydicom import dcmread

REPO = Path(__file__).resolve().parents[2]


def _cli(tmp_path, *args, process="nodetest_helpers:fake_process"):
    config = tmp_path / "node.toml"
    config.write_text(f'[worker]\nprocess_function = "{process}"\n')
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{Path(__file__).parent}"}
    return subprocess.run([sys.executable, "-m", "pacs_node", "replay", *map(str, args), "--config", str(config)],
                          env=env, capture_output=True, text=True, timeout=120)


def test_replay_produces_results_and_sends(tmp_path, storescp):
    study = make_study(tmp_path / "study", n_ct=4, n_pet=2)
    (tmp_path / "study" / "notes.txt").write_text("not dicom")
    out = tmp_path / "out"
    res = _cli(tmp_path, tmp_path / "study", "--out", out, "--dest", f"pacs=DEST@127.0.0.1:{storescp.port}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "6 DICOM file(s)" in res.stdout
    assert "found:    CT 4 slices" in res.stdout
    assert f"produced: {out / 'seg.dcm'}" in res.stdout and f"produced: {out / 'rtstruct.dcm'}" in res.stdout
    assert "sent:     2 object(s) to pacs" in res.stdout
    assert dcmread(out / "seg.dcm").StudyInstanceUID == study.study_uid
    assert len(storescp.files()) == 2


def test_replay_bad_input_exits_2_without_traceback(tmp_path):
    study = make_study(tmp_path / "study", n_ct=3, n_pet=0)
    res = _cli(tmp_path, tmp_path / "study", "--out", tmp_path / "out")
    assert res.returncode == 2
    assert "no PET" in res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert len(study.files) == 3 and all(p.exists() for p in study.files)  # input untouched
    res = _cli(tmp_path, tmp_path / "nowhere", "--out", tmp_path / "out")
    assert res.returncode == 2 and "not a folder" in res.stderr
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = _cli(tmp_path, tmp_path / "study", "--out", afile)
    assert res.returncode == 2 and "exists and is not a folder" in res.stderr
    res = _cli(tmp_path, tmp_path / "study", "--out", tmp_path / "out", "--dest", "p=A@h:1", "--dest", "p=B@h:2")
    assert res.returncode == 2 and "defined twice" in res.stderr
