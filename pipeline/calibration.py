"""``igtv-node calibrate``: choose a checkpoint's probability threshold on labelled studies.

Each study is predicted once; the post-processing (small components removed,
lesions ranked and kept, and outlined at the delineation threshold, as in the given
:class:`~pipeline.settings.ProcessSettings`, by default the node's defaults) then runs at
every candidate threshold, and the threshold with the highest mean Dice is chosen. Ties
go to the candidate nearest 0.5. Calibrate on studies that neither trained the model nor
will report its final accuracy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.metrics import dice
from model.operating_point import is_threshold
from pipeline.errors import LabelError
from pipeline.evaluation import SMALL_TARGET_CC, case_probabilities, load_case, postprocess_case
from pipeline.settings import ProcessSettings

#: Thresholds tried when none are given.
DEFAULT_CANDIDATES = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


@dataclass
class Calibration:
    """Mean Dice of every candidate threshold and the one chosen.

    Attributes
    ----------
    thresholds:
        The candidates, ascending.
    dice:
        Per-case Dice, shape (cases, thresholds).
    truth_cc:
        Target volume of each case (cc).
    studies:
        StudyInstanceUIDs of the cases, in row order.
    delineation_threshold:
        The post-processing's outline threshold the candidates were scored with.
    postprocessing:
        The rest of the post-processing the candidates were scored with (kept lesions,
        their order, smallest component, test-time flips).
    """

    thresholds: list[float]
    dice: np.ndarray
    truth_cc: np.ndarray
    studies: list[str] = field(default_factory=list)
    delineation_threshold: float | None = None
    postprocessing: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        """Mean Dice per threshold."""
        return self.dice.mean(axis=0)

    @property
    def chosen(self) -> float:
        """The threshold with the highest mean Dice (ties: the one nearest 0.5, then the lower)."""
        best = self.mean.max()
        tied = [t for t, m in zip(self.thresholds, self.mean, strict=True) if m >= best - 1e-12]
        return min(tied, key=lambda t: (round(abs(t - 0.5), 9), t))

    def table(self) -> str:
        """Markdown table: mean Dice per threshold, overall and by target size."""
        small = self.truth_cc < SMALL_TARGET_CC
        chosen = self.chosen
        lines = [f"| threshold | mean Dice ({len(self.studies)}) | IGTV < {SMALL_TARGET_CC:g} cc ({int(small.sum())}) "
                 f"| IGTV >= {SMALL_TARGET_CC:g} cc ({int((~small).sum())}) | Dice 0 (cases) |", "|---|---|---|---|---|"]
        for j, t in enumerate(self.thresholds):
            col = self.dice[:, j]
            part = [f"{col[m].mean():.3f}" if m.any() else "-" for m in (small, ~small)]
            mark = " (chosen)" if t == chosen else ""
            lines.append(f"| {t:g}{mark} | {col.mean():.3f} | {part[0]} | {part[1]} | {int((col == 0).sum())} |")
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        """JSON-ready description for the checkpoint's "operating_point"."""
        digest = hashlib.sha256("\n".join(sorted(self.studies)).encode()).hexdigest()[:16]
        return {
            "chosen_by": "highest mean Dice over labelled studies (igtv-node calibrate)",
            "studies": len(self.studies),
            "study_digest": digest,
            "candidates": {f"{t:g}": round(float(m), 4) for t, m in zip(self.thresholds, self.mean, strict=True)},
            "delineation_threshold": self.delineation_threshold,
            "postprocessing": dict(self.postprocessing),
        }


def calibrate(
    data: Sequence[Path],
    checkpoint: Path | None = None,
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    roi_names: Sequence[str] = ("IGTV", "ITV"),
    settings: ProcessSettings | None = None,
    device: str = "cpu",
    echo: bool = True,
) -> Calibration:
    """Score every candidate threshold of ``checkpoint`` (default: shipped) on labelled studies.

    Parameters
    ----------
    data:
        Folders of labelled studies (SEG or RTSTRUCT beside PET/CT).
    checkpoint:
        The model to calibrate.
    candidates:
        Probability thresholds to try, each strictly between 0 and 1.
    roi_names:
        Label names of the target.
    settings:
        Post-processing other than the threshold (default: the node's defaults).
    device:
        Where the network runs.
    echo:
        Print one line per study.
    """
    from model.predict import Predictor
    from pipeline.training import find_studies

    thresholds = sorted({float(t) for t in candidates})
    if not thresholds or not all(is_threshold(t) for t in thresholds):
        raise ValueError(f"candidate thresholds must lie strictly between 0 and 1, got {list(candidates)}")
    settings = settings or ProcessSettings()
    refs = [r for r in find_studies(list(data)) if r.label_series]
    if not refs:
        raise LabelError(f"no labelled study (SEG or RTSTRUCT beside PET/CT) under {[str(p) for p in data]}")
    predictor = Predictor.load(checkpoint, device=device)
    rows, volumes, studies = [], [], []
    for ref in refs:
        case = load_case(ref, roi_names)
        prob = case_probabilities(case, predictor, settings)
        row = [dice(postprocess_case(case, prob, settings, t), case.truth) for t in thresholds]
        rows.append(row)
        volumes.append(case.truth_cc)
        studies.append(case.study_uid)
        if echo:
            print(f"{case.study_uid}: " + ", ".join(f"{t:g}: {d:.3f}" for t, d in zip(thresholds, row, strict=True)),
                  flush=True)
    return Calibration(thresholds, np.asarray(rows, dtype=float), np.asarray(volumes), studies,
                       settings.delineation_threshold, settings.calibration_record())
