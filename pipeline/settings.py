"""Settings of one study's processing, passed down explicitly (no globals, no env reads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.uids import DEFAULT_UID_ROOT


@dataclass
class ProcessSettings:
    """What the worker needs to turn a study into results.

    Attributes
    ----------
    checkpoint:
        Path to a ``.safetensors`` checkpoint; None means the shipped default.
    device:
        torch device for inference ("cpu", "cuda", "auto").
    threshold:
        Probability threshold of the post-processing; None (default) uses the threshold
        the checkpoint was calibrated at (``igtv-node calibrate``; 0.5 if never).
    delineation_threshold:
        Kept lesions are outlined where the probability reaches this (when it is above
        ``threshold``): the threshold decides which lesion is found and kept, this one
        where its border runs; a lesion that never reaches it keeps its outline at the
        threshold. None outlines at the threshold. The default 0.5 beat outlining at the
        calibrated 0.3 for every network tried on the 48 selection studies (docs/model_card.md).
    min_component_cc:
        Connected components smaller than this (cc) are removed.
    keep_components:
        At most this many lesions are kept and reported. With 1 (default), a checkpoint
        that has a 3D lesion refiner (:mod:`model.refiner`) re-outlines the kept lesion.
    lesion_order:
        "volume" (default: largest first), "confidence" (highest mean probability first)
        or "uptake" (highest SUVmax first). With one kept lesion, ranking by volume
        matched the per-study best choice on the 48 selection studies for every network
        checked, where "confidence" lost a study or more (docs/model_card.md).
    test_time_flips:
        Average the network over flipped inputs: "none" (default), "lr" (2 passes) or
        "lr+slices" (4 passes). Measured gains were within noise (docs/model_card.md), so
        the default spends no extra inference time.
    uid_root:
        Root of derived result UIDs.
    roi_name, roi_interpreted_type, roi_color:
        RTSTRUCT ROI naming; RTROIInterpretedType defaults to GTV since ITV is not a defined term.
    register:
        "auto" (register only when FrameOfReferenceUIDs differ), "always" or "never".
    institution_name:
        Copied into results when set.
    """

    checkpoint: Path | None = None
    device: str = "cpu"
    threshold: float | None = None
    delineation_threshold: float | None = 0.5
    min_component_cc: float = 0.1
    keep_components: int = 1
    lesion_order: str = "volume"
    test_time_flips: str = "none"
    uid_root: str = DEFAULT_UID_ROOT
    roi_name: str = "IGTV"
    roi_interpreted_type: str = "GTV"
    roi_color: tuple[int, int, int] = (255, 0, 0)
    register: str = "auto"
    institution_name: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def calibration_record(self) -> dict[str, object]:
        """The post-processing settings, other than the thresholds, a calibrated threshold depends on."""
        return {
            "keep_components": self.keep_components,
            "lesion_order": self.lesion_order,
            "min_component_cc": self.min_component_cc,
            "test_time_flips": self.test_time_flips,
        }

    def differences_from_calibration(self, operating_point: dict[str, object]) -> dict[str, dict[str, object]]:
        """Settings that differ from those a checkpoint's threshold was calibrated under.

        Parameters
        ----------
        operating_point:
            The checkpoint's "operating_point" metadata (``igtv-node calibrate``).

        Returns
        -------
        dict
            ``{name: {"calibrated": value, "configured": value}}``; empty when the threshold is
            configured here rather than taken from the checkpoint, or the calibration recorded
            no post-processing (checkpoints calibrated before session 9).
        """
        recorded = dict(operating_point.get("postprocessing") or {})
        if self.threshold is not None or not recorded:
            return {}
        if "delineation_threshold" in operating_point:
            recorded["delineation_threshold"] = operating_point["delineation_threshold"]
        configured = {**self.calibration_record(), "delineation_threshold": self.delineation_threshold}
        return {name: {"calibrated": value, "configured": configured[name]}
                for name, value in sorted(recorded.items()) if name in configured and configured[name] != value}

    def threshold_for(self, calibrated: float) -> float:
        """The threshold to apply: the configured one, else the checkpoint's ``calibrated`` one."""
        return calibrated if self.threshold is None else float(self.threshold)
