"""dcmtk's storescu sends SEG and RTSTRUCT to dcmtk's storescp (SOP class negotiation works)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from pipeline.writers.rtstruct import write_rtstruct
from pipeline.writers.seg import write_seg
from tests.pipeline.writers.ct_factory import ellipsoid_mask
from tests.pipeline.writers.tools import require_tool

pytestmark = pytest.mark.peers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"storescp exited early: {process.communicate()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"storescp did not listen on port {port}")


@pytest.fixture
def storescp(tmp_path: Path):
    """A dcmtk storescp on a free port writing into tmp; yields (port, output folder)."""
    tool = require_tool("storescp")
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [tool, "--aetitle", "IGTVTEST", "--output-directory", str(out), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, process)
        yield port, out
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_storescu_sends_seg_and_rtstruct(small_ct, info, tmp_path, storescp):
    port, received = storescp
    mask = ellipsoid_mask(
        small_ct.volume.array.shape, small_ct.spacing_zyx, (18.0, 45.0, 40.0), (9.0, 14.0, 12.0)
    )
    sent = {}
    for name, ds in (
        ("seg.dcm", write_seg(mask, small_ct.volume, info)),
        ("rtstruct.dcm", write_rtstruct(mask, small_ct.volume, info)),
    ):
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        sent[str(ds.SOPInstanceUID)] = str(ds.SOPClassUID)
    # storescu's default proposal list has no Segmentation Storage; -R proposes the
    # presentation contexts of the files given instead.
    run = subprocess.run(
        [
            require_tool("storescu"),
            "-R",
            "-aec",
            "IGTVTEST",
            "127.0.0.1",
            str(port),
            str(tmp_path / "seg.dcm"),
            str(tmp_path / "rtstruct.dcm"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    deadline = time.monotonic() + 10
    files = []
    while time.monotonic() < deadline and len(files) < 2:
        files = [p for p in received.iterdir() if p.is_file()]
        time.sleep(0.05)
    arrived = {
        str(ds.SOPInstanceUID): str(ds.SOPClassUID)
        for ds in (dcmread(p, stop_before_pixels=True) for p in files)
    }
    assert arrived == sent
