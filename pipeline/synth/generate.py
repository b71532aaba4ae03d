"""Synthetic thorax PET/CT studies with GTV/IGTV truth: the public entry points.

``generate_study(seed, options)`` builds one study in memory, ``write_study(study, folder)``
writes it as DICOM, and ``generate_studies(out, seed, cases, options)`` does both for
several seeds. The same seed and options give bit-identical pixel data and identical UIDs.

Folder layout of a written study::

    CT/CT0001.dcm ...      CT Image Storage, one file per slice
    PT/PT0001.dcm ...      PET Image Storage (Bq/mL, decay corrected to series start)
    truth/seg_gtv.dcm      DICOM-SEG, one segment labelled "GTV" (tumour at the CT phase)
    truth/seg_igtv.dcm     DICOM-SEG, one segment labelled "IGTV" (union over the cycle)
    truth/rtstruct_gtv.dcm   RT Structure Set, ROI "GTV" (same truth as contours)
    truth/rtstruct_igtv.dcm  RT Structure Set, ROI "IGTV"
    truth/case.json        case parameters (seed, tumours, motion, SUVs, dose, geometry)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom import Dataset

from pipeline.synth.anatomy import ThoraxModel, sample_anatomy
from pipeline.synth.breathing import BreathingTrace
from pipeline.synth.ct import hu_to_stored, render_ct
from pipeline.synth.grid import Grid
from pipeline.synth.lesions import place_tumours, tumour_box, tumour_masks
from pipeline.synth.options import SynthOptions, SynthOptionsError
from pipeline.synth.pet import render_pet, sample_uptake
from pipeline.synth.series import F18_HALF_LIFE_S, StudyInfo, ct_datasets, pet_datasets
from pipeline.synth.truth import make_seg, write_case_json, write_rtstruct_truth
from pipeline.uids import DEFAULT_UID_ROOT, derive_uid
from pipeline.version import __version__

__all__ = ["SynthOptions", "SynthOptionsError", "SyntheticStudy", "generate_study", "write_study",
           "generate_studies"]

CT_INTERCEPT = -1024


@dataclass
class SyntheticStudy:
    """One synthetic study in memory.

    Attributes
    ----------
    seed, options:
        What produced it.
    ct_hu:
        CT in HU (int16, z-y-x in the CT grid's index order; exactly the written values).
    pet_suv:
        PET SUVbw (float32, z-y-x on the PET grid) before 16-bit quantisation.
    pet_suv_ideal:
        The same without noise (blurred time-averaged uptake).
    gtv, igtv:
        Boolean truth masks on the CT grid.
    ct_grid, pet_grid:
        Geometry (origin, spacing, direction); the PET grid is in the PET's own coordinates
        (CT coordinates + ``case["pet_offset_mm"]``).
    case:
        JSON-friendly parameters (written to ``truth/case.json``).
    ct_datasets, pet_datasets:
        One pydicom Dataset per slice, in grid order.
    seg_gtv, seg_igtv:
        highdicom Segmentations of the truth.
    """

    seed: int
    options: SynthOptions
    ct_hu: np.ndarray
    pet_suv: np.ndarray
    pet_suv_ideal: np.ndarray
    gtv: np.ndarray
    igtv: np.ndarray
    ct_grid: Grid
    pet_grid: Grid
    case: dict
    ct_datasets: list[Dataset] = field(repr=False)
    pet_datasets: list[Dataset] = field(repr=False)
    seg_gtv: Dataset = field(repr=False)
    seg_igtv: Dataset = field(repr=False)

    @property
    def ct_origin(self) -> tuple[float, float, float]:
        return self.ct_grid.origin

    @property
    def ct_spacing(self) -> tuple[float, float, float]:
        return self.ct_grid.spacing

    @property
    def ct_direction(self) -> tuple[float, ...]:
        return self.ct_grid.direction_matrix

    @property
    def pet_origin(self) -> tuple[float, float, float]:
        return self.pet_grid.origin

    @property
    def pet_spacing(self) -> tuple[float, float, float]:
        return self.pet_grid.spacing

    @property
    def pet_direction(self) -> tuple[float, ...]:
        return self.pet_grid.direction_matrix


def _ct_z_range(rng: np.random.Generator, options: SynthOptions, model: ThoraxModel) -> tuple[float, float]:
    """Superior-inferior range imaged by the CT, relative to the body centre (mm)."""
    if options.small:
        return -55.0, min(model.p.apex_z - 10.0, 165.0)
    return -110.0 - float(rng.uniform(0, 15)), model.p.apex_z + 12.0


def _ct_grid(rng: np.random.Generator, options: SynthOptions, model: ThoraxModel, lo: float, hi: float) -> Grid:
    p = model.p
    n = 128 if options.small else 512
    fov = 500.0
    px = fov / n
    if options.small:
        sz = options.ct_slice_mm or 5.0
    else:
        sz = options.ct_slice_mm or float(rng.choice([2.0, 2.5, 3.0]))
    nz = int(round((hi - lo) / sz)) + 1
    cx = p.centre[0] + rng.uniform(-12, 12)
    cy = p.centre[1] + rng.uniform(5, 30)
    half = (n - 1) / 2 * px
    z0 = p.centre[2] + lo
    if options.feet_first:
        return Grid((nz, n, n), (cx + half, cy - half, z0 + (nz - 1) * sz), (px, px, sz), (-1, 1, -1))
    return Grid((nz, n, n), (cx - half, cy - half, z0), (px, px, sz), (1, 1, 1))


def _pet_grid(rng: np.random.Generator, options: SynthOptions, ct: Grid, offset: np.ndarray) -> Grid:
    if options.small:
        n, px = 64, 7.0
        sz = options.pet_slice_mm or 5.0
    else:
        n, px = [(128, 4.0), (144, 4.0), (168, 4.0728), (192, 3.6458)][int(rng.integers(0, 4))]
        sz = options.pet_slice_mm or float(rng.choice([2.0, 2.78, 3.0, 3.27, 4.0]))
    lo, hi = ct.extent()
    zlo = lo[2] - rng.uniform(8, 30)
    zhi = hi[2] + rng.uniform(8, 30)
    nz = int(np.ceil((zhi - zlo) / sz)) + 1
    cx, cy = (lo[0] + hi[0]) / 2 + rng.uniform(-5, 5), (lo[1] + hi[1]) / 2 + rng.uniform(-5, 5)
    half = (n - 1) / 2 * px
    if options.feet_first:
        origin = np.array([cx + half, cy - half, zlo + (nz - 1) * sz]) + offset
        return Grid((nz, n, n), tuple(float(v) for v in origin), (px, px, sz), (-1, 1, -1))
    origin = np.array([cx - half, cy - half, zlo]) + offset
    return Grid((nz, n, n), tuple(float(v) for v in origin), (px, px, sz), (1, 1, 1))


def _uids(seed: int, options: SynthOptions, grid_ct: Grid, grid_pet: Grid) -> dict:
    base = ("igtv-node-synth", str(seed), options.fingerprint())

    def u(*parts: str) -> str:
        return derive_uid(DEFAULT_UID_ROOT, *base, *parts)

    own_pet_for = any(float(v) != 0.0 for v in options.pet_offset_mm)
    return {
        "study": u("study"),
        "for": u("frame-of-reference"),
        "pet_for": u("pet-frame-of-reference") if own_pet_for else u("frame-of-reference"),
        "ct_series": u("ct-series"),
        "pet_series": u("pet-series"),
        "ct_sops": [u("ct", str(k)) for k in range(grid_ct.shape[0])],
        "pet_sops": [u("pet", str(k)) for k in range(grid_pet.shape[0])],
        "seg_gtv_series": u("seg-gtv-series"),
        "seg_gtv": u("seg-gtv"),
        "seg_igtv_series": u("seg-igtv-series"),
        "seg_igtv": u("seg-igtv"),
    }


def birth_date(on: date, age: int) -> str:
    """DICOM DA of the birthday ``age`` years before ``on`` (born on 29 February: the 28th in a common year)."""
    try:
        born = on.replace(year=on.year - age)
    except ValueError:
        born = on.replace(year=on.year - age, day=28)
    return born.strftime("%Y%m%d")


def generate_study(seed: int, options: SynthOptions | None = None) -> SyntheticStudy:
    """Build one synthetic PET/CT study (images, truth, DICOM datasets) in memory."""
    options = (options or SynthOptions()).validate()
    static = options.motion == "static"
    r_case, r_anat, r_les, r_ct, r_pet, r_geo = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6))

    # patient and acquisition
    weight = float(np.clip(r_case.normal(76, 15), 45, 130))
    height = float(np.clip(r_case.normal(1.71, 0.09), 1.5, 1.95))
    sex = "M" if r_case.random() < 0.55 else "F"
    age = int(r_case.integers(45, 86))
    study_dt = datetime(2024, 1, 2, 7, 30) + timedelta(days=int(seed % 700), minutes=int(r_case.integers(0, 420)))
    inject_dt = study_dt - timedelta(minutes=float(r_case.uniform(50, 70)))
    ct_dt = study_dt + timedelta(minutes=1)
    pet_dt = ct_dt + timedelta(minutes=float(r_case.uniform(2, 4)))
    dose = float(weight * r_case.uniform(3.0, 4.5) * 1e6)
    centre = (float(r_case.uniform(-10, 10)), float(r_case.uniform(-15, 15)), float(r_case.uniform(-450, -150)))

    # anatomy, breathing, tumours
    model = ThoraxModel(sample_anatomy(r_anat, weight, centre, options.lymph_nodes))
    trace = BreathingTrace(float(r_les.uniform(3.0, 5.5)), int(r_les.integers(1, 4)), float(r_les.uniform(0, 0.08)),
                           float(r_les.uniform(0, 1)))
    z_lo, z_hi = _ct_z_range(r_geo, options, model)
    diameter = options.diameter_mm
    if diameter is None and options.small and options.diameter_range_mm is None:  # coarse test grids: keep the tumour several voxels wide
        diameter = float(r_les.uniform(18, 45))
    tumours = place_tumours(r_les, model, options.n_lesions, diameter, options.amplitude_mm, static,
                            options.necrosis, (z_lo, z_hi), options.amplitude_range_mm, options.diameter_range_mm)
    max_si = max(abs(float(t.amplitude_lps[2])) for t in tumours)
    dia_drawn = float(r_les.uniform(8, 22))
    dia_amp = 0.0 if static else max(1.15 * max_si, dia_drawn)

    # geometry
    offset = np.asarray(options.pet_offset_mm, float)
    ct_grid = _ct_grid(r_geo, options, model, z_lo, z_hi)
    pet_grid = _pet_grid(r_geo, options, ct_grid, offset)

    # truth on the CT grid
    t_ct = trace.ct_time_fraction
    max_path = max(float(np.linalg.norm(t.amplitude_lps)) for t in tumours)
    times = np.array([t_ct]) if static else np.concatenate([[t_ct], trace.envelope_times(max_path)])
    gtv = np.zeros(ct_grid.shape, bool)
    igtv = np.zeros(ct_grid.shape, bool)
    box = tumour_box(tumours, ct_grid)
    if box is not None:
        X, Y, Z = ct_grid.sub_axes(box)
        masks = tumour_masks(tumours, model, trace, dia_amp, X, Y, Z, times)
        gtv[box] = masks[0]
        igtv[box] = masks.any(axis=0)
    ct_shift = -float(trace.inhale_fraction(t_ct)) * dia_amp
    offsets = [trace.displacement(t.amplitude_lps, t_ct) for t in tumours]
    hu = render_ct(model, ct_grid, ct_shift, tumours, offsets, gtv[box] if box else gtv, box, r_ct,
                   work_factor=1 if options.small else 2)
    stored = hu_to_stored(hu, CT_INTERCEPT)
    del hu
    ct_hu = (stored.astype(np.int32) + CT_INTERCEPT).astype(np.int16)

    # PET
    uptake = sample_uptake(r_pet)
    fwhm = float(r_pet.uniform(5.0, 7.0))
    noise = float(r_pet.uniform(0.12, 0.2))
    ideal, suv = render_pet(model, pet_grid, uptake, tumours, trace, dia_amp, options.pet_phases, offset, fwhm, noise,
                            r_pet)
    decay = 2.0 ** (-(pet_dt - inject_dt).total_seconds() / F18_HALF_LIFE_S)
    bqml = suv.astype(np.float64) * (dose * decay) / (weight * 1000.0)

    # DICOM
    uids = _uids(seed, options, ct_grid, pet_grid)
    info = StudyInfo(
        patient_name=f"SYNTH^CASE{seed:04d}", patient_id=f"SYNTH{seed:06d}",
        birth_date=birth_date(study_dt.date(), age), sex=sex, age=f"{age:03d}Y",
        weight_kg=round(weight, 1), height_m=height, study_uid=uids["study"], frame_of_reference_uid=uids["for"],
        pet_frame_of_reference_uid=uids["pet_for"], study_datetime=study_dt, ct_datetime=ct_dt,
        injection_datetime=inject_dt, pet_datetime=pet_dt, injected_dose_bq=round(dose, 1),
        accession=f"SYN{seed:08d}"[-16:], study_id=f"{seed % 10**8}",
        patient_position="FFS" if options.feet_first else "HFS", software_version=__version__,
    )
    # weight as written (1 decimal) is what SUV readers use: recompute Bq/mL with it
    bqml = suv.astype(np.float64) * (info.injected_dose_bq * decay) / (info.weight_kg * 1000.0)
    ct_ds = ct_datasets(info, ct_grid, stored, uids["ct_series"], uids["ct_sops"], CT_INTERCEPT)
    pet_ds, _ = pet_datasets(info, pet_grid, bqml, uids["pet_series"], uids["pet_sops"], frame_s=150.0,
                             bed_mm=160.0)
    seg_gtv = make_seg(ct_ds, gtv, "GTV", uids["seg_gtv_series"], uids["seg_gtv"], 101, __version__)
    seg_igtv = make_seg(ct_ds, igtv, "IGTV", uids["seg_igtv_series"], uids["seg_igtv"], 102, __version__)
    if options.compress:
        _compress(ct_ds + pet_ds, options.compress)

    vox = ct_grid.voxel_volume_ml()
    case = {
        "generator": f"igtv-node {__version__} pipeline.synth",
        "seed": seed,
        "options": options.as_dict(),
        "patient": {"weight_kg": info.weight_kg, "height_m": round(height, 2), "sex": sex, "age": age},
        "injected_dose_bq": info.injected_dose_bq,
        "injection_datetime": inject_dt.isoformat(),
        "pet_series_datetime": pet_dt.isoformat(),
        "ct_datetime": ct_dt.isoformat(),
        "half_life_s": F18_HALF_LIFE_S,
        "decay_factor_injection_to_pet": decay,
        "pet_decay_correction": "START (series time)",
        "pet_psf_fwhm_mm": fwhm,
        "pet_noise_level": noise,
        "pet_offset_mm": [float(v) for v in offset],
        "pet_offset_meaning": "PET coordinates = CT coordinates + pet_offset_mm",
        "pet_phases": int(len(trace.pet_times(options.pet_phases))) if not static else 1,
        "uptake_suv": uptake,
        "breathing": {**trace.as_dict(), "diaphragm_amplitude_mm": dia_amp,
                      "ct_inhale_fraction": float(trace.inhale_fraction(t_ct))},
        "tumours": [t.as_dict() | {"ct_displacement_mm": [float(v) for v in o]} for t, o in zip(tumours, offsets, strict=False)],
        "tumour_si_amplitude_mm": max_si,
        "gtv_volume_ml": float(gtv.sum() * vox),
        "gtv_centroid_mm": _centroid(gtv, ct_grid),
        "igtv_centroid_mm": _centroid(igtv, ct_grid),
        "igtv_si_extent_mm": _si_extent(igtv, ct_grid),
        "gtv_si_extent_mm": _si_extent(gtv, ct_grid),
        "igtv_volume_ml": float(igtv.sum() * vox),
        "lymph_nodes": model.p.nodes,
        "anatomy": model.p.as_dict(),
        "ct_grid": ct_grid.as_dict(),
        "pet_grid": pet_grid.as_dict(),
        "uids": {k: v for k, v in uids.items() if not k.endswith("sops")},
        "truth_layout": {"seg_gtv.dcm": "GTV", "seg_igtv.dcm": "IGTV"},
    }
    return SyntheticStudy(seed, options, ct_hu, suv, ideal, gtv, igtv, ct_grid, pet_grid, case, ct_ds, pet_ds,
                          seg_gtv, seg_igtv)


def _centroid(mask: np.ndarray, grid: Grid) -> list[float] | None:
    """Patient-coordinate centroid (mm) of a mask on ``grid``."""
    if not mask.any():
        return None
    x, y, z = grid.axes()
    k, j, i = np.nonzero(mask)
    return [float(x[i].mean()), float(y[j].mean()), float(z[k].mean())]


def _si_extent(mask: np.ndarray, grid: Grid) -> float:
    """Superior-inferior extent (mm, slice centres plus one slice) of a mask."""
    z = grid.axes()[2][np.nonzero(mask.any(axis=(1, 2)))[0]]
    return float(np.ptp(z) + grid.spacing[2]) if z.size else 0.0


def _compress(datasets: list[Dataset], kind: str) -> None:
    from pydicom.uid import JPEG2000Lossless, RLELossless

    syntax = RLELossless if kind == "rle" else JPEG2000Lossless
    for ds in datasets:
        # keep the instance UIDs: the truth SEGs reference them, and seeds must reproduce them
        ds.compress(syntax, generate_instance_uid=False)


def write_study(study: SyntheticStudy, folder: Path) -> Path:
    """Write ``study`` as DICOM files (CT/, PT/, truth/) under ``folder``; return ``folder``."""
    folder = Path(folder)
    for sub in ("CT", "PT", "truth"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(study.ct_datasets):
        ds.save_as(folder / "CT" / f"CT{k + 1:04d}.dcm", enforce_file_format=True)
    for k, ds in enumerate(study.pet_datasets):
        ds.save_as(folder / "PT" / f"PT{k + 1:04d}.dcm", enforce_file_format=True)
    study.seg_gtv.save_as(folder / "truth" / "seg_gtv.dcm", enforce_file_format=True)
    study.seg_igtv.save_as(folder / "truth" / "seg_igtv.dcm", enforce_file_format=True)
    write_case_json(study.case, folder / "truth" / "case.json")
    write_rtstruct_truth(study, folder)
    return folder


def _write_case(out: Path, index: int, seed: int, options: SynthOptions) -> Path:
    """Generate and write study ``index`` (seed ``seed``); a worker-process entry point."""
    return write_study(generate_study(seed, options), Path(out) / f"case-{index:04d}-seed-{seed}")


def generate_studies(out: Path, seed: int = 0, cases: int = 1, options: SynthOptions | None = None,
                     progress: bool = False, workers: int = 1) -> list[Path]:
    """Generate ``cases`` studies with seeds ``seed .. seed + cases - 1`` into ``out/case-IIII-seed-S``.

    ``workers`` > 1 generates studies in that many processes (about 0.7 GB each
    for full-size studies); the studies are the same as with one.
    """
    options = (options or SynthOptions()).validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        bar = Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        bar.start()
        task = bar.add_task("studies", total=cases)
    try:
        if workers > 1 and cases > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(min(workers, cases), mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_write_case, out, i, seed + i, options) for i in range(cases)]
                folders = []
                for fut in futures:
                    folders.append(fut.result())
                    if bar:
                        bar.advance(task)
            return folders
        folders = []
        for i in range(cases):
            folders.append(_write_case(out, i, seed + i, options))
            if bar:
                bar.advance(task)
        return folders
    finally:
        if bar:
            bar.stop()
