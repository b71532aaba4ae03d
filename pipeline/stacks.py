"""2.5D model input from the CT grid, and predictions back onto the CT grid.

Model grid
----------
The CT's own slices are kept (no resampling along z). In-plane, the crop around
the lung field is resampled to ``prep.pixel_spacing_mm`` and padded (centred)
to a multiple of ``prep.size_multiple``. Every slice is first viewed in a
canonical in-plane orientation (array columns towards the patient's left, rows
towards posterior, as a head-first supine scan is displayed), so prone and
feet-first scans look like supine head-first ones to the model; the view is a
numpy view (flips/transposition), undone exactly on the way back. The K slices
of a stack are ``prep.slice_step`` CT slices apart (1: adjacent), ordered from
inferior to superior.

Channels: ``inputs[:, 0]`` is PET (SUV, ``prep.normalise_pet``),
``inputs[:, 1]`` is CT (HU, ``prep.normalise_ct``). Outside the CT image
the padding is air (-1000 HU) and SUV 0.

Resampling rules (one per direction, all separable 1D matrices)
---------------------------------------------------------------
- CT/PET -> model: area-weighted average (exact box filter) of the CT pixels
  a model pixel overlaps.
- Model -> CT (``to_ct_grid``): bilinear interpolation between model pixel
  centres (order=1, default: smooth contours) or the value of the model pixel
  containing the CT pixel centre (order=0). CT pixels whose centre lies in the
  model grid's footprint receive a value; all other voxels (outside the crop, or
  slices outside the lung range) are 0.
- CT mask -> model labels (``labels_from_ct_grid``): each CT pixel belongs to the
  model pixel that contains its centre; a model pixel is 1 when at least half of
  its member CT pixels are 1 (a model pixel without member, possible only when
  the model grid is finer than the CT, takes the CT pixel under its centre).

What "exact" means here (and what the tests check)
--------------------------------------------------
- Geometry: every model pixel maps to CT pixels through the same 1D maps both
  ways; a CT-grid object's round trip moves its centroid by < 0.3 mm.
- A mask made on the model grid goes to the CT grid with order=0, is
  thresholded at 0.5 and comes back through ``labels_from_ct_grid``
  identically, whenever the model grid is not finer than the CT (ratio >= 1).
  order=1 (the default, smoother contours) can differ from order=0 by one model
  pixel at corners.
- A CT-grid mask's round trip (``labels_from_ct_grid`` -> order=1 -> >= 0.5)
  loses only the 2 mm label quantisation: Dice >= 0.97 for objects of >= ~30 cc,
  ~0.955 for ~4 cc spheres at 2 mm model spacing on ~1 mm CT. Soft targets
  without that loss: ``to_model_grid(mask.astype(np.float32))`` (area fractions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from model.preprocessing import Preprocessing
from pipeline.volume import SeriesVolume

#: HU separating air from tissue for the lung/body finder.
AIR_HU = -400.0
#: Smallest lung component kept (cc) and its fraction of the largest one.
MIN_LUNG_CC = 5.0
MIN_LUNG_FRACTION = 0.15
#: Slices processed together (bounds temporary memory).
CHUNK = 16


@dataclass(frozen=True)
class AxisMap:
    """1D map between a CT axis and a model axis, in CT continuous index units.

    Model pixel ``j`` spans CT coordinates ``[start + j*ratio, start + (j+1)*ratio)``;
    CT pixel ``i`` spans ``[i - 0.5, i + 0.5)``.
    """

    n_ct: int
    n_model: int
    start: float
    ratio: float

    @classmethod
    def centred(cls, lo: int, hi: int, n_ct: int, ct_spacing: float, model_spacing: float, multiple: int) -> AxisMap:
        """Model axis covering CT pixels ``lo..hi`` (inclusive), padded to ``multiple`` and centred."""
        ratio = model_spacing / ct_spacing
        width = hi - lo + 1
        n = max(1, math.ceil(width / ratio - 1e-9))
        n = math.ceil(n / multiple) * multiple
        start = (lo - 0.5) + (width - n * ratio) / 2.0
        return cls(n_ct=n_ct, n_model=n, start=start, ratio=ratio)

    def _edges(self) -> np.ndarray:
        return self.start + np.arange(self.n_model + 1) * self.ratio

    def area(self) -> np.ndarray:
        """(n_model, n_ct) overlap of each CT pixel with each model pixel, over the model pixel length."""
        e = self._edges()
        i = np.arange(self.n_ct)
        lo = np.maximum(e[:-1, None], i[None, :] - 0.5)
        hi = np.minimum(e[1:, None], i[None, :] + 0.5)
        return (np.clip(hi - lo, 0.0, None) / self.ratio).astype(np.float64)

    def owner(self) -> np.ndarray:
        """(n_ct,) index of the model pixel containing each CT pixel centre, -1 outside."""
        j = np.floor((np.arange(self.n_ct) - self.start) / self.ratio).astype(np.int64)
        j[(j < 0) | (j >= self.n_model)] = -1
        return j

    def members(self) -> np.ndarray:
        """(n_model, n_ct) 0/1: CT pixel centre inside the model pixel (see module doc)."""
        m = np.zeros((self.n_model, self.n_ct))
        own = self.owner()
        inside = own >= 0
        m[own[inside], np.nonzero(inside)[0]] = 1.0
        centres = self.start + (np.arange(self.n_model) + 0.5) * self.ratio
        nearest = np.floor(centres + 0.5).astype(np.int64)
        empty = (m.sum(axis=1) == 0) & (nearest >= 0) & (nearest < self.n_ct)
        m[np.nonzero(empty)[0], nearest[empty]] = 1.0
        return m

    def nearest_back(self) -> np.ndarray:
        """(n_ct, n_model): each footprint CT pixel takes its owner's value."""
        b = np.zeros((self.n_ct, self.n_model))
        own = self.owner()
        inside = own >= 0
        b[np.nonzero(inside)[0], own[inside]] = 1.0
        return b

    def linear_back(self) -> np.ndarray:
        """(n_ct, n_model): linear interpolation between model pixel centres (edges replicated)."""
        b = np.zeros((self.n_ct, self.n_model))
        own = self.owner()
        rows = np.nonzero(own >= 0)[0]
        u = (rows - self.start) / self.ratio - 0.5
        j0 = np.floor(u).astype(np.int64)
        t = u - j0
        lo = np.clip(j0, 0, self.n_model - 1)
        hi = np.clip(j0 + 1, 0, self.n_model - 1)
        np.add.at(b, (rows, lo), 1.0 - t)
        np.add.at(b, (rows, hi), t)
        return b


@dataclass(frozen=True)
class Canonical:
    """In-plane view of a CT array in the canonical orientation (see module doc)."""

    transpose: bool
    flip_y: bool
    flip_x: bool
    z_superior: bool

    @classmethod
    def from_direction(cls, direction: tuple[float, ...]) -> Canonical:
        d = np.asarray(direction, dtype=float).reshape(3, 3)
        transpose = abs(d[0, 0]) < abs(d[0, 1])
        if transpose:
            flip_x, flip_y = d[0, 1] < 0, d[1, 0] < 0
        else:
            flip_x, flip_y = d[0, 0] < 0, d[1, 1] < 0
        return cls(transpose=bool(transpose), flip_y=bool(flip_y), flip_x=bool(flip_x), z_superior=bool(d[2, 2] >= 0))

    def view(self, array: np.ndarray) -> np.ndarray:
        """Canonical view (no copy) of a (Z, Y, X) array; writes go through to ``array``."""
        a = array.transpose(0, 2, 1) if self.transpose else array
        if self.flip_y:
            a = a[:, ::-1, :]
        if self.flip_x:
            a = a[:, :, ::-1]
        return a

    def spacing_yx(self, spacing_xyz: tuple[float, ...]) -> tuple[float, float]:
        """(row, column) spacing of the canonical view."""
        sx, sy = spacing_xyz[0], spacing_xyz[1]
        return (sx, sy) if self.transpose else (sy, sx)


def _largest_per_slice(fg: np.ndarray) -> np.ndarray:
    body = np.zeros_like(fg)
    s2 = ndimage.generate_binary_structure(2, 1)
    for z in range(fg.shape[0]):
        lab, n = ndimage.label(fg[z], structure=s2)
        if n:
            counts = np.bincount(lab.ravel())
            counts[0] = 0
            body[z] = lab == int(np.argmax(counts))
    return body


def find_lungs(hu: np.ndarray, spacing_zyx: tuple[float, float, float], step: int = 2) -> np.ndarray:
    """Lung field mask on an in-plane subsampled grid ``hu[:, ::step, ::step]``.

    Air (below -400 HU) enclosed by the body in its axial slice, kept in 3D
    components of at least ``MIN_LUNG_CC`` and ``MIN_LUNG_FRACTION`` of the
    largest component (so bowel gas and couch cavities are dropped).
    """
    sub = hu[:, ::step, ::step]
    fg = sub > AIR_HU
    body = _largest_per_slice(fg)
    planar = np.zeros((3, 3, 3), dtype=bool)
    planar[1] = ndimage.generate_binary_structure(2, 1)
    inside_air = ndimage.binary_fill_holes(body, structure=planar) & ~fg
    del body, fg
    lab, n = ndimage.label(inside_air)
    if n == 0:
        return inside_air
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    voxel_cc = spacing_zyx[0] * spacing_zyx[1] * step * spacing_zyx[2] * step / 1000.0
    keep = (sizes * voxel_cc >= MIN_LUNG_CC) & (sizes >= MIN_LUNG_FRACTION * sizes.max())
    keep[0] = False
    return keep[lab]


def crop_box(
    hu: np.ndarray, spacing_zyx: tuple[float, float, float], margin_mm: float
) -> tuple[tuple[int, int, int, int, int, int], str]:
    """(z0, z1, y0, y1, x0, x1) inclusive box around the lungs plus ``margin_mm``, and how found."""
    step = 2 if min(hu.shape[1:]) >= 64 else 1
    lungs = find_lungs(hu, spacing_zyx, step)
    if lungs.any():
        idx = np.nonzero(lungs)
        how = "lung field"
    else:
        body = hu[:, ::step, ::step] > AIR_HU
        idx = np.nonzero(body)
        how = "body (no lungs found)"
        if not body.any():
            z, y, x = hu.shape
            return (0, z - 1, 0, y - 1, 0, x - 1), "whole image (no body found)"
    z0, z1 = int(idx[0].min()), int(idx[0].max())
    y0, y1 = int(idx[1].min()) * step, int(idx[1].max()) * step + step - 1
    x0, x1 = int(idx[2].min()) * step, int(idx[2].max()) * step + step - 1
    mz = int(math.ceil(margin_mm / spacing_zyx[0]))
    my = int(math.ceil(margin_mm / spacing_zyx[1]))
    mx = int(math.ceil(margin_mm / spacing_zyx[2]))
    nz, ny, nx = hu.shape
    box = (
        max(0, z0 - mz), min(nz - 1, z1 + mz),
        max(0, y0 - my), min(ny - 1, y1 + my),
        max(0, x0 - mx), min(nx - 1, x1 + mx),
    )
    return box, how


def sandwich(left: np.ndarray, planes: np.ndarray, right_t: np.ndarray) -> np.ndarray:
    """``left @ planes[i] @ right_t`` for every plane, as two large matrix products (float32).

    One GEMM per side over the whole chunk is much faster than a GEMM per plane.
    """
    c, y, x = planes.shape
    h, w = left.shape[0], right_t.shape[1]
    right = np.ascontiguousarray(planes, dtype=np.float32).reshape(c * y, x) @ right_t  # (c*y, w)
    right = np.ascontiguousarray(right.reshape(c, y, w).transpose(1, 0, 2)).reshape(y, c * w)
    out = left @ right  # (h, c*w)
    return out.reshape(h, c, w).transpose(1, 0, 2)


def _nonzero_span(matrix: np.ndarray) -> tuple[int, int]:
    cols = np.nonzero(matrix.any(axis=0))[0]
    return int(cols.min()), int(cols.max()) + 1


@dataclass
class StackSet:
    """2.5D stacks of one CT (and the PET on its grid) and the way back.

    Attributes
    ----------
    planes:
        (N + span - 1, 2, H, W) float32 normalised model-grid planes (PET, CT), one
        per CT slice (``prep.span``: K slices ``prep.slice_step`` apart); ``inputs``
        is a sliding-window view of them.
    slice_indices:
        (N,) CT z index of each stack's centre slice.
    ct_shape:
        (Z, Y, X) of the CT array.
    prep:
        The preprocessing the stacks were built with.
    crop:
        Canonical-view box (z0, z1, y0, y1, x0, x1), inclusive.
    crop_reason:
        What the crop was found from (lung field, body, whole image).
    """

    planes: np.ndarray
    slice_indices: np.ndarray
    ct_shape: tuple[int, int, int]
    prep: Preprocessing
    crop: tuple[int, int, int, int, int, int]
    crop_reason: str
    canonical: Canonical
    ymap: AxisMap
    xmap: AxisMap
    _spans: tuple[tuple[int, int], tuple[int, int]] = field(default=((0, 0), (0, 0)))

    @property
    def inputs(self) -> np.ndarray:
        """(N, 2, K, H, W) float32 read-only view; channel 0 PET, channel 1 CT.

        Use ``np.ascontiguousarray(inputs[a:b])`` for a batch.
        """
        view = sliding_window_view(self.planes, self.prep.span, axis=0)[..., :: self.prep.slice_step]  # (N, 2, H, W, K)
        view = np.moveaxis(view, -1, 2)
        if not self.canonical.z_superior:
            view = view[:, :, ::-1]
        return view

    @property
    def shape_hw(self) -> tuple[int, int]:
        """Model-grid height and width."""
        return self.ymap.n_model, self.xmap.n_model

    def __len__(self) -> int:
        return int(self.slice_indices.size)

    def _sliced(self) -> tuple[slice, slice]:
        (ylo, yhi), (xlo, xhi) = self._spans
        return slice(ylo, yhi), slice(xlo, xhi)

    def to_ct_grid(self, probs: np.ndarray, order: int = 1) -> np.ndarray:
        """Put model-grid predictions of the centre slices back on the full CT grid.

        Parameters
        ----------
        probs:
            (N, H, W) or (N, 1, H, W) values per stack (probabilities).
        order:
            1: bilinear (default); 0: value of the model pixel containing the CT pixel centre.

        Returns
        -------
        np.ndarray
            float32 (Z, Y, X) on the original CT grid; 0 outside the model grid's footprint.
        """
        probs = np.asarray(probs)
        if probs.ndim == 4 and probs.shape[1] == 1:
            probs = probs[:, 0]
        if probs.shape != (len(self), *self.shape_hw):
            raise ValueError(f"expected predictions of shape {(len(self), *self.shape_hw)}, got {probs.shape}")
        if order not in (0, 1):
            raise ValueError("order must be 0 (nearest) or 1 (bilinear)")
        ys, xs = self._sliced()
        if order == 1:
            by, bx = self.ymap.linear_back()[ys], self.xmap.linear_back()[xs]
        else:
            by, bx = self.ymap.nearest_back()[ys], self.xmap.nearest_back()[xs]
        by = by.astype(np.float32)
        bxt = np.ascontiguousarray(bx.T.astype(np.float32))
        out = np.zeros(self.ct_shape, dtype=np.float32)
        canon = self.canonical.view(out)
        for a in range(0, len(self), CHUNK):
            chunk = probs[a : a + CHUNK].astype(np.float32, copy=False)
            back = sandwich(by, chunk, bxt)
            zs = self.slice_indices[a : a + CHUNK]
            for z, plane in zip(zs, back, strict=True):
                canon[z, ys, xs] = plane
        return out

    def labels_from_ct_grid(self, mask: np.ndarray) -> np.ndarray:
        """(N, H, W) uint8 model-grid labels of the centre slices from a (Z, Y, X) CT-grid mask."""
        mask = np.asarray(mask)
        if mask.shape != self.ct_shape:
            raise ValueError(f"mask shape {mask.shape} is not the CT shape {self.ct_shape}")
        ys, xs = self._sliced()
        my = self.ymap.members()[:, ys].astype(np.float32)
        mxt = np.ascontiguousarray(self.xmap.members()[:, xs].T.astype(np.float32))
        count = np.outer(my.sum(axis=1), mxt.sum(axis=0))
        canon = self.canonical.view(mask)
        out = np.zeros((len(self), *self.shape_hw), dtype=np.uint8)
        for a in range(0, len(self), CHUNK):
            zs = self.slice_indices[a : a + CHUNK]
            votes = sandwich(my, canon[zs][:, ys, xs], mxt)
            out[a : a + CHUNK] = (count > 0) & (2.0 * votes >= count - 1e-3)
        return out

    def to_model_grid(self, volume: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Area-weighted model-grid planes (N, H, W) float32 of a CT-grid volume at the centre slices."""
        if volume.shape != self.ct_shape:
            raise ValueError(f"volume shape {volume.shape} is not the CT shape {self.ct_shape}")
        return _resample_planes(
            self.canonical.view(volume), self.slice_indices, self.ymap, self.xmap, self._spans, fill
        )


def _resample_planes(
    canon: np.ndarray,
    z_indices: np.ndarray,
    ymap: AxisMap,
    xmap: AxisMap,
    spans: tuple[tuple[int, int], tuple[int, int]],
    fill: float,
) -> np.ndarray:
    (ylo, yhi), (xlo, xhi) = spans
    ay = ymap.area()[:, ylo:yhi]
    ax = xmap.area()[:, xlo:xhi]
    missing = (1.0 - np.outer(ay.sum(axis=1), ax.sum(axis=1))).astype(np.float32)
    ay32 = ay.astype(np.float32)
    axt = np.ascontiguousarray(ax.T.astype(np.float32))
    out = np.empty((len(z_indices), ymap.n_model, xmap.n_model), dtype=np.float32)
    for a in range(0, len(z_indices), CHUNK):
        zs = z_indices[a : a + CHUNK]
        res = sandwich(ay32, canon[zs][:, ylo:yhi, xlo:xhi], axt)
        if fill != 0.0:
            res += np.float32(fill) * missing
        out[a : a + CHUNK] = res
    return out


def build_stacks(ct: SeriesVolume, pet_on_ct: sitk.Image, prep: Preprocessing) -> StackSet:
    """Crop, resample and normalise CT and PET into 2.5D stacks (see the module doc).

    Parameters
    ----------
    ct:
        CT volume (HU).
    pet_on_ct:
        PET SUV already on the CT grid (same size as ``ct.image``).
    prep:
        K, model spacing, size multiple, normalisation, lung margin.
    """
    if tuple(pet_on_ct.GetSize()) != tuple(ct.image.GetSize()):
        raise ValueError(
            f"PET on CT grid has size {pet_on_ct.GetSize()}, CT has {ct.image.GetSize()}; resample first"
        )
    canonical = Canonical.from_direction(ct.image.GetDirection())
    hu = canonical.view(sitk.GetArrayViewFromImage(ct.image))
    suv = canonical.view(sitk.GetArrayViewFromImage(pet_on_ct))
    sy, sx = canonical.spacing_yx(ct.image.GetSpacing())
    sz = ct.image.GetSpacing()[2]
    box, reason = crop_box(hu, (sz, sy, sx), prep.lung_margin_mm)
    z0, z1, y0, y1, x0, x1 = box
    nz, ny, nx = hu.shape
    ymap = AxisMap.centred(y0, y1, ny, sy, prep.pixel_spacing_mm, prep.size_multiple)
    xmap = AxisMap.centred(x0, x1, nx, sx, prep.pixel_spacing_mm, prep.size_multiple)
    spans = (_nonzero_span(ymap.area()), _nonzero_span(xmap.area()))
    half = prep.span // 2
    centres = np.arange(z0, z1 + 1)
    plane_z = np.clip(np.arange(z0 - half, z1 + half + 1), 0, nz - 1)
    unique_z, inverse = np.unique(plane_z, return_inverse=True)
    ct_planes = _resample_planes(hu, unique_z, ymap, xmap, spans, fill=-1000.0)
    ct_planes = prep.normalise_ct(ct_planes)
    pet_planes = prep.normalise_pet(_resample_planes(suv, unique_z, ymap, xmap, spans, fill=0.0))
    planes = np.empty((plane_z.size, 2, ymap.n_model, xmap.n_model), dtype=np.float32)
    planes[:, 0] = pet_planes[inverse]
    planes[:, 1] = ct_planes[inverse]
    del ct_planes, pet_planes
    return StackSet(
        planes=planes,
        slice_indices=centres,
        ct_shape=tuple(int(v) for v in sitk.GetArrayViewFromImage(ct.image).shape),  # type: ignore[arg-type]
        prep=prep,
        crop=box,
        crop_reason=reason,
        canonical=canonical,
        ymap=ymap,
        xmap=xmap,
        _spans=spans,
    )
