"""Where a checkpoint loses Dice, study by study, and the ceiling the 2 mm model grid sets.

Usage::

    python benchmarks/error_analysis.py DATA_DIR [DATA_DIR ...] [--checkpoint CKPT] [--json OUT.json]

For every labelled study (IGTV and GTV truth, as ``igtv-node synth`` writes them):

* ``Dice``: the node's prediction (default post-processing, the checkpoint's threshold)
  against the IGTV, as ``igtv-node evaluate`` scores it;
* ``vs GTV``: the same prediction against the GTV (the tumour at the CT's breathing
  phase). A prediction that matches the GTV better than the IGTV found the tumour but
  not its motion envelope;
* ``p in IGTV``: the highest probability inside the IGTV (near 1 with Dice 0 means the
  tumour was found and the keep-one rule kept another lesion);
* ``envelope``: the share of the IGTV outside the GTV: where the tumour passes during
  breathing but the CT (one phase) shows lung, so only the PET marks it;
* ``found GTV`` / ``found env``: the share of the GTV and of that envelope the prediction
  covers;
* ``if env found``: Dice had the envelope been found too (prediction plus envelope): what
  the envelope costs;
* ``ceiling maj`` / ``ceiling area``: Dice of the IGTV after the trip onto the model grid
  and back (bilinear, >= 0.5), as 0/1 majority labels and as area fractions
  (``igtv-node train --labels``): what a network that reproduced its training targets
  exactly would score;
* ``env marked`` / ``PET oracle``: how much of the envelope the PET marks (2 SD above the
  lung around it) and the Dice of the GTV grown into its PET region at the best fraction
  of its peak for that study (:mod:`pipeline.envelope`): properties of the study, not of
  the checkpoint.

Means are printed over all studies and over those below and above 2 cc of IGTV, and the
PET rule's best single fraction over all studies (one rule for every study, not told
the answer per study).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def analyse_case(ref, predictor) -> dict[str, float]:
    """The columns of one study (see the module docstring)."""
    import SimpleITK as sitk

    from model.metrics import dice
    from pipeline import stacks
    from pipeline.envelope import envelope_evidence
    from pipeline.evaluation import case_probabilities, load_case, postprocess_case
    from pipeline.settings import ProcessSettings
    from pipeline.training import _label_mask

    case = load_case(ref, ["IGTV", "ITV"])
    gtv, _ = _label_mask(ref, case.ct, ["GTV"])
    gtv = gtv.astype(bool)
    truth, voxel_cc = case.truth, float(np.prod(case.spacing_zyx)) / 1000.0
    settings = ProcessSettings()
    grid = stacks.build_stacks(case.ct, case.pet_on_ct, predictor.preprocessing)
    prob = case_probabilities(case, predictor, stackset=grid)
    pred = postprocess_case(case, prob, settings, settings.threshold_for(predictor.threshold))
    majority = grid.to_ct_grid(grid.labels_from_ct_grid(truth).astype(np.float32)) >= 0.5
    area = grid.to_ct_grid(grid.to_model_grid(truth.astype(np.float32))) >= 0.5
    envelope = truth & ~gtv
    evidence = envelope_evidence(truth, gtv, sitk.GetArrayViewFromImage(case.pet_on_ct), case.spacing_zyx)
    return {
        "igtv_cc": float(truth.sum() * voxel_cc),
        "gtv_cc": float(gtv.sum() * voxel_cc),
        "pred_cc": float(pred.sum() * voxel_cc),
        "dice": dice(pred, truth),
        "dice_vs_gtv": dice(pred, gtv),
        "max_prob_in_igtv": float(prob[truth].max()) if truth.any() else 0.0,
        "envelope_share": _share(envelope, truth),
        "found_gtv": _share(pred & gtv, gtv),
        "found_envelope": _share(pred & envelope, envelope),
        "dice_if_envelope_found": dice(pred | envelope, truth),
        "ceiling_majority": dice(majority, truth),
        "ceiling_area": dice(area, truth),
        "envelope_marked": evidence.envelope_marked,
        "pet_oracle": evidence.pet_oracle,
        "pet_rule_dice": list(evidence.rule_dice),
    }


def _share(part: np.ndarray, whole: np.ndarray) -> float:
    """|part| / |whole| (0 for an empty whole)."""
    n = int(whole.sum())
    return float(part.sum()) / n if n else 0.0


def main() -> None:
    from model.predict import Predictor
    from pipeline.evaluation import SMALL_TARGET_CC
    from pipeline.training import find_studies

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+", type=Path)
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    predictor = Predictor.load(a.checkpoint)
    refs = [r for r in find_studies(a.data) if r.label_series]
    cols = ["igtv_cc", "gtv_cc", "pred_cc", "dice", "dice_vs_gtv", "max_prob_in_igtv", "envelope_share",
            "found_gtv", "found_envelope", "dice_if_envelope_found", "ceiling_majority", "ceiling_area",
            "envelope_marked", "pet_oracle"]
    print("| study | IGTV cc | GTV cc | predicted cc | Dice | vs GTV | p in IGTV | envelope | found GTV | found env "
          "| if env found | ceiling maj | ceiling area | env marked | PET oracle |")
    print("|---" * (len(cols) + 1) + "|")
    rows = []
    for ref in refs:
        row = analyse_case(ref, predictor)
        rows.append({"study": ref.study_uid, **row})
        print(f"| ...{ref.study_uid[-8:]} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |", flush=True)
    groups = {"mean": rows, f"mean < {SMALL_TARGET_CC:g} cc": [r for r in rows if r["igtv_cc"] < SMALL_TARGET_CC],
              f"mean >= {SMALL_TARGET_CC:g} cc": [r for r in rows if r["igtv_cc"] >= SMALL_TARGET_CC]}
    means = {name: {c: float(np.mean([r[c] for r in group])) for c in cols} for name, group in groups.items() if group}
    for name, values in means.items():
        print(f"| {name} ({len(groups[name])}) | " + " | ".join(f"{values[c]:.3f}" for c in cols) + " |")
    rule = best_single_fraction(rows)
    print(f"PET rule at one fraction for all studies: {rule['fraction']:.3f} of the peak, mean Dice {rule['dice']:.3f} "
          f"(< {SMALL_TARGET_CC:g} cc {rule['dice_small']:.3f}, >= {SMALL_TARGET_CC:g} cc {rule['dice_large']:.3f})")
    if a.json:
        a.json.write_text(json.dumps({"version": predictor.version, "cases": rows, "mean": means,
                                      "pet_rule_single_fraction": rule}, indent=1) + "\n")


def best_single_fraction(rows: list[dict]) -> dict[str, float]:
    """The PET rule's fraction with the best mean Dice over all ``rows``, and its means by size."""
    from pipeline.envelope import FRACTIONS
    from pipeline.evaluation import SMALL_TARGET_CC

    table = np.array([r["pet_rule_dice"] for r in rows])
    best = int(np.argmax(table.mean(axis=0)))
    small = np.array([r["igtv_cc"] < SMALL_TARGET_CC for r in rows])
    column = table[:, best]
    return {"fraction": FRACTIONS[best], "dice": float(column.mean()),
            "dice_small": float(column[small].mean()) if small.any() else float("nan"),
            "dice_large": float(column[~small].mean()) if (~small).any() else float("nan")}


if __name__ == "__main__":
    main()
