"""Training loop on in-memory 2.5D samples (torch only; no DICOM).

A :class:`StudySamples` holds one study's normalised model-grid planes
(M, 2, H, W) and centre-slice labels (N, H, W) with M = N + K - 1, exactly what
the pipeline's stack builder produces. Training draws patches: mostly around
the target, some around bright PET spots outside it (nodes, heart: hard
negatives) or, when mining, around the model's own false positives, some
anywhere; augments them on the fly; optimises Dice + BCE with AdamW and a cosine
schedule; validates each epoch (3D Dice over each validation study's whole crop
on the model grid, and, given a scorer, the Dice of what the node would deliver
after post-processing) and keeps the best epoch. Epoch checkpoints
(``<out>.last.safetensors`` + optimiser state) make a run resumable.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.checkpoint import load_checkpoint, save_checkpoint
from model.errors import CheckpointError
from model.network import NetConfig, SimMamba, build_network, count_parameters
from model.preprocessing import Preprocessing

log = logging.getLogger(__name__)

#: Soft-Dice modes of :func:`dice_bce_loss` (``TrainConfig.dice``).
DICE_MODES = ("batch", "sample")
#: Training targets on the model grid (``TrainConfig.labels``): "majority", a pixel is target
#: when at least half of its CT pixels are; "area", the fraction of the pixel the target
#: covers, so the network learns sub-pixel boundaries that bilinear upsampling recovers.
LABEL_MODES = ("majority", "area")


@dataclass
class StudySamples:
    """One study's model-grid data.

    Attributes
    ----------
    name:
        Study identifier for logs (no patient data).
    planes:
        (N + span - 1, 2, H, W) float32/float16 normalised PET and CT planes, one per
        CT slice; stack ``i`` takes K of them, ``slice_step`` apart, from plane ``i``.
    labels:
        (N, H, W) target of each stack's centre slice: uint8 0/1 (majority labels) or
        float area fractions in [0, 1]; a pixel counts as target from 0.5 (:meth:`target`).
    spacing_mm:
        (slice spacing, pixel spacing) of the model grid.
    slice_step:
        CT slices between consecutive slices of a stack (``Preprocessing.slice_step``).
    """

    name: str
    planes: np.ndarray
    labels: np.ndarray
    spacing_mm: tuple[float, float] = (3.0, 2.0)
    slice_step: int = 1

    def __post_init__(self) -> None:
        if self.planes.ndim != 4 or self.planes.shape[1] != 2:
            raise ValueError(f"{self.name}: planes must be (M, 2, H, W), got {self.planes.shape}")
        if self.labels.ndim != 3 or self.labels.shape[1:] != self.planes.shape[2:]:
            raise ValueError(f"{self.name}: labels {self.labels.shape} do not fit planes {self.planes.shape}")
        if self.slice_step < 1 or (self.span - 1) % self.slice_step:
            raise ValueError(f"{self.name}: {self.span} planes per stack do not make stacks of slices "
                             f"{self.slice_step} apart")

    def target(self, i: int | slice = slice(None)) -> np.ndarray:
        """Boolean target of stack(s) ``i``: label >= 0.5, for majority and area labels alike."""
        return self.labels[i] >= 0.5

    @property
    def span(self) -> int:
        """Planes one stack covers, first to last (implied by the plane and label counts)."""
        return self.planes.shape[0] - self.labels.shape[0] + 1

    @property
    def k(self) -> int:
        """K, the slices per stack."""
        return (self.span - 1) // self.slice_step + 1

    def stack_planes(self, i: int) -> np.ndarray:
        """(K, 2, H, W) planes of stack ``i`` (a view, in the stored dtype)."""
        return self.planes[i : i + self.span : self.slice_step]

    def stack(self, i: int) -> np.ndarray:
        """(2, K, H, W) float32 input of stack ``i``."""
        return np.moveaxis(self.stack_planes(i), 0, 1).astype(np.float32)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (stored in checkpoint metadata)."""

    epochs: int = 20
    samples_per_epoch: int = 400
    batch_size: int = 8
    patch: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    target_fraction: float = 0.6
    hard_negative_fraction: float = 0.2
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    seed: int = 0
    threads: int = 2
    freeze: list[str] = field(default_factory=list)
    # augmentation
    flip_lr: float = 0.5
    flip_slices: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    pet_gain: float = 0.2
    ct_shift: float = 0.05
    misregister_px: float = 2.0
    device: str = "cpu"
    prefetch: int = 4
    # "batch": one soft Dice over the whole batch; "sample": the mean of each target patch's
    # own soft Dice, so a small tumour weighs as much as a large one
    dice: str = "batch"
    # every this many epochs, predict the training studies and draw part of the hard
    # negatives at the model's own false positives (0 = off)
    mine_every: int = 0
    mined_fraction: float = 0.5
    mine_threshold: float = 0.5
    # what the samples' labels are (LABEL_MODES): "area" keeps them soft through augmentation
    labels: str = "majority"
    # BCE weight of target pixels where the centre slice's CT is lung (below envelope_ct_hu):
    # the motion envelope, which the CT does not show (1 = no extra weight)
    envelope_weight: float = 1.0
    envelope_ct_hu: float = -500.0


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- sampling


def _crop(arr: np.ndarray, cy: int, cx: int, size: int, fill: float) -> np.ndarray:
    """Crop (..., H, W) around (cy, cx) to size x size, padding with ``fill``."""
    h, w = arr.shape[-2:]
    y0, x0 = cy - size // 2, cx - size // 2
    out = np.full(arr.shape[:-2] + (size, size), fill, dtype=arr.dtype)
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + size, h), min(x0 + size, w)
    if sy1 > sy0 and sx1 > sx0:
        out[..., sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[..., sy0:sy1, sx0:sx1]
    return out


class PatchSampler:
    """Draws (input, label) patches from studies with a fixed random generator."""

    def __init__(
        self,
        studies: Sequence[StudySamples],
        cfg: TrainConfig,
        rng: np.random.Generator,
        mined: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.studies = list(studies)
        self.cfg = cfg
        self.rng = rng
        self.positive = [np.flatnonzero(s.target().reshape(len(s.labels), -1).any(1)) for s in self.studies]
        self.mined = list(mined) if mined is not None else None
        self.with_mined = [i for i, m in enumerate(self.mined or []) if len(m)]

    def _fill(self) -> np.ndarray:
        return np.array([0.0, -1.0], dtype=np.float32)  # PET 0, CT air

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        cfg, rng = self.cfg, self.rng
        si = int(rng.integers(len(self.studies)))
        s = self.studies[si]
        n, h, w = s.labels.shape
        r = rng.random()
        pos = self.positive[si]
        if r < cfg.target_fraction and len(pos):
            i = int(rng.choice(pos))
            ys, xs = np.nonzero(s.target(i))
            j = int(rng.integers(len(ys)))
            jitter = cfg.patch // 3
            cy = int(ys[j] + rng.integers(-jitter, jitter + 1))
            cx = int(xs[j] + rng.integers(-jitter, jitter + 1))
        elif r < cfg.target_fraction + cfg.hard_negative_fraction and self._use_mined():
            si = int(rng.choice(self.with_mined))
            s = self.studies[si]
            i, cy, cx = (int(v) for v in self.mined[si][int(rng.integers(len(self.mined[si])))])
        elif r < cfg.target_fraction + cfg.hard_negative_fraction:
            i = int(rng.integers(n))
            pet = s.planes[i + s.span // 2, 0].astype(np.float32)
            hot = (pet > max(0.35, float(pet.max()) * 0.5)) & (s.labels[i] == 0)
            ys, xs = np.nonzero(hot)
            if len(ys):
                j = int(rng.integers(len(ys)))
                cy, cx = int(ys[j]), int(xs[j])
            else:
                cy, cx = int(rng.integers(h)), int(rng.integers(w))
        else:
            i = int(rng.integers(n))
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
        planes = s.stack_planes(i)  # (K, 2, H, W): crop first, then convert only the patch
        xp = np.stack([_crop(planes[:, 0], cy, cx, cfg.patch, 0.0), _crop(planes[:, 1], cy, cx, cfg.patch, -1.0)])
        xp = xp.astype(np.float32, copy=False)
        yp = _crop(s.labels[i].astype(np.float32), cy, cx, cfg.patch, 0.0)
        return xp, yp

    def _use_mined(self) -> bool:
        """Whether this hard negative comes from the mined false positives (draws only when mining)."""
        if self.mined is None:
            return False
        return bool(self.with_mined) and bool(self.rng.random() < self.cfg.mined_fraction)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(self.draw() for _ in range(size)), strict=False)
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))[:, None]


def augment(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips, rotation/scaling, intensity jitter and PET/CT misregistration.

    x: (B, 2, K, H, W); y: (B, 1, H, W) in [0, 1]. Majority labels (``cfg.labels``) stay
    0/1 (resampled, then thresholded at 0.5); area labels are resampled bilinearly and stay
    fractions.
    """
    b, m, k, h, w = x.shape
    dev = x.device
    rnd = lambda *s: torch.rand(*s, generator=gen).to(dev)  # noqa: E731
    flip = rnd(b) < cfg.flip_lr
    x = torch.where(flip[:, None, None, None, None], x.flip(-1), x)
    y = torch.where(flip[:, None, None, None], y.flip(-1), y)
    zflip = rnd(b) < cfg.flip_slices
    x = torch.where(zflip[:, None, None, None, None], x.flip(2), x)
    # shared affine (rotation + isotropic scale) for every plane and the label
    ang = (rnd(b) * 2 - 1) * math.radians(cfg.rotate_deg)
    sc = 1 + (rnd(b) * 2 - 1) * cfg.scale
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(b, device=dev)], 1), torch.stack([sin, cos, torch.zeros(b, device=dev)], 1)], 1)
    # PET gets an extra small translation: simulated misregistration
    shift = (rnd(b, 2) * 2 - 1) * cfg.misregister_px * 2 / torch.tensor([w, h], dtype=torch.float32, device=dev)
    theta_pet = theta.clone()
    theta_pet[:, :, 2] += shift
    grid = F.affine_grid(theta, (b, k, h, w), align_corners=False)
    grid_pet = F.affine_grid(theta_pet, (b, k, h, w), align_corners=False)
    pet = F.grid_sample(x[:, 0], grid_pet, mode="bilinear", padding_mode="zeros", align_corners=False)
    ct = F.grid_sample(x[:, 1] + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.labels == "majority":
        y = (y > 0.5).float()
    pet = pet * (1 + (rnd(b, 1, 1, 1) * 2 - 1) * cfg.pet_gain)
    ct = ct + (rnd(b, 1, 1, 1) * 2 - 1) * cfg.ct_shift
    return torch.stack([pet.clamp(0, 1.5), ct.clamp(-1, 1)], dim=1), y


def envelope_pixels(x: torch.Tensor, y: torch.Tensor, ct_below: float) -> torch.Tensor:
    """Target pixels whose centre-slice CT is below ``ct_below`` (normalised units).

    x: (B, 2, K, H, W), y: (B, 1, H, W). These are the parts of an IGTV where the CT,
    taken at one breathing phase, shows lung: the tumour passes there at other phases,
    and only the PET (averaged over the cycle) marks it.
    """
    centre_ct = x[:, 1:2, x.shape[2] // 2]
    return (y >= 0.5) & (centre_ct < ct_below)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, cfg: TrainConfig,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE plus soft Dice, over the batch or per target patch (``cfg.dice``).

    Batch Dice is smoothed so target-free batches stay finite; sample Dice averages
    only the patches that contain target (BCE alone covers the others). ``weight``
    (shaped like ``target``) weighs each pixel's BCE; Dice is unweighted.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
    p = torch.sigmoid(logits)
    if cfg.dice == "sample":
        dims = tuple(range(1, p.ndim))
        truth = target.sum(dims)
        per_patch = 1 - (2 * (p * target).sum(dims) + 1) / (p.sum(dims) + truth + 1)
        has_target = (truth > 0).to(p.dtype)
        soft_dice = (per_patch * has_target).sum() / has_target.sum().clamp(min=1)
    elif cfg.dice == "batch":
        soft_dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    else:
        raise ValueError(f"unknown Dice mode {cfg.dice!r}; choose one of {DICE_MODES}")
    return cfg.bce_weight * bce + cfg.dice_weight * soft_dice


# --------------------------------------------------------------------------- validation


def predict_study(model: nn.Module, study: StudySamples, batch_size: int = 16) -> np.ndarray:
    """Probabilities (N, H, W) of every stack of ``study`` over the whole crop."""
    from model.predict import predict_planes

    n = len(study.labels)
    index = np.arange(n)[:, None] + study.slice_step * np.arange(study.k)[None]  # stack i from plane i
    return predict_planes(model, study.planes, index, batch_size, next(model.parameters()).device)


#: Scores one validation study from its probabilities (N, H, W) on the model grid: a Dice in [0, 1].
StudyScorer = Callable[[np.ndarray, StudySamples], float]


def validate(model: nn.Module, studies: Sequence[StudySamples], cfg: TrainConfig,
             scorer: StudyScorer | None = None) -> dict[str, float]:
    """Mean 3D Dice over each validation study's whole crop.

    "val_dice" thresholds the raw probabilities at 0.5, so false positives anywhere
    in the lungs count. With ``scorer`` (the pipeline passes the node's
    post-processing), "val_node_dice" is the mean of its scores: the Dice of what
    the node would deliver.
    """
    from model.metrics import dice

    model.eval()
    raw, node = [], []
    for s in studies:
        prob = predict_study(model, s)
        raw.append(dice(prob >= 0.5, s.target()))
        if scorer is not None:
            node.append(scorer(prob, s))
    out = {"val_dice": float(np.mean(raw)) if raw else float("nan"), "val_cases": len(raw)}
    if scorer is not None:
        out["val_node_dice"] = float(np.mean(node)) if node else float("nan")
    return out


def mine_false_positives(
    model: nn.Module,
    studies: Sequence[StudySamples],
    threshold: float = 0.5,
    margin_px: int = 4,
    limit: int = 4096,
    seed: int = 0,
) -> list[np.ndarray]:
    """Model-grid pixels each study's prediction calls target although they are not.

    Pixels within ``margin_px`` of the target in their slice are not counted (a
    boundary error is not a false positive). At most ``limit`` pixels per study are
    kept, chosen at random with ``seed``.

    Returns
    -------
    list of numpy.ndarray
        One (n, 3) int32 array of (stack, row, column) per study.
    """
    model.eval()
    rng = np.random.default_rng(seed)
    mined = []
    for s in studies:
        probs = predict_study(model, s)
        near = torch.from_numpy(s.target().astype(np.float32))[:, None]
        near = F.max_pool2d(near, 2 * margin_px + 1, stride=1, padding=margin_px)[:, 0].numpy() > 0
        found = np.argwhere((probs >= threshold) & ~near).astype(np.int32)
        if len(found) > limit:
            found = found[np.sort(rng.choice(len(found), limit, replace=False))]
        mined.append(found)
    return mined


def _mined_path(out: Path) -> Path:
    return out.with_name(out.stem + ".mined.npz")


def _save_mined(path: Path, mined: Sequence[np.ndarray]) -> None:
    np.savez(path, **{f"study{i}": m for i, m in enumerate(mined)})


def _load_mined(path: Path, count: int) -> list[np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        mined = [data[f"study{i}"] for i in range(count) if f"study{i}" in data]
    return mined if len(mined) == count else None


class BatchPrefetcher:
    """Draws the next batches on a background thread while the model trains.

    One producer draws batches in order from the sampler, so the sequence is the
    same as drawing them inline (runs stay reproducible).
    """

    def __init__(self, sampler: PatchSampler, batch_size: int, count: int, depth: int) -> None:
        import queue
        import threading

        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()

        def produce() -> None:
            try:
                for _ in range(count):
                    if self._stop.is_set():
                        return
                    self._queue.put(sampler.batch(batch_size))
            except BaseException as exc:  # handed to the consumer
                self._queue.put(exc)

        self._thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
        self._thread.start()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) batch, in draw order."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the producer (unblocks it if the queue is full)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except Exception:
                self._thread.join(timeout=0.05)


# --------------------------------------------------------------------------- loop


def freeze_stages(model: SimMamba, names: Sequence[str]) -> list[nn.Module]:
    """Freeze the named encoder stages (stem, stage1, stage2, stage3); return the frozen modules."""
    stages = model.encoder_stages()
    frozen: list[nn.Module] = []
    for name in names:
        if name not in stages:
            raise ValueError(f"unknown stage {name!r} to freeze; choose from {sorted(stages)}")
        for mod in stages[name]:
            for p in mod.parameters():
                p.requires_grad_(False)
            frozen.append(mod)
    return frozen


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _last_path(out: Path) -> Path:
    return out.with_name(out.stem + ".last.safetensors")


def _optimizer_path(out: Path) -> Path:
    return out.with_name(out.stem + ".optim.safetensors")


def _save_optimizer(opt: torch.optim.Optimizer, path: Path, state: dict[str, Any]) -> None:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"{pid}.{key}"] = (val.detach().to("cpu").contiguous() if isinstance(val, torch.Tensor)
                                       else torch.tensor(val))
    save_file(tensors, str(path), metadata={"progress": json.dumps(state)})


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        progress = json.loads(fh.metadata()["progress"])
    tensors = load_file(str(path))
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, val in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    sd["state"] = state
    opt.load_state_dict(sd)
    return progress


def train_model(
    train: Sequence[StudySamples],
    val: Sequence[StudySamples],
    out: Path,
    prep: Preprocessing,
    net_cfg: NetConfig | None = None,
    cfg: TrainConfig | None = None,
    init: Path | None = None,
    resume: bool = False,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    scorer: StudyScorer | None = None,
) -> dict[str, Any]:
    """Train, validate each epoch, and keep the best epoch at ``out``.

    Parameters
    ----------
    train, val:
        Training and validation studies (validation may be empty: then the last
        epoch is kept).
    out:
        Best checkpoint path (.safetensors); epoch checkpoints go beside it.
    prep:
        Preprocessing the samples were built with (stored in the metadata).
    net_cfg:
        Architecture; taken from ``init`` when fine-tuning.
    init:
        Checkpoint to start from (transfer learning); its architecture is used.
    resume:
        Continue from ``<out>.last.safetensors`` and its optimiser state.
    metadata:
        Extra metadata (training data description) for the checkpoint.
    scorer:
        Scores a validation study as the node would deliver it (see :func:`validate`);
        when given, the best epoch is the one with the highest mean score
        ("val_node_dice"), else the one with the highest whole-crop Dice ("val_dice").

    Returns
    -------
    dict
        The best epoch's metrics ("best"), the history, and the metric the best epoch
        was chosen by ("best_by": "val_node_dice" or "val_dice").
    """
    from model.device import resolve_device

    cfg = cfg or TrainConfig()
    if cfg.labels not in LABEL_MODES:
        raise ValueError(f"unknown label mode {cfg.labels!r}; choose one of {LABEL_MODES}")
    if cfg.envelope_weight < 1.0:
        raise ValueError(f"envelope_weight must be at least 1 (1 = off), got {cfg.envelope_weight}")
    ct_below = float(prep.normalise_ct(np.array([cfg.envelope_ct_hu]))[0])
    out = Path(out)
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    seed_everything(cfg.seed)
    init_meta: dict[str, Any] = {}
    if init is not None:
        model, init_meta = load_checkpoint(init)
        if not isinstance(model, SimMamba):
            raise CheckpointError(f"checkpoint {init}: an ensemble cannot be fine-tuned; start from one of its members")
        init_prep = Preprocessing.from_dict(init_meta["preprocessing"])
        if replace(init_prep, slice_step=prep.slice_step) != prep:  # a new slice step keeps K: weights fit
            raise CheckpointError(
                f"checkpoint {init}: its preprocessing {init_meta['preprocessing']} differs from this run's "
                f"{prep.to_dict()} beyond the slice step; rebuild the samples with the checkpoint's preprocessing"
            )
        net_cfg = model.cfg
    else:
        net_cfg = net_cfg or NetConfig(slices=prep.slices)
        model = build_network(net_cfg)
    if net_cfg.slices != prep.slices:
        raise ValueError(f"network K={net_cfg.slices} but samples were built with K={prep.slices}")
    for s in list(train) + list(val):
        if s.k != prep.slices or s.slice_step != prep.slice_step:
            raise ValueError(f"{s.name}: samples have K={s.k} with slice step {s.slice_step}, expected "
                             f"K={prep.slices} with slice step {prep.slice_step}")
    model.to(device)
    frozen = freeze_stages(model, cfg.freeze)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1 and not getattr(p, "_no_weight_decay", False)]
    no_decay = [p for p in params if not (p.ndim > 1 and not getattr(p, "_no_weight_decay", False))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = max(1, cfg.samples_per_epoch // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    select_by = "val_node_dice" if scorer is not None else "val_dice"
    start_epoch, best, history = 0, -1.0, []
    if resume and _last_path(out).is_file() and _optimizer_path(out).is_file():
        model.load_state_dict(load_file(str(_last_path(out))))
        state = _load_optimizer(opt, _optimizer_path(out))
        start_epoch, history = state["epoch"], state["history"]
        best = max((m.get(select_by, -1.0) for m in history), default=-1.0)  # by this run's criterion
        log.info("resuming %s at epoch %d (best so far %.4f)", out.name, start_epoch + 1, best)
    base_meta = {
        "preprocessing": prep.to_dict(),
        "architecture": net_cfg.to_dict(),
        "seed": cfg.seed,
        "training": asdict(cfg),
        "best_epoch_by": select_by,
        "init": (
            {"checkpoint": str(init), "version": init_meta.get("version"), "training_data": init_meta.get("training_data")}
            if init is not None else None
        ),
        "parameters": count_parameters(model),
        **(metadata or {}),
    }
    log.info("training %d parameters (%d trainable) on %d studies, validating on %d",
             count_parameters(model), sum(p.numel() for p in params), len(train), len(val))
    mined = _load_mined(_mined_path(out), len(train)) if cfg.mine_every and resume else None
    bar = _progress(progress)
    with bar:
        task = bar.add_task("train", total=total, completed=start_epoch * steps_per_epoch) if bar else None
        for epoch in range(start_epoch, cfg.epochs):
            # per-epoch seeding: a resumed run draws the same samples as an uninterrupted one
            rng = np.random.default_rng([cfg.seed, epoch])
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            torch.manual_seed(cfg.seed * 1000 + epoch)
            if cfg.mine_every and (epoch % cfg.mine_every == 0 or mined is None):
                t_mine = time.perf_counter()
                mined = mine_false_positives(model, train, cfg.mine_threshold, seed=cfg.seed * 1000 + epoch)
                _save_mined(_mined_path(out), mined)
                log.info("epoch %d: %d false-positive pixels in %d of %d training studies (%.0f s)", epoch + 1,
                         sum(len(m) for m in mined), sum(1 for m in mined if len(m)), len(train),
                         time.perf_counter() - t_mine)
            sampler = PatchSampler(train, cfg, rng, mined)
            model.train()
            for mod in frozen:
                mod.eval()
            t0, losses = time.perf_counter(), []
            batches = BatchPrefetcher(sampler, cfg.batch_size, steps_per_epoch, cfg.prefetch)
            try:
                for step in range(steps_per_epoch):
                    g = epoch * steps_per_epoch + step
                    for group in opt.param_groups:
                        group["lr"] = _lr_at(g, total, warmup, cfg.lr)
                    x, y = batches.next()
                    x, y = augment(x.to(device, non_blocking=True), y.to(device, non_blocking=True), cfg, gen)
                    weight = None
                    if cfg.envelope_weight != 1.0:
                        weight = 1 + (cfg.envelope_weight - 1) * envelope_pixels(x, y, ct_below).float()
                    loss = dice_bce_loss(model(x), y, cfg, weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 5.0)
                    opt.step()
                    losses.append(loss.detach())
                    if bar and (step % 10 == 9 or step == steps_per_epoch - 1):
                        recent = float(torch.stack(losses[-20:]).mean())
                        bar.update(task, completed=g + 1, description=f"epoch {epoch + 1}/{cfg.epochs} loss {recent:.3f}")
            finally:
                batches.close()
            mean_loss = float(torch.stack(losses).mean())
            metrics = {"epoch": epoch + 1, "loss": mean_loss, "seconds": round(time.perf_counter() - t0, 1)}
            metrics.update(validate(model, val, cfg, scorer) if val else {"val_dice": float("nan")})
            history.append(metrics)
            score = metrics[select_by] if val else float(epoch)
            if not val or score > best:
                best = score
                save_checkpoint(out, model, {**base_meta, "metrics": {**metrics, "best_epoch": epoch + 1}, "history": history})
            save_file({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, str(_last_path(out)))
            _save_optimizer(opt, _optimizer_path(out), {"epoch": epoch + 1, "best": best, "history": history})
            node_part = f", delivered {metrics['val_node_dice']:.4f}" if "val_node_dice" in metrics else ""
            log.info("epoch %d: loss %.4f, val Dice %.4f%s (%.0f s)", epoch + 1, metrics["loss"], metrics["val_dice"],
                     node_part, metrics["seconds"])
            if on_epoch:
                on_epoch(epoch + 1, metrics)
    best_entry = (max(history, key=lambda m: m.get(select_by, -math.inf)) if val and history
                  else (history[-1] if history else {}))
    return {"best": best_entry, "history": history, "best_by": select_by}


class _NoBar:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

    def __bool__(self) -> bool:
        return False


def _progress(enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn())
