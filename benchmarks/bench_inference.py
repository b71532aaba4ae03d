"""Whole-study inference time and peak memory on this machine.

Usage::

    python benchmarks/bench_inference.py [--checkpoint PATH] [--slices-n 100] [--height 160 --width 128]
        [--threads 2] [--study STUDY_DIR]

Without ``--study`` the input is a sliding window over random planes of the
given size (N stacks, as the pipeline's stack builder makes them: only slices
that can contain lung, cropped around the lungs). With ``--study`` a DICOM
study goes through the pipeline's loading and stack building first (timed
separately) and the checkpoint's lesion refiner and outline refiner, if it has them,
run after the network as in the node, with the return to the CT grid between them
(each timed separately). Prints seconds and peak RSS (target:
<= 10 s and < 2 GiB on the 2-core CPU). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import save_checkpoint, shipped_checkpoint_path  # noqa: E402
from model.network import NetConfig, build_network  # noqa: E402
from model.predict import Predictor  # noqa: E402
from model.preprocessing import Preprocessing  # noqa: E402
from pipeline.settings import ProcessSettings  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _predictor(path: Path | None) -> Predictor:
    if path is None and shipped_checkpoint_path().is_file():
        path = shipped_checkpoint_path()
    if path is None:  # untrained default network: same cost as the trained one
        import tempfile

        tmp = Path(tempfile.mkdtemp()) / "untrained.safetensors"
        prep = Preprocessing()
        save_checkpoint(tmp, build_network(NetConfig(slices=prep.slices)), {"preprocessing": prep.to_dict()})
        path = tmp
    return Predictor.load(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--slices-n", type=int, default=100, help="stacks per study (lung slices)")
    ap.add_argument("--height", type=int, default=160)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--study", type=Path, default=None, help="a DICOM study folder to run through the pipeline")
    ap.add_argument("--flips", default=ProcessSettings().test_time_flips,
                    help="test-time flips: none, lr or lr+slices (default: the node's)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    try:
        import numba

        numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    t0 = time.perf_counter()
    pred = _predictor(a.checkpoint)
    k, step, span = pred.preprocessing.slices, pred.preprocessing.slice_step, pred.preprocessing.span
    t_load = time.perf_counter() - t0
    if a.study is not None:
        from pipeline import geometry, reader, selection, stacks, suv

        t1 = time.perf_counter()
        scan = reader.scan_files(p for p in a.study.rglob("*") if p.is_file())
        chosen = selection.select_pet_ct(scan.series)
        ct = reader.load_volume(chosen.ct)
        pet_on_ct, _ = geometry.pet_onto_ct(suv.to_suv(reader.load_volume(chosen.pet)), ct)
        stackset = stacks.build_stacks(ct, pet_on_ct, pred.preprocessing)
        inputs = stackset.inputs
        print(f"pipeline load + stacks: {time.perf_counter() - t1:.2f} s")
    else:
        rng = np.random.default_rng(0)
        planes = rng.random((a.slices_n + span - 1, 2, a.height, a.width), dtype=np.float32)
        inputs = np.moveaxis(np.lib.stride_tricks.sliding_window_view(planes, span, axis=0)[..., ::step], -1, 2)
    pred.predict(inputs[:2])  # warm-up (numba kernels load from cache)
    t2 = time.perf_counter()
    probs = pred.predict(inputs, batch_size=a.batch_size, flips=a.flips)
    t_inf = time.perf_counter() - t2
    n, _, _, h, w = inputs.shape
    print(f"model {pred.version}: K={k} (slice step {step}), {n} stacks of {h}x{w}, {a.threads} threads, test-time flips {a.flips!r}")
    print(f"checkpoint load: {t_load:.2f} s")
    print(f"inference: {t_inf:.2f} s ({1000 * t_inf / n:.1f} ms/stack); target <= 10 s")
    if a.study is not None:
        import SimpleITK as sitk

        from pipeline.refinement import outline_in_place, refine_probabilities

        settings = ProcessSettings()
        z_mm = float(ct.image.GetSpacing()[2])
        peak_before = _peak_rss_mib()
        t3 = time.perf_counter()
        refined = refine_probabilities(probs, stackset, pred.refiner, z_mm, settings, settings.threshold_for(pred.threshold))
        t_ref = time.perf_counter() - t3
        state = "changed the lesion" if refined is not probs else "left the probabilities as they were"
        print(f"lesion refiner: {t_ref:.2f} s ({state}); network and refiner {t_inf + t_ref:.2f} s; "
              f"peak RSS before it {peak_before:.0f} MiB")
        t4 = time.perf_counter()
        prob_ct = stackset.to_ct_grid(refined)
        t_grid = time.perf_counter() - t4
        outlined = outline_in_place(prob_ct, sitk.GetArrayViewFromImage(ct.image), sitk.GetArrayViewFromImage(pet_on_ct),
                                    stackset.canonical, pred.preprocessing, pred.outline,
                                    tuple(float(v) for v in reversed(ct.image.GetSpacing())), settings,
                                    settings.threshold_for(pred.threshold))
        t_out = time.perf_counter() - t4 - t_grid
        state = "changed the lesion" if outlined else "left the probabilities as they were"
        print(f"CT grid: {t_grid:.2f} s; outline refiner: {t_out:.2f} s ({state}); network, refiners and CT grid "
              f"{t_inf + t_ref + t_grid + t_out:.2f} s")
    print(f"peak RSS: {_peak_rss_mib():.0f} MiB; target < 2048 MiB")
    assert probs.shape == (n, h, w)


if __name__ == "__main__":
    main()
