"""Time selective-scan candidates side by side against the sequential reference.

Usage: ``python benchmarks/bench_scan.py [--batch 1 --dim 384 --length 4096 --state 16]
[--threads 2] [--compile] [--repeats 3]``. Prints forward and forward+backward
times and the speed-up over the reference. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.scan import available_backends, selective_scan, selective_scan_chunked  # noqa: E402


def _reference():
    spec = importlib.util.spec_from_file_location("reference_scan", ROOT / "tests/model/reference_scan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.selective_scan_reference


def _inputs(b, d, L, n, device="cpu", grad=False):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, d, L, generator=g)
    delta = torch.randn(b, d, L, generator=g) * 0.5
    A = -torch.exp(torch.randn(d, n, generator=g) * 0.5)
    B = torch.randn(b, n, L, generator=g)
    C = torch.randn(b, n, L, generator=g)
    D = torch.randn(d, generator=g)
    z = torch.randn(b, d, L, generator=g)
    bias = torch.randn(d, generator=g) * 0.3
    ts = [t.to(device) for t in (u, delta, A, B, C, D, z, bias)]
    if grad:
        for t in ts:
            t.requires_grad_(True)
    return ts


def _time(fn, args, backward, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        u, delta, A, B, C, D, z, bias = args
        y = fn(u, delta, A, B, C, D, z, bias, True)
        if backward:
            y.sum().backward()
        if y.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the chunked scan")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    try:
        import numba

        numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    ref = _reference()
    shape = (a.batch, a.dim, a.length, a.state)
    cands = {
        "reference (loop)": ref,
        "chunked torch": lambda *x: selective_scan_chunked(*x[:5], D=x[5], z=x[6], delta_bias=x[7], delta_softplus=x[8]),
    }
    if "numba" in available_backends():
        cands["numba (+own backward)"] = lambda *x: selective_scan(*x[:5], D=x[5], z=x[6], delta_bias=x[7], delta_softplus=x[8], backend="numba")
    if a.compile:
        compiled = torch.compile(selective_scan_chunked, dynamic=False)
        cands["torch.compile(chunked)"] = lambda *x: compiled(*x[:5], D=x[5], z=x[6], delta_bias=x[7], delta_softplus=x[8])
    print(f"selective scan (batch, d_inner, L, d_state) = {shape}, {a.threads} threads")
    print(f"{'candidate':26s} {'first call':>10s} {'forward':>10s} {'fwd+bwd':>10s} {'x fwd':>7s} {'x f+b':>7s}")
    base = None
    for name, fn in cands.items():
        with torch.no_grad():
            t0 = time.perf_counter()
            fn(*_inputs(*shape), True)
            first = time.perf_counter() - t0
            fwd = _time(fn, _inputs(*shape), False, a.repeats)
        fb = _time(fn, _inputs(*shape, grad=True), True, a.repeats)
        if base is None:
            base = (fwd, fb)
        print(f"{name:26s} {first:9.3f}s {fwd:9.3f}s {fb:9.3f}s {base[0] / fwd:6.1f}x {base[1] / fb:6.1f}x", flush=True)


if __name__ == "__main__":
    main()
