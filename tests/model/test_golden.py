"""Golden output: the shipped checkpoint segments a fixed synthetic study (never used in training).

A broken network, checkpoint or preprocessing change makes this fail. It runs
the real path (DICOM -> SUV -> stacks -> model -> CT grid -> post-processing).
"""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import shipped_checkpoint_path
from model.metrics import dice

GOLDEN_SEED = 424242  # not among the training (1000-1095, 2000-2255) or selection/evaluation (3000-3147, 9000-9015) seeds


@pytest.mark.slow
def test_shipped_checkpoint_on_fixed_study(synthetic_study_factory):
    assert shipped_checkpoint_path().is_file(), "the shipped checkpoint is missing from model/weights/"
    from model.predict import Predictor
    from pipeline.evaluation import load_case, predict_case
    from pipeline.training import find_studies

    torch.set_num_threads(2)
    # a mid-sized (30 mm) moving tumour, no distracting nodes: a regression check, not a benchmark
    study = synthetic_study_factory(GOLDEN_SEED, motion="breathing", small=False, lymph_nodes=False, diameter_mm=30.0)
    (ref,) = find_studies([study])
    case = load_case(ref, ["IGTV"])
    predictor = Predictor.load()
    assert predictor.refiner is not None, "the shipped lesion refiner is missing beside the checkpoint"
    pred = predict_case(case, predictor)  # the node's path: network, refiner, post-processing
    assert dice(pred, case.truth) >= 0.8
