"""Train and measure the outline refiner (:mod:`model.outline`) of the shipped checkpoint.

The network and its lesion refiner outline on 2 mm pixels; the outline refiner re-outlines
the delivered lesion on the CT's own grid (PET, CT and the interpolated probability).

Usage (from the folder holding ``data/``; the ``outline`` stage of ``train_default.sh``)::

    python benchmarks/train_outline.py boxes data/outline_igtv --boxes runs/outline_boxes/train
    python benchmarks/train_outline.py boxes data/select_igtv --boxes runs/outline_boxes/select
    python benchmarks/train_outline.py train --boxes runs/outline_boxes/train \\
        --val runs/outline_boxes/select --out runs/outline.safetensors
    python benchmarks/train_outline.py ensemble --member runs/seed7/outline.safetensors \
        --member runs/seed8/outline.safetensors --val runs/outline_boxes/select --out runs/outline.safetensors
    python benchmarks/train_outline.py eval --val runs/outline_boxes/select --out runs/outline.safetensors

``boxes`` runs each labelled study through the node's path up to the CT grid (network and
lesion refiner of ``--checkpoint``, default the shipped one, without its outline refiner)
and stores, per study, the CT-grid box holding the IGTV and every voxel of probability
0.05 or more (12 voxels wider), in the canonical orientation: probability, HU, SUV and
truth. After that the study's DICOM files may go. ``train`` learns from the boxes of
``--boxes``, scores the ``--val`` boxes after each epoch (the Dice of the lesion the node
delivers, with the node's own code) and keeps the best epoch beside ``--out``
(``NAME.outline.safetensors``: copy it beside the checkpoint it refines); ``--amplitude``
gives it the lesion's breathing amplitude fitted from its PET (:mod:`pipeline.motion`),
``--box-margin`` its box, ``--seed`` its start. ``ensemble`` joins refiners trained from
different seeds into one whose logits are their mean, written beside ``--out``; ``eval``
prints the score, without and with the refiner, overall and by IGTV size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.metrics import dice  # noqa: E402
from model.outline import (  # noqa: E402
    KIND,
    PATCH,
    box_margin,
    lesion_box,
    outline_refiner,
    takes_amplitude,
    with_amplitude,
)
from model.refiner import (  # noqa: E402
    LesionRefiner,
    RefinerEnsemble,
    augmented,
    filled,
    fit,
    load_refiner,
    refiner_path,
    save_refiner,
)
from pipeline.postprocess import postprocess_with  # noqa: E402
from pipeline.refinement import lesion_amplitude, outline_in_place  # noqa: E402
from pipeline.settings import ProcessSettings  # noqa: E402
from pipeline.stacks import Canonical  # noqa: E402

#: Stored boxes are already in the canonical orientation.
IDENTITY = Canonical(transpose=False, flip_y=False, flip_x=False, z_superior=True)
#: Voxels of the stored box around the IGTV and the probable voxels.
BOX_MARGIN = (12, 12, 12)
SETTINGS = ProcessSettings()


def predictor_of(checkpoint: Path | None):
    """The node's predictor of ``checkpoint`` without its outline refiner, and its threshold."""
    from model.predict import Predictor

    predictor = Predictor.load(checkpoint)
    predictor.outline = None
    return predictor, SETTINGS.threshold_for(predictor.threshold)


def store_boxes(folders: list[str], boxes: Path, checkpoint: Path | None) -> None:
    """Each labelled study's CT-grid box (see the module doc) as ``boxes/UID.npz``; skips those stored."""
    import SimpleITK as sitk

    from pipeline import stacks
    from pipeline.evaluation import case_probabilities, load_case
    from pipeline.refinement import canonical_crop
    from pipeline.training import find_studies

    predictor, _ = predictor_of(checkpoint)
    boxes.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for i, ref in enumerate(r for r in find_studies([Path(f) for f in folders]) if r.label_series):
        path = boxes / f"{ref.study_uid}.npz"
        if path.exists():
            continue
        case = load_case(ref, ("IGTV", "ITV"))
        stackset = stacks.build_stacks(case.ct, case.pet_on_ct, predictor.preprocessing)
        prob = case_probabilities(case, predictor, SETTINGS, stackset)
        box = lesion_box(case.truth | (prob >= 0.05), BOX_MARGIN)
        arrays = {"prob": prob, "truth": case.truth, "ct": sitk.GetArrayViewFromImage(case.ct.image),
                  "suv": sitk.GetArrayViewFromImage(case.pet_on_ct)}
        crops = {k: np.ascontiguousarray(canonical_crop(stackset.canonical, v, box)) for k, v in arrays.items()}
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez_compressed(tmp, prob=crops["prob"].astype(np.float32), truth=crops["truth"].astype(bool),
                            ct=crops["ct"].astype(np.int16), suv=crops["suv"].astype(np.float32),
                            spacing=np.asarray(case.spacing_zyx), truth_total=int(case.truth.sum()))
        tmp.replace(path)
        print(f"{i + 1} studies, {time.time() - start:.0f} s", flush=True)


def load_box(path: Path) -> dict[str, np.ndarray]:
    """One stored box; refuses a box that does not hold its study's whole IGTV."""
    box = dict(np.load(path))
    if int(box["truth"].sum()) != int(box["truth_total"]):
        raise ValueError(f"{path}: the box does not hold the whole IGTV")
    return box


def training_region(box: dict[str, np.ndarray], prep, threshold: float,
                    refiner: LesionRefiner) -> tuple[np.ndarray, np.ndarray, float | None] | None:
    """Input (3, Z, Y, X), truth and breathing amplitude of the region ``refiner`` sees in ``box``.

    The amplitude is the node's fit (0 when none; None unless the refiner takes it). None
    when nothing is delivered.
    """
    spacing = tuple(float(s) for s in box["spacing"])
    lesion = postprocess_with(box["prob"], spacing, SETTINGS, threshold, suv=box["suv"]) > 0
    region = lesion_box(lesion, box_margin(refiner))
    if region is None:
        return None
    x = np.stack([prep.normalise_pet(box["suv"][region]), prep.normalise_ct(box["ct"][region]),
                  box["prob"][region]]).astype(np.float32)
    amplitude = None
    if takes_amplitude(refiner):
        fitted = lesion_amplitude(box["ct"], box["suv"], lesion, IDENTITY, spacing)
        amplitude = 0.0 if fitted is None else fitted.amplitude_mm
    return x, box["truth"][region], amplitude


def training_window(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """A random :data:`~model.outline.PATCH` window of a region (padded with the channels' fill values), its truth and loss mask."""
    lo = [int(rng.integers(0, max(1, n - p + 1))) for n, p in zip(y.shape, PATCH, strict=True)]
    window = tuple(slice(a, a + p) for a, p in zip(lo, PATCH, strict=True))
    xs, ys = x[(slice(None), *window)], y[window]
    inputs = filled(PATCH)
    truth, mask = np.zeros(PATCH, np.float32), np.zeros(PATCH, np.float32)
    inside = tuple(slice(0, n) for n in ys.shape)
    inputs[(slice(None), *inside)] = xs
    truth[inside], mask[inside] = ys, 1.0
    return inputs, truth, mask


def delivered(box: dict[str, np.ndarray], prep, refiner: LesionRefiner | None, threshold: float) -> float:
    """Dice of the lesion the node delivers from ``box``, re-outlined by ``refiner`` (None: as it comes)."""
    spacing = tuple(float(s) for s in box["spacing"])
    prob = box["prob"].copy()
    outline_in_place(prob, box["ct"], box["suv"], IDENTITY, prep, refiner, spacing, SETTINGS, threshold)
    return dice(postprocess_with(prob, spacing, SETTINGS, threshold, suv=box["suv"]) > 0, box["truth"])


def delivered_scores(paths: list[Path], threshold: float) -> list[float]:
    """:func:`delivered` without an outline refiner, for each box of ``paths``."""
    return [delivered(load_box(path), None, None, threshold) for path in paths]


def evaluate(model: LesionRefiner | None, paths: list[Path], prep, threshold: float,
             without: list[float] | None = None) -> dict:
    """Mean Dice of the delivered lesion without and with ``model``, overall and below/above 2 cc.

    ``without``: the boxes' :func:`delivered_scores` when already known.
    """
    without = delivered_scores(paths, threshold) if without is None else without
    rows = []
    for path, before in zip(paths, without, strict=True):
        box = load_box(path)
        cc = float(box["truth"].sum()) * float(np.prod(box["spacing"])) / 1000
        rows.append((path.stem, cc, before, delivered(box, prep, model, threshold)))
    a = np.asarray([r[1:] for r in rows], float)
    diff = a[:, 2] - a[:, 1]
    summary = {"studies": len(a), "delivered": a[:, 1].mean(), "outlined": a[:, 2].mean(),
               "paired_difference": diff.mean(), "paired_se": diff.std(ddof=1) / np.sqrt(len(a))}
    small = a[:, 0] < 2
    for name, part in (("below_2cc", small), ("from_2cc", ~small)):
        summary[name] = {"studies": int(part.sum()), "delivered": a[part, 1].mean(), "outlined": a[part, 2].mean()}
    return {"summary": summary, "rows": rows}


def train(boxes: list[Path], val: Path, out: Path, epochs: int, checkpoint: Path | None, seed: int = 7,
          widths: tuple[int, int, int] = (8, 16, 32), batch: int = 4, amplitude: bool = False,
          margin: tuple[int, int, int] | None = None) -> None:
    """Train on every stored box of ``boxes``, score ``val`` after each epoch, keep the best epoch.

    ``amplitude`` and ``margin``: see :func:`model.outline.outline_refiner`.
    """
    predictor, threshold = predictor_of(checkpoint)
    prep = predictor.preprocessing
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = outline_refiner(widths, amplitude=amplitude, box_margin=margin)
    paths = sorted(p for folder in boxes for p in folder.glob("*.npz") if not p.stem.endswith(".tmp"))
    data = [r for r in (training_region(load_box(p), prep, threshold, model) for p in paths) if r is not None]
    val_paths = sorted(val.glob("*.npz"))
    source = f"{len(data)} delivered lesions of {len(paths)} stored boxes ({', '.join(b.name for b in boxes)})"
    print(source, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    without = delivered_scores(val_paths, threshold)
    best = -1.0

    def sample(j: int) -> tuple[np.ndarray, ...]:
        x, truth, amplitude_mm = data[j]
        x, y, m = training_window(x, truth, rng)
        if amplitude_mm is not None:
            x = with_amplitude(x, amplitude_mm)
        x, (y, m) = augmented(x, [y, m], rng)
        return x, y, m

    def after_epoch(epoch: int, loss: float, seconds: float) -> None:
        nonlocal best
        score = evaluate(model, val_paths, prep, threshold, without)["summary"]
        print(f"epoch {epoch}: loss {loss:.4f}, {seconds:.0f} s; {val.name} "
              f"{score['delivered']:.4f} -> {score['outlined']:.4f}", flush=True)
        if score["outlined"] > best:
            best = score["outlined"]
            save_refiner(model, out, {"trained_on": f"shipped checkpoint's CT-grid probabilities; {source}",
                                      "best_epoch": epoch, "selected_on": val.name, "val_dice": score["outlined"],
                                      "val_dice_without": score["delivered"], "seed": seed},
                         network_sha256=predictor.metadata["weights_sha256"], kind=KIND)

    fit(model, sample, len(data), epochs, 2e-3, 0.1, rng, after_epoch, batch)


def ensemble(members: list[Path], val: Path, out: Path, checkpoint: Path | None) -> None:
    """Write beside ``out`` the outline refiners beside ``members`` as one :class:`~model.refiner.RefinerEnsemble`, scored on ``val``."""
    predictor, threshold = predictor_of(checkpoint)
    network = predictor.metadata["weights_sha256"]
    refiners = [load_refiner(m, network_sha256=network, kind=KIND) for m in members]
    missing = [str(m) for m, r in zip(members, refiners, strict=True) if r is None]
    if missing:
        raise SystemExit(f"no outline refiner beside {', '.join(missing)}")
    model = RefinerEnsemble(refiners).eval()
    score = evaluate(model, sorted(val.glob("*.npz")), predictor.preprocessing, threshold)["summary"]
    print(f"ensemble of {len(refiners)}: {val.name} {score['delivered']:.4f} -> {score['outlined']:.4f}", flush=True)
    metas = [json.loads(refiner_path(m, KIND).with_suffix(".json").read_text()) for m in members]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_refiner(model, out, {"trained_on": metas[0].get("trained_on"), "member_seeds": [m.get("seed") for m in metas],
                              "member_best_epochs": [m.get("best_epoch") for m in metas], "selected_on": val.name,
                              "val_dice": score["outlined"], "val_dice_without": score["delivered"]},
                 network_sha256=network, kind=KIND)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("boxes", "train", "ensemble", "eval"))
    parser.add_argument("data", nargs="*", help="study folders (boxes)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="the network whose lesions are re-outlined (default: the shipped one)")
    parser.add_argument("--boxes", type=Path, action="append", default=None,
                        help="a folder of stored boxes: written by boxes; train uses every one given")
    parser.add_argument("--val", type=Path, help="stored boxes scored after each epoch (train) or scored (eval)")
    parser.add_argument("--out", type=Path, default=Path("runs/outline.safetensors"),
                        help="the checkpoint path the refiner is written beside (NAME.outline.safetensors)")
    parser.add_argument("--amplitude", action="store_true",
                        help="train a refiner that is also given the lesion's breathing amplitude fitted from its PET")
    parser.add_argument("--box-margin", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None,
                        help="CT voxels around the lesion the refiner re-outlines (default: model.outline.MARGIN)")
    parser.add_argument("--member", type=Path, action="append", default=None,
                        help="ensemble: a checkpoint path that train wrote an outline refiner beside (give two or more)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7, help="seed of the initial weights, windows and augmentation")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.action == "boxes":
        if not args.boxes or len(args.boxes) != 1:
            parser.error("boxes takes one --boxes folder to write")
        store_boxes(args.data, args.boxes[0], args.checkpoint)
    elif not args.val:
        parser.error(f"{args.action} needs --val")
    elif args.action == "train":
        if not args.boxes:
            parser.error("train needs --boxes")
        train(args.boxes, args.val, args.out, args.epochs, args.checkpoint, seed=args.seed, amplitude=args.amplitude,
              margin=None if args.box_margin is None else tuple(args.box_margin))
    elif args.action == "ensemble":
        if not args.member or len(args.member) < 2:
            parser.error("ensemble needs two or more --member")
        ensemble(args.member, args.val, args.out, args.checkpoint)
    else:
        predictor, threshold = predictor_of(args.checkpoint)
        model = load_refiner(args.out, network_sha256=predictor.metadata["weights_sha256"], kind=KIND)
        if model is None:
            parser.error(f"no outline refiner beside {args.out}")
        result = evaluate(model, sorted(args.val.glob("*.npz")), predictor.preprocessing, threshold)
        print(json.dumps(result["summary"], indent=1))
        args.out.with_name(args.out.stem + ".outline-eval.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
