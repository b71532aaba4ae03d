"""How much of an IGTV's breathing envelope the PET marks, and the Dice a PET rule could reach.

An IGTV is the GTV (the tumour where the CT, taken at one breathing phase, shows it)
plus its *envelope*: where the tumour passes at other phases. The CT shows lung there;
only the PET, averaged over the breathing cycle, marks it, and only as strongly as the
time the tumour spends there. These measurements describe the data, not a model:

* ``envelope_share``: the share of the IGTV outside the GTV;
* ``envelope_marked``: the share of the envelope whose SUV stands at least two standard
  deviations above the lung around the IGTV (a shell 3-10 mm outside it);
* ``pet_oracle``: the Dice of the best *PET rule given the GTV*: the GTV grown into the
  connected PET region above ``background + f * (peak - background)`` of its own lesion,
  with the fraction ``f`` chosen per study against the truth. No method that draws the
  envelope from this PET by a threshold can do better on that study; a network can
  (learned shape), but where the envelope is unmarked it has nothing to see.

:func:`pet_rule_dice` gives the rule's Dice at every fraction, so a caller can also
score one fraction for all studies (a rule that is not told the answer).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Fractions of the lesion's peak above background tried by :func:`pet_rule_dice`.
FRACTIONS = tuple(round(float(f), 3) for f in np.arange(0.05, 0.801, 0.025))

_FULL = ndimage.generate_binary_structure(3, 3)
_SHELL_MM = (3.0, 10.0)
_MARGIN_MM = 20.0


@dataclass(frozen=True)
class EnvelopeEvidence:
    """PET evidence for one study's IGTV (see the module docstring)."""

    envelope_share: float
    envelope_marked: float
    pet_oracle: float
    oracle_fraction: float
    rule_dice: tuple[float, ...]


def envelope_evidence(truth: np.ndarray, gtv: np.ndarray, suv: np.ndarray,
                      spacing_zyx: Sequence[float]) -> EnvelopeEvidence:
    """Measure how well the PET marks the IGTV's envelope.

    Parameters
    ----------
    truth, gtv:
        IGTV and GTV masks (Z, Y, X) on one grid; each IGTV lesion should contain its GTV.
    suv:
        SUV on the same grid.
    spacing_zyx:
        Voxel spacing in mm (z, y, x).

    Returns
    -------
    EnvelopeEvidence
        Shares in [0, 1]; ``rule_dice`` holds the PET rule's Dice at each of :data:`FRACTIONS`.
    """
    truth, gtv = np.asarray(truth, dtype=bool), np.asarray(gtv, dtype=bool)
    suv = np.asarray(suv, dtype=np.float32)
    if not truth.shape == gtv.shape == suv.shape:
        raise ValueError(f"truth {truth.shape}, GTV {gtv.shape} and SUV {suv.shape} must share one grid")
    if not truth.any():
        raise ValueError("the IGTV is empty: nothing to measure")
    envelope = truth & ~gtv
    lesions = _measured_lesions(truth, suv, spacing_zyx)
    marked = _marked(envelope, lesions)
    dices = _rule_dice(truth, gtv, lesions)
    best = int(np.argmax(dices))
    return EnvelopeEvidence(
        envelope_share=float(envelope.sum()) / float(truth.sum()),
        envelope_marked=marked,
        pet_oracle=float(dices[best]),
        oracle_fraction=FRACTIONS[best],
        rule_dice=tuple(float(d) for d in dices),
    )


def pet_rule_dice(truth: np.ndarray, gtv: np.ndarray, suv: np.ndarray,
                  spacing_zyx: Sequence[float]) -> np.ndarray:
    """Dice against ``truth`` of the GTV grown into its lesion's PET region, at each of :data:`FRACTIONS`.

    Each IGTV lesion (26-connected) is taken in a box 20 mm around it. Its background is the
    mean SUV of a shell 3-10 mm outside it, its peak the highest SUV in its GTV (in the
    lesion when it has no GTV). At fraction ``f`` the prediction is the GTV plus every
    connected region of ``SUV >= background + f * (peak - background)`` that touches it.
    """
    truth, gtv = np.asarray(truth, dtype=bool), np.asarray(gtv, dtype=bool)
    return _rule_dice(truth, gtv, _measured_lesions(truth, suv, spacing_zyx))


@dataclass(frozen=True)
class _Lesion:
    """One IGTV lesion in its box, with the SUV there and the lung background around it."""

    box: tuple[slice, ...]
    mask: np.ndarray
    values: np.ndarray
    background: float
    background_sd: float


def _measured_lesions(truth: np.ndarray, suv: np.ndarray, spacing_zyx: Sequence[float]) -> list[_Lesion]:
    """Every IGTV lesion with its background measured once (shared by both measurements)."""
    spacing = np.asarray(spacing_zyx, dtype=float)
    lesions = []
    for box, mask in _lesions(truth, spacing):
        values = np.asarray(suv[box], dtype=np.float32)
        mean, sd = _background(mask, values, spacing)
        lesions.append(_Lesion(box, mask, values, mean, sd))
    return lesions


def _rule_dice(truth: np.ndarray, gtv: np.ndarray, lesions: Sequence[_Lesion]) -> np.ndarray:
    """:func:`pet_rule_dice` on lesions already measured."""
    pred = np.zeros((len(FRACTIONS),) + truth.shape, dtype=bool)
    for lesion in lesions:
        seed = gtv[lesion.box] & lesion.mask
        values, background = lesion.values, lesion.background
        peak = float(values[seed].max() if seed.any() else values[lesion.mask].max())
        if not seed.any():
            seed = lesion.mask & (values >= peak)
        for i, f in enumerate(FRACTIONS):
            hot, _ = ndimage.label(values >= background + f * (peak - background), structure=_FULL)
            touched = np.unique(hot[seed])
            grown = np.isin(hot, touched[touched > 0]) | seed
            pred[i][lesion.box] |= grown
    total = truth.sum()
    return np.array([2.0 * (p & truth).sum() / (p.sum() + total) for p in pred])


def _marked(envelope: np.ndarray, lesions: Sequence[_Lesion]) -> float:
    """Share of envelope voxels at least 2 SD above their lesion's surrounding lung."""
    if not envelope.any():
        return 1.0
    hits = sum(int((lesion.values[lesion.mask & envelope[lesion.box]]
                    >= lesion.background + 2.0 * lesion.background_sd).sum()) for lesion in lesions)
    return hits / float(envelope.sum())


def _background(lesion: np.ndarray, values: np.ndarray, spacing: np.ndarray) -> tuple[float, float]:
    """Mean and SD of the SUV in a shell 3-10 mm outside ``lesion``."""
    distance = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    shell = (distance > _SHELL_MM[0]) & (distance <= _SHELL_MM[1])
    if not shell.any():
        raise ValueError("no voxels around the IGTV to measure the background on")
    return float(values[shell].mean()), float(values[shell].std())


def _lesions(truth: np.ndarray, spacing: np.ndarray) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """Each IGTV lesion (26-connected) as (its box grown by 20 mm, its mask in that box)."""
    labels, _ = ndimage.label(truth, structure=_FULL)
    pad = np.ceil(_MARGIN_MM / spacing).astype(int)
    for label, tight in enumerate(ndimage.find_objects(labels), start=1):
        box = tuple(slice(max(0, s.start - int(p)), min(int(n), s.stop + int(p)))
                    for s, p, n in zip(tight, pad, truth.shape, strict=True))
        yield box, labels[box] == label
