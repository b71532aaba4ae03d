"""The lesion refiner: a small 3D network that re-outlines the lesion the 2.5D network found.

The 2.5D network sees K slices; a moving tumour's PET smear runs along z. The refiner
looks at a 3D crop around the found lesion (PET, CT and the network's probability on
the model grid) and returns new probabilities inside the crop. Its logits are added to
the logit of the input probability, so an untrained refiner changes little.

A refiner belongs to the checkpoint whose outputs it was trained on and lives beside
it: ``NAME.refiner.safetensors`` and ``NAME.refiner.json`` next to ``NAME.safetensors``.
Its metadata names that network's weights digest, and it is refused beside any other.
Loading never unpickles (safetensors).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

from model.errors import CheckpointError

FORMAT = "igtv-node-refiner/1"
#: Default crop (z, y, x) in model-grid voxels (each divisible by 4 for the two poolings).
CROP = (32, 48, 48)
#: Values outside the study in each input channel: PET 0, CT air (-1), probability 0.
FILL = (0.0, -1.0, 0.0)
#: A lesion must leave this many voxels of the crop free on each axis to be refined.
MARGIN = 8
#: The kinds of refiner a checkpoint may have beside it: the lesion refiner and the
#: outline refiner (:data:`model.outline.KIND`).
KINDS = ("refiner", "outline")


class _Block(nn.Sequential):
    """Two 3x3x3 convolutions with instance norm and leaky ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True),
                         nn.LeakyReLU(0.1), nn.Conv3d(cout, cout, 3, padding=1, bias=False),
                         nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.1))


class LesionRefiner(nn.Module):
    """A two-level 3D U-Net on (B, 3, Z, Y, X) crops: PET, CT, probability -> IGTV logits.

    Parameters
    ----------
    widths:
        Channels at full, half and quarter resolution.
    crop:
        The (z, y, x) crop it was trained on.
    pool:
        Downsampling (z, y, x) between levels: (2, 2, 2) on the model grid; (1, 2, 2) for
        the outline refiner (:mod:`model.outline`), whose CT slices are already coarse.
    inputs:
        Input channels: 3, or 4 for an outline refiner that is also given the lesion's
        breathing amplitude (:func:`model.outline.with_amplitude`).
    box_margin:
        Outline refiner only: the CT voxels (z, y, x) around the lesion it re-outlines
        (None: :data:`model.outline.MARGIN`).
    """

    def __init__(self, widths: tuple[int, int, int] = (8, 16, 32), crop: tuple[int, int, int] = CROP,
                 pool: tuple[int, int, int] = (2, 2, 2), inputs: int = 3,
                 box_margin: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.widths, self.crop, self.pool, self.inputs = tuple(widths), tuple(crop), tuple(pool), int(inputs)
        self.box_margin = None if box_margin is None else tuple(int(m) for m in box_margin)
        self.digest: str | None = None  # the first 8 hex digits of its weights file's SHA-256, once loaded
        self.e0, self.e1, self.e2 = _Block(self.inputs, w0), _Block(w0, w1), _Block(w1, w2)
        self.d1, self.d0 = _Block(w2 + w1, w1), _Block(w1 + w0, w0)
        self.head = nn.Conv3d(w0, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prior = torch.logit(x[:, 2:3].clamp(1e-3, 1 - 1e-3))
        a = self.e0(x)
        b = self.e1(F.max_pool3d(a, self.pool))
        c = self.e2(F.max_pool3d(b, self.pool))
        b = self.d1(torch.cat([F.interpolate(c, size=b.shape[2:], mode="trilinear"), b], 1))
        a = self.d0(torch.cat([F.interpolate(b, size=a.shape[2:], mode="trilinear"), a], 1))
        return self.head(a) + prior

    def refine(self, volume: np.ndarray, lesion: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...]] | None:
        """Probabilities of the crop around ``lesion``, and the region of ``volume`` the crop covers.

        Parameters
        ----------
        volume:
            (N, 3, H, W) float32 model-grid PET, CT and probability, slices ordered
            inferior to superior.
        lesion:
            (N, H, W) boolean lesion to re-outline.

        Returns
        -------
        tuple or None
            (N, H, W) float32 probabilities (the refiner's inside the crop, 0 outside)
            and the (z, y, x) slices of the crop inside the volume; None when the
            lesion is empty or does not fit the crop.
        """
        if not lesion.any():
            return None
        hits = np.nonzero(lesion)
        if any(np.ptp(h) + 1 > c - MARGIN for h, c in zip(hits, self.crop, strict=True)):
            return None
        centre = [(int(h.min()) + int(h.max())) / 2 for h in hits]
        x, (src, dst) = crop_around(volume, centre, self.crop)
        with torch.no_grad():
            p = torch.sigmoid(self(torch.from_numpy(x)[None]))[0, 0].numpy()
        out = np.zeros(lesion.shape, np.float32)
        out[src] = p[dst]
        return out, src


class RefinerEnsemble(nn.Module):
    """Refiners of one configuration whose logits are averaged; used wherever a :class:`LesionRefiner` is.

    Averaging refiners trained from different seeds steadies the answer: single
    trainings of the same recipe differ by a few thousandths of Dice on the same studies.
    """

    def __init__(self, members: list[LesionRefiner]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one refiner")
        first = members[0]
        config = (first.widths, first.crop, first.pool, first.inputs, first.box_margin)
        if any((m.widths, m.crop, m.pool, m.inputs, m.box_margin) != config for m in members):
            raise ValueError("the refiners of an ensemble must share widths, crop, pooling, inputs and box margin")
        self.members = nn.ModuleList(members)
        self.widths, self.crop, self.pool, self.inputs, self.box_margin = config
        self.digest: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)

    refine = LesionRefiner.refine


#: What a checkpoint's refiner files load as.
Refiner = LesionRefiner | RefinerEnsemble


def augmented(x: np.ndarray, labels: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """A refiner's training crop augmented: left-right and anterior-posterior flips, PET gain within ±10 %.

    ``x`` is (C, Z, Y, X) with PET first; each of ``labels`` (Z, Y, X) is flipped with it.
    Returns copies.
    """
    for axis in (2, 1):
        if rng.random() < 0.5:
            x, labels = np.flip(x, axis + 1), [np.flip(a, axis) for a in labels]
    x = x.copy()
    x[0] *= rng.uniform(0.9, 1.1)
    return x, [a.copy() for a in labels]


def refiner_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """BCE plus soft Dice per crop (smoothed by 1), over the voxels of ``mask`` (default: all).

    All tensors are (B, 1, Z, Y, X); ``mask`` is 1 where a crop holds the study (not padding).
    """
    mask = torch.ones_like(target) if mask is None else mask
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * mask).sum() / mask.sum()
    p = torch.sigmoid(logits) * mask
    dims = tuple(range(1, p.ndim))
    soft_dice = 1 - (2 * (p * target).sum(dims) + 1) / (p.sum(dims) + (target * mask).sum(dims) + 1)
    return bce + soft_dice.mean()


def fit(model: LesionRefiner, sample: Callable[[int], tuple[np.ndarray, ...]], n_samples: int, epochs: int,
        lr: float, pct_start: float, rng: np.random.Generator, after_epoch: Callable[[int, float, float], None],
        batch: int = 4) -> None:
    """Train a refiner: AdamW (weight decay 1e-4), a one-cycle schedule peaking at ``lr``, :func:`refiner_loss`.

    Each epoch visits the samples in a new order drawn from ``rng`` in full batches of
    ``batch``; ``sample(j)`` returns sample ``j``'s input (3, Z, Y, X), target and,
    optionally, loss mask (each (Z, Y, X) float32), drawing any randomness it needs from
    the same ``rng``. After each epoch the model is put in eval mode and
    ``after_epoch(epoch, mean_loss, seconds)`` is called (to score and keep it).
    """
    steps = max(1, n_samples // batch)
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps, pct_start=pct_start)
    for epoch in range(1, epochs + 1):
        model.train()
        start, total = time.time(), 0.0
        order = rng.permutation(n_samples)
        for step in range(steps):
            parts = list(zip(*(sample(int(j)) for j in order[step * batch:(step + 1) * batch]), strict=True))
            x = torch.from_numpy(np.stack(parts[0]))
            y, *mask = (torch.from_numpy(np.stack(p).astype(np.float32))[:, None] for p in parts[1:])
            loss = refiner_loss(model(x), y, mask[0] if mask else None)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        model.eval()
        after_epoch(epoch, total / steps, time.time() - start)


def filled(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 (3, *shape) array holding each input channel's :data:`FILL` value (what lies outside a study)."""
    return np.stack([np.full(shape, f, np.float32) for f in FILL])


def crop_around(volume: np.ndarray, centre: list[float], size: tuple[int, ...]) -> tuple[np.ndarray, tuple]:
    """(3, Z, Y, X) crop of an (N, 3, H, W) volume centred at ``centre`` (z, y, x), padded with :data:`FILL`.

    Returns the crop and ``(source, destination)`` slices: ``volume`` indices and crop indices.
    """
    out = filled(size)
    shape = (volume.shape[0], volume.shape[2], volume.shape[3])
    src, dst = [], []
    for c, n, extent in zip(centre, size, shape, strict=True):
        lo = int(round(c)) - n // 2
        a, b = max(lo, 0), min(lo + n, extent)
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[:, dst[0], dst[1], dst[2]] = np.moveaxis(volume[src[0], :, src[1], src[2]], 1, 0)
    return out, (tuple(src), tuple(dst))


def refiner_path(checkpoint: Path, kind: str = "refiner") -> Path:
    """Where a refiner of ``checkpoint`` lives: ``NAME.KIND.safetensors`` beside it.

    ``kind`` is "refiner" for the lesion refiner and "outline" for the outline refiner
    (:mod:`model.outline`).
    """
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.{kind}.safetensors")


def refiners_beside(checkpoint: Path) -> list[str]:
    """The kinds (:data:`KINDS`) of refiner whose weights lie beside ``checkpoint``."""
    return [kind for kind in KINDS if refiner_path(checkpoint, kind).is_file()]


def refuse_foreign_refiners(src: Path, out: Path) -> None:
    """Raise :class:`CheckpointError` when ``out`` has a refiner of a kind that ``src`` lacks.

    Such a refiner belongs to another model; overwriting or deleting it is left to the user.
    """
    foreign = [kind for kind in refiners_beside(out) if kind not in refiners_beside(src)]
    if foreign:
        raise CheckpointError(f"{refiner_path(out, foreign[0])} belongs to another model: {src} has no {foreign[0]} "
                              "refiner; remove it or write to another path")


def refuse_refiners_beside(checkpoint: Path) -> None:
    """Raise :class:`CheckpointError` when refiners lie beside ``checkpoint``, which a new network is to replace.

    They learned from the network there now, and beside the new one they would be refused
    when loaded (:func:`load_refiner`): better to say so before training or writing it.
    """
    found = [refiner_path(checkpoint, kind).name for kind in refiners_beside(checkpoint)]
    if found:
        raise CheckpointError(f"{checkpoint}: {', '.join(found)} beside it learned from the network there now and "
                              "would not fit a new one; move them away, or write the new network to another path")


def copy_refiners(src: Path, out: Path) -> None:
    """Copy every refiner beside checkpoint ``src`` to beside checkpoint ``out``.

    A copy of a checkpoint's weights (a calibrated one, say) refines as ``src`` does only
    with ``src``'s refiners. Each file is written to a temporary name and renamed.
    Refuses (:func:`refuse_foreign_refiners`) before copying anything.
    """
    src, out = Path(src), Path(out)
    refuse_foreign_refiners(src, out)
    for kind in refiners_beside(src):
        source, target = refiner_path(src, kind), refiner_path(out, kind)
        if source.resolve() == target.resolve():
            continue
        for a, b in ((source, target), (source.with_suffix(".json"), target.with_suffix(".json"))):
            tmp = b.with_name(b.name + ".tmp")
            shutil.copyfile(a, tmp)
            tmp.replace(b)


def save_refiner(model: Refiner, checkpoint: Path, meta: dict[str, Any], *,
                 network_sha256: str, kind: str = "refiner") -> Path:
    """Write ``model`` beside ``checkpoint`` as ``kind`` (weights and JSON metadata); returns the weights' path.

    ``network_sha256`` is the weights digest of the network whose outputs the refiner
    learned from; :func:`load_refiner` refuses the refiner beside any other network.
    """
    path = refiner_path(checkpoint, kind)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    record = {**meta, "format": FORMAT, "widths": list(model.widths), "crop": list(model.crop),
              "pool": list(model.pool), "network_sha256": network_sha256}
    if model.inputs != 3:
        record["inputs"] = model.inputs
    if model.box_margin is not None:
        record["box_margin"] = list(model.box_margin)
    if isinstance(model, RefinerEnsemble):
        record["members"] = len(model.members)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def load_refiner(checkpoint: Path, *, network_sha256: str, device: str | torch.device = "cpu",
                 kind: str = "refiner") -> Refiner | None:
    """The refiner of ``kind`` beside ``checkpoint``, or None when it has none.

    ``network_sha256`` is the weights digest of the network it will refine
    (:func:`model.checkpoint.weights_sha256`): a refiner learned from another network's
    outputs, left beside a checkpoint that was overwritten, say, is refused.

    Raises
    ------
    CheckpointError
        The refiner's files are incomplete, of another format, do not fit its metadata, or
        belong to another network.
    """
    path = refiner_path(checkpoint, kind)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"refiner {path}: metadata {path.with_suffix('.json').name} unreadable ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"refiner {path}: metadata is not {FORMAT}")
    learned_from = meta.get("network_sha256")
    if learned_from != network_sha256:
        source = f"the network {str(learned_from)[:8]}" if learned_from else "no named network"
        raise CheckpointError(f"refiner {path} learned from {source}, not from this checkpoint's network "
                              f"{network_sha256[:8]}: it belongs to another model; move it away, or train "
                              "one for this network")
    margin = meta.get("box_margin")
    try:
        members = [LesionRefiner(tuple(meta["widths"]), tuple(meta["crop"]), tuple(meta.get("pool", (2, 2, 2))),
                                 inputs=int(meta.get("inputs", 3)),
                                 box_margin=None if margin is None else tuple(margin))
                   for _ in range(int(meta.get("members", 1)))]
        model = members[0] if "members" not in meta else RefinerEnsemble(members)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"refiner {path}: metadata does not describe a refiner ({exc})") from None
    try:
        data = path.read_bytes()  # read once: loaded and hashed for the version
        model.load_state_dict(load(data))
    except (RuntimeError, OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"refiner {path}: weights do not fit its metadata ({exc})") from None
    model.digest = hashlib.sha256(data).hexdigest()[:8]
    return model.to(device).eval()


def load_refiners(checkpoint: Path, *, network_sha256: str) -> tuple[Refiner | None, Refiner | None]:
    """The lesion refiner and the outline refiner beside ``checkpoint`` (:func:`load_refiner`; None when absent)."""
    lesion, outline = (load_refiner(checkpoint, network_sha256=network_sha256, kind=kind) for kind in KINDS)
    return lesion, outline
