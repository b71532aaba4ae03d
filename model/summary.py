"""Parameter count and FLOPs of a SIM-Mamba configuration.

``python -m model.summary [--height 160 --width 128 --slices 5]`` prints them for the
default configuration; ``--checkpoint PATH`` (or ``--checkpoint shipped``) for a
checkpoint's architecture.
FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix
multiplies and convolutions; the selective scan's own O(b*d*L*n) work is added
analytically because the counter does not see inside the numba kernel).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.network import NetConfig, Scan2D, build_network, count_parameters


def _scan_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Analytic FLOPs of the selective scans (about 9 per state element per position)."""
    total = 0
    hooks = []

    def hook(mod: Scan2D, inp: tuple[torch.Tensor], _out: torch.Tensor) -> None:
        nonlocal total
        b, c, h, w = inp[0].shape
        m = mod.mamba
        total += 9 * mod.directions * b * m.d_inner * h * w * m.d_state

    for mod in model.modules():
        if isinstance(mod, Scan2D):
            hooks.append(mod.register_forward_hook(hook))
    with torch.inference_mode():
        model(x)
    for hk in hooks:
        hk.remove()
    return total


def describe(config: NetConfig | None = None, height: int = 160, width: int = 128) -> str:
    """Parameters and forward FLOPs per stack of one (1, 2, K, height, width) input."""
    config = config or NetConfig()
    model = build_network(config).eval()
    x = torch.zeros(1, 2, config.slices, height, width)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    flops = counter.get_total_flops() + _scan_flops(model, x)
    params = count_parameters(model)
    return (
        f"SIM-Mamba {config.to_dict()}\n"
        f"parameters: {params:,} ({params * 4 / 2**20:.2f} MiB float32)\n"
        f"forward FLOPs per stack (1 x 2 x {config.slices} x {height} x {width}): {flops / 1e9:.3f} GFLOP"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Print parameters and FLOPs of the SIM-Mamba network.")
    ap.add_argument("--height", type=int, default=160)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--slices", type=int, default=5)
    ap.add_argument("--no-sim", action="store_true")
    ap.add_argument("--checkpoint", help="a checkpoint whose architecture to describe ('shipped': the default model)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    config = NetConfig(slices=a.slices, use_sim=not a.no_sim)
    if a.checkpoint:
        from model.checkpoint import read_metadata, shipped_checkpoint_path

        path = shipped_checkpoint_path() if a.checkpoint == "shipped" else Path(a.checkpoint)
        config = NetConfig.from_dict(read_metadata(path)["architecture"])
    print(describe(config, a.height, a.width))


if __name__ == "__main__":
    main()
