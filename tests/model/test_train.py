"""The training loop learns a toy target, keeps the best epoch, resumes, freezes and fine-tunes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from blobs import blob_study
from scipy import ndimage

from model.checkpoint import load_checkpoint, metadata_path
from model.errors import CheckpointError
from model.network import NetConfig
from model.preprocessing import Preprocessing
from model.train import (
    BatchPrefetcher,
    PatchSampler,
    StudySamples,
    TrainConfig,
    augment,
    dice_bce_loss,
    envelope_pixels,
    mine_false_positives,
    train_model,
)

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


def test_a_scorer_chooses_the_best_epoch_and_is_recorded(tmp_path):
    train = [blob_study(s) for s in range(2)]
    val = [blob_study(100 + s) for s in range(2)]
    calls = []

    def scorer(prob, study):  # prefers epoch 2 of 3, whatever the raw Dice says
        calls.append(prob.shape == study.labels.shape)
        epoch = (len(calls) - 1) // len(val) + 1
        return {1: 0.2, 2: 0.9, 3: 0.5}[epoch]

    out = tmp_path / "m.safetensors"
    res = train_model(train, val, out, PREP, NET, _cfg(epochs=3, samples_per_epoch=16), progress=False, scorer=scorer)
    assert all(calls) and len(calls) == 3 * len(val)
    assert [h["val_node_dice"] for h in res["history"]] == pytest.approx([0.2, 0.9, 0.5])
    assert res["best"]["epoch"] == 2 and res["best_by"] == "val_node_dice"
    meta = json.loads(metadata_path(out).read_text())
    assert meta["metrics"]["best_epoch"] == 2 and meta["best_epoch_by"] == "val_node_dice"
    # resuming recomputes the best so far by the same criterion: epoch 4 must beat 0.9 to be kept
    res2 = train_model(train, val, out, PREP, NET, _cfg(epochs=4, samples_per_epoch=16), resume=True,
                       progress=False, scorer=lambda prob, study: 0.8)
    assert res2["best"]["epoch"] == 2 and json.loads(metadata_path(out).read_text())["metrics"]["best_epoch"] == 2


def test_stepped_samples_take_every_other_plane_and_train(tmp_path):
    def stepped(seed):
        s = blob_study(seed, k=5)  # 5 planes per stack = K 3 with a step of 2
        return StudySamples(s.name, s.planes, s.labels, s.spacing_mm, slice_step=2)

    study = stepped(0)
    assert (study.k, study.span) == (3, 5)
    np.testing.assert_array_equal(study.stack(2), np.moveaxis(study.planes[[2, 4, 6]], 0, 1))
    with pytest.raises(ValueError, match="2 apart"):
        StudySamples("odd", study.planes[:-1], study.labels, slice_step=2)  # 4 planes per stack
    prep = Preprocessing(slices=3, slice_step=2)
    out = tmp_path / "m.safetensors"
    res = train_model([stepped(s) for s in range(4)], [stepped(100), stepped(101)], out, prep, NET,
                      _cfg(epochs=4, samples_per_epoch=96, lr=1e-2), progress=False)
    assert res["best"]["val_dice"] > 0.5
    assert json.loads(metadata_path(out).read_text())["preprocessing"]["slice_step"] == 2
    with pytest.raises(ValueError, match="slice step 1, expected K=3 with slice step 2"):
        train_model([blob_study(0)], [], tmp_path / "x.safetensors", prep, NET, _cfg(epochs=1), progress=False)


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
    with pytest.raises(CheckpointError, match="beyond the slice step"):  # only the slice step may change
        train_model(train, [], tmp_path / "x.safetensors", Preprocessing(slices=3, pixel_spacing_mm=1.5), None,
                    _cfg(epochs=1), init=base, progress=False)


def test_augment_keeps_shapes_and_binary_labels():
    s = blob_study(0)
    x = torch.from_numpy(np.stack([s.stack(3)[..., :32, :32]] * 4))
    y = torch.from_numpy(s.labels[3:4, :32, :32].astype(np.float32))[None].repeat(4, 1, 1, 1)
    xa, ya = augment(x, y, _cfg(), torch.Generator().manual_seed(0))
    assert xa.shape == x.shape and ya.shape == y.shape
    assert set(torch.unique(ya).tolist()) <= {0.0, 1.0}
    assert xa[:, 1].min() >= -1 and xa[:, 1].max() <= 1


def _area_blob(seed: int) -> StudySamples:
    """A blob study whose labels are area fractions: 0.6 inside, 0.3 on a one-pixel rim."""
    s = blob_study(seed)
    inside = s.labels.astype(bool)
    rim = ndimage.binary_dilation(inside, structure=np.ones((1, 3, 3), bool)) & ~inside
    soft = np.where(inside, 0.6, np.where(rim, 0.3, 0.0)).astype(np.float16)
    return StudySamples(s.name, s.planes, soft, s.spacing_mm)


def test_area_labels_stay_fractions_through_augmentation():
    s = _area_blob(0)
    x = torch.from_numpy(np.stack([s.stack(3)[..., :32, :32]] * 4))
    y = torch.from_numpy(s.labels[3:4, :32, :32].astype(np.float32))[None].repeat(4, 1, 1, 1)
    _, ya = augment(x, y, _cfg(labels="area"), torch.Generator().manual_seed(0))
    assert ya.min() >= 0 and ya.max() <= 0.6 + 1e-3  # 0.6 as float16
    assert ((ya > 0.05) & (ya < 0.55)).any()  # fractions, not a thresholded mask
    # without any geometric change the soft label comes through unchanged
    still = _cfg(labels="area", flip_lr=0.0, rotate_deg=0.0, scale=0.0)
    _, ys = augment(x, y, still, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ys, y, atol=1e-5, rtol=0)
    # the same labels under majority mode are thresholded: 0.6 -> 1, 0.3 -> 0
    _, ym = augment(x, y, _cfg(labels="majority", flip_lr=0.0, rotate_deg=0.0, scale=0.0),
                    torch.Generator().manual_seed(0))
    torch.testing.assert_close(ym, (y > 0.5).float())


def test_area_labels_centre_target_patches_on_pixels_at_least_half_covered():
    studies = [_area_blob(s) for s in range(2)]
    sampler = PatchSampler(studies, _cfg(labels="area", target_fraction=1.0, patch=16), np.random.default_rng(3))
    for s, pos in zip(studies, sampler.positive, strict=True):
        assert pos.tolist() == np.flatnonzero(s.target().any(axis=(1, 2))).tolist()
    drawn = [sampler.draw()[1] for _ in range(20)]
    assert all(y.max() == pytest.approx(0.6, abs=1e-3) for y in drawn)  # every target patch holds target


def test_training_on_area_labels_learns_and_refuses_unknown_modes(tmp_path):
    train = [_area_blob(s) for s in range(4)]
    val = [_area_blob(100 + s) for s in range(2)]
    res = train_model(train, val, tmp_path / "a.safetensors", PREP, NET,
                      _cfg(epochs=3, samples_per_epoch=96, lr=1e-2, labels="area"), progress=False)
    assert res["best"]["val_dice"] > 0.5
    _, meta = load_checkpoint(tmp_path / "a.safetensors")
    assert meta["training"]["labels"] == "area"
    with pytest.raises(ValueError, match="label mode"):
        train_model(train, [], tmp_path / "b.safetensors", PREP, NET, _cfg(epochs=1, labels="soft"), progress=False)


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


def _patches(sizes, size=32):
    """(len(sizes), 1, size, size) targets with a square of side s in each patch (0 = none)."""
    y = torch.zeros(len(sizes), 1, size, size)
    for b, side in enumerate(sizes):
        y[b, 0, :side, :side] = 1
    return y


def test_sample_dice_weighs_a_small_target_like_a_large_one():
    y = _patches([2, 20, 0])
    # perfect on the large target, the small one missed, the empty patch clean
    logits = torch.where(y > 0, 10.0, -10.0)
    logits[0] = -10.0
    dice_only = dict(bce_weight=0.0, dice_weight=1.0)
    batch = float(dice_bce_loss(logits, y, TrainConfig(dice="batch", **dice_only)))
    sample = float(dice_bce_loss(logits, y, TrainConfig(dice="sample", **dice_only)))
    assert batch < 0.01  # 4 of 404 target pixels missed: barely visible to the batch Dice
    # the mean over the two target patches: the missed one scores 1 - 1/(4 + 1) (smoothing 1)
    assert sample == pytest.approx(0.5 * (1 - 1 / 5), abs=0.01)
    # an all-background batch: sample Dice adds nothing, BCE still counts
    empty = _patches([0, 0])
    assert float(dice_bce_loss(torch.full_like(empty, -10.0), empty, TrainConfig(dice="sample"))) < 1e-3
    with pytest.raises(ValueError, match="Dice mode"):
        dice_bce_loss(logits, y, TrainConfig(dice="nope"))


def test_envelope_pixels_are_target_where_the_centre_ct_shows_lung():
    x = torch.zeros(1, 2, 3, 4, 4)
    x[:, 1] = 0.2  # soft tissue everywhere...
    x[0, 1, 1, 0, :] = -0.8  # ...except one row of the centre slice (lung)
    x[0, 1, 0, 1, :] = -0.8  # lung in a neighbour slice does not count
    y = torch.zeros(1, 1, 4, 4)
    y[0, 0, :2, :2] = 1
    env = envelope_pixels(x, y, ct_below=-0.3)
    assert env.shape == y.shape
    assert env[0, 0].nonzero().tolist() == [[0, 0], [0, 1]]


def test_pixel_weights_scale_bce_only_where_given():
    y = _patches([4, 0], size=8)
    logits = torch.zeros_like(y)  # p = 0.5 everywhere: BCE ln 2 per pixel
    cfg = TrainConfig(bce_weight=1.0, dice_weight=0.0)
    plain = float(dice_bce_loss(logits, y, cfg))
    weight = torch.ones_like(y)
    weight[0, 0, 0, 0] = 3.0  # one of 128 pixels counts three times
    weighted = float(dice_bce_loss(logits, y, cfg, weight))
    assert plain == pytest.approx(np.log(2), rel=1e-5)
    assert weighted == pytest.approx(np.log(2) * (128 + 2) / 128, rel=1e-5)


def _moving_blob(seed: int) -> StudySamples:
    """A blob whose CT shows only the upper half of the target (the rest: the motion envelope)."""
    s = blob_study(seed)
    h = s.k // 2
    target = np.pad(s.labels.astype(bool), ((h, h), (0, 0), (0, 0)))
    centre_row = np.argwhere(target)[:, 1].mean()
    lower = target & (np.arange(target.shape[1])[None, :, None] > centre_row)
    s.planes[:, 1][lower] = -0.7
    return s


def test_training_with_envelope_weight_learns_and_refuses_weights_below_one(tmp_path, monkeypatch):
    import model.train as train_module

    weights = []
    original = train_module.dice_bce_loss

    def recording(logits, target, cfg, weight=None):
        weights.append(None if weight is None else float(weight.max()))
        return original(logits, target, cfg, weight)

    monkeypatch.setattr(train_module, "dice_bce_loss", recording)
    train = [_moving_blob(s) for s in range(4)]
    val = [_moving_blob(100 + s) for s in range(2)]
    res = train_model(train, val, tmp_path / "e.safetensors", PREP, NET,
                      _cfg(epochs=3, samples_per_epoch=96, lr=1e-2, envelope_weight=3.0), progress=False)
    assert res["best"]["val_dice"] > 0.5
    assert weights and all(w is not None for w in weights) and max(weights) == 3.0
    _, meta = load_checkpoint(tmp_path / "e.safetensors")
    assert meta["training"]["envelope_weight"] == 3.0
    with pytest.raises(ValueError, match="envelope_weight"):
        train_model(train, [], tmp_path / "b.safetensors", PREP, NET, _cfg(epochs=1, envelope_weight=0.5),
                    progress=False)


def test_mining_finds_false_positives_away_from_the_target(monkeypatch):
    import model.train as train_module

    study = blob_study(3)
    probs = study.labels.astype(np.float32) * 0.9  # the target itself, found
    probs[4, 5:8, 5:8] = 0.8  # a false positive far from the blob
    ys, xs = np.nonzero(study.labels[4])
    probs[4, ys.min() - 1, xs.min()] = 0.9  # a boundary error next to the target: not mined
    monkeypatch.setattr(train_module, "predict_study", lambda model, s: probs)
    model = torch.nn.Linear(1, 1)
    mined = mine_false_positives(model, [study], threshold=0.5, margin_px=2)
    assert len(mined) == 1 and mined[0].shape == (9, 3)
    assert {tuple(r) for r in mined[0]} == {(4, y, x) for y in range(5, 8) for x in range(5, 8)}
    capped = mine_false_positives(model, [study], threshold=0.5, margin_px=2, limit=4)
    assert len(capped[0]) == 4 and {tuple(r) for r in capped[0]} <= {tuple(r) for r in mined[0]}
    assert mine_false_positives(model, [study], threshold=0.95)[0].shape == (0, 3)


def test_sampler_draws_hard_negatives_at_mined_pixels():
    studies = [blob_study(s) for s in range(2)]
    mined = [np.zeros((0, 3), np.int32), np.array([[2, 10, 11]], np.int32)]
    cfg = _cfg(target_fraction=0.0, hard_negative_fraction=1.0, mined_fraction=1.0, patch=8)
    sampler = PatchSampler(studies, cfg, np.random.default_rng(0), mined)
    expected = studies[1].planes[2 : 2 + studies[1].k, 0, 6:14, 7:15]
    for _ in range(5):
        x, y = sampler.draw()
        np.testing.assert_array_equal(x[0], expected)
        np.testing.assert_array_equal(y, studies[1].labels[2, 6:14, 7:15])


def test_training_with_mining_and_sample_dice_resumes_identically(tmp_path):
    train = [blob_study(s) for s in range(3)]
    val = [blob_study(100)]
    cfg = dict(epochs=3, samples_per_epoch=32, dice="sample", mine_every=2, mine_threshold=0.3)
    whole = train_model(train, val, tmp_path / "a.safetensors", PREP, NET, _cfg(**cfg), progress=False)
    assert (tmp_path / "a.mined.npz").is_file()

    def stop_after_one(epoch, metrics):  # epoch 2 then reuses epoch 1's mining from disk
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_model(train, val, tmp_path / "b.safetensors", PREP, NET, _cfg(**cfg), progress=False,
                    on_epoch=stop_after_one)
    resumed = train_model(train, val, tmp_path / "b.safetensors", PREP, NET, _cfg(**cfg), resume=True, progress=False)
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in whole["history"]], rel=1e-5)
