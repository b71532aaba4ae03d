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
        (n, 8) rows of (dx, dy, dz, sigma_across, sigma_along, ux, uy, uz) in unit-free shape
        space: lobules are round (equal sigmas), spicules are thin blobs elongated along u.
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
    roughness, surface:
        Relative amplitude and (k, phase) rows of the waves that make the surface irregular.
    peak:
        Largest field value (the deepest point), for relative depth.
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
    roughness: float = 0.0
    peak: float = 1.0
    surface: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    extra: dict = field(default_factory=dict)

    @property
    def radius_bound_mm(self) -> float:
        """Radius of a sphere around the centre that contains the whole tumour."""
        b = self.blobs
        reach = np.max(np.linalg.norm(b[:, :3], axis=1) + 3.0 * np.maximum(b[:, 3], b[:, 4]))
        return float(reach * self.scale * (1.0 + self.roughness))

    def field(self, X, Y, Z, offset) -> np.ndarray:
        """Implicit function (>= ``level`` inside) at coordinates with the tumour shifted by ``offset``.

        A sum of (possibly elongated) Gaussian blobs, modulated by a few low-frequency
        waves that make the surface irregular.
        """
        cx, cy, cz = (np.asarray(self.centre, np.float64) + np.asarray(offset, np.float64)).astype(np.float32)
        s = np.float32(1.0 / self.scale)
        u, v, w = (X - cx) * s, (Y - cy) * s, (Z - cz) * s
        total = np.zeros(np.broadcast_shapes(u.shape, v.shape, w.shape), np.float32)
        for bx, by, bz, s_perp, s_par, ax, ay, az in self.blobs.astype(np.float32):
            du, dv, dw = u - bx, v - by, w - bz
            if s_perp == s_par:
                inv = np.float32(-0.5 / (s_perp * s_perp))
                total += np.exp(du * du * inv) * np.exp(dv * dv * inv) * np.exp(dw * dw * inv)
            else:
                along = du * ax + dv * ay + dw * az
                across2 = du * du + dv * dv + dw * dw - along * along
                total += np.exp(np.float32(-0.5) * (across2 / (s_perp * s_perp) + along * along / (s_par * s_par)))
        if self.roughness > 0 and len(self.surface):
            wave = np.zeros_like(total)
            for kx, ky, kz, ph in self.surface.astype(np.float32):
                wave += np.cos(kx * u + ky * v + kz * w + ph)
            total *= 1.0 + np.float32(self.roughness / np.sqrt(len(self.surface))) * wave
        return total

    def local_box(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, offset) -> tuple[slice, slice, slice]:
        """Index slices (z, y, x) of the 1-D axes that can hold the tumour displaced by ``offset``."""
        c = np.asarray(self.centre, float) + np.asarray(offset, float)
        r = self.radius_bound_mm

        def span(axis: np.ndarray, lo: float, hi: float) -> slice:
            idx = np.nonzero((axis >= lo) & (axis <= hi))[0]
            return slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)

        return span(z, c[2] - r, c[2] + r), span(y, c[1] - r, c[1] + r), span(x, c[0] - r, c[0] + r)

    def inside(self, X, Y, Z, offset) -> np.ndarray:
        """Boolean tumour mask at the given coordinates for displacement ``offset``."""
        return self.field(X, Y, Z, offset) >= self.level

    def depth(self, f: np.ndarray) -> np.ndarray:
        """Relative depth (0 at the surface, 1 at the deepest point) from field values."""
        return np.clip((f - self.level) / (self.peak - self.level + 1e-6), 0, 1)

    def ct_hu(self, X, Y, Z, offset, f: np.ndarray | None = None) -> np.ndarray:
        """CT number of tumour tissue (necrotic core lower) at the coordinates.

        ``f`` may pass the already evaluated :meth:`field` at the same coordinates.
        """
        f = self.field(X, Y, Z, offset) if f is None else f
        hu = np.full(f.shape, np.float32(self.hu))
        if self.necrosis > 0:
            hu[self.depth(f) > 1.0 - self.necrosis] = np.float32(self.hu - 22.0)
        return hu

    def uptake(self, X, Y, Z, offset, f: np.ndarray | None = None) -> np.ndarray:
        """SUV of tumour tissue at the coordinates (meaningful only inside the tumour).

        ``f`` may pass the already evaluated :meth:`field` at the same coordinates.
        """
        f = self.field(X, Y, Z, offset) if f is None else f
        cx, cy, cz = np.asarray(self.centre, np.float32) + np.asarray(offset, np.float32)
        s = np.float32(1.0 / self.scale)
        u, v, w = (X - cx) * s, (Y - cy) * s, (Z - cz) * s
        tex = np.zeros_like(f)
        for kx, ky, kz, ph in self.texture.astype(np.float32):
            tex += np.cos(kx * u + ky * v + kz * w + ph)
        tex = tex / max(1.0, np.sqrt(len(self.texture) / 2.0))
        depth = self.depth(f)
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
            "lobules": int(np.sum(self.blobs[:, 3] == self.blobs[:, 4]) - 1),
            "spicules": int(np.sum(self.blobs[:, 3] != self.blobs[:, 4])),
            **self.extra,
        }


def sample_shape(rng: np.random.Generator, diameter_mm: float) -> dict:
    """Random lobulated (sometimes spiculated) shape scaled to an equivalent diameter.

    Returns keyword arguments for :class:`TumourShape`: blobs, level, scale, roughness, surface.
    """
    n_lobes = int(rng.integers(2, 7))
    n_spicules = int(rng.integers(3, 9)) if rng.random() < 0.35 else 0
    core = rng.uniform(0.55, 0.85)
    rows = [(0, 0, 0, core, core, 1, 0, 0)]
    for _ in range(n_lobes):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        sig = rng.uniform(0.3, 0.65)
        rows.append((*(d * rng.uniform(0.55, 1.25)), sig, sig, *d))
    for _ in range(n_spicules):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        length = rng.uniform(0.5, 1.0)
        rows.append((*(d * (0.9 + 0.5 * length)), rng.uniform(0.05, 0.09), length, *d))
    blobs = np.asarray(rows, dtype=np.float64)
    level = float(rng.uniform(0.5, 0.65))
    roughness = float(rng.uniform(0.05, 0.2))
    surface = np.concatenate([rng.normal(size=(5, 3)) * 3.5, rng.uniform(0, 2 * np.pi, size=(5, 1))], axis=1)
    shape = TumourShape(np.zeros(3), "", 0, blobs, level, 1.0, 0, 0, 0, np.zeros(3), np.zeros((0, 4)),
                        roughness=roughness, surface=surface)
    # equivalent diameter of the unit-scale shape, measured on a fine cube
    g = np.linspace(-3, 3, 81, dtype=np.float32)
    f = shape.field(g[None, None, :], g[None, :, None], g[:, None, None], (0, 0, 0))
    vol = (f >= level).sum() * (g[1] - g[0]) ** 3
    unit_d = (6.0 * vol / np.pi) ** (1 / 3)
    return {"blobs": blobs, "level": level, "scale": float(diameter_mm / unit_d), "roughness": roughness,
            "surface": surface, "peak": float(f.max())}


def sample_texture(rng: np.random.Generator) -> np.ndarray:
    """Random plane waves for uptake heterogeneity (spatial frequency in shape units)."""
    m = 6
    k = rng.normal(size=(m, 3)) * 2.5
    return np.concatenate([k, rng.uniform(0, 2 * np.pi, size=(m, 1))], axis=1)
