"""Lobulated tumours: an implicit shape (sum of Gaussian "metaballs") in the tumour's own frame.

The shape is rigid; breathing translates it. ``occupancy`` evaluates it on any axis-aligned
set of coordinates, and ``uptake`` gives its heterogeneous FDG uptake (with an optional
necrotic core) in the same frame, so the PET sees the uptake move with the tumour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LOBES = ("RUL", "RML", "RLL", "LUL", "LLL")


@dataclass
class TumourShape:
    """One tumour, defined around its exhale-position centre.

    Attributes
    ----------
    centre:
        LPS centre (mm) at end-exhale.
    lobe:
        Lobe label (RUL, RML, RLL, LUL, LLL).
    diameter_mm:
        Target equivalent-sphere diameter; ``scale`` makes the implicit shape match it.
    blobs:
        (n, 4) rows of (dx, dy, dz, sigma) in unit-free shape space.
    level:
        Iso-level of the summed Gaussians that defines the surface.
    scale:
        mm per shape-space unit.
    suv_peak, suv_floor:
        Uptake at the hottest part and at the rim of viable tissue.
    necrosis:
        Fraction (0-0.6) of the shape's depth that is necrotic (0 = none).
    amplitude_lps:
        Displacement (mm) at end-inhale relative to end-exhale.
    texture:
        (m, 4) rows (kx, ky, kz, phase) of the uptake heterogeneity pattern.
    """

    centre: np.ndarray
    lobe: str
    diameter_mm: float
    blobs: np.ndarray
    level: float
    scale: float
    suv_peak: float
    suv_floor: float
    necrosis: float
    amplitude_lps: np.ndarray
    texture: np.ndarray
    abutting: str = "none"
    hu: float = 38.0
    extra: dict = field(default_factory=dict)

    @property
    def radius_bound_mm(self) -> float:
        """Radius of a sphere around the centre that contains the whole tumour."""
        reach = np.max(np.linalg.norm(self.blobs[:, :3], axis=1) + 3.0 * self.blobs[:, 3])
        return float(reach * self.scale)

    def field(self, X, Y, Z, offset) -> np.ndarray:
        """Implicit function (>= ``level`` inside) at coordinates with the tumour shifted by ``offset``."""
        cx, cy, cz = (np.asarray(self.centre, np.float64) + np.asarray(offset, np.float64)).astype(np.float32)
        s = np.float32(1.0 / self.scale)
        u, v, w = (X - cx) * s, (Y - cy) * s, (Z - cz) * s
        total = np.zeros(np.broadcast_shapes(u.shape, v.shape, w.shape), np.float32)
        for bx, by, bz, sig in self.blobs.astype(np.float32):
            inv = np.float32(-0.5 / (sig * sig))
            total += np.exp(((u - bx) ** 2) * inv) * np.exp(((v - by) ** 2) * inv) * np.exp(((w - bz) ** 2) * inv)
        return total

    def inside(self, X, Y, Z, offset) -> np.ndarray:
        """Boolean tumour mask at the given coordinates for displacement ``offset``."""
        return self.field(X, Y, Z, offset) >= self.level

    def uptake(self, X, Y, Z, offset) -> np.ndarray:
        """SUV of tumour tissue at the coordinates (meaningful only inside the tumour)."""
        f = self.field(X, Y, Z, offset)
        cx, cy, cz = np.asarray(self.centre, np.float32) + np.asarray(offset, np.float32)
        s = np.float32(1.0 / self.scale)
        u, v, w = (X - cx) * s, (Y - cy) * s, (Z - cz) * s
        tex = np.zeros_like(f)
        for kx, ky, kz, ph in self.texture.astype(np.float32):
            tex += np.cos(kx * u + ky * v + kz * w + ph)
        tex = tex / max(1.0, np.sqrt(len(self.texture) / 2.0))
        depth = np.clip((f - self.level) / (f.max() - self.level + 1e-6), 0, 1) if f.size else f
        viable = self.suv_floor + (self.suv_peak - self.suv_floor) * np.clip(0.55 + 0.3 * tex + 0.45 * depth, 0, 1)
        if self.necrosis > 0:
            core = depth > 1.0 - self.necrosis
            viable = np.where(core, np.float32(0.9), viable)
        return viable.astype(np.float32)

    def as_dict(self) -> dict:
        """JSON-friendly description."""
        return {
            "centre_exhale_mm": [float(v) for v in self.centre],
            "lobe": self.lobe,
            "diameter_mm": float(self.diameter_mm),
            "suv_peak": float(self.suv_peak),
            "suv_floor": float(self.suv_floor),
            "necrotic_fraction": float(self.necrosis),
            "hu": float(self.hu),
            "inhale_displacement_mm": [float(v) for v in self.amplitude_lps],
            "abutting": self.abutting,
            **self.extra,
        }


def sample_shape(rng: np.random.Generator, diameter_mm: float) -> tuple[np.ndarray, float, float]:
    """Random lobulated blob set scaled to an equivalent diameter; returns (blobs, level, scale)."""
    n = int(rng.integers(2, 7))
    blobs = np.zeros((n, 4))
    blobs[0] = (0, 0, 0, 1.0)
    for i in range(1, n):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        blobs[i, :3] = direction * rng.uniform(0.4, 1.0)
        blobs[i, 3] = rng.uniform(0.45, 0.85)
    level = float(rng.uniform(0.45, 0.6))
    # equivalent diameter of the unit-scale shape, measured on a fine cube
    g = np.linspace(-3, 3, 61, dtype=np.float32)
    shape = TumourShape(np.zeros(3), "", 0, blobs, level, 1.0, 0, 0, 0, np.zeros(3), np.zeros((0, 4)))
    vol = shape.inside(g[None, None, :], g[None, :, None], g[:, None, None], (0, 0, 0)).sum() * (g[1] - g[0]) ** 3
    unit_d = (6.0 * vol / np.pi) ** (1 / 3)
    return blobs, level, float(diameter_mm / unit_d)


def sample_texture(rng: np.random.Generator) -> np.ndarray:
    """Random plane waves for uptake heterogeneity (spatial frequency in shape units)."""
    m = 6
    k = rng.normal(size=(m, 3)) * 2.5
    return np.concatenate([k, rng.uniform(0, 2 * np.pi, size=(m, 1))], axis=1)
