"""The outline refiner: its box, padding, an untrained one's output, and its files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.outline import (
    AMPLITUDE_SCALE_MM,
    KIND,
    MARGIN,
    MULTIPLE,
    POOL,
    box_margin,
    lesion_box,
    outline_crop,
    outline_refiner,
    padded,
    takes_amplitude,
    with_amplitude,
)
from model.refiner import FILL, load_refiner, refiner_path, save_refiner

#: The weights digest of the (imagined) network the refiners here learned from.
NETWORK = "ab" * 32


def test_the_box_grows_the_lesion_by_the_margin_and_stops_at_the_array():
    lesion = np.zeros((20, 30, 30), bool)
    lesion[1:4, 10:15, 25:28] = True
    assert lesion_box(lesion, (3, 8, 8)) == (slice(0, 7), slice(2, 23), slice(17, 30))
    assert lesion_box(np.zeros((4, 4, 4), bool)) is None


def test_padding_reaches_the_pooling_multiple_with_the_fill_values():
    crop = np.random.default_rng(0).random((3, 5, 13, 18), dtype=np.float32)
    out = padded(crop)
    assert out.shape == (3, 5, 16, 20) and out.shape[2] % MULTIPLE == 0 == out.shape[3] % MULTIPLE
    assert np.array_equal(out[:, :, :13, :18], crop)
    for channel, fill in enumerate(FILL):
        assert np.all(out[channel, :, 13:] == fill) and np.all(out[channel, :, :, 18:] == fill)


def test_a_new_outline_refiner_returns_its_input_probability_on_any_box():
    torch.manual_seed(0)
    model = outline_refiner().eval()
    crop = np.random.default_rng(1).random((3, 7, 21, 30), dtype=np.float32) * 0.98 + 0.01
    out = outline_crop(model, crop)
    assert out.shape == (7, 21, 30)
    assert np.allclose(out, crop[2], atol=1e-5)


def test_a_trained_outline_refiner_is_saved_and_loaded_beside_its_checkpoint(tmp_path):
    torch.manual_seed(2)
    model = outline_refiner()
    torch.nn.init.normal_(model.head.weight)  # a correction that is not zero
    checkpoint = tmp_path / "net.safetensors"
    assert load_refiner(checkpoint, network_sha256=NETWORK, kind=KIND) is None
    path = save_refiner(model, checkpoint, {"best_epoch": 4}, network_sha256=NETWORK, kind=KIND)
    assert path == refiner_path(checkpoint, KIND) == tmp_path / "net.outline.safetensors"
    assert load_refiner(checkpoint, network_sha256=NETWORK) is None  # the lesion refiner's file is another one
    meta = json.loads((tmp_path / "net.outline.json").read_text())
    assert meta["pool"] == list(POOL) and meta["best_epoch"] == 4
    loaded = load_refiner(checkpoint, network_sha256=NETWORK, kind=KIND)
    assert loaded.pool == POOL
    crop = np.random.default_rng(3).random((3, 6, 16, 24), dtype=np.float32)
    expected = outline_crop(model.eval(), crop)
    assert np.array_equal(outline_crop(loaded, crop), expected)
    assert not np.allclose(expected, crop[2], atol=1e-3)


def test_the_amplitude_channel_is_the_scaled_amplitude_everywhere():
    x = np.zeros((3, 2, 4, 4), np.float32)
    out = with_amplitude(x, 12.5)
    assert out.shape == (4, 2, 4, 4) and out.dtype == np.float32
    assert np.array_equal(out[:3], x) and np.all(out[3] == np.float32(12.5 / AMPLITUDE_SCALE_MM))


def test_an_amplitude_refiner_needs_the_amplitude_and_its_output_depends_on_it():
    torch.manual_seed(4)
    model = outline_refiner(amplitude=True)
    torch.nn.init.normal_(model.head.weight)
    model.eval()
    assert takes_amplitude(model) and not takes_amplitude(outline_refiner())
    crop = np.random.default_rng(5).random((3, 6, 16, 24), dtype=np.float32)
    with pytest.raises(ValueError, match="breathing amplitude"):
        outline_crop(model, crop)
    still, moving = outline_crop(model, crop, 0.0), outline_crop(model, crop, 20.0)
    assert still.shape == moving.shape == (6, 16, 24)
    assert not np.allclose(still, moving, atol=1e-4)


def test_inputs_and_box_margin_survive_saving_and_old_refiners_keep_the_defaults(tmp_path):
    torch.manual_seed(6)
    model = outline_refiner(amplitude=True, box_margin=(6, 12, 12))
    torch.nn.init.normal_(model.head.weight)
    checkpoint = tmp_path / "net.safetensors"
    save_refiner(model, checkpoint, {}, network_sha256=NETWORK, kind=KIND)
    meta = json.loads((tmp_path / "net.outline.json").read_text())
    assert meta["inputs"] == 4 and meta["box_margin"] == [6, 12, 12]
    loaded = load_refiner(checkpoint, network_sha256=NETWORK, kind=KIND)
    assert takes_amplitude(loaded) and box_margin(loaded) == (6, 12, 12)
    crop = np.random.default_rng(7).random((3, 5, 12, 12), dtype=np.float32)
    assert np.array_equal(outline_crop(loaded, crop, 9.0), outline_crop(model.eval(), crop, 9.0))

    plain = tmp_path / "plain.safetensors"
    save_refiner(outline_refiner(), plain, {}, network_sha256=NETWORK, kind=KIND)
    meta = json.loads((tmp_path / "plain.outline.json").read_text())
    assert "inputs" not in meta and "box_margin" not in meta  # what refiners written before them hold
    loaded = load_refiner(plain, network_sha256=NETWORK, kind=KIND)
    assert not takes_amplitude(loaded) and box_margin(loaded) == MARGIN
