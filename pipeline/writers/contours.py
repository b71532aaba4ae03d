"""Planar contours of a binary slice traced along pixel boundaries.

Each boundary loop runs along the edges between foreground and background
pixels, so its vertices sit at pixel corners (half-pixel offsets from the pixel
centres). Filling all loops of a slice with the even-odd rule (XOR) gives back
the mask exactly: every pixel centre lies 0.5 px away from every edge.

Foreground is 4-connected: two pixels that only touch at a corner belong to
separate loops. Outer boundaries run counter-clockwise in (x = column,
y = row) coordinates (positive signed area), hole boundaries clockwise. By
default holes are joined to their outline by keyhole cuts (see
:func:`trace_slice`), so the union of the loops is the mask as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Loop:
    """One closed boundary loop.

    Attributes
    ----------
    points:
        (N, 2) float array of (row, column) in pixel units of the slice, pixel
        centres at integers, so vertices lie at ``k + 0.5``. Collinear points
        are removed; the first point is not repeated at the end.
    is_hole:
        True for the boundary of a hole inside a region.
    """

    points: np.ndarray
    is_hole: bool

    @property
    def area(self) -> float:
        """Enclosed area in pixels (positive)."""
        return abs(signed_area(self.points))


def signed_area(points: np.ndarray) -> float:
    """Shoelace area of a closed polygon given as (row, column) points; x = column, y = row."""
    y, x = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def trace_slice(mask: np.ndarray, keyhole: bool = True) -> list[Loop]:
    """Boundary loops of a 2D binary ``mask`` (rows, columns).

    Parameters
    ----------
    mask:
        Binary slice.
    keyhole:
        True: every hole is joined to the outline of its region by a zero-width
        cut along a pixel-boundary line, so each 4-connected region is one
        polygon (readers that OR or XOR the contours of a plane both fill it
        right). False: holes are separate loops (clockwise), for readers that
        XOR the contours of a plane.

    Returns
    -------
    list of Loop
        Empty for an empty slice; otherwise in raster order of each loop's
        top-left corner, so a region's outline precedes its holes.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"trace_slice needs a 2D mask, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    r0, c0 = int(rows[0]), int(cols[0])
    crop = mask[r0 : int(rows[-1]) + 1, c0 : int(cols[-1]) + 1]
    fg = np.pad(crop, 1)
    width = fg.shape[1] + 1  # vertices per row of the corner grid
    starts, ends, pixels = _boundary_edges(fg, width)
    successor = _successors(starts, ends, pixels)
    cycles = _cycles(starts, successor)
    if keyhole:
        cycles = _merge_holes(cycles, fg, width)
    loops = []
    for vertex in cycles:
        corners = np.stack([vertex // width, vertex % width], axis=1)
        corners = _drop_collinear(corners)
        # Padded corner index k sits at pixel coordinate k - 1 - 0.5 of the crop.
        points = corners.astype(float) + np.array([r0 - 1.5, c0 - 1.5])
        loops.append(Loop(points=points, is_hole=signed_area(points) < 0))
    return loops


def _cycles(starts: np.ndarray, successor: np.ndarray) -> list[np.ndarray]:
    """Vertex-id sequences of the cycles of the edge successor permutation."""
    visited = np.zeros(starts.size, dtype=bool)
    cycles = []
    for first in range(starts.size):
        if visited[first]:
            continue
        cycle = [first]
        visited[first] = True
        edge = int(successor[first])
        while edge != first:
            visited[edge] = True
            cycle.append(edge)
            edge = int(successor[edge])
        cycles.append(starts[np.asarray(cycle)])
    return cycles


def _merge_holes(cycles: list[np.ndarray], fg: np.ndarray, width: int) -> list[np.ndarray]:
    """Join every hole cycle to the outline of its region with a keyhole cut.

    The cut runs up the pixel-boundary line left of the hole's top-left pixel,
    through foreground of the same region, to the first boundary above it
    (the outline, or a hole higher up that is already joined). It is walked
    down and back up, so it adds no area under even-odd or nonzero filling.
    """
    polygons: list[list[int] | None] = [[int(v) for v in c] for c in cycles]
    areas = [_corner_area(c, width) for c in cycles]
    owner = list(range(len(cycles)))
    edge_owner: dict[tuple[int, int], int] = {}
    for index, cycle in enumerate(cycles):
        for a, b in zip(cycle.tolist(), np.roll(cycle, -1).tolist(), strict=True):
            edge_owner[(a, b)] = index

    def root(index: int) -> int:
        while owner[index] != index:
            index = owner[index]
        return index

    holes = sorted((int(c.min()), i) for i, c in enumerate(cycles) if areas[i] < 0)
    for top_left, hole_index in holes:
        r_top, c_left = divmod(top_left, width)
        r = r_top - 1
        while fg[r, c_left]:
            r -= 1
        above = (r + 1) * width + c_left  # top-left corner of the top pixel of the run
        target = root(edge_owner[(above, above + 1)])
        poly = polygons[target]
        hole = polygons[hole_index]
        assert poly is not None and hole is not None
        at = next(
            i for i, v in enumerate(poly) if v == above and poly[(i + 1) % len(poly)] == above + 1
        )
        start = hole.index(top_left)
        rotated = hole[start:] + hole[:start]
        polygons[target] = poly[: at + 1] + rotated + [top_left] + poly[at:]
        polygons[hole_index] = None
        owner[hole_index] = target
    return [np.asarray(p, dtype=np.int64) for p in polygons if p is not None]


def _corner_area(vertex: np.ndarray, width: int) -> float:
    return signed_area(np.stack([vertex // width, vertex % width], axis=1).astype(float))


def _boundary_edges(fg: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed unit edges between foreground and background (start, end vertex ids, pixel id).

    Each foreground pixel (r, c) contributes the sides that face background,
    walked top-left -> top-right -> bottom-right -> bottom-left, so shared
    sides cancel and the remaining edges chain into loops.
    """
    inner = fg[1:-1, 1:-1]
    r, c = np.nonzero(inner)
    r, c = r + 1, c + 1
    top_left = r * width + c
    top_right = top_left + 1
    bottom_left = top_left + width
    bottom_right = bottom_left + 1
    pixel = r * fg.shape[1] + c
    sides = (
        (~fg[r - 1, c], top_left, top_right),
        (~fg[r, c + 1], top_right, bottom_right),
        (~fg[r + 1, c], bottom_right, bottom_left),
        (~fg[r, c - 1], bottom_left, top_left),
    )
    starts = np.concatenate([s[keep] for keep, s, _ in sides])
    ends = np.concatenate([e[keep] for keep, _, e in sides])
    pixels = np.concatenate([pixel[keep] for keep, _, _ in sides])
    return starts, ends, pixels


def _successors(starts: np.ndarray, ends: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Index of the edge that follows each edge in its loop.

    A vertex has one outgoing edge, or two where two foreground pixels touch
    only at that corner; there the loop stays with the pixel it came along
    (4-connected foreground).
    """
    order = np.argsort(starts, kind="stable")
    sorted_starts = starts[order]
    lo = np.searchsorted(sorted_starts, ends, side="left")
    hi = np.searchsorted(sorted_starts, ends, side="right")
    count = hi - lo
    if np.any(count < 1) or np.any(count > 2):
        raise RuntimeError("boundary edges do not form closed loops")
    successor = order[lo]
    saddle = np.flatnonzero(count == 2)
    if saddle.size:
        second = order[lo[saddle] + 1]
        use_second = pixels[second] == pixels[saddle]
        successor[saddle[use_second]] = second[use_second]
    return successor


def _drop_collinear(corners: np.ndarray) -> np.ndarray:
    """Keep only the vertices where the walking direction changes."""
    incoming = np.sign(corners - np.roll(corners, 1, axis=0))
    outgoing = np.sign(np.roll(corners, -1, axis=0) - corners)
    turn = np.any(incoming != outgoing, axis=1)
    return corners[turn]


def fill_even_odd(loops: list[Loop], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise ``loops`` on a (rows, columns) grid with the even-odd rule at pixel centres.

    A reference rasteriser for tests and checks: a pixel is inside when a ray
    from its centre towards +column crosses an odd number of loop edges.
    """
    out = np.zeros(shape, dtype=bool)
    rows = np.arange(shape[0], dtype=float)
    cols = np.arange(shape[1], dtype=float)
    for loop in loops:
        p = loop.points
        q = np.roll(p, -1, axis=0)
        for (ra, ca), (rb, cb) in zip(p, q, strict=True):
            if ra == rb:
                continue
            lo, hi = min(ra, rb), max(ra, rb)
            hit = (rows >= lo) & (rows < hi)
            if not hit.any():
                continue
            rr = rows[hit]
            crossing = ca + (rr - ra) * (cb - ca) / (rb - ra)
            out[hit] ^= cols[None, :] < crossing[:, None]
    return out
