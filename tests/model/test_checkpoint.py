"""Checkpoints round-trip through safetensors + JSON and never unpickle."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from model.checkpoint import (
    DEFAULT_THRESHOLD,
    load_checkpoint,
    metadata_path,
    read_metadata,
    save_checkpoint,
    save_operating_point,
    shipped_checkpoint_info,
    weights_sha256,
)
from model.errors import CheckpointError
from model.network import NetConfig, build_network
from model.outline import outline_refiner
from model.predict import Predictor
from model.preprocessing import Preprocessing
from model.refiner import LesionRefiner, save_refiner

CFG = NetConfig(slices=3, widths=(4, 8, 8, 8), d_state=4)
PREP = Preprocessing(slices=3)


def _saved(tmp_path):
    torch.manual_seed(0)
    net = build_network(CFG)
    path = save_checkpoint(tmp_path / "m.safetensors", net, {"preprocessing": PREP.to_dict(), "seed": 7,
                                                             "training_data": {"studies": 2}})
    return net, path


def _digest(path):
    return weights_sha256(path, read_metadata(path))


def test_results_carry_a_new_version_whenever_a_refiner_beside_the_checkpoint_changes(tmp_path):
    _, path = _saved(tmp_path)
    network_only = Predictor.load(path).version
    torch.manual_seed(1)
    save_refiner(LesionRefiner(), path, {}, network_sha256=_digest(path))
    with_refiner = Predictor.load(path)
    assert with_refiner.version == f"{network_only}+r{with_refiner.refiner.digest}"
    save_refiner(outline_refiner(), path, {}, network_sha256=_digest(path), kind="outline")
    first = Predictor.load(path)
    assert first.version == f"{network_only}+r{with_refiner.refiner.digest}+o{first.outline.digest}"
    retrained = outline_refiner()
    torch.nn.init.normal_(retrained.head.weight)
    save_refiner(retrained, path, {}, network_sha256=_digest(path), kind="outline")
    second = Predictor.load(path).version
    assert second != first.version and second.startswith(f"{network_only}+r")


def test_round_trip_and_predictor(tmp_path):
    net, path = _saved(tmp_path)
    net.eval()
    loaded, meta = load_checkpoint(path)
    assert meta["seed"] == 7 and meta["architecture"] == CFG.to_dict()
    x = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    pred = Predictor.load(path)
    assert pred.preprocessing == PREP and pred.version == meta["version"]
    probs = pred.predict(x.numpy(), batch_size=1)
    assert probs.shape == (2, 32, 32) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, torch.sigmoid(net(x))[:, 0].detach().numpy(), atol=1e-5)


def test_operating_point_is_written_beside_unchanged_weights(tmp_path):
    net, path = _saved(tmp_path)
    assert Predictor.load(path).threshold == DEFAULT_THRESHOLD
    out = save_operating_point(path, tmp_path / "calibrated.safetensors", 0.35, {"studies": 12})
    assert out.read_bytes() == path.read_bytes()
    meta = read_metadata(out)
    assert meta["operating_point"] == {"threshold": 0.35, "studies": 12}
    original = read_metadata(path)["version"]
    assert meta["version"] == f"{original}-t0.35" and meta["weights_version"] == original
    assert Predictor.load(out).threshold == 0.35
    save_operating_point(out, out, 0.4, {})  # in place: only the metadata changes
    again = Predictor.load(out)
    assert again.threshold == 0.4 and again.version == f"{original}-t0.4"
    assert out.read_bytes() == path.read_bytes()
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(CheckpointError, match="strictly between 0 and 1"):
            save_operating_point(path, tmp_path / "bad.safetensors", bad, {})
    assert not (tmp_path / "bad.safetensors").exists()
    save_operating_point(path, out, 0.3, {"threshold": 0.9})  # the calibration record cannot override it
    assert Predictor.load(out).threshold == 0.3


def test_a_calibrated_copy_carries_the_refiners_its_threshold_was_chosen_with(tmp_path):
    _, path = _saved(tmp_path)
    torch.manual_seed(1)
    save_refiner(LesionRefiner(), path, {}, network_sha256=_digest(path))
    save_refiner(outline_refiner(), path, {}, network_sha256=_digest(path), kind="outline")
    source = Predictor.load(path)
    out = save_operating_point(path, tmp_path / "site" / "calibrated.safetensors", 0.35, {})
    copy = Predictor.load(out)
    assert copy.refiner.digest == source.refiner.digest and copy.outline.digest == source.outline.digest
    assert copy.version == source.version.replace("+r", "-t0.35+r")
    save_operating_point(out, out, 0.3, {})  # in place: the refiners stay
    assert Predictor.load(out).outline.digest == source.outline.digest


def test_a_refiner_left_beside_a_new_network_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    save_refiner(outline_refiner(), path, {}, network_sha256=_digest(path), kind="outline")
    assert Predictor.load(path).outline is not None
    torch.manual_seed(5)
    save_checkpoint(path, build_network(CFG), {"preprocessing": PREP.to_dict()})  # a retrained network, same path
    with pytest.raises(CheckpointError, match="m.outline.safetensors learned from the network .* belongs to another"):
        Predictor.load(path)


def test_a_calibrated_copy_never_takes_a_refiner_of_another_model(tmp_path):
    _, path = _saved(tmp_path)
    out = tmp_path / "calibrated.safetensors"
    save_refiner(outline_refiner(), out, {}, network_sha256="0" * 64, kind="outline")  # left by an earlier model
    with pytest.raises(CheckpointError, match="belongs to another model"):
        save_operating_point(path, out, 0.35, {})
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("point", [{"threshold": None}, {"threshold": 5.0}, {"threshold": True}, ["0.3"]])
def test_a_hand_edited_operating_point_is_refused_when_loading(tmp_path, point):
    net, path = _saved(tmp_path)
    meta = json.loads(metadata_path(path).read_text())
    meta["operating_point"] = point
    metadata_path(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="operating_point threshold"):
        Predictor.load(path)


def test_operating_point_refuses_weights_that_do_not_match(tmp_path):
    net, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        save_operating_point(path, tmp_path / "c.safetensors", 0.3, {})


def test_pickle_payload_in_safetensors_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    _, path = _saved(tmp_path)
    path.write_bytes(pickle.dumps({"weights": Evil()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_pt_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    _, path = _saved(tmp_path)
    evil = tmp_path / "m.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    metadata_path(evil).write_text(metadata_path(path).read_text())
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError):
        Predictor.load(evil)
    assert not marker.exists()


def test_missing_or_mismatched_files(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="not found|missing"):
        load_checkpoint(tmp_path / "nope.safetensors")
    meta = json.loads(metadata_path(path).read_text())
    meta["architecture"]["widths"] = [8, 8, 8, 8]
    meta.pop("weights_sha256")
    metadata_path(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="fit"):
        load_checkpoint(path)
    _, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)
    metadata_path(path).unlink()
    with pytest.raises(CheckpointError, match="metadata"):
        load_checkpoint(path)


def test_shipped_info_is_a_line():
    info = shipped_checkpoint_info()
    assert isinstance(info, str) and "\n" not in info
    assert "threshold" in info and "calibrated on" in info  # the shipped model is calibrated


def test_summary_names_the_calibration():
    from model.checkpoint import checkpoint_summary

    meta = {"version": "v1-t0.3", "architecture": {"slices": 5}, "metrics": {"val_dice": 0.8301},
            "operating_point": {"threshold": 0.3, "studies": 48, "candidates": {"0.3": 0.8576, "0.5": 0.84},
                                "postprocessing": {"lesion_order": "volume"}}}
    assert checkpoint_summary(meta) == ("v1-t0.3 (SIM-Mamba, K=5, training validation Dice 0.830, threshold 0.3 "
                                        "calibrated on 48 studies (mean Dice 0.858) with lesion_order 'volume')")
    meta["metrics"]["val_node_dice"] = 0.8412
    assert "training validation Dice 0.830 (0.841 as delivered)," in checkpoint_summary(meta)
    bare = {"version": "v0", "architecture": {"slices": 3}, "members": [{}, {}]}
    assert checkpoint_summary(bare) == "v0 (SIM-Mamba ensemble of 2, K=3, not calibrated)"


def test_shared_planes_give_the_same_probabilities(tmp_path):
    """Whole-study inference encodes each plane once; results equal the plain path."""
    from model.predict import shared_plane_layout

    _, path = _saved(tmp_path)
    pred = Predictor.load(path)
    rng = np.random.default_rng(0)
    planes = rng.normal(size=(9, 2, 32, 32)).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(planes, 3, axis=0)  # (7, 2, 32, 32, 3)
    for inputs in (np.moveaxis(windows, -1, 2), np.moveaxis(windows, -1, 2)[:, :, ::-1]):
        assert shared_plane_layout(inputs) is not None
        fast = pred.predict(inputs, batch_size=3)
        plain = np.stack([pred.predict(np.ascontiguousarray(inputs[i : i + 1]))[0] for i in range(len(inputs))])
        np.testing.assert_allclose(fast, plain, atol=1e-5)
    shuffled = np.moveaxis(windows, -1, 2)[[0, 2, 1]]
    assert shared_plane_layout(shuffled) is None


@pytest.mark.parametrize("step", [2, 3])
def test_shared_planes_of_stepped_stacks(step):
    """Stacks whose slices are ``step`` planes apart are recognised, in either slice order."""
    from model.predict import shared_plane_layout

    planes = np.random.default_rng(step).normal(size=(12 + 2 * step, 2, 4, 4)).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(planes, 2 * step + 1, axis=0)[..., ::step]
    for inputs in (np.moveaxis(windows, -1, 2), np.moveaxis(windows, -1, 2)[:, :, ::-1]):
        shared, index = shared_plane_layout(inputs, step)
        assert len(shared) == len(planes)  # each plane once
        np.testing.assert_array_equal(np.moveaxis(shared[index], 1, 2), inputs)
        assert shared_plane_layout(inputs, 1) is None


def test_test_time_flips_average_the_flipped_passes(tmp_path):
    _, path = _saved(tmp_path)
    pred = Predictor.load(path)
    rng = np.random.default_rng(1)
    planes = rng.normal(size=(8, 2, 32, 32)).astype(np.float32)
    inputs = np.moveaxis(np.lib.stride_tricks.sliding_window_view(planes, 3, axis=0), -1, 2)  # (6, 2, 3, 32, 32)
    plain = pred.predict(inputs)
    mirrored = pred.predict(np.ascontiguousarray(inputs[..., ::-1]))[..., ::-1]
    reversed_slices = pred.predict(np.ascontiguousarray(inputs[:, :, ::-1]))
    both = pred.predict(np.ascontiguousarray(inputs[:, :, ::-1, :, ::-1]))[..., ::-1]
    np.testing.assert_allclose(pred.predict(inputs, flips="none"), plain, atol=1e-6)
    np.testing.assert_allclose(pred.predict(inputs, flips="lr"), (plain + mirrored) / 2, atol=1e-5)
    np.testing.assert_allclose(pred.predict(inputs, flips="lr+slices"),
                               (plain + mirrored + reversed_slices + both) / 4, atol=1e-5)
    assert not np.allclose(plain, mirrored, atol=1e-4)  # an untrained net is not symmetric: the flip matters
    with pytest.raises(ValueError, match="flips must be one of"):
        pred.predict(inputs, flips="ud")


def test_read_only_inputs_are_copied_not_wrapped(monkeypatch):
    net = build_network(NetConfig(slices=1, widths=(4, 8, 8, 8), d_state=4)).eval()
    pred = Predictor(net, Preprocessing(slices=1), "k1")
    inputs = np.zeros((3, 2, 1, 32, 32), np.float32)
    inputs.setflags(write=False)
    wrapped = []
    real = torch.from_numpy

    def from_numpy(array):
        wrapped.append(array.flags.writeable)
        return real(array)

    monkeypatch.setattr(torch, "from_numpy", from_numpy)
    assert pred.predict(inputs, batch_size=2).shape == (3, 32, 32)
    assert len(wrapped) >= 2 and all(wrapped)
