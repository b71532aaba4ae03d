"""Inference: a loaded checkpoint that turns 2.5D stacks into centre-slice probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from model.checkpoint import (
    load_checkpoint,
    operating_threshold,
    shipped_checkpoint_path,
    weights_sha256,
)
from model.device import resolve_device
from model.preprocessing import Preprocessing
from model.refiner import Refiner, load_refiners

#: Test-time flip sets: (left-right flip, slice-order flip) per pass.
TEST_TIME_FLIPS: dict[str, tuple[tuple[bool, bool], ...]] = {
    "none": ((False, False),),
    "lr": ((False, False), (True, False)),
    "lr+slices": ((False, False), (True, False), (False, True), (True, True)),
}


def refined_version(version: str, refiner: Refiner | None, outline: Refiner | None) -> str:
    """The version results carry: the network's, plus ``+r`` and ``+o`` with the lesion and outline refiners' digests.

    Results derive their UIDs from the version, so a model whose refiners change writes
    new objects instead of silently replacing the results of the earlier model.
    """
    for tag, model in (("r", refiner), ("o", outline)):
        if model is not None:
            version += f"+{tag}{model.digest}"
    return version


@dataclass
class Predictor:
    """A network with the preprocessing it was trained with.

    Attributes
    ----------
    network:
        The SIM-Mamba network in eval mode.
    preprocessing:
        How the pipeline must build this network's input.
    version:
        Model version string (goes into result UIDs and reports).
    metadata:
        The checkpoint's full metadata.
    device:
        Where inference runs.
    refiner:
        The checkpoint's lesion refiner (:mod:`model.refiner`), or None when it has none.
    outline:
        The checkpoint's outline refiner (:mod:`model.outline`), or None when it has none.
    """

    network: nn.Module
    preprocessing: Preprocessing
    version: str
    metadata: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    refiner: Refiner | None = None
    outline: Refiner | None = None

    @classmethod
    def load(cls, checkpoint: Path | None = None, device: str = "cpu") -> Predictor:
        """Load ``checkpoint`` (default: the shipped model) onto ``device`` ("cpu", "cuda", "auto")."""
        path = Path(checkpoint) if checkpoint is not None else shipped_checkpoint_path()
        dev = resolve_device(device)
        network, meta = load_checkpoint(path, device=str(dev))
        # on the CPU: the lesion refiner sees one small crop per study, the outline refiner one CT-grid box
        refiner, outline = load_refiners(path, network_sha256=weights_sha256(path, meta))
        return cls(
            network=network,
            preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
            version=refined_version(str(meta.get("version", "unknown")), refiner, outline),
            metadata=meta,
            device=dev,
            refiner=refiner,
            outline=outline,
        )

    @property
    def threshold(self) -> float:
        """The probability threshold this checkpoint was calibrated at (0.5 when never)."""
        return operating_threshold(self.metadata)

    def predict(self, inputs: np.ndarray, batch_size: int = 8, flips: str = "none") -> np.ndarray:
        """Probabilities (N, H, W) float32 of the centre slices of ``inputs`` (N, 2, K, H, W).

        ``inputs`` may be a read-only view; it is copied batch by batch. ``flips``
        averages test-time flips (see :data:`TEST_TIME_FLIPS`): "none", "lr" (left-right,
        2 passes) or "lr+slices" (also the slice order reversed, 4 passes); the network
        was trained with both flips as augmentations.
        """
        k = self.preprocessing.slices
        if inputs.ndim != 5 or inputs.shape[1] != 2 or inputs.shape[2] != k:
            raise ValueError(f"expected inputs (N, 2, {k}, H, W), got {inputs.shape}")
        if flips not in TEST_TIME_FLIPS:
            raise ValueError(f"flips must be one of {sorted(TEST_TIME_FLIPS)}, got {flips!r}")
        total: np.ndarray | None = None
        for flip_lr, flip_slices in TEST_TIME_FLIPS[flips]:
            x = inputs[:, :, ::-1] if flip_slices else inputs
            x = x[..., ::-1] if flip_lr else x
            prob = self._predict_once(x, batch_size)
            prob = prob[..., ::-1] if flip_lr else prob
            total = prob if total is None else total + prob
        assert total is not None
        return np.ascontiguousarray(total / len(TEST_TIME_FLIPS[flips]), dtype=np.float32)

    def _predict_once(self, inputs: np.ndarray, batch_size: int) -> np.ndarray:
        k = self.preprocessing.slices
        n = inputs.shape[0]
        layout = shared_plane_layout(inputs, self.preprocessing.slice_step) if k > 1 and n > 1 else None
        if layout is not None:
            return predict_planes(self.network, *layout, batch_size=batch_size, device=self.device)
        out = np.empty((n, inputs.shape[3], inputs.shape[4]), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, n, batch_size):
                x = torch.from_numpy(np.array(inputs[s : s + batch_size], dtype=np.float32))  # a writable copy
                logits = self.network(x.to(self.device))
                out[s : s + batch_size] = torch.sigmoid(logits[:, 0]).float().cpu().numpy()
        return out


def predict_planes(network: nn.Module, planes: np.ndarray, index: np.ndarray, batch_size: int = 8,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Centre-slice probabilities (N, H, W) of stacks given as shared planes.

    ``planes`` is (M, 2, H, W); row ``i`` of ``index`` (N, K) lists the planes of stack
    ``i``. Each plane in a batch is encoded once however many stacks use it.
    """
    out = np.empty((len(index),) + planes.shape[2:], dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(index), batch_size):
            idx = index[s : s + batch_size]
            lo, hi = int(idx.min()), int(idx.max()) + 1
            x = torch.from_numpy(np.ascontiguousarray(planes[lo:hi], dtype=np.float32))
            logits = network.forward_planes(x.to(device), torch.from_numpy(idx - lo).to(device))
            out[s : s + batch_size] = torch.sigmoid(logits[:, 0]).float().cpu().numpy()
    return out


def shared_plane_layout(inputs: np.ndarray, step: int = 1) -> tuple[np.ndarray, np.ndarray] | None:
    """Planes and (N, K) index when the stacks come from one sliding window, else None.

    Recognises ``StackSet.inputs`` (either slice order): stack ``i``'s slice ``j`` is
    plane ``i + j * step``, so each plane is encoded once instead of K times.
    """
    n, _, k = inputs.shape[:3]
    if n <= step:
        return None
    for order in (slice(None), slice(None, None, -1)):
        x = inputs[:, :, order]
        if np.array_equal(x[step:, :, :-1], x[:-step, :, 1:]):
            first = np.arange(n)  # plane p < n is slice 0 of stack p
            later = np.arange(n, n + (k - 1) * step)  # the rest: slice j of stack p - j * step
            j = (later - (n - 1) + step - 1) // step
            planes = np.concatenate([x[first, :, 0], x[later - j * step, :, j]], axis=0)
            index = np.arange(n)[:, None] + step * np.arange(k)[None]
            return planes, (index[:, order] if order.step else index).astype(np.int64)
    return None
