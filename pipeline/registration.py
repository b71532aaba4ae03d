"""Rigid PET-to-CT registration (SimpleITK, Mattes mutual information, Euler3D).

The registration runs on coarse copies of both images (block-averaged to about
``grid_mm``), with a two-level pyramid and random metric sampling from a fixed
seed, so the same input always gives the same transform. The transform maps CT
(fixed) physical points to PET (moving) physical points, which is what
``sitk.Resample(pet, ct, transform)`` expects.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

#: Seed of the metric's random sampling: the registration is reproducible.
DEFAULT_SEED = 20250927


@dataclass
class RegistrationInfo:
    """How the PET was placed on the CT grid.

    Attributes
    ----------
    method:
        "geometry" (DICOM geometry only) or "rigid-mattes-mi".
    registered:
        Whether an image registration ran.
    reason:
        Why it ran or not.
    transform:
        CT-to-PET physical transform (None means identity).
    parameters:
        Euler3D parameters (angle x, y, z in radians, translation x, y, z in mm).
    fixed_parameters:
        Rotation centre (mm, LPS).
    metric_value, iterations, seconds, stop_condition:
        Final Mattes MI value (lower is better), optimizer iterations over all
        levels, wall time, the optimizer's stop reason.
    coverage:
        Fraction of CT slices whose centre lies inside the PET field of view.
    """

    method: str = "geometry"
    registered: bool = False
    reason: str = ""
    transform: sitk.Transform | None = None
    parameters: list[float] = field(default_factory=list)
    fixed_parameters: list[float] = field(default_factory=list)
    metric_value: float | None = None
    iterations: int = 0
    seconds: float = 0.0
    stop_condition: str = ""
    coverage: float | None = None

    @property
    def translation_mm(self) -> tuple[float, float, float]:
        """Translation part (x, y, z in mm, LPS); zeros when not registered."""
        if len(self.parameters) >= 6:
            return tuple(float(v) for v in self.parameters[3:6])  # type: ignore[return-value]
        return (0.0, 0.0, 0.0)

    @property
    def rotation_deg(self) -> tuple[float, float, float]:
        """Rotation angles about x, y, z in degrees; zeros when not registered."""
        if len(self.parameters) >= 3:
            return tuple(math.degrees(float(v)) for v in self.parameters[:3])  # type: ignore[return-value]
        return (0.0, 0.0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the transform as parameters)."""
        return {
            "method": self.method,
            "registered": self.registered,
            "reason": self.reason,
            "translation_mm": [round(v, 3) for v in self.translation_mm],
            "rotation_deg": [round(v, 4) for v in self.rotation_deg],
            "parameters": [float(v) for v in self.parameters],
            "fixed_parameters": [float(v) for v in self.fixed_parameters],
            "metric_value": self.metric_value,
            "iterations": self.iterations,
            "seconds": round(self.seconds, 3),
            "stop_condition": self.stop_condition,
            "coverage": None if self.coverage is None else round(self.coverage, 4),
        }


def coarse_copy(image: sitk.Image, grid_mm: float) -> sitk.Image:
    """Block-average ``image`` by integer factors to a spacing of about ``grid_mm`` (float32)."""
    factors = [max(1, int(round(grid_mm / s))) for s in image.GetSpacing()]
    if any(f > 1 for f in factors):
        image = sitk.BinShrink(image, factors)
    return sitk.Cast(image, sitk.sitkFloat32)


def physical_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned (LPS) bounding box (min, max corners in mm) of the image's voxel centres."""
    size = np.asarray(image.GetSize()) - 1
    corners = []
    for i in (0, size[0]):
        for j in (0, size[1]):
            for k in (0, size[2]):
                corners.append(image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k))))
    pts = np.asarray(corners)
    return pts.min(axis=0), pts.max(axis=0)


def box_overlap(a: sitk.Image, b: sitk.Image) -> float:
    """Overlap of the two boxes per axis, as the smallest fraction of the shorter extent."""
    amin, amax = physical_box(a)
    bmin, bmax = physical_box(b)
    inter = np.minimum(amax, bmax) - np.maximum(amin, bmin)
    shorter = np.maximum(np.minimum(amax - amin, bmax - bmin), 1e-6)
    return float(np.min(np.clip(inter / shorter, 0.0, 1.0)))


def _centroid(image: sitk.Image, threshold: float) -> np.ndarray | None:
    arr = sitk.GetArrayViewFromImage(image)
    idx = np.argwhere(arr > threshold)
    if idx.size == 0:
        return None
    mean_zyx = idx.mean(axis=0)
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in mean_zyx[::-1])))


def initial_transform(
    fixed: sitk.Image, moving: sitk.Image, fixed_body: float, moving_body: float
) -> tuple[sitk.Euler3DTransform, str]:
    """Identity when the images' boxes overlap by at least half, else align body centroids."""
    transform = sitk.Euler3DTransform()
    size = np.asarray(fixed.GetSize(), dtype=float)
    centre = fixed.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2.0))
    transform.SetCenter(centre)
    if box_overlap(fixed, moving) >= 0.5:
        return transform, "identity (fields of view overlap)"
    cf = _centroid(fixed, fixed_body)
    cm = _centroid(moving, moving_body)
    if cf is None or cm is None:
        return transform, "identity (no body found to align)"
    transform.SetTranslation(tuple(float(v) for v in cm - cf))
    return transform, "body centroids aligned (fields of view barely overlap)"


def register_rigid(
    fixed_ct: sitk.Image,
    moving_pet: sitk.Image,
    *,
    seed: int = DEFAULT_SEED,
    grid_mm: float = 4.0,
    sampling: float = 0.25,
    bins: int = 32,
    max_iterations: int = 150,
    threads: int | None = None,
) -> RegistrationInfo:
    """Rigidly register a PET (moving) to a CT (fixed) with Mattes mutual information.

    Parameters
    ----------
    fixed_ct:
        CT in HU (any orientation; LPS geometry).
    moving_pet:
        PET (SUV or Bq/mL).
    seed:
        Seed of the random metric sampling (fixed: reproducible results).
    grid_mm:
        Approximate spacing of the coarse copies the registration runs on.
    sampling:
        Fraction of coarse fixed voxels sampled per metric evaluation.
    bins:
        Histogram bins of the Mattes metric.
    max_iterations:
        Per pyramid level.
    threads:
        Threads of the registration (SimpleITK's default when None). Results
        repeat to floating-point rounding (~1e-12 relative).

    Returns
    -------
    RegistrationInfo
        ``transform`` maps CT physical points to PET physical points.
    """
    start = time.perf_counter()
    fixed = sitk.Clamp(coarse_copy(fixed_ct, grid_mm), sitk.sitkFloat32, -1000.0, 1500.0)
    moving = coarse_copy(moving_pet, grid_mm)
    moving_arr = sitk.GetArrayViewFromImage(moving)
    positive = moving_arr[moving_arr > 0]
    moving_body = 0.1 * float(np.percentile(positive, 95)) if positive.size else 0.0
    initial, how = initial_transform(fixed, moving, -500.0, moving_body)

    method = sitk.ImageRegistrationMethod()
    if threads is not None:
        method.SetNumberOfThreads(threads)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=4.0,
        minStep=0.01,
        numberOfIterations=max_iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    iterations = [0]
    method.AddCommand(sitk.sitkIterationEvent, lambda: iterations.__setitem__(0, iterations[0] + 1))
    result = method.Execute(fixed, moving)
    euler = _as_euler(result)
    return RegistrationInfo(
        method="rigid-mattes-mi",
        registered=True,
        reason=f"initial transform: {how}",
        transform=euler,
        parameters=[float(v) for v in euler.GetParameters()],
        fixed_parameters=[float(v) for v in euler.GetFixedParameters()],
        metric_value=float(method.GetMetricValue()),
        iterations=iterations[0],
        seconds=time.perf_counter() - start,
        stop_condition=method.GetOptimizerStopConditionDescription(),
    )


def _as_euler(transform: sitk.Transform) -> sitk.Euler3DTransform:
    """The registration result as a plain Euler3DTransform."""
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(0)
    return sitk.Euler3DTransform(transform)
