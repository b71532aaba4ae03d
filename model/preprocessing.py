"""Preprocessing parameters shared by the pipeline's stack builder and the model.

They travel in every checkpoint's metadata, so the pipeline builds exactly the
input a checkpoint was trained on. Nothing here knows about DICOM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Preprocessing:
    """How CT and PET slices become model input.

    Parameters
    ----------
    slices:
        K, the number of CT slices per stack (odd; centre slice is predicted).
    slice_step:
        CT slices from one stack slice to the next (1: adjacent slices). A step of 2
        lets the same K see twice as far along the breathing axis.
    pixel_spacing_mm:
        In-plane spacing of the model grid (mm); CT-grid slices are resampled to it.
    size_multiple:
        Height and width of a stack are padded to a multiple of this.
    ct_window:
        HU range clipped before scaling to [-1, 1].
    suv_max:
        SUV at which PET is clipped; PET is scaled as ``log1p(suv) / log1p(suv_max)``.
    lung_margin_mm:
        Margin around the lung field's bounding box kept by the crop.
    """

    slices: int = 5
    slice_step: int = 1
    pixel_spacing_mm: float = 2.0
    size_multiple: int = 16
    ct_window: tuple[float, float] = (-1000.0, 400.0)
    suv_max: float = 20.0
    lung_margin_mm: float = 20.0

    def __post_init__(self) -> None:
        if self.slices < 1 or self.slices % 2 == 0:
            raise ValueError(f"slices (K) must be a positive odd number, got {self.slices}")
        if self.slice_step < 1:
            raise ValueError(f"slice_step must be a positive number of CT slices, got {self.slice_step}")
        if self.pixel_spacing_mm <= 0:
            raise ValueError("pixel_spacing_mm must be positive")

    @property
    def span(self) -> int:
        """CT slices one stack covers, from its first slice to its last."""
        return (self.slices - 1) * self.slice_step + 1

    def normalise_ct(self, hu: np.ndarray) -> np.ndarray:
        """Map HU to [-1, 1] over ``ct_window`` (float32)."""
        lo, hi = self.ct_window
        out = (np.clip(hu, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
        return out.astype(np.float32, copy=False)

    def normalise_pet(self, suv: np.ndarray) -> np.ndarray:
        """Map SUV to [0, 1] on a log scale up to ``suv_max`` (float32)."""
        clipped = np.clip(suv, 0.0, self.suv_max)
        out = np.log1p(clipped) / np.log1p(self.suv_max)
        return out.astype(np.float32, copy=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for checkpoint metadata."""
        d = asdict(self)
        d["ct_window"] = list(self.ct_window)
        if self.slice_step == 1:  # checkpoints and sample caches from before the option keep their identity
            del d["slice_step"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; unknown keys are rejected."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        kwargs = dict(data)
        if "ct_window" in kwargs:
            kwargs["ct_window"] = tuple(float(v) for v in kwargs["ct_window"])
        return cls(**kwargs)
