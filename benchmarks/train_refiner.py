"""Train and measure the lesion refiner (:mod:`model.refiner`) of the shipped checkpoint.

The 2.5D network sees K slices; the PET smear of a moving tumour runs along z. The
refiner re-outlines, in 3D, a crop around the lesion the node would deliver (input: PET,
CT and the shipped network's probability on the model grid; target: the IGTV).

Usage (from the folder holding ``data/`` and the sample cache ``cache/`` that
``benchmarks/train_default.sh`` writes; steps of its ``refiner`` stage)::

    python benchmarks/train_refiner.py probs data/select_igtv data/refine_igtv data/more_igtv data/extra_igtv
    python benchmarks/train_refiner.py train --epochs 12 --out runs/refiner_base.safetensors
    python benchmarks/train_refiner.py eval data/select_igtv --out runs/refiner_base.safetensors

``probs`` stores the network's probabilities of each study (``--checkpoint``, default the
shipped one; uint8, under ``--probs``); ``crops`` stores each study's training crop under
``--crops`` (after which the study's DICOM files may go); ``train`` learns from the crops of
the ``--crops`` folders, or without them from the 448 IGTV studies' training split of
``train_default.sh`` (seed 17, 10 % validation), validates on that split's validation
studies, keeps the epoch with the best validation Dice and writes the refiner
beside ``--out`` (``NAME.refiner.safetensors``: copy it beside the checkpoint it refines);
``eval`` prints, on the model grid, the mean Dice of the lesion the node delivers without
and with the refiner, and by IGTV size.
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
from scipy import ndimage  # noqa: E402

from model.refiner import (  # noqa: E402
    CROP,
    LesionRefiner,
    augmented,
    crop_around,
    fit,
    load_refiner,
    save_refiner,
)

#: Training jitter (z, y, x) of the crop around the IGTV, on each side.
JITTER = (4, 8, 8)
TRAIN_SETS = ("data/refine_igtv", "data/more_igtv", "data/extra_igtv")


def network_of(checkpoint: Path | None):
    """The network, metadata and preprocessing of ``checkpoint`` (None: the shipped one)."""
    from model.checkpoint import load_checkpoint, shipped_checkpoint_path
    from model.preprocessing import Preprocessing

    network, meta = load_checkpoint(checkpoint or shipped_checkpoint_path())
    return network, meta, Preprocessing.from_dict(meta["preprocessing"])


def labelled(folders: list[str]) -> list:
    """Study references with a label, in a fixed order."""
    from pipeline.training import find_studies

    return [r for r in find_studies([Path(f) for f in folders]) if r.label_series]


def samples(ref, prep, cache: Path):
    from pipeline.training import cached_samples

    return cached_samples([ref], ["IGTV"], prep, cache)[0]


def store_probabilities(folders: list[str], cache: Path, probs: Path, checkpoint: Path | None) -> None:
    """The network's probabilities of every study (skips those already stored)."""
    from model.train import predict_study

    network, _, prep = network_of(checkpoint)
    probs.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for i, ref in enumerate(labelled(folders)):
        path = probs / f"{ref.study_uid}.npz"
        if path.exists():
            continue
        with torch.no_grad():
            prob = predict_study(network, samples(ref, prep, cache))
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez_compressed(tmp, prob=np.round(prob * 255).astype(np.uint8))
        tmp.replace(path)
        print(f"{i + 1} studies, {time.time() - start:.0f} s", flush=True)


def study_volume(ref, prep, cache: Path, probs: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(N, 3, H, W) PET, CT and probability of each stack's centre slice, the target, the spacing."""
    s = samples(ref, prep, cache)
    n, centre = len(s.labels), s.span // 2
    planes = s.planes[centre:centre + n].astype(np.float32)
    prob = np.load(probs / f"{ref.study_uid}.npz")["prob"].astype(np.float32) / 255
    return np.concatenate([planes, prob[:, None]], axis=1), s.target(), s.spacing_mm


def training_crop(volume: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Input and label around the IGTV's centre of mass, :data:`JITTER` wider on each side."""
    size = tuple(c + 2 * m for c, m in zip(CROP, JITTER, strict=True))
    x, (src, dst) = crop_around(volume, list(ndimage.center_of_mass(target)), size)
    label = np.zeros(size, bool)
    label[dst] = target[src]
    return x, label


def fits_crop(target: np.ndarray) -> bool:
    """Whether the IGTV fits the refiner's crop with 2 voxels to spare on each side."""
    extent = [np.ptp(v) + 1 for v in np.nonzero(target)]
    return all(e <= c - 4 for e, c in zip(extent, CROP, strict=True))


def study_crop(ref, prep, cache: Path, probs: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The study's float16 training crop and label (:func:`training_crop`); None when the IGTV does not fit."""
    volume, target, _ = study_volume(ref, prep, cache, probs)
    if not fits_crop(target):  # the refiner only sees lesions that fit
        return None
    x, y = training_crop(volume, target)
    return x.astype(np.float16), y


def store_crops(folders: list[str], cache: Path, probs: Path, crops: Path, checkpoint: Path | None) -> None:
    """Each study's training crop (:func:`training_crop`, float16 input and label) under ``crops``.

    A study whose IGTV does not fit the crop is stored without one (``fits`` 0). Once stored,
    a crop needs neither the study's DICOM files nor its cached samples.
    """
    _, _, prep = network_of(checkpoint)
    crops.mkdir(parents=True, exist_ok=True)
    for i, ref in enumerate(labelled(folders)):
        path = crops / f"{ref.study_uid}.npz"
        if path.exists():
            continue
        crop = study_crop(ref, prep, cache, probs)
        tmp = path.with_name(path.stem + ".tmp.npz")
        if crop is None:
            np.savez_compressed(tmp, fits=0)
        else:
            np.savez_compressed(tmp, fits=1, x=crop[0], y=crop[1])
        tmp.replace(path)
        print(f"{i + 1} studies", flush=True)


def load_crops(folders: list[Path], exclude: set[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fitting training crops stored in ``folders``, except those of the studies in ``exclude``."""
    data = []
    for folder in folders:
        for path in sorted(folder.glob("*.npz")):
            if path.stem in exclude or path.name.endswith(".tmp.npz"):
                continue
            with np.load(path) as f:
                if int(f["fits"]):
                    data.append((f["x"], f["y"]))
    return data


def delivered(prob: np.ndarray, spacing: tuple[float, float], threshold: float) -> np.ndarray:
    """The lesion the node delivers from model-grid probabilities (default post-processing)."""
    from pipeline.postprocess import postprocess_with
    from pipeline.settings import ProcessSettings

    return postprocess_with(prob, (spacing[0], spacing[1], spacing[1]), ProcessSettings(), threshold) > 0


def refine(model: LesionRefiner, volume: np.ndarray, spacing, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The delivered lesion, and the same with its crop outlined by the refiner (>= 0.5)."""
    first = delivered(volume[:, 2], spacing, threshold)
    refined = model.refine(volume, first)
    if refined is None:
        return first, first  # nothing found, or larger than the crop: left as delivered
    prob, region = refined
    out = first.copy()
    out[region] = prob[region] >= 0.5
    labels, count = ndimage.label(out)
    if count > 1:  # keep the component holding most of the delivered lesion
        votes = np.bincount(labels[first], minlength=count + 1)
        votes[0] = 0
        out = labels == votes.argmax()
    return first, out


def evaluate(model: LesionRefiner, refs, prep, cache: Path, probs: Path, threshold: float) -> dict:
    """Mean Dice without and with the refiner, overall and below/above 2 cc, with per-study rows."""
    from model.metrics import dice

    rows = []
    for ref in refs:
        volume, target, spacing = study_volume(ref, prep, cache, probs)
        first, refined = refine(model, volume, spacing, threshold)
        cc = float(target.sum()) * spacing[0] * spacing[1] ** 2 / 1000
        rows.append((cc, dice(first, target), dice(refined, target)))
    a = np.asarray(rows)
    small = a[:, 0] < 2
    diff = a[:, 2] - a[:, 1]
    summary = {"studies": len(a), "delivered": a[:, 1].mean(), "refined": a[:, 2].mean(),
               "paired_difference": diff.mean(), "paired_se": diff.std(ddof=1) / np.sqrt(len(a))}
    for name, part in (("below_2cc", small), ("from_2cc", ~small)):
        summary[name] = {"studies": int(part.sum()), "delivered": a[part, 1].mean(), "refined": a[part, 2].mean()}
    return {"summary": summary, "rows": rows}


def train(epochs: int, out: Path, cache: Path, probs: Path, checkpoint: Path | None,
          widths: tuple[int, int, int] = (8, 16, 32), seed: int = 5, crops: list[Path] | None = None) -> None:
    """Train, validate each epoch on the 448 studies' validation split, keep the best.

    The training crops are those stored in ``crops`` (:func:`store_crops`; never a study of
    the validation split); without ``crops``, those of the 448 studies' training split.
    """
    from pipeline.training import split_studies

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    _, meta, prep = network_of(checkpoint)
    threshold = float(meta.get("operating_point", {}).get("threshold", 0.5))
    refs = labelled(list(TRAIN_SETS))
    train_uids, val_uids = split_studies([r.study_uid for r in refs], 0.1, 17)
    by_uid = {r.study_uid: r for r in refs}
    if crops:
        data = load_crops(crops, set(val_uids))
        source = f"{len(data)} stored training crops ({', '.join(c.name for c in crops)})"
    else:
        data = [c for c in (study_crop(by_uid[uid], prep, cache, probs) for uid in train_uids) if c is not None]
        source = f"{len(data)} training crops of the 448 studies' training split"
    print(source, flush=True)
    model = LesionRefiner(widths)
    out.parent.mkdir(parents=True, exist_ok=True)
    best = -1.0

    def sample(j: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = data[j]
        o = [int(rng.integers(0, 2 * m + 1)) for m in JITTER]
        window = tuple(slice(a, a + c) for a, c in zip(o, CROP, strict=True))
        x, (y,) = augmented(x[(slice(None), *window)].astype(np.float32), [y[window]], rng)
        return x, y

    def after_epoch(epoch: int, loss: float, seconds: float) -> None:
        nonlocal best
        val = evaluate(model, [by_uid[u] for u in val_uids], prep, cache, probs, threshold)["summary"]
        print(f"epoch {epoch}: loss {loss:.4f}, {seconds:.0f} s; validation "
              f"{val['delivered']:.4f} -> {val['refined']:.4f}", flush=True)
        if val["refined"] > best:
            best = val["refined"]
            save_refiner(model, out, {"trained_on": f"shipped checkpoint's probabilities; {source}",
                                      "best_epoch": epoch, "val_dice": val["refined"],
                                      "val_dice_without": val["delivered"], "seed": seed},
                         network_sha256=meta["weights_sha256"])

    fit(model, sample, len(data), epochs, 1e-3, 0.05, rng, after_epoch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("probs", "crops", "train", "eval"))
    parser.add_argument("data", nargs="*", help="study folders (probs, crops, eval)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="the network whose lesions are refined (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=Path("runs/refiner_base.safetensors"),
                        help="the checkpoint path the refiner is written beside (NAME.refiner.safetensors)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--widths", default="8,16,32", help="refiner channels at full, half and quarter resolution")
    parser.add_argument("--cache", type=Path, default=Path("cache"))
    parser.add_argument("--probs", type=Path, default=Path("runs/refiner_probs"))
    parser.add_argument("--crops", type=Path, action="append", default=None,
                        help="a folder of training crops: written by crops; train uses every one given")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.action == "probs":
        store_probabilities(args.data, args.cache, args.probs, args.checkpoint)
    elif args.action == "crops":
        if not args.crops or len(args.crops) != 1:
            parser.error("crops takes one --crops folder to write")
        store_crops(args.data, args.cache, args.probs, args.crops[0], args.checkpoint)
    elif args.action == "train":
        widths = tuple(int(w) for w in args.widths.split(","))
        if len(widths) != 3:
            parser.error("--widths takes three numbers")
        train(args.epochs, args.out, args.cache, args.probs, args.checkpoint, widths, crops=args.crops)
    else:
        _, meta, prep = network_of(args.checkpoint)
        model = load_refiner(args.out, network_sha256=meta["weights_sha256"])
        if model is None:
            parser.error(f"no refiner beside {args.out}")
        threshold = float(meta.get("operating_point", {}).get("threshold", 0.5))
        result = evaluate(model, labelled(args.data), prep, args.cache, args.probs, threshold)
        print(json.dumps(result["summary"], indent=1))
        args.out.with_name(args.out.stem + ".refiner-eval.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
