"""A PNG montage for checking a result at a glance (Pillow + numpy only).

Top: axial slices through the target, cropped around it, CT in a lung window
with PET SUV fused as a hot colour overlay and the target outline drawn.
Bottom: coronal and sagittal views through the target's centroid, scaled to
true millimetre aspect ratio (slice spacing differs from pixel spacing), with
the axial levels marked. Each panel carries its position and SUVmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.errors import GeometryError
from pipeline.volume import SeriesVolume

CT_WINDOW = (-1000.0, 400.0)  # HU shown black .. white (lung and soft tissue together)
SUV_FLOOR = 1.5  # PET overlay starts above blood-pool-like uptake
ROI_COLOURS = [(255, 40, 40), (255, 165, 0), (255, 0, 255), (0, 200, 255), (255, 255, 0)]
TILE_PX = 256
COLUMNS = 3
PAD = 8
TEXT = (235, 235, 235)
BACKGROUND = (20, 20, 24)


def render_preview(
    ct_hu: np.ndarray,
    pet_suv: np.ndarray,
    mask: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    path: Path,
    title: str = "",
    slice_positions_mm: Sequence[float] | None = None,
    superior_last: bool = True,
    max_axial: int = 6,
    flip_columns: bool = False,
    flip_rows: bool = False,
) -> Path:
    """Render the preview montage to ``path`` (PNG) and return ``path``.

    Parameters
    ----------
    ct_hu, pet_suv, mask:
        (Z, Y, X) arrays on the CT grid: HU, SUV (PET resampled onto the CT)
        and the target (bool, or labels 1..n drawn in different colours).
    spacing_zyx:
        Voxel spacing in mm (slice, row, column).
    path:
        Output PNG file; its folder is created.
    title:
        First line of the header (e.g. study date, model version; no patient names).
    slice_positions_mm:
        Patient z (mm) of each slice for the labels; default index * spacing.
    superior_last:
        True when higher slice indices are more superior (drawn at the top of
        coronal and sagittal views).
    max_axial:
        At most this many axial slices, evenly spread over the target.
    flip_columns, flip_rows:
        Mirror the display so that it follows the radiological convention
        (patient left on the image right, anterior at the top).
        :func:`display_geometry` derives these and the two above from the CT.
    """
    ct_hu, pet_suv, labels = (np.asarray(a) for a in (ct_hu, pet_suv, mask))
    if not (ct_hu.shape == pet_suv.shape == labels.shape) or ct_hu.ndim != 3:
        raise GeometryError(
            f"preview needs CT, PET and mask on one (Z, Y, X) grid, got {ct_hu.shape}, "
            f"{pet_suv.shape}, {labels.shape}"
        )
    labels = labels.astype(np.int32)
    flips = (
        slice(None),
        slice(None, None, -1) if flip_rows else slice(None),
        slice(None, None, -1) if flip_columns else slice(None),
    )
    ct_hu, pet_suv, labels = ct_hu[flips], pet_suv[flips], labels[flips]
    spacing = (float(spacing_zyx[0]), float(spacing_zyx[1]), float(spacing_zyx[2]))
    z_positions = (
        np.asarray(slice_positions_mm, dtype=float)
        if slice_positions_mm is not None
        else np.arange(ct_hu.shape[0]) * spacing[0]
    )
    target = labels > 0
    found = bool(target.any())
    suv_top = _display_max(pet_suv, target)
    if found:
        centroid = np.round(np.argwhere(target).mean(axis=0)).astype(int)
        z_with = np.flatnonzero(target.any(axis=(1, 2)))
        count = min(max_axial, z_with.size)
        axial = sorted({int(z_with[round(i)]) for i in np.linspace(0, z_with.size - 1, count)})
        box = _crop_box(target, spacing)
    else:
        # Nothing segmented: show the hottest PET voxel, the likeliest place of a missed tumour.
        centroid = np.array(np.unravel_index(int(np.argmax(pet_suv)), pet_suv.shape))
        axial = [int(centroid[0])]
        box = (0, ct_hu.shape[1], 0, ct_hu.shape[2])

    tiles = []
    for z in axial:
        r0, r1, c0, c1 = box
        image = _fuse(ct_hu[z, r0:r1, c0:c1], pet_suv[z, r0:r1, c0:c1], suv_top)
        size = _fit((r1 - r0) * spacing[1], (c1 - c0) * spacing[2], TILE_PX, TILE_PX)
        tile = _panel(image, labels[z, r0:r1, c0:c1], size)
        inside = labels[z] > 0
        lines = [f"axial z {z_positions[z]:.1f} mm (#{z})"]
        if inside.any():
            lines.append(f"SUVmax {float(pet_suv[z][inside].max()):.1f}")
        elif not found:
            lines.append(f"hottest PET voxel: SUV {float(pet_suv[z].max()):.1f}")
        tiles.append((tile, lines))

    side = (TILE_PX * COLUMNS + PAD * (COLUMNS - 1) - PAD) // 2
    flip = slice(None, None, -1) if superior_last else slice(None)
    yc, xc = int(centroid[1]), int(centroid[2])
    # Captions name rows and columns of the stored CT, not of the mirrored display.
    row_label = ct_hu.shape[1] - 1 - yc if flip_rows else yc
    column_label = ct_hu.shape[2] - 1 - xc if flip_columns else xc
    coronal = _panel(
        _fuse(ct_hu[flip, yc, :], pet_suv[flip, yc, :], suv_top),
        labels[flip, yc, :],
        _fit(ct_hu.shape[0] * spacing[0], ct_hu.shape[2] * spacing[2], side, side),
    )
    sagittal = _panel(
        _fuse(ct_hu[flip, :, xc], pet_suv[flip, :, xc], suv_top),
        labels[flip, :, xc],
        _fit(ct_hu.shape[0] * spacing[0], ct_hu.shape[1] * spacing[1], side, side),
    )
    for view in (coronal, sagittal):
        _mark_levels(view, axial, ct_hu.shape[0], superior_last)

    through = "centroid" if found else "hottest PET voxel"
    header = [title] if title else []
    if found:
        header.append(
            f"target: {int(labels.max())} lesion(s), {target.sum() * np.prod(spacing) / 1000:.1f} cc, "
            f"SUVmax {float(pet_suv[target].max()):.1f}; PET scale 0-{suv_top:.1f} SUV"
        )
    else:
        header.append("NO TARGET FOUND")
    canvas = _compose(
        header,
        tiles,
        [
            (coronal, [f"coronal through {through} (row {row_label})"]),
            (sagittal, [f"sagittal through {through} (column {column_label})"]),
        ],
        side,
        alert=not found,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def display_geometry(ct: SeriesVolume) -> dict:
    """Keyword arguments of :func:`render_preview` that follow the CT's geometry.

    Returns ``slice_positions_mm`` (patient z of each slice), ``superior_last``
    and the flips that give the radiological display convention.
    """
    headers = ct.headers
    positions = [float(h.ImagePositionPatient[2]) for h in headers]
    iop = [float(v) for v in headers[0].ImageOrientationPatient]
    return {
        "slice_positions_mm": positions,
        "superior_last": len(positions) < 2 or positions[-1] >= positions[0],
        "flip_columns": iop[0] < 0,
        "flip_rows": iop[4] < 0,
    }


def _display_max(pet: np.ndarray, target: np.ndarray) -> float:
    """Top of the PET colour scale: the target's SUVmax (else the PET maximum), at least 3."""
    if target.any():
        top = float(pet[target].max())
    else:
        top = float(pet.max()) if pet.size else 0.0
    return max(top, 3.0)


def _crop_box(target: np.ndarray, spacing: tuple[float, float, float]) -> tuple[int, int, int, int]:
    """A square (in mm) in-plane box around the target with a margin, clipped to the slice."""
    rows = np.flatnonzero(target.any(axis=(0, 2)))
    cols = np.flatnonzero(target.any(axis=(0, 1)))
    centre = ((rows[0] + rows[-1] + 1) / 2.0, (cols[0] + cols[-1] + 1) / 2.0)
    extent_mm = max((rows[-1] - rows[0] + 1) * spacing[1], (cols[-1] - cols[0] + 1) * spacing[2])
    half_mm = max(40.0, 0.5 * extent_mm + 25.0)
    box = []
    for axis, (mid, step) in enumerate(zip(centre, spacing[1:], strict=True)):
        limit = target.shape[axis + 1]
        half = half_mm / step
        lo, hi = int(np.floor(mid - half)), int(np.ceil(mid + half))
        lo, hi = max(lo, 0), min(hi, limit)
        box.extend([lo, hi])
    return box[0], box[1], box[2], box[3]


def _fit(height_mm: float, width_mm: float, max_h: int, max_w: int) -> tuple[int, int]:
    """(width, height) in pixels that keeps the mm aspect ratio inside max_w x max_h."""
    scale = min(max_h / max(height_mm, 1e-6), max_w / max(width_mm, 1e-6))
    return max(1, round(width_mm * scale)), max(1, round(height_mm * scale))


def _fuse(ct: np.ndarray, pet: np.ndarray, suv_top: float) -> np.ndarray:
    """RGB float image: windowed CT in grey with PET SUV as a hot overlay.

    Uptake below ``SUV_FLOOR`` stays transparent; the overlay fades in above it.
    """
    lo, hi = CT_WINDOW
    grey = np.clip((ct.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    suv = pet.astype(np.float32)
    p = np.clip(suv / suv_top, 0.0, 1.0)
    hot = np.stack(
        [np.clip(3 * p, 0, 1), np.clip(3 * p - 1, 0, 1), np.clip(3 * p - 2, 0, 1)], axis=-1
    )
    alpha = (0.7 * np.clip((suv - SUV_FLOOR) / (0.3 * suv_top), 0.0, 1.0))[..., None]
    return (1.0 - alpha) * grey[..., None] + alpha * hot


def _panel(rgb: np.ndarray, labels: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Resize a fused image to ``size`` (width, height) and draw each label's outline."""
    image = Image.fromarray((rgb * 255).astype(np.uint8), "RGB").resize(
        size, Image.Resampling.BILINEAR
    )
    pixels = np.asarray(image).copy()
    big = np.asarray(
        Image.fromarray(labels.astype(np.int32)).resize(size, Image.Resampling.NEAREST)
    )
    for label in np.unique(big[big > 0]):
        region = big == label
        edge = region & ~_erode(region)
        edge |= _dilate(edge) & region  # two pixels wide, inside the target
        pixels[edge] = ROI_COLOURS[(int(label) - 1) % len(ROI_COLOURS)]
    return Image.fromarray(pixels, "RGB")


def _erode(region: np.ndarray) -> np.ndarray:
    padded = np.pad(region, 1)
    return (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )


def _dilate(region: np.ndarray) -> np.ndarray:
    return ~_erode(~region)


def _mark_levels(view: Image.Image, axial: list[int], slices: int, superior_last: bool) -> None:
    """Small ticks at both edges of a coronal/sagittal view where the axial tiles lie."""
    draw = ImageDraw.Draw(view)
    width, height = view.size
    for z in axial:
        row = (slices - 1 - z if superior_last else z) + 0.5
        y = int(row * height / slices)
        draw.line([(0, y), (8, y)], fill=(80, 200, 255), width=2)
        draw.line([(width - 9, y), (width - 1, y)], fill=(80, 200, 255), width=2)


def _compose(
    header: list[str],
    tiles: list[tuple[Image.Image, list[str]]],
    views: list[tuple[Image.Image, list[str]]],
    side: int,
    alert: bool,
) -> Image.Image:
    font = ImageFont.load_default()
    line = 14
    caption = 2 * line + 2
    rows = (len(tiles) + COLUMNS - 1) // COLUMNS
    width = COLUMNS * TILE_PX + (COLUMNS + 1) * PAD
    header_h = PAD + line * len(header) + PAD
    tiles_h = rows * (TILE_PX + caption + PAD)
    views_h = side + caption + PAD
    canvas = Image.new("RGB", (width, header_h + tiles_h + views_h + PAD), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(header):
        colour = (255, 90, 90) if alert and i == len(header) - 1 else TEXT
        draw.text((PAD, PAD + i * line), text, fill=colour, font=font)
    top = header_h
    for index, (tile, lines) in enumerate(tiles):
        row, col = divmod(index, COLUMNS)
        x = PAD + col * (TILE_PX + PAD)
        y = top + row * (TILE_PX + caption + PAD)
        canvas.paste(tile, (x + (TILE_PX - tile.width) // 2, y + (TILE_PX - tile.height) // 2))
        for j, text in enumerate(lines):
            draw.text((x, y + TILE_PX + 2 + j * line), text, fill=TEXT, font=font)
    top += tiles_h
    for index, (view, lines) in enumerate(views):
        x = PAD + index * (side + PAD)
        canvas.paste(view, (x + (side - view.width) // 2, top + (side - view.height) // 2))
        for j, text in enumerate(lines):
            draw.text((x, top + side + 2 + j * line), text, fill=TEXT, font=font)
    return canvas
