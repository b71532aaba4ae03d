"""``igtv-node train`` end to end on small synthetic DICOM studies, and the evaluation path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint, metadata_path
from model.errors import CheckpointError
from model.preprocessing import Preprocessing
from model.refiner import LesionRefiner, save_refiner
from model.train import StudySamples
from pipeline.errors import LabelError, PipelineError
from pipeline.training import (
    TrainRequest,
    cached_samples,
    delivered_dice_scorer,
    find_studies,
    load_samples,
    run_training,
    save_samples,
    split_studies,
)

TINY = {"widths": [4, 8, 8, 8], "d_state": 4}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_delivered_dice_keeps_the_largest_lesion_and_outlines_it_at_half():
    labels = np.zeros((6, 32, 32), dtype=np.uint8)
    labels[1:5, 8:16, 8:16] = 1
    study = StudySamples("s", np.zeros((8, 2, 32, 32), np.float16), labels, (3.0, 2.0))
    prob = np.zeros(labels.shape, dtype=np.float32)
    prob[1:5, 8:16, 8:16] = 0.9
    prob[1:5, 6:8, 8:16] = 0.4  # a rim found at 0.35 but outside the outline at 0.5
    prob[1:4, 22:30, 22:30] = 0.9  # a smaller false lesion, dropped by keep-one (largest)
    score = delivered_dice_scorer()(prob, study)
    assert score == pytest.approx(1.0)
    from model.metrics import dice

    assert dice(prob >= 0.5, labels) < 0.9  # what the raw whole-crop Dice sees
    assert delivered_dice_scorer(threshold=0.95)(prob, study) == 0.0  # nothing found


def test_split_is_deterministic_and_by_study():
    uids = [f"1.2.{i}" for i in range(10)]
    a = split_studies(uids, 0.2, seed=3)
    assert a == split_studies(list(reversed(uids)), 0.2, seed=3)
    train, val = a
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == sorted(uids)
    assert split_studies(uids[:1], 0.5, 0) == (uids[:1], [])


def test_samples_from_dicom_match_the_label_and_cache_without_pickle(small_study, tmp_path):
    prep = Preprocessing(slices=3)
    refs = find_studies([small_study])
    assert len(refs) == 1 and {s.modality for s in refs[0].series} >= {"CT", "PT", "SEG"}
    (s,) = cached_samples(refs, ["IGTV"], prep, tmp_path)
    assert s.k == 3 and s.planes.shape[1] == 2 and s.labels.any()
    # the target is PET-hot: mean PET inside the label is well above the mean elsewhere
    centre_pet = s.planes[1:-1, 0].astype(np.float32)
    assert centre_pet[s.labels > 0].mean() > 2 * centre_pet[s.labels == 0].mean()
    (path,) = list(tmp_path.glob("*.npz"))
    with np.load(path, allow_pickle=False) as z:
        assert z["planes"].dtype == np.float16
    again = load_samples(path)
    assert np.array_equal(again.labels, s.labels)
    # GTV labels differ from IGTV labels in a breathing study (IGTV is the envelope)
    (g,) = cached_samples(refs, ["GTV"], prep, tmp_path)
    assert g.labels.sum() < s.labels.sum()
    with pytest.raises(LabelError):
        cached_samples(refs, ["Heart"], prep, tmp_path)
    save_samples(tmp_path / "x.npz", s)
    assert load_samples(tmp_path / "x.npz").spacing_mm == s.spacing_mm


def test_stepped_samples_are_the_inference_stacks(small_study, tmp_path):
    """Training sees exactly what inference builds, also with slices two CT slices apart."""
    from pipeline import geometry, reader, selection, stacks, suv

    prep = Preprocessing(slices=3, slice_step=2)
    refs = find_studies([small_study])
    (s,) = cached_samples(refs, ["IGTV"], prep, tmp_path)
    (plain,) = cached_samples(refs, ["IGTV"], Preprocessing(slices=3), tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2  # cached apart
    assert (s.k, s.slice_step) == (3, 2) and load_samples(next(tmp_path.glob("*.npz"))).slice_step in (1, 2)
    np.testing.assert_array_equal(s.labels, plain.labels)
    chosen = selection.select_pet_ct(refs[0].series)
    ct = reader.load_volume(chosen.ct)
    pet_on_ct, _ = geometry.pet_onto_ct(suv.to_suv(reader.load_volume(chosen.pet)), ct)
    inputs = stacks.build_stacks(ct, pet_on_ct, prep).inputs
    assert stacks.build_stacks(ct, pet_on_ct, prep).canonical.z_superior  # else samples are stored reversed
    for i in (0, len(s.labels) // 2, len(s.labels) - 1):
        np.testing.assert_allclose(s.stack(i), inputs[i], atol=2e-3)  # float16 cache
    with pytest.raises(PipelineError, match="slice step must be a positive"):
        run_training(TrainRequest(data=[small_study], out=tmp_path / "x.safetensors", roi_names=["IGTV"],
                                  slice_step=0, progress=False))
    save_refiner(LesionRefiner(), tmp_path / "old.safetensors", {}, network_sha256="ab" * 32)
    with pytest.raises(CheckpointError, match="old.refiner.safetensors beside it .* write the new network"):
        run_training(TrainRequest(data=[small_study], out=tmp_path / "old.safetensors", roi_names=["IGTV"],
                                  progress=False))


def test_area_and_majority_labels_are_cached_apart_and_agree(small_study, tmp_path):
    prep = Preprocessing(slices=3)
    refs = find_studies([small_study])
    (area,) = cached_samples(refs, ["IGTV"], prep, tmp_path, labels="area")
    (major,) = cached_samples(refs, ["IGTV"], prep, tmp_path, labels="majority")
    assert len(list(tmp_path.glob("*.npz"))) == 2  # one cache file per label mode
    assert area.labels.dtype == np.float16 and major.labels.dtype == np.uint8
    assert area.labels.min() >= 0 and area.labels.max() <= 1
    assert ((area.labels > 0) & (area.labels < 1)).any()
    # same target: the area labels' volume matches the majority labels' to a few per cent,
    # and their >= 0.5 part is the majority mask up to boundary pixels
    assert float(area.labels.astype(np.float64).sum()) == pytest.approx(float(major.labels.sum()), rel=0.05)
    agree = 2 * (area.target() & (major.labels > 0)).sum() / (area.target().sum() + major.labels.sum())
    assert agree > 0.9
    path = next(p for p in tmp_path.glob("*.npz") if load_samples(p).labels.dtype == np.float16)
    assert np.array_equal(load_samples(path).labels, area.labels)
    with pytest.raises(PipelineError, match="label mode"):
        run_training(TrainRequest(data=[small_study], out=tmp_path / "x.safetensors", roi_names=["IGTV"],
                                  labels="soft", progress=False))
    with pytest.raises(PipelineError, match="envelope weight must be at least 1"):
        run_training(TrainRequest(data=[small_study], out=tmp_path / "x.safetensors", roi_names=["IGTV"],
                                  envelope_weight=0.0, progress=False))
    with pytest.raises(PipelineError, match="misregistration shift must be 0"):
        run_training(TrainRequest(data=[small_study], out=tmp_path / "x.safetensors", roi_names=["IGTV"],
                                  misregister_px=-1.0, progress=False))


def test_run_training_writes_checkpoint_and_fine_tunes(synthetic_study_factory, tmp_path):
    studies = [synthetic_study_factory(seed, motion="static") for seed in (11, 12)]
    base = tmp_path / "gtv.safetensors"
    req = TrainRequest(data=studies, out=base, roi_names=["GTV"], epochs=1, seed=5, cache=tmp_path / "cache",
                       val_fraction=0.5, samples_per_epoch=8, batch_size=4, threads=1, architecture=TINY,
                       slices=3, progress=False)
    res = run_training(req)
    assert res["history"][0]["val_cases"] == 1
    model, meta = load_checkpoint(base)
    assert meta["training_data"]["train_studies"] == 1 and meta["training_data"]["label_names"] == ["GTV"]
    assert meta["preprocessing"]["slices"] == 3 and meta["seed"] == 5
    ft = tmp_path / "igtv.safetensors"
    run_training(TrainRequest(data=studies, out=ft, roi_names=["IGTV"], init=base, freeze=["stem"], epochs=1,
                              seed=6, cache=tmp_path / "cache", val_fraction=0.5, samples_per_epoch=8,
                              batch_size=4, threads=1, envelope_weight=2.0, misregister_px=0.0, slice_step=2,
                              progress=False))
    meta_ft = json.loads(metadata_path(ft).read_text())
    assert meta_ft["preprocessing"]["slices"] == 3 and meta_ft["preprocessing"]["slice_step"] == 2
    assert meta_ft["init"]["version"] == meta["version"] and meta_ft["training"]["freeze"] == ["stem"]
    assert meta_ft["training"]["envelope_weight"] == 2.0 and meta_ft["training"]["misregister_px"] == 0.0
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4  # 2 studies x (GTV, IGTV)
    assert meta_ft["best_epoch_by"] == "val_node_dice" and "val_node_dice" in meta_ft["metrics"]
    with pytest.raises(PipelineError, match="epoch selection"):
        run_training(TrainRequest(data=studies, out=tmp_path / "x.safetensors", roi_names=["IGTV"], init=base,
                                  select_by="best", progress=False))
