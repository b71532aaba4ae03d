"""Analytic thorax anatomy: tissue labels evaluated on any axis-aligned grid.

Shapes are defined in LPS patient millimetres relative to a body centre, so the same
patient can be rasterised on the CT grid, the PET grid or a small box around a tumour,
and at any breathing phase (``diaphragm_shift_mm``: 0 at end-exhale, negative = inferior).
Structures are painted in order, later ones over earlier ones ("painter's algorithm"),
each restricted to its bounding box so the cost follows the structure's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

# Tissue labels -----------------------------------------------------------------------
AIR, FAT, MUSCLE, LUNG, CORTEX, MARROW, CARTILAGE = 0, 1, 2, 3, 4, 5, 6
MYOCARDIUM, BLOOD, LIVER, SPLEEN, STOMACH_WALL, STOMACH_AIR, GAS = 7, 8, 9, 10, 11, 12, 13
CANAL, DISC, ABDOMEN, OESOPHAGUS, NODE, TABLE_SHELL, TABLE_FOAM = 14, 15, 16, 17, 18, 19, 20
N_LABELS = 21

LABEL_NAMES = {
    AIR: "air", FAT: "fat", MUSCLE: "muscle", LUNG: "lung", CORTEX: "cortical bone",
    MARROW: "marrow", CARTILAGE: "cartilage", MYOCARDIUM: "myocardium", BLOOD: "blood",
    LIVER: "liver", SPLEEN: "spleen", STOMACH_WALL: "stomach wall", STOMACH_AIR: "stomach gas",
    GAS: "airway", CANAL: "spinal canal", DISC: "disc", ABDOMEN: "abdomen",
    OESOPHAGUS: "oesophagus", NODE: "lymph node", TABLE_SHELL: "table shell", TABLE_FOAM: "table foam",
}

#: Mean CT numbers (HU) per label.
HU = np.zeros(N_LABELS, dtype=np.float32)
HU[[AIR, FAT, MUSCLE, LUNG, CORTEX, MARROW, CARTILAGE]] = [-1000, -100, 45, -860, 1100, 260, 140]
HU[[MYOCARDIUM, BLOOD, LIVER, SPLEEN, STOMACH_WALL, STOMACH_AIR, GAS]] = [45, 38, 58, 48, 35, -1000, -1000]
HU[[CANAL, DISC, ABDOMEN, OESOPHAGUS, NODE, TABLE_SHELL, TABLE_FOAM]] = [15, 85, 20, 35, 38, 250, -950]


@dataclass
class AnatomyParams:
    """Patient-specific shape parameters (mm, LPS, relative to ``centre``)."""

    centre: tuple[float, float, float]
    half_width: float
    half_depth: float
    fat_mm: float
    muscle_mm: float
    apex_z: float
    dome_right_z: float
    dome_left_z: float
    carina_z: float
    heart_centre: tuple[float, float, float]
    heart_axes: tuple[float, float, float]
    heart_tilt: tuple[float, float]
    vertebra_radius: float
    aorta_radius: float
    rib_pitch: float
    rib_slope: float
    rib_phase: float
    nodes: list[dict]

    def as_dict(self) -> dict:
        """JSON-friendly description."""
        return asdict(self)

    @property
    def spine_y(self) -> float:
        """AP position (relative) of the vertebral body centre."""
        return self.half_depth - self.fat_mm - 52.0

    @property
    def cage_depth(self) -> float:
        """Half-depth of the outer rib cage."""
        return self.half_depth - self.fat_mm - self.muscle_mm

    @property
    def cage_width(self) -> float:
        """Half-width of the outer rib cage."""
        return self.half_width - self.fat_mm - self.muscle_mm


NODE_STATIONS = {
    "subcarinal (7)": (0.0, 14.0, -28.0),
    "right paratracheal (4R)": (-20.0, 2.0, 22.0),
    "aortopulmonary window (5)": (20.0, -8.0, 8.0),
    "right hilar (10R)": (-52.0, 14.0, -22.0),
    "left hilar (10L)": (50.0, 16.0, -26.0),
}


def sample_anatomy(rng: np.random.Generator, weight_kg: float, centre: tuple[float, float, float],
                   lymph_nodes: bool) -> AnatomyParams:
    """Draw one patient's anatomy; body size follows the weight."""
    size = (weight_kg / 75.0) ** 0.5
    half_width = float(np.clip(165 * size * rng.uniform(0.95, 1.05), 135, 205))
    half_depth = float(np.clip(108 * size * rng.uniform(0.93, 1.07), 88, 140))
    fat = float(np.clip(6 + 18 * (weight_kg - 50) / 60 * rng.uniform(0.7, 1.3), 4, 35))
    carina = float(rng.uniform(115, 140))
    nodes = []
    if lymph_nodes:
        names = list(NODE_STATIONS)
        for i in rng.choice(len(names), size=int(rng.integers(0, 4)), replace=False):
            off = NODE_STATIONS[names[i]]
            avid = bool(rng.random() < 0.6)
            nodes.append({
                "station": names[i],
                "centre_rel": [off[0] + rng.uniform(-4, 4), off[1] + rng.uniform(-4, 4), carina + off[2] + rng.uniform(-5, 5)],
                "radius_mm": float(rng.uniform(5, 11)),
                "suv": float(rng.uniform(2.5, 8.0) if avid else rng.uniform(0.8, 1.6)),
                "fdg_avid": avid,
            })
    return AnatomyParams(
        centre=centre,
        half_width=half_width,
        half_depth=half_depth,
        fat_mm=fat,
        muscle_mm=float(rng.uniform(9, 15)),
        apex_z=float(rng.uniform(190, 220)),
        dome_right_z=0.0,
        dome_left_z=float(rng.uniform(-25, -10)),
        carina_z=carina,
        heart_centre=(float(rng.uniform(12, 28)), float(rng.uniform(-30, -15)), float(rng.uniform(40, 55))),
        heart_axes=(float(rng.uniform(62, 75)), float(rng.uniform(42, 50)), float(rng.uniform(44, 52))),
        heart_tilt=(float(rng.uniform(25, 45)), float(rng.uniform(-25, -10))),
        vertebra_radius=float(rng.uniform(16, 20)),
        aorta_radius=float(rng.uniform(12, 16)),
        rib_pitch=float(rng.uniform(26, 31)),
        rib_slope=float(rng.uniform(0.35, 0.55)),
        rib_phase=float(rng.uniform(0, 1)),
        nodes=nodes,
    )


class _Canvas:
    """Label volume on an axis-aligned grid with bounding-box painting."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: tuple[float, float, float]):
        # 1-D axes relative to the body centre
        self.x = np.asarray(x, dtype=np.float32).ravel() - np.float32(centre[0])
        self.y = np.asarray(y, dtype=np.float32).ravel() - np.float32(centre[1])
        self.z = np.asarray(z, dtype=np.float32).ravel() - np.float32(centre[2])
        self.labels = np.zeros((self.z.size, self.y.size, self.x.size), dtype=np.uint8)

    def box(self, lo, hi):
        """Index slices and broadcast coordinates of the box [lo, hi] (relative mm)."""
        sl = []
        for axis, a, b in zip((self.z, self.y, self.x), (lo[2], lo[1], lo[0]), (hi[2], hi[1], hi[0]), strict=False):
            idx = np.nonzero((axis >= a) & (axis <= b))[0]
            if idx.size == 0:
                return None
            sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
        zs, ys, xs = sl
        return (zs, ys, xs), self.x[xs][None, None, :], self.y[ys][None, :, None], self.z[zs][:, None, None]

    def paint(self, label: int, lo, hi, fn: Callable, only: tuple[int, ...] | None = None) -> None:
        """Set ``label`` where ``fn(X, Y, Z)`` is true inside the box (optionally only over ``only`` labels)."""
        found = self.box(lo, hi)
        if found is None:
            return
        sl, X, Y, Z = found
        mask = fn(X, Y, Z)
        view = self.labels[sl]
        mask = np.broadcast_to(mask, view.shape)
        if only is not None:
            allowed = np.zeros(256, bool)
            allowed[list(only)] = True
            mask = mask & allowed[view]
        view[mask] = label


def _capsule(p0, p1, r):
    """Indicator of points within ``r`` of the segment p0-p1, plus its bounding box."""
    p0 = np.asarray(p0, np.float32)
    p1 = np.asarray(p1, np.float32)
    d = p1 - p0
    dd = float(d @ d) or 1e-6

    def fn(X, Y, Z):
        t = ((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2]) / dd
        t = np.clip(t, 0, 1)
        return (X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (Z - p0[2] - t * d[2]) ** 2 <= r * r

    return np.minimum(p0, p1) - r, np.maximum(p0, p1) + r, fn


def _rotated_ellipsoid(c, a, angles_deg):
    """Ellipsoid with semi-axes ``a`` rotated by (about-y, about-x) angles, plus a bounding box."""
    c = np.asarray(c, np.float32)
    a = np.asarray(a, np.float32)
    ty, tx = np.radians(angles_deg)
    ry = np.array([[np.cos(ty), 0, np.sin(ty)], [0, 1, 0], [-np.sin(ty), 0, np.cos(ty)]])
    rx = np.array([[1, 0, 0], [0, np.cos(tx), -np.sin(tx)], [0, np.sin(tx), np.cos(tx)]])
    rot = (ry @ rx).astype(np.float32)  # columns: the ellipsoid's axes in patient space

    def fn(X, Y, Z):
        dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
        total = None
        for axis in range(3):
            local = (dx * rot[0, axis] + dy * rot[1, axis] + dz * rot[2, axis]) / a[axis]
            total = local * local if total is None else total + local * local
        return total <= 1

    r = float(a.max())
    return c - r, c + r, fn


def _ellipsoid(c, a):
    c = np.asarray(c, np.float32)
    a = np.asarray(a, np.float32)

    def fn(X, Y, Z):
        return ((X - c[0]) / a[0]) ** 2 + ((Y - c[1]) / a[1]) ** 2 + ((Z - c[2]) / a[2]) ** 2 <= 1

    return c - a, c + a, fn


class ThoraxModel:
    """Rasterises one patient's thorax at a given breathing state."""

    def __init__(self, p: AnatomyParams):
        self.p = p

    # -- shared shape functions (relative coordinates) ---------------------------------
    def _section(self, Z, shrink: float):
        """Half-width/half-depth of the body outline shrunk by ``shrink`` mm at heights Z."""
        p = self.p
        top = np.clip((Z - 120.0) / 110.0, 0, 1)
        belly = np.clip((-Z - 40.0) / 80.0, 0, 1)
        w = p.half_width * (1 - 0.10 * top) - shrink
        d = p.half_depth * (1 - 0.04 * top + 0.06 * belly) - shrink
        return w, d

    def _inside(self, X, Y, Z, shrink: float, back_power: float = 3.0):
        w, d = self._section(Z, shrink)
        u = np.abs(X) / w
        v = Y / d
        back = np.abs(v) ** np.where(v > 0, np.float32(back_power), np.float32(2.0))
        return u * u + back <= 1

    def diaphragm_z(self, X, Y, shift: float):
        """Height (relative z) of the diaphragm surface below each (x, y)."""
        p = self.p
        right = p.dome_right_z - 75.0 * (((X + 60) / 95.0) ** 2 + ((Y - 5) / 110.0) ** 2)
        left = p.dome_left_z - 75.0 * (((X - 65) / 90.0) ** 2 + ((Y - 10) / 105.0) ** 2)
        tendon = np.float32(min(p.dome_left_z, p.dome_right_z) - 12.0) - 40.0 * ((Y + 10) / 120.0) ** 2
        # posterior recesses reach lower than the anterior diaphragm
        return np.maximum(np.maximum(right, left), tendon) + np.float32(shift)

    def _pleura(self, X, Y, Z):
        """Inside the pleural cavity outline (inner rib cage), apex included."""
        p = self.p
        shrink = p.fat_mm + p.muscle_mm + 9.0
        apex_start = p.apex_z - 70.0
        scale = np.sqrt(np.clip(1 - ((Z - apex_start) / 70.0) ** 2, 0, 1))
        scale = np.where(Z < apex_start, np.float32(1.0), scale)
        w, d = self._section(Z, shrink)
        u = X / (w * np.maximum(scale, 1e-3))
        v = (Y - (1 - scale) * 25.0) / (d * np.maximum(scale, 1e-3))
        return (u * u + v * v <= 1) & (Z <= p.apex_z)

    def _heart(self, extra: float, heart_shift: float):
        """Bounding box and indicator of the heart (grown by ``extra`` mm) resting on the diaphragm."""
        p = self.p
        hc = (p.heart_centre[0], p.heart_centre[1], p.heart_centre[2] + heart_shift)
        a = tuple(v + extra for v in p.heart_axes)
        lo, hi, fn = _rotated_ellipsoid(hc, a, p.heart_tilt)
        return lo, hi, lambda X, Y, Z: fn(X, Y, Z) & (Z > self.diaphragm_z(X, Y, heart_shift))

    def _paint_abdomen(self, cv: _Canvas, shift: float) -> None:
        """Abdomen, liver, stomach and spleen below the diaphragm (they move with it)."""
        p = self.p
        W, D = p.half_width * 1.1, p.half_depth * 1.1
        cage = p.fat_mm + p.muscle_mm
        cv.paint(ABDOMEN, (-W, -D, -1e4), (W, D, 60),
                 lambda X, Y, Z: self._inside(X, Y, Z, cage + 9.0) & (Z <= self.diaphragm_z(X, Y, shift)),
                 only=(FAT, MUSCLE))
        cv.paint(LIVER, (-W, -D, -400), (W, D, 60),
                 lambda X, Y, Z: (X < 25 - 0.6 * (self.diaphragm_z(X, Y, shift) - Z)) & (Z > -150 + shift),
                 only=(ABDOMEN,))
        lo, hi, fn = _ellipsoid((62, -10, -50 + shift), (48, 45, 42))
        cv.paint(STOMACH_WALL, lo, hi, fn, only=(ABDOMEN, LIVER))
        lo, hi, fn = _ellipsoid((62, -10, -50 + shift), (43, 40, 37))
        cv.paint(STOMACH_AIR, lo, hi, lambda X, Y, Z: fn(X, Y, Z) & (Y < -22), only=(STOMACH_WALL,))
        cv.paint(ABDOMEN, lo, hi, lambda X, Y, Z: fn(X, Y, Z) & (Y >= -22), only=(STOMACH_WALL,))
        lo, hi, fn = _ellipsoid((92, 48, -62 + shift), (28, 42, 50))
        cv.paint(SPLEEN, lo, hi, fn, only=(ABDOMEN, LIVER))

    # -- rasterisation ---------------------------------------------------------------
    def labels(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, diaphragm_shift_mm: float = 0.0,
               table: bool = True, moving: bool = True) -> np.ndarray:
        """uint8 tissue labels (z, y, x) on the grid with patient-coordinate axes x, y, z.

        ``moving=False`` leaves out everything that moves with breathing (diaphragm, abdomen,
        heart) and lets the lungs fill the whole pleural cavity: the static base of
        :meth:`lung_masks`.
        """
        p = self.p
        cv = _Canvas(x, y, z, p.centre)
        W, D = p.half_width * 1.1, p.half_depth * 1.1
        big_lo, big_hi = (-W, -D, -1e4), (W, D, 1e4)
        shift = float(diaphragm_shift_mm)
        heart_shift = 0.35 * shift

        cv.paint(FAT, big_lo, big_hi, lambda X, Y, Z: self._inside(X, Y, Z, 0.0))
        cv.paint(MUSCLE, big_lo, big_hi, lambda X, Y, Z: self._inside(X, Y, Z, p.fat_mm), only=(FAT,))
        ys, rv = p.spine_y, p.vertebra_radius
        # paraspinal muscles
        for sx in (-1, 1):
            lo, hi, fn = _ellipsoid((sx * (rv + 22), ys + rv + 20, 0), (30, 24, 1e4))
            cv.paint(MUSCLE, lo, hi, fn, only=(FAT,))
        # rib cage: ring between the outer cage and the pleura; ribs descend anteriorly
        cage = p.fat_mm + p.muscle_mm
        post = p.cage_depth

        def rib_band(X, Y, Z, margin):
            h = (Z + p.rib_slope * (post - Y)) / p.rib_pitch + p.rib_phase
            frac = np.abs(h - np.floor(h) - 0.5) * p.rib_pitch
            ring = self._inside(X, Y, Z, cage + margin, 2.0) & ~self._inside(X, Y, Z, cage + 9.0 - margin, 2.0)
            ribs_here = (Z + p.rib_slope * (post - Y) < p.apex_z + 10) & (Z > -170)
            return ring & (frac < 5.5 - margin) & ribs_here

        cv.paint(CORTEX, big_lo, big_hi, lambda X, Y, Z: rib_band(X, Y, Z, 0.0))
        cv.paint(MARROW, big_lo, big_hi, lambda X, Y, Z: rib_band(X, Y, Z, 1.8), only=(CORTEX,))
        cv.paint(CARTILAGE, (-60, -D, -1e4), (60, 0, 1e4), lambda X, Y, Z: np.ones_like(X * Y * Z, bool), only=(CORTEX, MARROW))
        # lungs
        lung_lo, lung_hi = (-W, -D, -400), (W, D, p.apex_z + 1)
        cv.paint(LUNG, lung_lo, lung_hi,
                 lambda X, Y, Z: self._pleura(X, Y, Z) & ((Z > self.diaphragm_z(X, Y, shift)) | (not moving)),
                 only=(FAT, MUSCLE))
        if moving:
            self._paint_abdomen(cv, shift)
        top = p.apex_z + 60
        cv.paint(FAT, (-28, -D, p.heart_centre[2]), (28, ys, top),
                 lambda X, Y, Z: np.abs(X - 3) < 20 + 6 * np.clip((Y + 40) / 40, 0, 1), only=(LUNG,))
        # heart with pericardial fat collar, on the diaphragm
        if moving:
            for label, extra in ((FAT, 5.0), (MYOCARDIUM, 0.0), (BLOOD, -11.0)):
                lo, hi, fn = self._heart(extra, heart_shift)
                cv.paint(label, lo, hi, fn,
                         only=(LUNG, FAT, MUSCLE, ABDOMEN, LIVER, MYOCARDIUM) if label != BLOOD else (MYOCARDIUM,))
        hc = p.heart_centre  # great vessels are anchored to the heart at rest
        # spine: vertebral bodies with discs, canal, lamina and spinous process
        cv.paint(CORTEX, (-rv, ys - rv, -1e4), (rv, ys + rv, 1e4),
                 lambda X, Y, Z: X * X + (Y - ys) ** 2 <= rv * rv)
        cv.paint(MARROW, (-rv, ys - rv, -1e4), (rv, ys + rv, 1e4),
                 lambda X, Y, Z: X * X + (Y - ys) ** 2 <= (rv - 2.2) ** 2)
        cv.paint(DISC, (-rv, ys - rv, -1e4), (rv, ys + rv, 1e4),
                 lambda X, Y, Z: (X * X + (Y - ys) ** 2 <= (rv - 1.0) ** 2)
                 & (np.abs(((Z + Y * 0.05) / 27.0 + p.rib_phase) % 1.0 - 0.5) * 27.0 < 3.0))
        yc = ys + rv + 9.0
        cv.paint(CORTEX, (-16, yc - 15, -1e4), (16, yc + 15, 1e4), lambda X, Y, Z: X * X + (Y - yc) ** 2 <= 14 ** 2)
        cv.paint(CANAL, (-9, yc - 9, -1e4), (9, yc + 9, 1e4), lambda X, Y, Z: X * X + (Y - yc) ** 2 <= 8 ** 2)
        sp_end = p.half_depth - p.fat_mm - 4
        cv.paint(CORTEX, (-5, yc + 12, -1e4), (5, sp_end, 1e4), lambda X, Y, Z: np.abs(X) + 0 * Y * Z <= 4)
        # sternum
        st_y = -post + 8.0
        lo, hi, fn = _ellipsoid((0, st_y, p.heart_centre[2] + 40), (17, 7, 110))
        cv.paint(CORTEX, lo, hi, lambda X, Y, Z: fn(X, Y, Z) & (Z < p.apex_z - 20))
        lo, hi, fn = _ellipsoid((0, st_y, p.heart_centre[2] + 40), (15, 5, 108))
        cv.paint(MARROW, lo, hi, fn, only=(CORTEX,))
        # great vessels (with fat collars) and airways
        ar = p.aorta_radius
        asc = (-18.0, -22.0)
        dsc = (rv + 9.0, ys - 8.0)
        arch_top = p.carina_z + 35
        path = [(asc[0], asc[1], hc[2] + 25), (asc[0], asc[1], arch_top - 15), (-6, -6, arch_top),
                (dsc[0] - 6, dsc[1] - 10, arch_top - 4), (dsc[0], dsc[1], arch_top - 25), (dsc[0], dsc[1], -400)]
        pa = [(12.0, -28.0, hc[2] + 30), (10.0, -8.0, p.carina_z - 12)]
        vessels = [(path, ar), (pa, 13.0),
                   ([(10.0, -8.0, p.carina_z - 12), (-50.0, 6.0, p.carina_z - 25)], 10.0),
                   ([(10.0, -8.0, p.carina_z - 12), (48.0, 10.0, p.carina_z - 20)], 10.0),
                   ([(-42.0, -14.0, hc[2] + 30), (-40.0, -10.0, top)], 10.0),
                   ([(-28.0, 18.0, -400), (-26.0, 10.0, hc[2] - 30)], 12.0)]
        for label, extra, only in ((FAT, 4.0, (LUNG, MUSCLE)), (BLOOD, 0.0, None)):
            for pts, r in vessels:
                for a, b in zip(pts[:-1], pts[1:], strict=False):
                    lo, hi, fn = _capsule(a, b, r + extra)
                    cv.paint(label, lo, hi, fn, only=only)
        yt = ys - rv - 20.0
        eso = [(6.0, ys - rv - 6, -60), (3.0, ys - rv - 6, top)]
        airways = [[(0.0, yt, p.carina_z), (0.0, yt, top)],
                   [(0.0, yt, p.carina_z), (-48.0, yt + 12, p.carina_z - 28)],
                   [(0.0, yt, p.carina_z), (46.0, yt + 14, p.carina_z - 34)]]
        for label, radius in ((MUSCLE, (11.0, 8.0)), (GAS, (9.0, 6.5))):
            for i, (a, b) in enumerate(airways):
                lo, hi, fn = _capsule(a, b, radius[0] if i == 0 else radius[1])
                cv.paint(label, lo, hi, fn)
        lo, hi, fn = _capsule(eso[0], eso[1], 8.0)
        cv.paint(OESOPHAGUS, lo, hi, fn)
        # lymph nodes
        for node in p.nodes:
            c = node["centre_rel"]
            lo, hi, fn = _ellipsoid(c, (node["radius_mm"],) * 3)
            cv.paint(NODE, lo, hi, fn, only=(FAT, LUNG, MUSCLE, BLOOD))
        # scanner table under the patient (CT only)
        if table:
            back = p.half_depth * 1.06
            cv.paint(TABLE_SHELL, (-230, back + 4, -1e4), (230, back + 40, 1e4),
                     lambda X, Y, Z: (np.abs(X) < 230 - 0.01 * X * X) + 0 * Y * Z > 0)
            cv.paint(TABLE_FOAM, (-230, back + 6.5, -1e4), (230, back + 37.5, 1e4),
                     lambda X, Y, Z: np.ones_like(X * Y * Z, bool), only=(TABLE_SHELL,))
        return cv.labels

    def lung_mask(self, x, y, z, diaphragm_shift_mm: float) -> np.ndarray:
        """Boolean lung mask on the grid (for keeping tumours inside the lungs)."""
        return self.labels(x, y, z, diaphragm_shift_mm, table=False) == LUNG

    def lung_masks(self, x, y, z, shifts) -> np.ndarray:
        """Lung masks (len(shifts), z, y, x) at several diaphragm shifts, sharing the static anatomy.

        Equal to ``lung_mask`` at each shift, at a fraction of the cost: only the diaphragm
        and the heart are re-evaluated per shift.
        """
        p = self.p
        base = self.labels(x, y, z, 0.0, table=False, moving=False) == LUNG
        X = (np.asarray(x, np.float32).ravel() - np.float32(p.centre[0]))[None, None, :]
        Y = (np.asarray(y, np.float32).ravel() - np.float32(p.centre[1]))[None, :, None]
        Z = (np.asarray(z, np.float32).ravel() - np.float32(p.centre[2]))[:, None, None]
        out = np.empty((len(shifts), *base.shape), bool)
        for i, shift in enumerate(shifts):
            _, _, heart = self._heart(5.0, 0.35 * float(shift))
            out[i] = base & (Z > self.diaphragm_z(X, Y, float(shift))) & ~heart(X, Y, Z)
        return out
