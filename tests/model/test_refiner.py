"""The lesion refiner: crops, what it refuses, and its safetensors files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.errors import CheckpointError
from model.refiner import (
    CROP,
    FILL,
    LesionRefiner,
    RefinerEnsemble,
    augmented,
    crop_around,
    fit,
    load_refiner,
    refiner_loss,
    refiner_path,
    save_refiner,
)

#: The weights digest of the (imagined) network the refiners here learned from.
NETWORK = "ab" * 32


def _volume(n=40, h=64, w=64, seed=0):
    rng = np.random.default_rng(seed)
    volume = rng.random((n, 3, h, w), dtype=np.float32)
    return volume


def test_crop_is_padded_where_the_volume_ends():
    volume = _volume()
    crop, (src, dst) = crop_around(volume, [2.0, 5.0, 60.0], CROP)
    assert crop.shape == (3, *CROP)
    assert np.array_equal(crop[:, dst[0], dst[1], dst[2]], np.moveaxis(volume[src[0], :, src[1], src[2]], 1, 0))
    outside = np.ones(CROP, bool)
    outside[dst] = False
    for channel, fill in enumerate(FILL):
        assert np.all(crop[channel][outside] == fill)


def test_refine_returns_crop_probabilities_and_the_region():
    torch.manual_seed(0)
    refiner = LesionRefiner().eval()
    volume = _volume()
    lesion = np.zeros((40, 64, 64), bool)
    lesion[18:22, 30:36, 28:33] = True
    prob, region = refiner.refine(volume, lesion)
    assert prob.shape == lesion.shape and prob.dtype == np.float32
    inside = np.zeros_like(lesion)
    inside[region] = True
    assert inside[lesion].all() and not prob[~inside].any()
    assert ((prob[inside] > 0) & (prob[inside] < 1)).all()


def test_refine_leaves_empty_and_too_large_lesions():
    refiner = LesionRefiner().eval()
    volume = _volume()
    assert refiner.refine(volume, np.zeros((40, 64, 64), bool)) is None
    large = np.zeros((40, 64, 64), bool)
    large[5:35, 20:30, 20:30] = True  # 30 slices: more than the crop's 32 minus the margin
    assert refiner.refine(volume, large) is None


def test_an_untrained_refiner_keeps_the_input_probability_as_its_prior():
    refiner = LesionRefiner().eval()
    for p in refiner.head.parameters():
        torch.nn.init.zeros_(p)  # no correction: the output is the input probability
    x = torch.rand(1, 3, *CROP) * 0.98 + 0.01
    assert torch.allclose(torch.sigmoid(refiner(x))[0, 0], x[0, 2], atol=1e-5)


def test_save_and_load_beside_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    refiner = LesionRefiner()
    checkpoint = tmp_path / "net.safetensors"
    assert load_refiner(checkpoint, network_sha256=NETWORK) is None  # a checkpoint without a refiner
    path = save_refiner(refiner, checkpoint, {"best_epoch": 3}, network_sha256=NETWORK)
    assert path == refiner_path(checkpoint) == tmp_path / "net.refiner.safetensors"
    assert json.loads((tmp_path / "net.refiner.json").read_text())["best_epoch"] == 3
    loaded = load_refiner(checkpoint, network_sha256=NETWORK)
    x = torch.rand(1, 3, *CROP)
    with torch.no_grad():
        assert torch.equal(loaded(x), refiner.eval()(x))
    assert path.read_bytes()[8:9] == b"{"  # safetensors: a length, then a JSON header (no pickle)


def test_a_broken_refiner_is_refused_with_its_path(tmp_path):
    checkpoint = tmp_path / "net.safetensors"
    save_refiner(LesionRefiner(), checkpoint, {}, network_sha256=NETWORK)
    meta = tmp_path / "net.refiner.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "widths": [4, 8, 16]}))
    with pytest.raises(CheckpointError, match="net.refiner.safetensors: weights do not fit"):
        load_refiner(checkpoint, network_sha256=NETWORK)
    meta.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_refiner(checkpoint, network_sha256=NETWORK)
    save_refiner(LesionRefiner(), checkpoint, {}, network_sha256=NETWORK)
    (tmp_path / "net.refiner.safetensors").write_bytes(b"not weights")  # readable metadata, broken weights
    with pytest.raises(CheckpointError, match="net.refiner.safetensors: weights do not fit"):
        load_refiner(checkpoint, network_sha256=NETWORK)


def test_a_refiner_is_refused_beside_a_network_it_did_not_learn_from(tmp_path):
    checkpoint = tmp_path / "net.safetensors"
    save_refiner(LesionRefiner(), checkpoint, {}, network_sha256=NETWORK)
    with pytest.raises(CheckpointError, match="learned from the network abababab, not from this checkpoint's network "
                                              "cdcdcdcd: it belongs to another model"):
        load_refiner(checkpoint, network_sha256="cd" * 32)
    meta = tmp_path / "net.refiner.json"
    record = json.loads(meta.read_text())
    del record["network_sha256"]
    meta.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="learned from no named network"):
        load_refiner(checkpoint, network_sha256=NETWORK)


def test_the_training_loss_ignores_the_padding_outside_the_mask():
    torch.manual_seed(3)
    logits, target = torch.randn(2, 1, 4, 6, 6), (torch.rand(2, 1, 4, 6, 6) > 0.5).float()
    pad = (0, 3, 0, 2)  # x and y padded at their far ends
    padded_logits = torch.nn.functional.pad(logits, pad, value=5.0)
    padded_target = torch.nn.functional.pad(target, pad, value=0.0)
    mask = torch.nn.functional.pad(torch.ones_like(target), pad, value=0.0)
    assert torch.allclose(refiner_loss(padded_logits, padded_target, mask), refiner_loss(logits, target), atol=1e-6)
    assert not torch.allclose(refiner_loss(padded_logits, padded_target), refiner_loss(logits, target), atol=1e-3)


def test_augmentation_flips_input_and_labels_together_and_scales_only_the_pet():
    x = np.random.default_rng(0).random((3, 4, 6, 8), dtype=np.float32) + 0.5
    label = np.random.default_rng(1).random((4, 6, 8)) > 0.5
    original = x.copy()
    seen = set()
    for seed in range(16):
        ax, (al,) = augmented(x, [label], np.random.default_rng(seed))
        (axes,) = [a for a in ((), (1,), (2,), (1, 2)) if np.array_equal(ax[2], np.flip(x[2], a))]
        seen.add(axes)
        assert np.array_equal(ax[1], np.flip(x[1], axes)) and np.array_equal(al, np.flip(label, axes))
        gain = ax[0] / np.flip(x[0], axes)
        assert np.allclose(gain, gain.flat[0]) and 0.9 <= gain.flat[0] <= 1.1
    assert len(seen) == 4  # every flip combination occurs
    assert np.array_equal(x, original)  # the input is left alone


def _fitted(seed: int, epochs: int = 3) -> tuple[LesionRefiner, list[tuple[int, float, bool]]]:
    """A tiny refiner fitted to a bright cube; the calls its after-epoch callback saw."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, calls = LesionRefiner((2, 4, 8), (8, 16, 16)), []
    target = np.zeros((8, 16, 16), np.float32)
    target[2:6, 4:12, 4:12] = 1.0

    def sample(j: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(0, 0.1, (3, 8, 16, 16)).astype(np.float32)
        x[0] += target
        return x, target

    fit(model, sample, 8, epochs, 1e-2, 0.1, rng,
        lambda epoch, loss, seconds: calls.append((epoch, loss, model.training)), batch=2)
    return model, calls


def test_fit_trains_reproducibly_and_reports_every_epoch_in_eval_mode():
    model, calls = _fitted(3)
    assert [c[0] for c in calls] == [1, 2, 3] and not any(c[2] for c in calls)
    assert calls[-1][1] < calls[0][1]  # the loss falls
    again, _ = _fitted(3)
    other, _ = _fitted(4)
    same = [torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)]
    assert all(same)
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(),
                                                     strict=True))


def _members(n=3, **kwargs):
    members = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = LesionRefiner((4, 8, 8), (16, 24, 24), **kwargs)
        torch.nn.init.normal_(model.head.weight)
        members.append(model.eval())
    return members


def test_an_ensemble_averages_its_members_logits_and_refines_like_one_refiner():
    members = _members()
    ensemble = RefinerEnsemble(members).eval()
    x = torch.rand(1, 3, 16, 24, 24)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in members]).mean(0)
        assert torch.allclose(ensemble(x), expected, atol=1e-6)
        assert not torch.allclose(ensemble(x), members[0](x), atol=1e-3)
    volume = _volume(n=20, h=32, w=32)
    lesion = np.zeros((20, 32, 32), bool)
    lesion[8:11, 12:16, 12:16] = True
    probs, region = ensemble.refine(volume, lesion)
    single, single_region = members[0].refine(volume, lesion)
    assert probs.shape == lesion.shape and region == single_region  # the same crop as one refiner
    assert probs[region].min() > 0 and not np.allclose(probs, single, atol=1e-3)


def test_an_ensemble_refuses_members_of_different_configurations():
    with pytest.raises(ValueError, match="share"):
        RefinerEnsemble(_members(1) + _members(1, inputs=4))
    with pytest.raises(ValueError, match="at least one"):
        RefinerEnsemble([])


def test_an_ensemble_is_saved_as_one_file_and_loads_as_an_ensemble(tmp_path):
    ensemble = RefinerEnsemble(_members(2, inputs=4, box_margin=(6, 12, 12))).eval()
    checkpoint = tmp_path / "net.safetensors"
    save_refiner(ensemble, checkpoint, {"member_seeds": [0, 1]}, network_sha256=NETWORK, kind="outline")
    meta = json.loads((tmp_path / "net.outline.json").read_text())
    assert meta["members"] == 2 and meta["inputs"] == 4 and meta["box_margin"] == [6, 12, 12]
    loaded = load_refiner(checkpoint, network_sha256=NETWORK, kind="outline")
    assert isinstance(loaded, RefinerEnsemble) and len(loaded.members) == 2
    assert loaded.inputs == 4 and loaded.box_margin == (6, 12, 12) and len(loaded.digest) == 8
    x = torch.rand(1, 4, 16, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x), ensemble(x))
    meta["members"] = 3  # more members than the weights hold
    (tmp_path / "net.outline.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_refiner(checkpoint, network_sha256=NETWORK, kind="outline")
