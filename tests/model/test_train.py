"""The training loop learns a toy target, keeps the best epoch, resumes, freezes and fine-tunes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from blobs import blob_study

from model.checkpoint import load_checkpoint, metadata_path
from model.network import NetConfig
from model.preprocessing import Preprocessing
from model.train import BatchPrefetcher, PatchSampler, TrainConfig, augment, train_model

PREP = Preprocessing(slices=3)
NET = NetConfig(slices=3, widths=(8, 8, 16, 16), d_state=4)


def _cfg(**kw):
    base = dict(epochs=3, samples_per_epoch=48, batch_size=8, patch=32, lr=5e-3, threads=1, seed=1,
                rotate_deg=5)
    base.update(kw)
    return TrainConfig(**base)


def test_training_learns_and_resumes(tmp_path):
    train = [blob_study(s) for s in range(4)]
    val = [blob_study(100 + s) for s in range(2)]
    out = tmp_path / "m.safetensors"
    res = train_model(train, val, out, PREP, NET, _cfg(epochs=4, samples_per_epoch=96, lr=1e-2), progress=False,
                      metadata={"training_data": {"kind": "blobs"}})
    hist = res["history"]
    assert len(hist) == 4 and hist[-1]["loss"] < hist[0]["loss"]
    assert res["best"]["val_dice"] > 0.5
    meta = json.loads(metadata_path(out).read_text())
    assert meta["metrics"]["val_dice"] == pytest.approx(res["best"]["val_dice"])
    # resume: asking for more epochs continues from epoch 4
    res2 = train_model(train, val, out, PREP, NET, _cfg(epochs=5, samples_per_epoch=96, lr=1e-2), resume=True, progress=False)
    assert [h["epoch"] for h in res2["history"]] == list(range(1, 6))


def test_fine_tune_from_init_with_frozen_stem(tmp_path):
    train = [blob_study(s) for s in range(2)]
    base = tmp_path / "base.safetensors"
    train_model(train, [], base, PREP, NET, _cfg(epochs=1, samples_per_epoch=16), progress=False)
    before, _ = load_checkpoint(base)
    out = tmp_path / "ft.safetensors"
    train_model(train, [], out, PREP, None, _cfg(epochs=1, samples_per_epoch=16, freeze=["stem"]), init=base, progress=False)
    after, meta = load_checkpoint(out)
    assert meta["init"]["checkpoint"] == str(base)
    sb, sa = before.state_dict(), after.state_dict()
    assert all(torch.equal(sb[k], sa[k]) for k in sb if ".stem." in k)
    assert any(not torch.equal(sb[k], sa[k]) for k in sb if ".stage1." in k)
    with pytest.raises(ValueError):
        train_model(train, [], tmp_path / "x.safetensors", PREP, None, _cfg(epochs=1, freeze=["nope"]),
                    init=base, progress=False)


def test_augment_keeps_shapes_and_binary_labels():
    s = blob_study(0)
    x = torch.from_numpy(np.stack([s.stack(3)[..., :32, :32]] * 4))
    y = torch.from_numpy(s.labels[3:4, :32, :32].astype(np.float32))[None].repeat(4, 1, 1, 1)
    xa, ya = augment(x, y, _cfg(), torch.Generator().manual_seed(0))
    assert xa.shape == x.shape and ya.shape == y.shape
    assert set(torch.unique(ya).tolist()) <= {0.0, 1.0}
    assert xa[:, 1].min() >= -1 and xa[:, 1].max() <= 1


def test_prefetched_batches_match_inline_draws():
    studies = [blob_study(s) for s in range(3)]
    cfg = _cfg()
    inline = PatchSampler(studies, cfg, np.random.default_rng(7))
    expected = [inline.batch(4) for _ in range(5)]
    prefetch = BatchPrefetcher(PatchSampler(studies, cfg, np.random.default_rng(7)), 4, 5, depth=2)
    try:
        got = [prefetch.next() for _ in range(5)]
    finally:
        prefetch.close()
    for (xe, ye), (xg, yg) in zip(expected, got, strict=True):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)
        assert xg.dtype == torch.float32 and xg.shape == (4, 2, 3, 32, 32)


def test_prefetcher_passes_sampler_errors_to_the_trainer():
    class Broken:
        def batch(self, size):
            raise RuntimeError("sampler broke")

    prefetch = BatchPrefetcher(Broken(), 4, 3, depth=1)
    with pytest.raises(RuntimeError, match="sampler broke"):
        prefetch.next()
    prefetch.close()


def test_cuda_device_refused_clearly_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from model.device import DeviceError

    with pytest.raises(DeviceError, match="CUDA is not available"):
        train_model([blob_study(0)], [], tmp_path / "m.safetensors", PREP, NET, _cfg(device="cuda"), progress=False)
