"""Tiny synthetic 2.5D samples for model tests: a PET-hot, CT-dense blob in 'lung'."""

from __future__ import annotations

import numpy as np

from model.train import StudySamples


def blob_study(seed: int, n: int = 9, k: int = 3, size: int = 48, name: str | None = None) -> StudySamples:
    """Planes (n + k - 1, 2, size, size) and labels (n, size, size) with one spherical target."""
    rng = np.random.default_rng(seed)
    m = n + k - 1
    zz, yy, xx = np.mgrid[0:m, 0:size, 0:size].astype(np.float32)
    c = np.array([m / 2 + rng.uniform(-1, 1), rng.uniform(14, size - 14), rng.uniform(14, size - 14)])
    r = rng.uniform(4, 8)
    d = np.sqrt(((zz - c[0]) * 2) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    inside = d <= r
    pet = np.where(inside, 0.7, 0.1) + rng.normal(0, 0.03, inside.shape)
    ct = np.where(inside, 0.0, -0.7) + rng.normal(0, 0.05, inside.shape)
    planes = np.stack([pet, ct], axis=1).astype(np.float32)
    h = k // 2
    labels = inside[h : h + n].astype(np.uint8)
    return StudySamples(name or f"blob-{seed}", planes, labels, (2.0, 2.0))
