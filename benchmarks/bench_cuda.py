"""CUDA path check: mamba_ssm's selective-scan kernel against the portable scan, and GPU timings.

Usage (on a machine with a CUDA GPU; mamba-ssm optional)::

    python benchmarks/bench_cuda.py [--repeats 5] [--json OUT.json]

What it does, in one run:

1. agreement: the sequential reference, the portable chunked torch scan and
   (when importable) ``mamba_ssm``'s ``selective_scan_fn``, all on the GPU, on
   the same inputs: largest forward and gradient differences. Exits 1 when the
   paths differ by more than the tolerance (a benchmark that checks, not a test:
   CI has no GPU);
2. the same check one level up: a :class:`model.mamba.Mamba` block with the
   same weights run through both paths;
3. timings (best of ``--repeats``): the scan at the model issue's size
   (1, 384, 4096, 16) and at the network's own sizes; the shipped network's
   whole-study inference (150 stacks of 160x128) and one training step
   (batch 32 of 96x96 patches) through both scan paths, and on the CPU for
   comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_scan import _inputs, _reference  # noqa: E402
from model import mamba as mamba_mod  # noqa: E402
from model.scan import selective_scan_chunked  # noqa: E402

TOLERANCE = 1e-3  # max abs difference, relative to the output's max abs value


def _cuda_scan() -> tuple[Callable[..., torch.Tensor] | None, str]:
    try:
        import mamba_ssm
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # not installed or not built for this GPU
        return None, f"unavailable ({type(exc).__name__}: {exc})"
    return selective_scan_fn, f"mamba_ssm {mamba_ssm.__version__}"


def _sync() -> None:
    torch.cuda.synchronize()


def _best(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (kernel compilation, allocator)
    _sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _scan_call(scan: Callable[..., torch.Tensor], args: list[torch.Tensor]) -> torch.Tensor:
    u, delta, A, B, C, D, z, bias = args
    return scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)


def _grads(scan: Callable[..., torch.Tensor], shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    args = _inputs(*shape, device="cuda", grad=True)
    y = _scan_call(scan, args)
    (y * torch.linspace(-1, 1, y.shape[-1], device="cuda")).sum().backward()
    return y.detach(), [a.grad.detach() for a in args]


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def check_agreement(shape: tuple[int, int, int, int], cuda_scan: Callable[..., torch.Tensor] | None) -> dict[str, float]:
    """Largest forward and gradient differences of each fast path against the reference."""
    ref = _reference()
    y_ref, g_ref = _grads(ref, shape)
    out: dict[str, float] = {}
    candidates = {"torch-chunked": selective_scan_chunked}
    if cuda_scan is not None:
        candidates["mamba_ssm"] = cuda_scan
    for name, scan in candidates.items():
        y, g = _grads(scan, shape)
        out[f"{name} forward"] = _rel_diff(y, y_ref)
        out[f"{name} gradients"] = max(_rel_diff(a, b) for a, b in zip(g, g_ref, strict=True))
    return out


def check_block(cuda_available: bool) -> float | None:
    """Output difference of one Mamba block run with and without the CUDA kernels."""
    if not cuda_available:
        return None
    torch.manual_seed(0)
    block = mamba_mod.Mamba(64, d_state=16).cuda()
    x = torch.randn(8, 144, 64, device="cuda")
    with torch.no_grad():
        block.use_cuda_kernels = True
        y_cuda = block(x)
        block.use_cuda_kernels = False
        y_portable = block(x)
    block.use_cuda_kernels = True
    return _rel_diff(y_cuda, y_portable)


def time_scans(shapes: dict[str, tuple[int, int, int, int]], cuda_scan: Callable[..., torch.Tensor] | None,
               repeats: int) -> list[dict[str, Any]]:
    """Forward and forward+backward times of each path at each shape."""
    rows = []
    candidates = {"torch-chunked (GPU)": selective_scan_chunked}
    if cuda_scan is not None:
        candidates["mamba_ssm (GPU)"] = cuda_scan
    for label, shape in shapes.items():
        for name, scan in candidates.items():
            fwd_args = _inputs(*shape, device="cuda")
            grad_args = _inputs(*shape, device="cuda", grad=True)
            fwd = _best(lambda s=scan, a=fwd_args: _scan_call(s, a), repeats)
            fb = _best(lambda s=scan, a=grad_args: _scan_call(s, a).sum().backward(), repeats)
            rows.append({"shape": label, "path": name, "forward_ms": fwd * 1e3, "fwd_bwd_ms": fb * 1e3})
    return rows


def time_network(repeats: int, cuda_available: bool) -> list[dict[str, Any]]:
    """Whole-study inference and one training step of the shipped network per scan path."""
    from model.checkpoint import load_checkpoint, shipped_checkpoint_path
    from model.predict import Predictor

    rows = []
    net, _ = load_checkpoint(shipped_checkpoint_path())
    k = net.cfg.slices
    g = torch.Generator().manual_seed(0)
    study = torch.rand(150 + k - 1, 2, 160, 128, generator=g)
    stacks = study.unfold(0, k, 1).permute(0, 1, 4, 2, 3).contiguous().numpy()  # (150, 2, K, H, W)
    x = torch.rand(32, 2, k, 96, 96, generator=g)
    y = (torch.rand(32, 1, 96, 96, generator=g) > 0.9).float()
    paths = [("CUDA kernels", "cuda", True)] if cuda_available else []
    paths += [("portable scan", "cuda", False), ("CPU (numba scan)", "cpu", False)]
    for name, device, kernels in paths:
        pred = Predictor.load(None, device=device)
        for mod in pred.network.modules():
            if isinstance(mod, mamba_mod.Mamba):
                mod.use_cuda_kernels = kernels
        sync = _sync if device == "cuda" else (lambda: None)
        pred.predict(stacks, batch_size=32)
        sync()
        t0 = time.perf_counter()
        pred.predict(stacks, batch_size=32)
        sync()
        infer = time.perf_counter() - t0
        step = float("nan")
        if device == "cuda":
            model = pred.network.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            xd, yd = x.to(device), y.to(device)

            def train_step(m=model, o=opt, a=xd, b=yd) -> None:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(m(a), b)
                o.zero_grad(set_to_none=True)
                loss.backward()
                o.step()

            step = _best(train_step, repeats)
        rows.append({"path": name, "device": device, "inference_150_stacks_s": infer, "train_step_b32_96px_ms": step * 1e3})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (this benchmark needs a GPU)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # agreement is checked in true fp32
    torch.backends.cudnn.allow_tf32 = False
    cuda_scan, cuda_info = _cuda_scan()
    mamba_mod._CUDA_SCAN = None  # let the block re-detect the kernels in this process
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "mamba_ssm": cuda_info,
    }
    print(f"GPU {report['gpu']}, torch {report['torch']} (CUDA {report['cuda']}), mamba_ssm: {cuda_info}")
    agreement = {"(2, 96, 300, 16)": check_agreement((2, 96, 300, 16), cuda_scan),
                 "(1, 384, 4096, 16)": check_agreement((1, 384, 4096, 16), cuda_scan)}
    report["agreement"] = agreement
    print("\nagreement with the sequential reference (max abs diff / max abs value):")
    worst = 0.0
    for shape, diffs in agreement.items():
        for key, val in diffs.items():
            worst = max(worst, val)
            print(f"  {shape:20s} {key:28s} {val:.2e}")
    block = check_block(cuda_scan is not None and mamba_mod._cuda_selective_scan() is not False)
    report["mamba_block_cuda_vs_portable"] = block
    if block is not None:
        worst = max(worst, block)
        print(f"  Mamba block, same weights, CUDA kernels vs portable scan: {block:.2e}")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # the network's scans for a batch of 32 160x128 crops: 4 directions x 32 sequences,
    # d_inner = stage width (expand 1), L = tokens of the 1/8 and 1/16 maps
    shapes = {"issue (1, 384, 4096, 16)": (1, 384, 4096, 16),
              "network 1/8 (128, 32, 320, 16)": (128, 32, 320, 16),
              "network 1/16 (128, 64, 80, 16)": (128, 64, 80, 16)}
    report["scan_timings"] = time_scans(shapes, cuda_scan, args.repeats)
    print(f"\n{'scan shape':34s} {'path':22s} {'forward ms':>11s} {'fwd+bwd ms':>11s}")
    for r in report["scan_timings"]:
        print(f"{r['shape']:34s} {r['path']:22s} {r['forward_ms']:11.2f} {r['fwd_bwd_ms']:11.2f}")
    report["network"] = time_network(args.repeats, cuda_scan is not None)
    print(f"\n{'network path':22s} {'150-stack inference s':>22s} {'train step ms':>14s}")
    for r in report["network"]:
        print(f"{r['path']:22s} {r['inference_150_stacks_s']:22.3f} {r['train_step_b32_96px_ms']:14.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    ok = worst <= TOLERANCE
    print(f"\nworst difference {worst:.2e} (tolerance {TOLERANCE:.0e}): {'AGREE' if ok else 'DISAGREE'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
