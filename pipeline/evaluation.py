"""``igtv-node evaluate``: per-case Dice, HD95 (mm) and volume ratio on the original CT grid.

Each labelled study goes through the inference path (stacks -> model ->
probabilities back on the CT grid -> post-processing) and is compared with its
label. Baselines on the same cases:

* ``SUV40``: SUV >= 40 % of the maximum inside a VOI (the target's bounding box
  grown by ``VOI_MARGIN_MM``), keeping the connected component holding the
  maximum; the classic PET auto-contour, given the target's location.
* any further checkpoints (``extra``): e.g. the same network without SIM
  (K=1, or K>1 with a plain slice mix) and the network trained from scratch.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from model.metrics import dice, hd95, volume_ratio
from model.operating_point import is_threshold
from pipeline.errors import LabelError
from pipeline.settings import ProcessSettings

log = logging.getLogger(__name__)

VOI_MARGIN_MM = 15.0
SUV_FRACTION = 0.4


@dataclass
class LoadedCase:
    """One study loaded for evaluation (CT grid)."""

    study_uid: str
    ct: Any  # SeriesVolume
    pet_on_ct: Any  # SimpleITK image
    truth: np.ndarray
    spacing_zyx: tuple[float, float, float]

    @property
    def truth_cc(self) -> float:
        """Volume of the target (truth mask) in cc."""
        return float(self.truth.sum() * np.prod(self.spacing_zyx) / 1000.0)


def load_case(ref: Any, roi_names: Sequence[str]) -> LoadedCase:
    """Read a labelled study through the inference path's loading steps."""
    import SimpleITK as sitk  # noqa: F401  (imported by the pipeline anyway)

    from pipeline import geometry, reader, selection, suv
    from pipeline.training import _label_mask

    chosen = selection.select_pet_ct(ref.series)
    ct = reader.load_volume(chosen.ct)
    pet_on_ct, _ = geometry.pet_onto_ct(suv.to_suv(reader.load_volume(chosen.pet)), ct)
    truth, _ = _label_mask(ref, ct, roi_names)
    spacing = tuple(float(s) for s in reversed(ct.image.GetSpacing()))
    return LoadedCase(ref.study_uid, ct, pet_on_ct, truth.astype(bool), spacing)  # type: ignore[arg-type]


def suv_threshold_baseline(suv: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float],
                           fraction: float = SUV_FRACTION, margin_mm: float = VOI_MARGIN_MM) -> np.ndarray:
    """SUV >= fraction * SUVmax inside the target's VOI; the component holding the maximum."""
    out = np.zeros(truth.shape, dtype=bool)
    if not truth.any():
        return out
    idx = np.argwhere(truth)
    margin = [int(math.ceil(margin_mm / s)) for s in spacing_zyx]
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + np.array(margin) + 1, truth.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    voi = np.asarray(suv[box], dtype=np.float32)
    peak = np.unravel_index(int(np.argmax(voi)), voi.shape)
    mask = voi >= fraction * float(voi[peak])
    lab, _ = ndimage.label(mask)
    out[box] = lab == lab[peak]
    return out


def case_probabilities(case: LoadedCase, predictor: Any, settings: ProcessSettings | None = None,
                       stackset: Any = None) -> np.ndarray:
    """The model's probabilities of one case on the CT grid (before post-processing), as the node computes them.

    ``settings`` (default: the node's defaults) give the test-time flips and, with the
    checkpoint's threshold, the lesion its refiners re-outline. ``stackset``: the case's
    stacks when the caller has built them already (with the predictor's preprocessing);
    built here otherwise.
    """
    import SimpleITK as sitk

    from pipeline import stacks
    from pipeline.refinement import ct_grid_probabilities

    settings = settings or ProcessSettings()
    if stackset is None:
        stackset = stacks.build_stacks(case.ct, case.pet_on_ct, predictor.preprocessing)
    prob_ct, _ = ct_grid_probabilities(predictor, stackset, sitk.GetArrayViewFromImage(case.ct.image),
                                       sitk.GetArrayViewFromImage(case.pet_on_ct), case.spacing_zyx, settings,
                                       settings.threshold_for(predictor.threshold), batch_size=16)
    return prob_ct


def postprocess_case(case: LoadedCase, prob_ct: np.ndarray, settings: ProcessSettings, threshold: float) -> np.ndarray:
    """The node's post-processing of ``prob_ct`` at ``threshold``, as a boolean mask."""
    import SimpleITK as sitk

    from pipeline import postprocess

    suv = sitk.GetArrayViewFromImage(case.pet_on_ct)
    return postprocess.postprocess_with(prob_ct, case.spacing_zyx, settings, threshold, suv=suv) > 0


def predict_case(case: LoadedCase, predictor: Any, settings: ProcessSettings | None = None) -> np.ndarray:
    """Post-processed boolean prediction of one case on the CT grid (the node's post-processing)."""
    settings = settings or ProcessSettings()
    prob_ct = case_probabilities(case, predictor, settings)
    return postprocess_case(case, prob_ct, settings, settings.threshold_for(predictor.threshold))


def case_metrics(pred: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float]) -> dict[str, float]:
    """Dice, HD95 (mm) and volume ratio of one prediction."""
    return {
        "dice": dice(pred, truth),
        "hd95_mm": hd95(pred, truth, spacing_zyx),
        "volume_ratio": volume_ratio(pred, truth),
    }


def _summary(rows: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, float]]:
    out = {}
    for m in methods:
        vals = [r[m] for r in rows if m in r]
        if not vals:
            continue
        hd = [v["hd95_mm"] for v in vals if math.isfinite(v["hd95_mm"])]
        out[m] = {
            "dice_mean": float(np.mean([v["dice"] for v in vals])),
            "dice_std": float(np.std([v["dice"] for v in vals])),
            "hd95_mm_median": float(np.median(hd)) if hd else float("inf"),
            "volume_ratio_median": float(np.median([v["volume_ratio"] for v in vals])),
            "cases": len(vals),
        }
    return out


def format_table(summary: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table of the summary (one row per method)."""
    lines = ["| method | cases | Dice mean ± sd | HD95 median (mm) | volume ratio median |",
             "|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['cases']} | {s['dice_mean']:.3f} ± {s['dice_std']:.3f} | "
                     f"{s['hd95_mm_median']:.1f} | {s['volume_ratio_median']:.2f} |")
    return "\n".join(lines)


#: IGTVs below this volume (cc) count as small in the size breakdown.
SMALL_TARGET_CC = 2.0


def size_breakdown(rows: Sequence[Mapping[str, Any]], methods: Sequence[str],
                   split_cc: float = SMALL_TARGET_CC) -> dict[str, dict[str, dict[str, float]]]:
    """Mean Dice per method for targets below and at/above ``split_cc``.

    Returns ``{method: {"small": {"cases", "dice_mean"}, "large": {...}}}``; a bin
    without cases has ``dice_mean`` NaN.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m in methods:
        bins: dict[str, dict[str, float]] = {}
        for name, keep in (("small", lambda cc: cc < split_cc), ("large", lambda cc: cc >= split_cc)):
            vals = [r[m]["dice"] for r in rows if m in r and keep(r["truth_cc"])]
            bins[name] = {"cases": len(vals), "dice_mean": float(np.mean(vals)) if vals else float("nan")}
        out[m] = bins
    return out


def format_size_table(breakdown: Mapping[str, Mapping[str, Mapping[str, float]]],
                      split_cc: float = SMALL_TARGET_CC) -> str:
    """Markdown table of :func:`size_breakdown` (one row per method)."""
    lines = [f"| method | Dice, IGTV < {split_cc:g} cc (cases) | Dice, IGTV >= {split_cc:g} cc (cases) |",
             "|---|---|---|"]
    for name, b in breakdown.items():
        lines.append(f"| {name} | {b['small']['dice_mean']:.3f} ({b['small']['cases']}) | "
                     f"{b['large']['dice_mean']:.3f} ({b['large']['cases']}) |")
    return "\n".join(lines)


def run_evaluation(
    data: list[Path],
    checkpoint: Path | None = None,
    roi_names: Sequence[str] = ("IGTV", "ITV"),
    baselines: bool = True,
    out: Path | None = None,
    extra: Mapping[str, Path] | None = None,
    threshold: float | None = None,
    echo: bool = True,
    device: str = "cpu",
    settings: ProcessSettings | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (default: shipped) and baselines on labelled studies.

    Parameters
    ----------
    data:
        Folders of labelled studies.
    checkpoint:
        The model to evaluate; None means the shipped one.
    roi_names:
        Label names of the target (RTSTRUCT ROI or SEG segment).
    baselines:
        Also run the SUV-40% baseline.
    out:
        Write per-case results and the summary as JSON here.
    extra:
        Further checkpoints by name (ablations), evaluated on the same cases.
    threshold:
        Probability threshold for every model; None uses each checkpoint's calibrated one.
    device:
        Where the networks run ("cpu", "cuda", "auto").
    settings:
        The post-processing (lesions kept, their order, outline, flips; default the
        node's); ``threshold``, when given, replaces its threshold.

    Returns
    -------
    dict
        ``{"cases": [...], "summary": {...}, "table": str}``.
    """
    from model.predict import Predictor
    from pipeline.training import find_studies

    if threshold is not None and not is_threshold(threshold):
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    settings = replace(settings or ProcessSettings(), **({} if threshold is None else {"threshold": threshold}))
    models = {"SIM-Mamba": Predictor.load(checkpoint, device=device)}
    for name, path in (extra or {}).items():
        models[name] = Predictor.load(path, device=device)
    refs = [r for r in find_studies(data) if r.label_series]
    if not refs:
        raise LabelError(f"no labelled study (SEG or RTSTRUCT beside PET/CT) under {[str(p) for p in data]}")
    methods = list(models) + (["SUV40"] if baselines else [])
    rows: list[dict[str, Any]] = []
    for ref in refs:
        case = load_case(ref, roi_names)
        row: dict[str, Any] = {"study": case.study_uid, "truth_cc": case.truth_cc}
        for name, predictor in models.items():
            row[name] = case_metrics(predict_case(case, predictor, settings), case.truth, case.spacing_zyx)
        if baselines:
            import SimpleITK as sitk

            suv = sitk.GetArrayViewFromImage(case.pet_on_ct)
            row["SUV40"] = case_metrics(suv_threshold_baseline(suv, case.truth, case.spacing_zyx),
                                        case.truth, case.spacing_zyx)
        rows.append(row)
        if echo:
            print(f"{case.study_uid}: " + ", ".join(f"{m} Dice {row[m]['dice']:.3f}" for m in methods), flush=True)
    summary = _summary(rows, methods)
    by_size = size_breakdown(rows, methods)
    table = format_table(summary) + "\n\n" + format_size_table(by_size)
    versions = {name: p.version for name, p in models.items()}  # names its refiners (+r, +o digests)
    thresholds = {name: settings.threshold_for(p.threshold) for name, p in models.items()}
    result = {"cases": rows, "summary": summary, "by_size": by_size, "table": table, "versions": versions,
              "thresholds": thresholds, "roi_names": list(roi_names)}
    if echo:
        print(table)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result
