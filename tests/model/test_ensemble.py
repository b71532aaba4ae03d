"""Ensembles average their members' probabilities and round-trip as one checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from blobs import blob_study

from model.checkpoint import load_checkpoint, metadata_path, save_checkpoint, save_ensemble
from model.ensemble import Ensemble
from model.errors import CheckpointError
from model.network import NetConfig, build_network
from model.predict import Predictor
from model.preprocessing import Preprocessing
from model.refiner import LesionRefiner, save_refiner
from model.train import TrainConfig, train_model

CFG = NetConfig(slices=3, widths=(4, 8, 8, 8), d_state=4)
PREP = Preprocessing(slices=3)


def _member(tmp_path, seed: int, cfg: NetConfig = CFG, prep: Preprocessing = PREP):
    torch.manual_seed(seed)
    net = build_network(cfg).eval()
    with torch.no_grad():  # a non-trivial output layer, so members differ visibly
        net.refine[-1].bias.fill_(seed - 1.0)
    path = save_checkpoint(tmp_path / f"m{seed}.safetensors", net,
                           {"preprocessing": prep.to_dict(), "training_data": {"seed": seed}})
    return net, path


def test_output_is_the_mean_of_the_members_probabilities(tmp_path):
    nets = [_member(tmp_path, s)[0] for s in (1, 2, 3)]
    ens = Ensemble(nets).eval()
    x = torch.randn(2, 2, 3, 32, 32)
    with torch.inference_mode():
        expected = torch.stack([torch.sigmoid(n(x)) for n in nets]).mean(0)
        np.testing.assert_allclose(torch.sigmoid(ens(x)), expected, atol=1e-6)
        planes = torch.randn(5, 2, 32, 32)
        index = torch.tensor([[0, 1, 2], [1, 2, 3], [2, 3, 4]])
        stacks = planes[index].transpose(1, 2)
        np.testing.assert_allclose(ens.forward_planes(planes, index), ens(stacks), atol=1e-5)


def test_members_must_be_two_or_more_with_one_k():
    with pytest.raises(ValueError, match="at least two"):
        Ensemble([build_network(CFG)])
    with pytest.raises(ValueError, match="share K"):
        Ensemble([build_network(CFG), build_network(NetConfig(slices=5, widths=(4, 8, 8, 8), d_state=4))])


def test_ensemble_checkpoint_round_trips_and_predicts_the_average(tmp_path):
    p1, p2 = _member(tmp_path, 1)[1], _member(tmp_path, 2)[1]
    out = save_ensemble([p1, p2], tmp_path / "ens.safetensors", "two seeds")
    model, meta = load_checkpoint(out)
    assert isinstance(model, Ensemble) and len(model.members) == 2
    singles = [json.loads(metadata_path(p).read_text()) for p in (p1, p2)]
    assert [m["version"] for m in meta["members"]] == [s["version"] for s in singles]
    assert [m["training_data"] for m in meta["members"]] == [{"seed": 1}, {"seed": 2}]
    assert meta["training_data"]["description"] == "two seeds"
    assert meta["version"] not in {s["version"] for s in singles}
    inputs = np.random.default_rng(0).normal(size=(6, 2, 3, 32, 32)).astype(np.float32)
    mean = (Predictor.load(p1).predict(inputs) + Predictor.load(p2).predict(inputs)) / 2
    np.testing.assert_allclose(Predictor.load(out).predict(inputs), mean, atol=1e-5)


def test_bad_ensembles_are_refused_clearly(tmp_path):
    _, p1 = _member(tmp_path, 1)
    with pytest.raises(CheckpointError, match="at least two"):
        save_ensemble([p1], tmp_path / "one.safetensors")
    _, other = _member(tmp_path, 4, prep=Preprocessing(slices=3, pixel_spacing_mm=3.0))
    with pytest.raises(CheckpointError, match="preprocessing"):
        save_ensemble([p1, other], tmp_path / "mixed.safetensors")
    _, p2 = _member(tmp_path, 2)
    ens = save_ensemble([p1, p2], tmp_path / "ens.safetensors")
    with pytest.raises(CheckpointError, match="itself an ensemble"):
        save_ensemble([ens, p1], tmp_path / "nested.safetensors")
    save_refiner(LesionRefiner(), tmp_path / "old.safetensors", {}, network_sha256="ab" * 32, kind="outline")
    with pytest.raises(CheckpointError, match="old.outline.safetensors beside it learned from the network there"):
        save_ensemble([p1, p2], tmp_path / "old.safetensors")
    # metadata that names one member only, or a K the preprocessing does not have
    meta = json.loads(metadata_path(ens).read_text())
    for broken in ({**meta, "members": meta["members"][:1]},
                   {**meta, "members": [{**m, "architecture": {**m["architecture"], "slices": 5}} for m in meta["members"]]}):
        metadata_path(ens).write_text(json.dumps(broken))
        with pytest.raises(CheckpointError):
            load_checkpoint(ens)


def test_an_ensemble_is_not_fine_tuned(tmp_path):
    _, p1 = _member(tmp_path, 1)
    _, p2 = _member(tmp_path, 2)
    ens = save_ensemble([p1, p2], tmp_path / "ens.safetensors")
    with pytest.raises(CheckpointError, match="cannot be fine-tuned"):
        train_model([blob_study(0)], [], tmp_path / "ft.safetensors", PREP, None,
                    TrainConfig(epochs=1, samples_per_epoch=8, batch_size=8, patch=32), init=ens, progress=False)
