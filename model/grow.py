"""Growing a trained network's decoder without changing what it computes.

A trained :class:`~model.network.SimMamba` can be given a wider decoder
(``NetConfig.decoder_widths``) and refinement head (``refine_width``) for further
fine-tuning. The old weights are copied into the wider layers; each new channel
gets fresh random incoming weights and zero outgoing weights, so the grown
network's output equals the old one's until training moves the new weights.

Run ``igtv-node grow CHECKPOINT --decoder-widths 64,48,32 --refine-width 24 --out GROWN``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.errors import CheckpointError
from model.network import SimMamba, build_network
from model.refiner import refuse_refiners_beside

#: Convolutions whose input is the concatenation [decoder features, something fixed]:
#: name -> the decoder level (index into NetConfig.decoder) of the first part.
_CONCAT_INPUTS = {"up1.conv.0.0.weight": 0, "up0.conv.0.0.weight": 1, "refine.0.0.weight": 2}


def _input_map(name: str, old_in: int, old_dec: tuple[int, ...], new_dec: tuple[int, ...]) -> torch.Tensor:
    """New input-channel index of each old input channel of parameter ``name``."""
    idx = torch.arange(old_in)
    if name in _CONCAT_INPUTS:
        level = _CONCAT_INPUTS[name]
        grown = new_dec[level] - old_dec[level]
        return torch.where(idx < old_dec[level], idx, idx + grown)
    return idx  # the old inputs are the first channels of the new ones


def _grow_tensor(name: str, old: torch.Tensor, new: torch.Tensor, old_dec: tuple[int, ...],
                 new_dec: tuple[int, ...]) -> torch.Tensor:
    """``new`` (fresh init, the grown shape) with ``old`` copied in and the new inputs of old outputs zeroed.

    Only tensors whose shape changed come here, so never a 0-d one (BatchNorm's batch count).
    """
    out = new.clone()
    if old.dim() == 1:  # BatchNorm statistics and affine terms, biases: per output channel
        out[: old.shape[0]] = old
        return out
    o_old, i_old = old.shape[:2]
    cols = _input_map(name, i_old, old_dec, new_dec)
    out[:o_old] = 0  # old outputs must not read the new channels
    out[:o_old, cols] = old
    return out


def grow_decoder(net: SimMamba, decoder_widths: tuple[int, int, int], refine_width: int,
                 seed: int = 0) -> SimMamba:
    """A copy of ``net`` with a wider decoder and refinement head and the same output.

    Parameters
    ----------
    net:
        The trained network.
    decoder_widths:
        New decoder output channels at 1/8, 1/4 and 1/2 resolution; each at least
        the current one.
    refine_width:
        New channels of the full-resolution refinement head, at least the current.
    seed:
        Seed of the new channels' random incoming weights.

    Returns
    -------
    SimMamba
        The grown network (in the mode ``net`` was in).
    """
    old_cfg = net.cfg
    new_cfg = replace(old_cfg, decoder_widths=tuple(int(v) for v in decoder_widths), refine_width=int(refine_width))
    old_dec, new_dec = old_cfg.decoder, new_cfg.decoder
    if any(n < o for n, o in zip(new_dec, old_dec, strict=True)) or new_cfg.refine_width < old_cfg.refine_width:
        raise ValueError(f"growing needs widths at least the current ones: decoder {old_dec} -> {new_dec}, "
                         f"refinement {old_cfg.refine_width} -> {new_cfg.refine_width}")
    torch.manual_seed(seed)
    grown = build_network(new_cfg)
    old_state = net.state_dict()
    new_state = grown.state_dict()
    merged = {}
    for name, new in new_state.items():
        old = old_state[name]
        merged[name] = old.clone() if old.shape == new.shape else _grow_tensor(name, old, new, old_dec, new_dec)
    grown.load_state_dict(merged)
    return grown.train(net.training)


def grow_checkpoint(path: Path, out: Path, decoder_widths: tuple[int, int, int], refine_width: int,
                    seed: int = 0) -> Path:
    """Write ``path``'s network with a grown decoder to ``out`` as a new checkpoint.

    The metadata (preprocessing, training data, seed, ...) is kept; the architecture,
    weights digest and version are the grown network's, "grown_from" names the source,
    and the source's calibrated operating point is dropped (calibrate the new network
    after training it).
    """
    refuse_refiners_beside(out)
    net, meta = load_checkpoint(path)
    if not isinstance(net, SimMamba):
        raise CheckpointError(f"checkpoint {path}: an ensemble cannot be grown; grow one of its members")
    try:
        grown = grow_decoder(net, decoder_widths, refine_width, seed)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc
    grown_from = {"version": meta.get("version"), "decoder": list(net.cfg.decoder), "refine_width": net.cfg.refine_width,
                  "seed": seed}
    dropped = ("architecture", "parameters", "operating_point", "version", "weights_sha256", "created", "grown_from")
    meta = {k: v for k, v in meta.items() if k not in dropped}
    meta["grown_from"] = grown_from
    return save_checkpoint(out, grown, meta)
