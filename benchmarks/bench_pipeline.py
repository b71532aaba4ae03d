"""Time the pipeline core on one full-size synthetic PET/CT study and report peak memory.

Stages: scan headers + select series, load CT, load PET, SUV, PET onto the CT
grid (geometry; and, separately, a rigid registration), 2.5D stacks,
back-projection of model-grid predictions to the CT grid, post-processing.
The "predictions" are the truth IGTV on the model grid (no network), so the
back-projected mask is also checked against the truth (Dice).

Reproduce (generates the study in a child process first, so the generator's
memory does not count)::

    PYTHONPATH=$PWD python benchmarks/bench_pipeline.py --ct-slice-mm 1.0
    PYTHONPATH=$PWD python benchmarks/bench_pipeline.py --study path/to/study --register always

Peak RSS is this process's ``ru_maxrss`` (Python, numpy, SimpleITK included).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_mb() -> float:
    """Peak resident set size of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def generate(seed: int, ct_slice_mm: float | None, folder: Path) -> Path:
    """Write one full-size study in a child process; returns its folder."""
    code = (
        "import sys; from pathlib import Path;"
        "from pipeline.synth.generate import SynthOptions, generate_studies;"
        f"opts = SynthOptions(small=False, ct_slice_mm={ct_slice_mm!r});"
        f"print(generate_studies(Path({str(folder)!r}), seed={seed}, cases=1, options=opts)[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, help="Study folder (CT/, PT/, truth/); generated when omitted.")
    parser.add_argument("--seed", type=int, default=2024, help="Seed of the generated study.")
    parser.add_argument("--ct-slice-mm", type=float, default=1.0, help="CT slice spacing of the generated study.")
    parser.add_argument("--register", choices=("auto", "always", "never"), default="always",
                        help="Also time a rigid registration ('always'), or only what 'auto' does.")
    parser.add_argument("--slices", type=int, default=5, help="K of the stacks.")
    args = parser.parse_args(argv)

    import pydicom
    import SimpleITK as sitk

    from model.preprocessing import Preprocessing
    from pipeline import geometry, labels, postprocess, reader, registration, selection, stacks, suv

    tmp = None
    if args.study is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-pipeline-")
        t = time.perf_counter()
        args.study = generate(args.seed, args.ct_slice_mm, Path(tmp.name))
        print(f"generated {args.study} in {time.perf_counter() - t:.1f} s (child process)")

    rows: list[tuple[str, float, float, float]] = []
    base = rss_mb()

    def stage(name: str, start: float) -> None:
        rows.append((name, time.perf_counter() - start, rss_mb(), peak_mb()))

    files = sorted(p for p in args.study.rglob("*.dcm") if "truth" not in p.parts)
    t = time.perf_counter()
    scan = reader.scan_files(files)
    chosen = selection.select_pet_ct(scan.series)
    stage("scan + select", t)
    t = time.perf_counter()
    ct = reader.load_volume(chosen.ct)
    stage("load CT", t)
    t = time.perf_counter()
    pet = reader.load_volume(chosen.pet)
    stage("load PET", t)
    t = time.perf_counter()
    pet_suv = suv.to_suv(pet)
    del pet
    stage("SUV", t)
    t = time.perf_counter()
    pet_on_ct, info = geometry.pet_onto_ct(pet_suv, ct, register="never" if args.register == "always" else args.register)
    stage(f"PET onto CT ({info.method})", t)
    reg_note = ""
    if args.register == "always":
        t = time.perf_counter()
        reg = registration.register_rigid(ct.image, pet_suv.image)
        stage("rigid registration (MI)", t)
        reg_note = (f"registration: translation {np.round(reg.translation_mm, 2).tolist()} mm, rotation "
                    f"{np.round(reg.rotation_deg, 2).tolist()} deg, {reg.iterations} iterations "
                    f"(same frame: ideal is 0)")
    del pet_suv
    prep = Preprocessing(slices=args.slices)
    t = time.perf_counter()
    built = stacks.build_stacks(ct, pet_on_ct, prep)
    stage("2.5D stacks", t)
    t = time.perf_counter()
    truth = labels.mask_from_seg(pydicom.dcmread(args.study / "truth" / "seg_igtv.dcm"), ct, "IGTV")
    probs = built.labels_from_ct_grid(truth).astype(np.float32)
    stage("(truth SEG -> model grid)", t)
    t = time.perf_counter()
    prob_ct = built.to_ct_grid(probs)
    stage("back-projection", t)
    del probs
    spacing_zyx = tuple(float(s) for s in reversed(ct.image.GetSpacing()))
    t = time.perf_counter()
    lesions = postprocess.postprocess(prob_ct, spacing_zyx)
    report = postprocess.component_report(lesions, sitk.GetArrayViewFromImage(pet_on_ct), spacing_zyx)
    stage("post-process + report", t)
    dice = 2.0 * np.logical_and(lesions > 0, truth).sum() / max((lesions > 0).sum() + truth.sum(), 1)

    size = ct.image.GetSize()
    print(f"\nstudy {args.study.name}: CT {size[0]}x{size[1]}x{size[2]} "
          f"spacing {tuple(round(v, 3) for v in ct.image.GetSpacing())}, PET {sitk.Image.GetSize(pet_on_ct)} "
          f"on CT grid; stacks {built.inputs.shape} (N, 2, K, H, W)")
    print(f"{'stage':32s} {'seconds':>8s} {'RSS MiB':>9s} {'peak MiB':>9s}")
    for name, seconds, rss, peak in rows:
        print(f"{name:32s} {seconds:8.2f} {rss:9.0f} {peak:9.0f}")
    total = sum(r[1] for r in rows if not r[0].startswith("("))
    print(f"{'total (pipeline stages)':32s} {total:8.2f}")
    print(f"peak RSS {peak_mb():.0f} MiB (start {base:.0f} MiB); limit 3072 MiB")
    print(f"oracle round trip: {len(report)} lesion(s), Dice vs truth IGTV {dice:.3f}")
    if reg_note:
        print(reg_note)
    print("command: PYTHONPATH=$PWD python benchmarks/bench_pipeline.py " + " ".join(argv or sys.argv[1:]))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
