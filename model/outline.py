"""The outline refiner: the delivered lesion re-outlined on the CT's own grid.

The network and the lesion refiner (:mod:`model.refiner`) see 2 mm pixels; their
probabilities reach the CT grid (about 1 mm) by bilinear interpolation, which draws a
small lesion's outline on the 2 mm grid. The outline refiner looks at a box around the
delivered lesion at the CT's resolution (PET, CT and the interpolated probability) and
returns new probabilities there. It is a :class:`~model.refiner.LesionRefiner` that pools
in-plane only, since CT slices are already 2-3 mm apart, saved beside its checkpoint as
``NAME.outline.safetensors``. Its logits are added to the logit of the input probability.

An outline refiner may take a 4th input: the lesion's superior-inferior breathing
amplitude fitted from its PET smear (:mod:`pipeline.motion`), a constant channel
(:func:`with_amplitude`). The CT shows the tumour at one moment and the PET only blurs its
path, so without it the refiner draws a typical path's envelope, too long for a tumour
that barely moves and too short for one that moves far.
"""

from __future__ import annotations

import numpy as np
import torch

from model.refiner import KINDS, LesionRefiner, Refiner, filled

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
#: The amplitude channel holds the fitted amplitude divided by this (mm).
AMPLITUDE_SCALE_MM = 25.0


def outline_refiner(widths: tuple[int, int, int] = (8, 16, 32), *, amplitude: bool = False,
                    box_margin: tuple[int, int, int] | None = None) -> LesionRefiner:
    """A new outline refiner whose correction starts at zero (it returns its input probability).

    ``amplitude``: it also takes the lesion's breathing amplitude (:func:`with_amplitude`).
    ``box_margin``: the voxels around the lesion it re-outlines (None: :data:`MARGIN`).
    """
    model = LesionRefiner(widths, PATCH, POOL, inputs=4 if amplitude else 3, box_margin=box_margin)
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


def box_margin(model: Refiner) -> tuple[int, int, int]:
    """The CT voxels (z, y, x) around the lesion that outline refiner ``model`` re-outlines."""
    return MARGIN if model.box_margin is None else model.box_margin


def takes_amplitude(model: Refiner) -> bool:
    """Whether outline refiner ``model`` is given the lesion's breathing amplitude."""
    return model.inputs == 4


def with_amplitude(x: np.ndarray, amplitude_mm: float) -> np.ndarray:
    """(3, Z, Y, X) input ``x`` with a 4th channel holding ``amplitude_mm`` / :data:`AMPLITUDE_SCALE_MM` everywhere."""
    channel = np.full((1, *x.shape[1:]), amplitude_mm / AMPLITUDE_SCALE_MM, np.float32)
    return np.concatenate([x, channel]).astype(np.float32, copy=False)


def padded(crop: np.ndarray) -> np.ndarray:
    """(3, Z, Y, X) ``crop`` padded at the far end of y and x to a multiple of :data:`MULTIPLE` with :func:`~model.refiner.filled`."""
    z, y, x = crop.shape[1:]
    shape = (z, -(-y // MULTIPLE) * MULTIPLE, -(-x // MULTIPLE) * MULTIPLE)
    out = filled(shape)
    out[:, :, :y, :x] = crop
    return out


def outline_crop(model: Refiner, crop: np.ndarray, amplitude_mm: float | None = None) -> np.ndarray:
    """The outline refiner's probabilities (Z, Y, X) of a box around the delivered lesion.

    Parameters
    ----------
    model:
        An outline refiner.
    crop:
        (3, Z, Y, X) float32 CT-grid PET, CT (both normalised as the network's input) and
        probability of the box (:func:`lesion_box` with :func:`box_margin`), in the
        canonical orientation with slices ordered inferior to superior.
    amplitude_mm:
        The lesion's fitted breathing amplitude, for a refiner that :func:`takes_amplitude`.
    """
    x = padded(crop)
    if takes_amplitude(model):
        if amplitude_mm is None:
            raise ValueError("this outline refiner needs the lesion's breathing amplitude")
        x = with_amplitude(x, amplitude_mm)
    x = torch.from_numpy(x)[None]
    with torch.no_grad():
        p = torch.sigmoid(model(x))[0, 0].numpy()
    return np.ascontiguousarray(p[:, : crop.shape[2], : crop.shape[3]])
