"""Breathing trace: where the tumour and the diaphragm are at each moment of the cycle.

The trace follows the Lujan model, ``s(t) = cos^(2n)(pi t / T)``: ``s = 0`` is end-exhale
(where the lungs spend most of the cycle) and ``s = 1`` is end-inhale. Inhalation moves
the diaphragm and lower lung inferiorly (-z in LPS) and slightly anteriorly (-y).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BreathingTrace:
    """One periodic breathing cycle.

    Attributes
    ----------
    period_s:
        Cycle length in seconds.
    shape_n:
        Lujan exponent ``n`` (1-3); larger values flatten the exhale plateau.
    hysteresis:
        Phase lag (fraction of the cycle) of the AP/LR motion behind the SI motion,
        which makes the tumour path an ellipse rather than a line.
    ct_time_fraction:
        Moment of the cycle (0-1) at which the CT snapshot is taken.
    """

    period_s: float
    shape_n: int
    hysteresis: float
    ct_time_fraction: float

    def inhale_fraction(self, t_fraction: np.ndarray | float) -> np.ndarray:
        """Inhale fraction s(t) in [0, 1] at cycle fractions ``t_fraction``."""
        t = np.asarray(t_fraction, dtype=np.float64)
        return np.cos(np.pi * t) ** (2 * self.shape_n)

    def displacement(self, amplitude_lps: np.ndarray, t_fraction: np.ndarray | float) -> np.ndarray:
        """Displacement (mm, LPS) at cycle fractions for a target with inhale displacement ``amplitude_lps``.

        Returns an array shaped (..., 3).
        """
        t = np.asarray(t_fraction, dtype=np.float64)
        s_si = self.inhale_fraction(t)
        s_lat = self.inhale_fraction(t - self.hysteresis)
        amp = np.asarray(amplitude_lps, dtype=np.float64)
        return np.stack([s_lat * amp[0], s_lat * amp[1], s_si * amp[2]], axis=-1)

    def pet_times(self, n: int) -> np.ndarray:
        """``n`` uniformly spaced cycle fractions: the PET sees the time average over them."""
        return (np.arange(n) + 0.5) / n

    def envelope_times(self, amplitude_mm: float, step_mm: float = 1.0) -> np.ndarray:
        """Cycle fractions whose positions are at most ``step_mm`` apart along the whole path.

        Uniform sampling in time leaves gaps near inhale, where motion is fastest; these
        points are uniform in inhale fraction, on the inhale half and (for the hysteresis of
        the AP/LR motion) on the exhale half of the cycle. Translating a shape by at most
        1 mm between samples leaves a union that differs from the swept volume by slivers
        far thinner than a voxel.
        """
        n = max(2, int(np.ceil(amplitude_mm / step_mm)) + 1)
        s = np.linspace(0.0, 1.0, n)
        half = np.arccos(s ** (1.0 / (2 * self.shape_n))) / np.pi  # in [0, 0.5]
        return np.unique(np.concatenate([half, 1.0 - half]))

    def as_dict(self) -> dict:
        """JSON-friendly description."""
        return {
            "model": "lujan_cos2n",
            "period_s": self.period_s,
            "shape_n": self.shape_n,
            "hysteresis_fraction": self.hysteresis,
            "ct_time_fraction": self.ct_time_fraction,
        }
