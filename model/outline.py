"""The outline refiner: the delivered lesion re-outlined on the CT's own grid.

The network and the lesion refiner (:mod:`model.refiner`) see 2 mm pixels; their
probabilities reach the CT grid (about 1 mm) by bilinear interpolation, which draws a
small lesion's outline on the 2 mm grid. The outline refiner looks at a box around the
delivered lesion at the CT's resolution (PET, CT and the interpolated probability) and
returns new probabilities there. It is a :class:`~model.refiner.LesionRefiner` that pools
in-plane only, since CT slices are already 2-3 mm apart, saved beside its checkpoint as
``NAME.outline.safetensors``. Its logits are added to the logit of the input probability.
"""

from __future__ import annotations

import numpy as np
import torch

from model.refiner import KINDS, LesionRefiner, filled

#: File kind beside the checkpoint (``NAME.outline.safetensors``).
KIND = KINDS[1]
#: Downsampling between the refiner's levels (z, y, x).
POOL = (1, 2, 2)
#: Training window (z, y, x) in CT voxels.
PATCH = (16, 64, 64)
#: CT voxels around the lesion's bounding box that the refiner may change (z, y, x).
MARGIN = (3, 8, 8)
#: CT pixel spacings (mm) it is applied at: the synthetic CTs it learned from have 0.98 mm pixels.
PIXEL_MM = (0.7, 1.3)
#: In-plane box sizes are padded to a multiple of this (two in-plane poolings).
MULTIPLE = 4


def outline_refiner(widths: tuple[int, int, int] = (8, 16, 32)) -> LesionRefiner:
    """A new outline refiner whose correction starts at zero (it returns its input probability)."""
    model = LesionRefiner(widths, PATCH, POOL)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    return model


def lesion_box(lesion: np.ndarray, margin: tuple[int, int, int] = MARGIN) -> tuple[slice, ...] | None:
    """The (z, y, x) box of ``lesion`` grown by ``margin`` voxels and clipped to the array; None when empty."""
    hits = np.nonzero(lesion)
    if hits[0].size == 0:
        return None
    return tuple(slice(max(int(h.min()) - m, 0), min(int(h.max()) + m + 1, n))
                 for h, m, n in zip(hits, margin, lesion.shape, strict=True))


def padded(crop: np.ndarray) -> np.ndarray:
    """(3, Z, Y, X) ``crop`` padded at the far end of y and x to a multiple of :data:`MULTIPLE` with :func:`~model.refiner.filled`."""
    z, y, x = crop.shape[1:]
    shape = (z, -(-y // MULTIPLE) * MULTIPLE, -(-x // MULTIPLE) * MULTIPLE)
    out = filled(shape)
    out[:, :, :y, :x] = crop
    return out


def outline_crop(model: LesionRefiner, crop: np.ndarray) -> np.ndarray:
    """The outline refiner's probabilities (Z, Y, X) of a box around the delivered lesion.

    Parameters
    ----------
    model:
        An outline refiner.
    crop:
        (3, Z, Y, X) float32 CT-grid PET, CT (both normalised as the network's input) and
        probability of the box (:func:`lesion_box`), in the canonical orientation with
        slices ordered inferior to superior.
    """
    x = torch.from_numpy(padded(crop))[None]
    with torch.no_grad():
        p = torch.sigmoid(model(x))[0, 0].numpy()
    return np.ascontiguousarray(p[:, : crop.shape[2], : crop.shape[3]])
