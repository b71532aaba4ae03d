"""Fixtures of the writer tests: synthetic CT series, result identity, external tools."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

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


def require_tool(name: str) -> str:
    """Path of an external tool the tests depend on; fail (not skip) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"required tool {name!r} is not installed (see .ci/run's apt-get line)")
    return path


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """Run dciodvfy on ``path``; return its error lines and the whole output."""
    tool = require_tool("dciodvfy")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    return errors, output


def plastimatch_labelmap(
    rtstruct: Path, ct: CtSeries, out: Path, roi_names: list[str], xor: bool = False
) -> np.ndarray:
    """Rasterise ``rtstruct`` with plastimatch and resample it onto the CT grid.

    plastimatch writes one image per ROI (``--output-prefix``; its
    ``--output-labelmap`` path ignores ``--xor-contours``). Returns an int
    array (Z, Y, X) in the z order of the CT headers where ROI ``roi_names[k]``
    has label k + 1.
    """
    tool = require_tool("plastimatch")
    prefix = out / "rois"
    cmd = [tool, "convert", "--input", str(rtstruct), "--referenced-ct", str(ct.directory),
           "--output-prefix", str(prefix), "--prefix-format", "mha"]
    if xor:
        cmd.append("--xor-contours")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"plastimatch failed:\n{run.stdout}\n{run.stderr}"
    reference = sitk.Image(ct.volume.image.GetSize(), sitk.sitkUInt8)
    reference.CopyInformation(ct.volume.image)
    labels = np.zeros(ct.volume.array.shape, dtype=np.int64)
    for label, name in enumerate(roi_names, start=1):
        image = sitk.ReadImage(str(prefix / f"{name}.mha"))
        resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        inside = sitk.GetArrayFromImage(resampled) > 0
        assert not (labels[inside] > 0).any(), "plastimatch ROIs overlap"
        labels[inside] = label
    return labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two bool masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
