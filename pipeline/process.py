"""One study from DICOM files to results: the worker path shared by ``serve`` and ``replay``.

Stages: scan headers -> pick PET and CT -> load volumes -> SUV -> PET onto the
CT grid (registering when needed) -> 2.5D stacks -> model -> back onto the CT
grid -> post-processing -> DICOM-SEG, RTSTRUCT, preview PNG, JSON report.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from pipeline.refinement import ct_grid_probabilities
from pipeline.settings import ProcessSettings

log = logging.getLogger(__name__)

#: Called with (stage name, fraction done in [0, 1]) as the study progresses.
ProgressCallback = Callable[[str, float], None]


@dataclass
class StudyResult:
    """What processing one study produced.

    Attributes
    ----------
    study_instance_uid:
        The source study (results join it).
    out_dir:
        Folder holding every output.
    outputs:
        All written files: seg.dcm, rtstruct.dcm, preview.png, report.json.
    dicom_outputs:
        The DICOM objects to export (SEG, RTSTRUCT).
    report:
        The JSON report as a dict.
    found:
        One line per series seen.
    skipped:
        (series description, reason) per series not used.
    """

    study_instance_uid: str
    out_dir: Path
    outputs: list[Path] = field(default_factory=list)
    dicom_outputs: list[Path] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    found: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


class _Timer:
    """Collects wall-clock durations per stage and reports progress."""

    def __init__(self, progress: ProgressCallback | None, stages: Sequence[str]) -> None:
        self.timings: dict[str, float] = {}
        self._progress = progress
        self._stages = list(stages)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._progress:
            self._progress(name, self._stages.index(name) / len(self._stages))
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)
            log.debug("stage %s took %.2f s", name, self.timings[name])


STAGES = ("load", "suv", "register", "stacks", "inference", "postprocess", "writers")


def process_study(
    paths: Sequence[Path],
    out_dir: Path,
    settings: ProcessSettings,
    predictor: object | None = None,
    progress: ProgressCallback | None = None,
) -> StudyResult:
    """Segment the IGTV of one study and write the results.

    Parameters
    ----------
    paths:
        DICOM files of the study (any order, any names; non-DICOM files are reported).
    out_dir:
        Output folder (created).
    settings:
        Processing settings.
    predictor:
        A loaded :class:`model.predict.Predictor`; loaded from ``settings`` when None.
    progress:
        Optional callback receiving (stage, fraction done).

    Raises
    ------
    PipelineError
        Expected bad input; the message names the series and the problem.
    """
    from pipeline import geometry, postprocess, reader, selection, stacks, suv
    from pipeline.writers import preview as preview_writer
    from pipeline.writers import report as report_writer
    from pipeline.writers.common import ResultInfo
    from pipeline.writers.rtstruct import write_rtstruct
    from pipeline.writers.seg import write_seg

    timer = _Timer(progress, STAGES)
    t0 = time.perf_counter()

    with timer.stage("load"):
        scan = reader.scan_files(paths)
        chosen = selection.select_pet_ct(scan.series)
        ct = reader.load_volume(chosen.ct)
        pet = reader.load_volume(chosen.pet)
    result = StudyResult(study_instance_uid=ct.study_instance_uid, out_dir=Path(out_dir))
    result.found = [f"{s.modality} series {s.number} '{s.description}': {len(s.files)} files" for s in scan.series]
    result.skipped = [(f"{s.modality} series {s.number} '{s.description}'", why) for s, why in chosen.skipped]
    result.skipped += [(str(p), why) for p, why in scan.unreadable]

    with timer.stage("suv"):
        pet_suv = suv.to_suv(pet)
        del pet
    with timer.stage("register"):
        pet_on_ct, registration = geometry.pet_onto_ct(pet_suv, ct, register=settings.register)
        del pet_suv

    if predictor is None:
        predictor = load_predictor(settings.checkpoint, settings.device)

    with timer.stage("stacks"):
        stackset = stacks.build_stacks(ct, pet_on_ct, predictor.preprocessing)
    spacing_zyx = tuple(float(s) for s in reversed(ct.image.GetSpacing()))
    threshold = settings.threshold_for(predictor.threshold)
    suv_ct = sitk.GetArrayViewFromImage(pet_on_ct)
    with timer.stage("inference"):
        prob_ct, refined = ct_grid_probabilities(predictor, stackset, sitk.GetArrayViewFromImage(ct.image), suv_ct,
                                                 spacing_zyx, settings, threshold)
        del stackset

    differences = settings.differences_from_calibration(getattr(predictor, "metadata", {}).get("operating_point", {}))
    if differences:
        warn_calibration_differs(predictor.version, differences)
    with timer.stage("postprocess"):
        labels = postprocess.postprocess_with(prob_ct, spacing_zyx, settings, threshold, suv=suv_ct)
        components = postprocess.component_report(
            labels, suv_ct, spacing_zyx, origin=ct.image.GetOrigin(), direction=ct.image.GetDirection()
        )
        del prob_ct

    out_dir.mkdir(parents=True, exist_ok=True)
    info = ResultInfo(
        uid_root=settings.uid_root,
        model_version=predictor.version,
        node_version=node_version(),
        roi_name=settings.roi_name,
        roi_interpreted_type=settings.roi_interpreted_type,
        roi_color=settings.roi_color,
        institution_name=settings.institution_name,
    )
    with timer.stage("writers"):
        seg_path = out_dir / "seg.dcm"
        rt_path = out_dir / "rtstruct.dcm"
        seg = write_seg(labels, ct, info)
        seg.save_as(seg_path, enforce_file_format=True)
        rts = write_rtstruct(labels, ct, info)
        rts.save_as(rt_path, enforce_file_format=True)
        preview_path = preview_writer.render_preview(
            sitk.GetArrayViewFromImage(ct.image), suv_ct, labels, spacing_zyx,
            out_dir / "preview.png", title=f"IGTV, model {predictor.version}",
            **preview_writer.display_geometry(ct),
        )
    timer.timings["total"] = round(time.perf_counter() - t0, 3)

    report = report_writer.build_report(
        components,
        timer.timings,
        {"version": predictor.version, "preprocessing": predictor.preprocessing.to_dict(),
         "lesion_refiner": getattr(predictor, "refiner", None) is not None,
         "outline_refiner": getattr(predictor, "outline", None) is not None, **refined},
        {
            **report_writer.uid_entries(ct, None, {"seg": seg, "rtstruct": rts}),
            "pet_series_instance_uid": chosen.pet.uid,
            "registration": registration_summary(registration),
            "selection_notes": list(chosen.notes),
            "postprocessing": {
                "threshold": threshold,
                "threshold_from": threshold_source(settings, predictor),
                "delineation_threshold": settings.delineation_threshold,
                **settings.calibration_record(),
                "differs_from_calibration": differences,
            },
            "skipped": [{"series": s, "reason": r} for s, r in result.skipped],
        },
    )
    report_path = out_dir / "report.json"
    report_writer.write_report(report, report_path)

    result.outputs = [seg_path, rt_path, Path(preview_path), report_path]
    result.dicom_outputs = [seg_path, rt_path]
    result.report = report
    log.info(
        "study processed: %d lesion(s), %.1f s total", len(components), timer.timings["total"]
    )
    return result


def check_model(checkpoint: Path | None, device: str) -> None:
    """Check, without loading the network's weights, that a node can run ``checkpoint`` on ``device``.

    Raises the model's :class:`~pipeline.errors.IgtvError` subclasses (checkpoint or its
    refiner missing or unreadable, device unknown or unavailable), so ``serve`` refuses to
    start instead of failing every study later.
    """
    from model.checkpoint import read_metadata, shipped_checkpoint_path, weights_sha256
    from model.device import resolve_device
    from model.refiner import load_refiners

    resolve_device(device)
    path = Path(checkpoint) if checkpoint is not None else shipped_checkpoint_path()
    # small; a broken refiner file fails here, not at the first study
    load_refiners(path, network_sha256=weights_sha256(path, read_metadata(path)))


@functools.lru_cache(maxsize=2)
def load_predictor(checkpoint: Path | None, device: str) -> object:
    """Load a checkpoint once per worker process (later studies reuse it)."""
    from model.predict import Predictor

    return Predictor.load(checkpoint, device=device)


def warn_calibration_differs(version: str, differences: dict[str, dict[str, object]]) -> None:
    """Warn (once per model and difference) that the calibrated threshold was chosen under other settings."""
    key = (version, repr(sorted(differences.items())))
    if key in _WARNED_CALIBRATION:
        return
    _WARNED_CALIBRATION.add(key)
    changed = ", ".join(f"{name} {d['configured']!r} (calibrated with {d['calibrated']!r})"
                        for name, d in differences.items())
    log.warning("model %s: its threshold was calibrated under other post-processing than configured: %s; "
                "re-run `igtv-node calibrate --config node.toml` on labelled studies or set "
                "processing.threshold", version, changed)


_WARNED_CALIBRATION: set[tuple[str, str]] = set()


def threshold_source(settings: ProcessSettings, predictor: object) -> str:
    """Where the applied threshold came from: "settings", "checkpoint" (calibrated) or "default"."""
    if settings.threshold is not None:
        return "settings"
    return "checkpoint" if "operating_point" in getattr(predictor, "metadata", {}) else "default"


def node_version() -> str:
    """Installed version of the igtv-node distribution."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("igtv-node")
    except PackageNotFoundError:
        return "0.1.0"


def registration_summary(info: object) -> dict:
    """JSON-ready view of the registration record (whatever fields it carries)."""
    if info is None:
        return {}
    if hasattr(info, "to_dict"):
        return info.to_dict()
    if hasattr(info, "__dataclass_fields__"):
        from dataclasses import asdict

        return {k: v for k, v in asdict(info).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    return {"description": str(info)}
