"""External tools of the writer tests: dciodvfy, plastimatch, and a Dice helper."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.pipeline.writers.ct_factory import CtSeries
from tests.system_tools import system_tool


def require_tool(name: str) -> str:
    """Path of an external tool the tests depend on; fail (not skip) when it is missing."""
    path = system_tool(name)
    if path is None:
        pytest.fail(f"required tool {name!r} is not installed (see .ci/run's apt-get line)")
    return path


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """Run dciodvfy on ``path``; return its error lines and the whole output."""
    tool = require_tool("dciodvfy")
    run = subprocess.run(
        [tool, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
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
    cmd = [
        tool,
        "convert",
        "--input",
        str(rtstruct),
        "--referenced-ct",
        str(ct.directory),
        "--output-prefix",
        str(prefix),
        "--prefix-format",
        "mha",
    ]
    if xor:
        cmd.append("--xor-contours")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
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
