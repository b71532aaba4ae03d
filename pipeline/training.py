"""``igtv-node train``: labelled DICOM studies -> cached 2.5D samples -> a trained checkpoint.

Each study goes through the same path as inference (read, select PET/CT, SUV,
PET onto the CT grid, 2.5D stacks), and its label (an RTSTRUCT ROI or a
DICOM-SEG segment matched by name) goes onto the same model grid. Samples are
cached as pickle-free ``.npz`` files keyed by study, label names and
preprocessing, so a second run (or a fine-tuning run) skips the DICOM work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.preprocessing import Preprocessing
from model.train import DICE_MODES, LABEL_MODES, StudySamples, StudyScorer, TrainConfig, train_model
from pipeline.errors import LabelError, PipelineError
from pipeline.settings import ProcessSettings
from pipeline.uids import validate_uid

log = logging.getLogger(__name__)

LABEL_MODALITIES = ("SEG", "RTSTRUCT")

#: How the best epoch is chosen: "delivered" (the Dice of the lesion the node would deliver
#: after its default post-processing) or "raw" (the whole-crop Dice of the probabilities at 0.5).
SELECTION_RULES = ("delivered", "raw")

#: Probability threshold at which validation finds lesions: inside 0.3-0.45, where
#: ``igtv-node calibrate`` put every network calibrated under the default post-processing
#: (refine5 to refine11, docs/model_card.md).
VALIDATION_THRESHOLD = 0.35


@dataclass
class TrainRequest:
    """What ``igtv-node train`` asks for (see the CLI help for each field).

    The optional fields after ``resume`` are not CLI flags; scripts (ablations,
    the model card) set them.
    """

    data: list[Path]
    out: Path
    roi_names: list[str]
    init: Path | None = None
    freeze: list[str] = field(default_factory=list)
    epochs: int = 30
    seed: int = 0
    cache: Path = Path(".cache/samples")
    val_fraction: float = 0.2
    resume: bool = False
    lr: float | None = None
    samples_per_epoch: int = 400
    batch_size: int = 8
    threads: int = 2
    device: str = "cpu"
    workers: int = 1
    patch: int = 64
    dice: str = "batch"
    mine_every: int = 0
    labels: str = "majority"
    envelope_weight: float = 1.0
    misregister_px: float = 2.0
    slice_step: int | None = None
    select_by: str = "delivered"
    architecture: dict[str, Any] | None = None
    slices: int | None = None
    progress: bool = True


@dataclass
class StudyRef:
    """The series of one study found under the data folders."""

    study_uid: str
    series: list[Any]  # pipeline.reader.SeriesInfo

    @property
    def label_series(self) -> list[Any]:
        return [s for s in self.series if s.modality in LABEL_MODALITIES]


def find_studies(data: Sequence[Path]) -> list[StudyRef]:
    """Scan the folders (recursively) and group series by StudyInstanceUID, sorted by UID."""
    from pipeline import reader

    files: list[Path] = []
    for root in data:
        root = Path(root)
        if not root.exists():
            raise PipelineError(f"training data folder {root} does not exist")
        files.extend(sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root])
    scan = reader.scan_files(files)
    by_study: dict[str, list[Any]] = defaultdict(list)
    for s in scan.series:
        by_study[s.study_instance_uid].append(s)
    return [StudyRef(uid, by_study[uid]) for uid in sorted(by_study)]


def _label_mask(ref: StudyRef, ct: Any, roi_names: Sequence[str]) -> tuple[np.ndarray, str]:
    """CT-grid mask of the first label object that has a matching ROI/segment."""
    import pydicom

    from pipeline import labels

    tried = []
    for s in ref.label_series:
        for path in s.files:
            ds = pydicom.dcmread(path)
            try:
                if s.modality == "SEG":
                    return labels.mask_from_seg(ds, ct, list(roi_names)), f"SEG {s.description or s.uid}"
                return labels.mask_from_rtstruct(ds, ct, list(roi_names)), f"RTSTRUCT {s.description or s.uid}"
            except LabelError as exc:
                tried.append(str(exc))
    detail = "; ".join(tried) if tried else "the study holds no SEG or RTSTRUCT"
    raise LabelError(f"study {ref.study_uid}: no label named {list(roi_names)} ({detail})")


def _cache_key(study_uid: str, roi_names: Sequence[str], prep: Preprocessing, labels: str) -> str:
    blob = json.dumps({"roi": sorted(n.lower() for n in roi_names), "prep": prep.to_dict(), "labels": labels},
                      sort_keys=True)
    return f"{validate_uid(study_uid)}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.npz"


def build_samples(ref: StudyRef, roi_names: Sequence[str], prep: Preprocessing,
                  labels: str = "majority") -> StudySamples:
    """Run one study through the inference path and put its label on the model grid.

    The K slices of every stack are ordered inferior to superior, as in
    ``StackSet.inputs``. ``labels`` (:data:`model.train.LABEL_MODES`): "area" gives each
    model pixel the fraction of it the target covers (float16), "majority" 1 where at
    least half of its CT pixels are target (uint8).
    """
    from pipeline import geometry, reader, selection, stacks, suv

    chosen = selection.select_pet_ct(ref.series)
    ct = reader.load_volume(chosen.ct)
    pet = suv.to_suv(reader.load_volume(chosen.pet))
    pet_on_ct, _ = geometry.pet_onto_ct(pet, ct)
    del pet
    stackset = stacks.build_stacks(ct, pet_on_ct, prep)
    mask, source = _label_mask(ref, ct, roi_names)
    if not mask.any():
        raise LabelError(f"study {ref.study_uid}: label {source} is empty")
    if labels == "area":
        target = stackset.to_model_grid(mask.astype(np.float32)).astype(np.float16)
    elif labels == "majority":
        target = stackset.labels_from_ct_grid(mask)
    else:
        raise PipelineError(f"unknown label mode {labels!r}; choose one of {LABEL_MODES}")
    planes = stackset.planes
    if not stackset.canonical.z_superior:  # inputs reverse K; reverse the study instead
        planes, target = planes[::-1], target[::-1]
    z_spacing = float(ct.image.GetSpacing()[2])
    samples = StudySamples(ref.study_uid, np.ascontiguousarray(planes), np.ascontiguousarray(target),
                           (z_spacing, prep.pixel_spacing_mm), prep.slice_step)
    log.info("study %s: %d stacks of %dx%d, %s label from %s (%d positive slices)", ref.study_uid,
             len(target), *target.shape[1:], labels, source, int(samples.target().reshape(len(target), -1).any(1).sum()))
    return samples


def save_samples(path: Path, s: StudySamples) -> None:
    """Write samples as an npz without pickled objects (planes float16; labels uint8 or float16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    labels = s.labels.astype(np.uint8) if s.labels.dtype == np.uint8 else s.labels.astype(np.float16)
    np.savez(tmp, planes=s.planes.astype(np.float16), labels=labels,
             spacing=np.asarray(s.spacing_mm, dtype=np.float64), name=np.asarray(s.name),
             slice_step=np.asarray(s.slice_step))
    tmp.replace(path)


def load_samples(path: Path) -> StudySamples:
    """Read samples written by :func:`save_samples` (``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as z:
        step = int(z["slice_step"]) if "slice_step" in z.files else 1  # caches from before the option
        return StudySamples(str(z["name"]), z["planes"], z["labels"], tuple(float(v) for v in z["spacing"]), step)


def prepare_sample_file(ref: StudyRef, roi_names: Sequence[str], prep: Preprocessing, labels: str,
                        path: Path) -> Path:
    """Build one study's samples and write them to ``path`` (a worker-process entry point)."""
    save_samples(path, build_samples(ref, roi_names, prep, labels))
    return path


def cached_samples(refs: Iterable[StudyRef], roi_names: Sequence[str], prep: Preprocessing, cache: Path,
                   progress: bool = False, workers: int = 1, labels: str = "majority") -> list[StudySamples]:
    """Samples of every study, from the cache when present (built and cached otherwise).

    Missing studies are built by ``workers`` processes (each runs the whole
    DICOM path, about 1.5 GB peak for a full-size study).
    """
    refs = list(refs)
    paths = [Path(cache) / _cache_key(ref.study_uid, roi_names, prep, labels) for ref in refs]
    missing = [(ref, path) for ref, path in zip(refs, paths, strict=True) if not path.is_file()]
    bar = None
    if progress and missing:
        from rich.progress import Progress

        bar = Progress()
        bar.start()
        task = bar.add_task("preparing studies", total=len(missing))
    try:
        if workers > 1 and len(missing) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(min(workers, len(missing)), mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(prepare_sample_file, ref, list(roi_names), prep, labels, path) for ref, path in missing]
                for fut in as_completed(futures):
                    fut.result()
                    if bar:
                        bar.advance(task)
        else:
            for ref, path in missing:
                prepare_sample_file(ref, roi_names, prep, labels, path)
                if bar:
                    bar.advance(task)
    finally:
        if bar:
            bar.stop()
    return [load_samples(path) for path in paths]


def delivered_dice_scorer(settings: ProcessSettings | None = None,
                          threshold: float = VALIDATION_THRESHOLD) -> StudyScorer:
    """A validation scorer: the Dice of the lesions the node would deliver, on the model grid.

    Parameters
    ----------
    settings:
        :class:`~pipeline.settings.ProcessSettings` whose post-processing (size limit,
        lesions kept, their order, outline) is applied; default the node's defaults.
    threshold:
        Probability threshold at which lesions are found.
    """
    from model.metrics import dice
    from pipeline.postprocess import postprocess_with

    settings = settings or ProcessSettings()

    def score(prob: np.ndarray, study: StudySamples) -> float:
        z_mm, pixel_mm = study.spacing_mm
        delivered = postprocess_with(prob, (z_mm, pixel_mm, pixel_mm), settings, threshold) > 0
        return dice(delivered, study.target() >= 0.5)

    return score


def split_studies(uids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic study-level split: (train, validation)."""
    uids = sorted(uids)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = math.ceil(val_fraction * len(uids)) if len(uids) > 1 and val_fraction > 0 else 0
    order = np.random.default_rng(seed).permutation(len(uids))
    val = sorted(uids[i] for i in order[:n_val])
    return [u for u in uids if u not in val], val


def run_training(req: TrainRequest) -> dict[str, Any]:
    """Prepare samples (cached), split by study, train, and write the best checkpoint."""
    from model.checkpoint import read_metadata
    from model.network import NetConfig
    from model.refiner import refuse_refiners_beside

    refuse_refiners_beside(req.out)  # before hours of training, not when the node first loads it
    if req.init is not None:
        prep = Preprocessing.from_dict(read_metadata(req.init)["preprocessing"])
    else:
        prep = Preprocessing(slices=req.slices) if req.slices else Preprocessing()
    if req.slice_step is not None:
        if req.slice_step < 1:
            raise PipelineError(f"slice step must be a positive number of CT slices, got {req.slice_step}")
        prep = replace(prep, slice_step=req.slice_step)  # K, and so the weights' shapes, stay
    if req.dice not in DICE_MODES:
        raise PipelineError(f"unknown Dice loss {req.dice!r}; choose one of {DICE_MODES}")
    if req.labels not in LABEL_MODES:
        raise PipelineError(f"unknown label mode {req.labels!r}; choose one of {LABEL_MODES}")
    if req.mine_every < 0:
        raise PipelineError(f"mine_every must be 0 (off) or a number of epochs, got {req.mine_every}")
    if req.envelope_weight < 1.0:
        raise PipelineError(f"envelope weight must be at least 1 (1 = no extra weight), got {req.envelope_weight}")
    if req.select_by not in SELECTION_RULES:
        raise PipelineError(f"unknown epoch selection {req.select_by!r}; choose one of {SELECTION_RULES}")
    if req.misregister_px < 0:
        raise PipelineError(f"misregistration shift must be 0 (off) or positive, got {req.misregister_px} px")
    refs = find_studies(req.data)
    refs = [r for r in refs if r.label_series]
    if not refs:
        raise LabelError(f"no labelled study (SEG or RTSTRUCT beside PET/CT) under {[str(p) for p in req.data]}")
    samples = cached_samples(refs, req.roi_names, prep, req.cache, progress=req.progress, workers=req.workers,
                             labels=req.labels)
    by_uid = {s.name: s for s in samples}
    train_uids, val_uids = split_studies(list(by_uid), req.val_fraction, req.seed)
    net_cfg = None
    if req.init is None:
        arch = dict(req.architecture or {})
        arch["slices"] = prep.slices
        net_cfg = NetConfig.from_dict(arch)
    cfg = TrainConfig(
        epochs=req.epochs, seed=req.seed, freeze=list(req.freeze), threads=req.threads,
        samples_per_epoch=req.samples_per_epoch, batch_size=req.batch_size, patch=req.patch, device=req.device,
        lr=req.lr if req.lr is not None else (1e-3 if req.init is not None else 2e-3),
        dice=req.dice, mine_every=req.mine_every, labels=req.labels, envelope_weight=req.envelope_weight,
        misregister_px=req.misregister_px,
    )
    description = {
        "training_data": {
            "sources": [str(p) for p in req.data],
            "label_names": list(req.roi_names),
            "train_studies": len(train_uids),
            "validation_studies": len(val_uids),
            "study_digest": hashlib.sha256("\n".join(sorted(by_uid)).encode()).hexdigest()[:16],
            "train_stacks": int(sum(len(by_uid[u].labels) for u in train_uids)),
        }
    }
    log.info("training on %d studies, validating on %d", len(train_uids), len(val_uids))
    result = train_model(
        [by_uid[u] for u in train_uids], [by_uid[u] for u in val_uids], req.out, prep,
        net_cfg=net_cfg, cfg=cfg, init=req.init, resume=req.resume, metadata=description,
        progress=req.progress, scorer=delivered_dice_scorer() if req.select_by == "delivered" else None,
    )
    best = result["best"]
    log.info("best epoch %s: validation Dice %.4f (%s) -> %s", best.get("epoch"),
             best.get(result["best_by"], float("nan")), req.select_by, req.out)
    return result
