"""Train the ablation models of docs/model_card.md with the same recipe as the fine-tuning step.

Usage::

    python benchmarks/train_ablations.py IGTV_DATA_DIR --out-dir DIR [--epochs 16] [--seed 12]
        [--cache .cache/samples] [--only scratch,nosim,k1] [--device cuda] [--workers 4]
        [--samples-per-epoch 6400] [--batch-size 32] [--patch 96] [--val-fraction 0.15]

The defaults are the fine-tuning stage of ``benchmarks/train_default.sh``.

Variants (all trained from scratch on the IGTV studies only, with the fine-tuning
step's epochs and seed, via :func:`pipeline.training.run_training`):

* ``scratch``: the full SIM-Mamba without GTV pre-training (does transfer learning help?)
* ``nosim``: K=5 with the SIM replaced by a 1x1 conv over the concatenated slices
* ``k1``: K=1 (2D, no slice context)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "scratch": {"architecture": None, "slices": None},
    "nosim": {"architecture": {"use_sim": False}, "slices": None},
    "k1": {"architecture": None, "slices": 1},
}


def main() -> None:
    from pipeline.training import TrainRequest, run_training

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+", type=Path)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--cache", type=Path, default=Path(".cache/samples"))
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--samples-per-epoch", type=int, default=6400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in a.only.split(","):
        v = VARIANTS[name]
        out = a.out_dir / f"ablation_{name}.safetensors"
        res = run_training(TrainRequest(
            data=list(a.data), out=out, roi_names=["IGTV", "ITV"], epochs=a.epochs, seed=a.seed, cache=a.cache,
            val_fraction=a.val_fraction, resume=True, threads=a.threads, architecture=v["architecture"],
            slices=v["slices"], progress=False, samples_per_epoch=a.samples_per_epoch, batch_size=a.batch_size,
            patch=a.patch, device=a.device, workers=a.workers,
        ))
        print(f"{name}: best epoch {res['best'].get('epoch')} val Dice {res['best'].get('val_dice'):.4f} -> {out}",
              flush=True)


if __name__ == "__main__":
    main()
