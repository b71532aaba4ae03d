"""Axis-aligned voxel grids in LPS patient coordinates (the synthetic generator's geometry)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """A z-y-x voxel grid whose axes are aligned with the patient axes (possibly flipped).

    Attributes
    ----------
    shape:
        (nz, ny, nx) array shape.
    origin:
        LPS position (mm) of the centre of voxel (0, 0, 0), i.e. ImagePositionPatient of slice 0.
    spacing:
        (sx, sy, sz) in mm, SimpleITK order (column step, row step, slice step).
    direction:
        Signs (dx, dy, dz) of the image axes along patient x, y, z: +1 for HFS
        (rows to the left, columns posterior, slices superior); FFS uses (-1, 1, -1).
    """

    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[int, int, int] = (1, 1, 1)

    @property
    def direction_matrix(self) -> tuple[float, ...]:
        """Row-major 3x3 direction cosines (columns are the i, j, k axes), SimpleITK style."""
        dx, dy, dz = self.direction
        return (float(dx), 0.0, 0.0, 0.0, float(dy), 0.0, 0.0, 0.0, float(dz))

    @property
    def image_orientation(self) -> list[float]:
        """DICOM ImageOrientationPatient (row cosine, column cosine)."""
        dx, dy, _ = self.direction
        return [float(dx), 0.0, 0.0, 0.0, float(dy), 0.0]

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient coordinates (mm) of the voxel centres along each axis: x(i), y(j), z(k)."""
        nz, ny, nx = self.shape
        sx, sy, sz = self.spacing
        dx, dy, dz = self.direction
        x = self.origin[0] + dx * sx * np.arange(nx)
        y = self.origin[1] + dy * sy * np.arange(ny)
        z = self.origin[2] + dz * sz * np.arange(nz)
        return x, y, z

    def mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable float32 coordinate arrays shaped (1,1,nx), (1,ny,1), (nz,1,1)."""
        x, y, z = self.axes()
        return (
            x.astype(np.float32)[None, None, :],
            y.astype(np.float32)[None, :, None],
            z.astype(np.float32)[:, None, None],
        )

    def slice_position(self, k: int) -> list[float]:
        """ImagePositionPatient of slice ``k``."""
        x, y, z = self.axes()
        return [float(x[0]), float(y[0]), float(z[k])]

    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest voxel-centre coordinates along x, y, z."""
        lo = np.array([a.min() for a in self.axes()])
        hi = np.array([a.max() for a in self.axes()])
        return lo, hi

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices (z, y, x) of the voxels whose centres lie in [lo, hi]; None if empty."""
        out = []
        for axis, (a, b) in zip(self.axes(), zip(lo, hi, strict=False), strict=False):
            idx = np.nonzero((axis >= a) & (axis <= b))[0]
            if idx.size == 0:
                return None
            out.append(slice(int(idx[0]), int(idx[-1]) + 1))
        sx, sy, sz = out
        return (sz, sy, sx)

    def sub_axes(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable float32 coordinates (x, y, z) of a sub-box of the grid."""
        x, y, z = self.axes()
        bz, by, bx = box
        return (
            x[bx].astype(np.float32)[None, None, :],
            y[by].astype(np.float32)[None, :, None],
            z[bz].astype(np.float32)[:, None, None],
        )

    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing)) / 1000.0

    def as_dict(self) -> dict:
        """JSON-friendly description."""
        return {
            "shape_zyx": list(self.shape),
            "origin": [float(v) for v in self.origin],
            "spacing_xyz": [float(v) for v in self.spacing],
            "direction": list(self.direction_matrix),
        }
