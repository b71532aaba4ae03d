"""Would an outline threshold that follows the fitted breathing amplitude raise Dice?

Usage::

    python benchmarks/amplitude_threshold.py DATA_DIR [DATA_DIR ...] [--checkpoint CKPT] [--json OUT.json]

For every labelled study, the node's CT-grid probabilities (network and both refiners,
as ``igtv-node evaluate`` computes them) are post-processed at outline thresholds 0.15 to
0.85 (lesions still found at the checkpoint's threshold, or at the outline threshold
when that is lower), and the delivered lesion's superior-inferior amplitude is fitted
from the PET (:func:`pipeline.refinement.lesion_amplitude`). It prints:

* the mean Dice at each single threshold, and each study's best (an oracle);
* the rule ``threshold = a + b * (amplitude - 8 mm)`` fitted on all studies (in sample),
  and scored leave-one-out: each study scored by the rule fitted on the others, paired
  against the node's default outline (0.5).

The leave-one-out line is the honest estimate; the in-sample one shows how much of it is
fitting noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.evaluation import SMALL_TARGET_CC
from pipeline.settings import ProcessSettings

THRESHOLDS = np.round(np.arange(0.15, 0.851, 0.05), 2)
#: The node's outline threshold, and its column in each study's curve.
DEFAULT_OUTLINE = ProcessSettings().delineation_threshold
DEFAULT_COLUMN = list(THRESHOLDS).index(DEFAULT_OUTLINE)
#: Amplitude (mm) the rule is centred on, and the one assumed when none could be fitted.
CENTRE_MM = 8.0
RULE_OFFSETS = np.round(np.arange(0.30, 0.701, 0.05), 2)
RULE_SLOPES = np.round(np.arange(-0.040, 0.0101, 0.005), 3)


def study_curves(data: list[Path], checkpoint: Path | None) -> list[dict]:
    """Each study's Dice at every threshold of :data:`THRESHOLDS`, its amplitude and IGTV volume."""
    import SimpleITK as sitk

    from model.metrics import dice
    from model.predict import Predictor
    from pipeline.evaluation import case_probabilities, load_case, postprocess_case
    from pipeline.refinement import lesion_amplitude
    from pipeline.stacks import build_stacks
    from pipeline.training import find_studies

    predictor = Predictor.load(checkpoint)
    settings = ProcessSettings()
    found_at = settings.threshold_for(predictor.threshold)
    rows = []
    for ref in (r for r in find_studies(data) if r.label_series):
        case = load_case(ref, ("IGTV", "ITV"))
        stackset = build_stacks(case.ct, case.pet_on_ct, predictor.preprocessing)
        prob = case_probabilities(case, predictor, settings, stackset=stackset)
        delivered = postprocess_case(case, prob, settings, found_at)
        fit = None
        if delivered.any():
            fit = lesion_amplitude(sitk.GetArrayViewFromImage(case.ct.image),
                                   sitk.GetArrayViewFromImage(case.pet_on_ct), delivered,
                                   stackset.canonical, case.spacing_zyx)
        curve = []
        for t in THRESHOLDS:
            at = ProcessSettings(delineation_threshold=float(t))
            curve.append(dice(postprocess_case(case, prob, at, min(found_at, float(t))), case.truth))
        rows.append({"study": case.study_uid, "amplitude_mm": None if fit is None else fit.amplitude_mm,
                     "igtv_cc": case.truth_cc, "dice": curve})
        print(f"study {len(rows)}: IGTV {rows[-1]['igtv_cc']:.2f} cc, amplitude {rows[-1]['amplitude_mm']}, "
              f"Dice at {DEFAULT_OUTLINE} {curve[DEFAULT_COLUMN]:.3f}", flush=True)
    return rows


def rule_dice(curves: np.ndarray, amplitude: np.ndarray, offset: float, slope: float) -> np.ndarray:
    """Each study's Dice at the threshold of :data:`THRESHOLDS` nearest the rule's."""
    wanted = np.clip(offset + slope * (amplitude - CENTRE_MM), THRESHOLDS[0], THRESHOLDS[-1])
    nearest = np.abs(THRESHOLDS[None, :] - wanted[:, None]).argmin(1)
    return curves[np.arange(len(curves)), nearest]


def fit_rule(curves: np.ndarray, amplitude: np.ndarray) -> tuple[float, float]:
    """The (offset, slope) of the grid with the highest mean Dice on these studies."""
    grid = [(a, b) for a in RULE_OFFSETS for b in RULE_SLOPES]
    return max(grid, key=lambda p: rule_dice(curves, amplitude, *p).mean())


def summarise(rows: list[dict]) -> dict:
    """Single thresholds, the per-study oracle, the rule in sample and leave-one-out."""
    curves = np.array([r["dice"] for r in rows])
    amplitude = np.array([CENTRE_MM if r["amplitude_mm"] is None else r["amplitude_mm"] for r in rows])
    small = np.array([r["igtv_cc"] < SMALL_TARGET_CC for r in rows])
    default = curves[:, DEFAULT_COLUMN]
    in_sample = fit_rule(curves, amplitude)
    held = np.empty(len(rows))
    for i in range(len(rows)):
        others = np.arange(len(rows)) != i
        held[i] = rule_dice(curves[i:i + 1], amplitude[i:i + 1], *fit_rule(curves[others], amplitude[others]))[0]
    diff = held - default
    return {
        "studies": len(rows),
        "by_threshold": {f"{t:.2f}": float(m) for t, m in zip(THRESHOLDS, curves.mean(0), strict=True)},
        "per_study_best": float(curves.max(1).mean()),
        "default": float(default.mean()),
        "rule_in_sample": {"offset": in_sample[0], "slope": in_sample[1],
                           "dice": float(rule_dice(curves, amplitude, *in_sample).mean())},
        "rule_leave_one_out": float(held.mean()),
        "paired_gain": float(diff.mean()),
        "paired_gain_se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan"),
        "paired_gain_below_2cc": float(diff[small].mean()) if small.any() else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = study_curves(args.data, args.checkpoint)
    if len(rows) < 3:
        print("need at least 3 labelled studies", file=sys.stderr)
        return 2
    result = summarise(rows)
    print("mean Dice by outline threshold: "
          + ", ".join(f"{t} {d:.4f}" for t, d in result["by_threshold"].items()))
    print(f"each study at its own best threshold (oracle): {result['per_study_best']:.4f}")
    rule = result["rule_in_sample"]
    print(f"rule a + b*(amplitude - {CENTRE_MM:g} mm), in sample: a {rule['offset']:.2f}, b {rule['slope']:.3f}, "
          f"Dice {rule['dice']:.4f} (default {result['default']:.4f})")
    print(f"rule, leave-one-out: {result['rule_leave_one_out']:.4f}; paired against the default "
          f"{result['paired_gain']:+.4f} ± {result['paired_gain_se']:.4f} (below 2 cc {result['paired_gain_below_2cc']:+.4f})")
    if args.json:
        args.json.write_text(json.dumps({"cases": rows, "summary": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
