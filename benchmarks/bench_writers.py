"""Time SEG and RTSTRUCT creation for a 512x512x300 CT with a realistic tumour mask.

Run from the repository root:

    PYTHONPATH=$PWD python benchmarks/bench_writers.py [--repeats 3]

Prints the best time of each writer and its ratio to the 5 s target.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.writers.common import ResultInfo
from pipeline.writers.rtstruct import write_rtstruct
from pipeline.writers.seg import write_seg
from tests.pipeline.writers.ct_factory import ellipsoid_mask, make_ct_series

TARGET_S = 5.0
SHAPE = (300, 512, 512)
SPACING = (2.0, 0.9765625, 0.9765625)


def tumour_mask(seed: int = 0) -> np.ndarray:
    """A lobulated 5-6 cm tumour with a necrotic core, plus a 15 mm nodal lesion (labels 1, 2)."""
    rng = np.random.default_rng(seed)
    centre = np.array([300.0, 250.0, 180.0])
    mask = ellipsoid_mask(SHAPE, SPACING, tuple(centre), (28.0, 24.0, 22.0))
    for _ in range(6):  # lobules
        offset = rng.normal(0.0, 12.0, 3)
        radius = rng.uniform(8.0, 14.0)
        mask |= ellipsoid_mask(SHAPE, SPACING, tuple(centre + offset), (radius, radius, radius))
    rough = ndimage.gaussian_filter(rng.random(SHAPE[1:]).astype(np.float32), 3.0) > 0.5
    mask[:, :, :] &= ~(rough[None] & ~ndimage.binary_erosion(mask, iterations=2))
    mask &= ~ellipsoid_mask(SHAPE, SPACING, tuple(centre), (8.0, 8.0, 8.0))
    labels = mask.astype(np.uint8)
    labels[ellipsoid_mask(SHAPE, SPACING, (320.0, 300.0, 290.0), (7.5, 7.5, 7.5)) & ~mask] = 2
    return labels


def timed(repeats: int, func) -> tuple[float, float, object]:
    """(first call, best call) seconds of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return times[0], min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ct = make_ct_series(None, shape=SHAPE, spacing_zyx=SPACING).volume
    mask = tumour_mask()
    info = ResultInfo(
        uid_root="1.2.826.0.1.3680043.10.1561", model_version="bench", node_version="0.1.0"
    )
    print(
        f"CT {SHAPE[2]}x{SHAPE[1]}x{SHAPE[0]}, tumour {int((mask == 1).sum())} + "
        f"{int((mask == 2).sum())} voxels on {int(mask.any(axis=(1, 2)).sum())} slices"
    )
    for name, func in (
        ("SEG", lambda: write_seg(mask, ct, info)),
        ("RTSTRUCT", lambda: write_rtstruct(mask, ct, info)),
    ):
        first, best, ds = timed(args.repeats, func)
        buffer = io.BytesIO()
        start = time.perf_counter()
        ds.save_as(buffer, enforce_file_format=True)
        save_s = time.perf_counter() - start
        print(
            f"{name:9s} create first {first:6.3f} s, best of {args.repeats} {best:6.3f} s "
            f"(ratio to the {TARGET_S:.0f} s target: {first / TARGET_S:.3f}); "
            f"encode {save_s:.3f} s, {buffer.tell() / 1e6:.2f} MB"
        )


if __name__ == "__main__":
    main()
