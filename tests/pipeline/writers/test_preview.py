"""Preview PNG: outlines drawn, true mm aspect ratio, empty mask handled."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import GeometryError
from pipeline.writers.preview import ROI_COLOURS, TILE_PX, render_preview


def phantom(shape):
    ct = np.full(shape, -800.0, dtype=np.float32)
    pet = np.full(shape, 1.0, dtype=np.float32)
    return ct, pet


def colour_pixels(image: Image.Image, colour) -> np.ndarray:
    return np.argwhere(np.all(np.asarray(image) == np.array(colour, dtype=np.uint8), axis=-1))


def test_outlines_of_two_lesions_are_drawn(tmp_path):
    shape = (20, 64, 64)
    ct, pet = phantom(shape)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[8:12, 20:30, 20:30] = 1
    mask[9:11, 45:50, 45:50] = 2
    pet[mask == 1] = 8.0
    path = render_preview(
        ct, pet, mask, (3.0, 1.0, 1.0), tmp_path / "p" / "preview.png", title="test"
    )
    image = Image.open(path)
    assert image.format == "PNG" and image.mode == "RGB"
    assert len(colour_pixels(image, ROI_COLOURS[0])) > 0
    assert len(colour_pixels(image, ROI_COLOURS[1])) > 0


@pytest.mark.parametrize("slice_mm", [1.0, 4.0])
def test_coronal_view_keeps_the_millimetre_aspect(tmp_path, slice_mm):
    # A 24 mm cube: square in every view only if the slice spacing is honoured.
    slices = round(80 / slice_mm)
    shape = (slices, 80, 80)
    ct, pet = phantom(shape)
    mask = np.zeros(shape, dtype=bool)
    z0 = slices // 2 - int(12 / slice_mm)
    mask[z0 : z0 + int(24 / slice_mm), 28:52, 28:52] = True
    path = render_preview(
        ct, pet, mask, (slice_mm, 1.0, 1.0), tmp_path / "preview.png", max_axial=1
    )
    image = Image.open(path)
    red = colour_pixels(image, ROI_COLOURS[0])
    lower = red[red[:, 0] > 30 + TILE_PX + 40]  # below the single row of axial tiles
    assert len(lower) > 0
    # Coronal view is the left half of the lower row.
    coronal = lower[lower[:, 1] < image.width // 2]
    height = np.ptp(coronal[:, 0]) + 1
    width = np.ptp(coronal[:, 1]) + 1
    assert height == pytest.approx(width, rel=0.1)


def test_empty_mask_says_no_target(tmp_path):
    shape = (10, 48, 48)
    ct, pet = phantom(shape)
    pet[4, 10, 30] = 9.0
    path = render_preview(
        ct, pet, np.zeros(shape, dtype=bool), (3.0, 1.0, 1.0), tmp_path / "empty.png"
    )
    image = Image.open(path)
    assert len(colour_pixels(image, ROI_COLOURS[0])) == 0
    # The alert line is drawn in red text (anti-aliased: look for clearly reddish pixels).
    header = np.asarray(image)[:40].astype(int)
    assert np.sum(header[..., 0] - header[..., 1] > 80) > 20


def test_mismatched_grids_are_refused(tmp_path):
    with pytest.raises(GeometryError):
        render_preview(
            np.zeros((2, 3, 4)),
            np.zeros((2, 3, 5)),
            np.zeros((2, 3, 4), bool),
            (1.0, 1.0, 1.0),
            tmp_path / "x.png",
        )
