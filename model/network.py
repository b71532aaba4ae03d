"""SIM-Mamba: a 2.5D cross-modal PET/CT Mamba network with a slice interaction module.

Input (batch, 2, K, H, W): channel 0 PET (normalised SUV), channel 1 CT
(normalised HU), K adjacent slices; output logits (batch, 1, H, W) for the
centre slice. H and W must be multiples of 16.

Layout (widths c0..c3 at 1/2, 1/4, 1/8, 1/16 resolution):

* per-slice stages (stem at 1/2, stage1 at 1/4): every one of the K slices of
  each modality goes through its modality's encoder (batched as B*K); the two
  modalities are fused per slice, and the slice interaction module (SIM) folds
  the K slices' features into the centre slice's -> decoder skips at 1/2 and 1/4.
* centre-slice stages (stage2 at 1/8, stage3 at 1/16): only the centre slice
  continues, per modality, with cross-modal Mamba interaction at each stage:
  PET<->CT channel gating, fusion, and selective scans over the fused 2D map in
  four directions (row, column and their reverses).
* U-shaped decoder with skips, plus a full-resolution refinement that sees the
  centre slice's raw PET and CT.

The K-slice context therefore costs only the two cheap high-resolution stages;
the Mamba stages run once per stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.mamba import Mamba


@dataclass(frozen=True)
class NetConfig:
    """Architecture of :class:`SimMamba` (serialised into checkpoint metadata).

    Parameters
    ----------
    slices:
        K, adjacent slices per input stack (odd).
    widths:
        Channels at 1/2, 1/4, 1/8 and 1/16 resolution.
    depths:
        Conv blocks per encoder stage (after the downsampling conv).
    use_sim:
        True: SIM fuses the K slices; False: a plain 1x1 conv over the
        concatenated slice features (the "K>1 without SIM" ablation).
    shared_encoders:
        One encoder for PET and CT (with a learned modality embedding) instead of two.
    d_state, mamba_expand:
        Mamba state size and inner expansion in the cross-modal stages.
    directions:
        Scan directions over 2D maps: 2 (row, row reversed) or 4 (+ columns).
    refine_width:
        Channels of the full-resolution refinement head.
    decoder_widths:
        Output channels of the decoder's blocks at 1/8, 1/4 and 1/2 resolution; None
        uses the encoder's (``widths`` 1/8, 1/4, 1/2). Wider decoders can be grown from a trained
        network without changing its output (:func:`model.grow.grow_decoder`).
    """

    slices: int = 5
    widths: tuple[int, int, int, int] = (8, 16, 32, 64)
    depths: tuple[int, int, int, int] = (1, 1, 1, 1)
    use_sim: bool = True
    shared_encoders: bool = False
    d_state: int = 16
    mamba_expand: int = 1
    directions: int = 4
    refine_width: int = 8
    sim_reduction: int = 4
    decoder_widths: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.slices < 1 or self.slices % 2 == 0:
            raise ValueError(f"slices must be a positive odd number, got {self.slices}")
        if len(self.widths) != 4 or len(self.depths) != 4:
            raise ValueError("widths and depths need four entries (1/2, 1/4, 1/8, 1/16)")
        if self.directions not in (2, 4):
            raise ValueError("directions must be 2 or 4")
        if self.decoder_widths is not None and (len(self.decoder_widths) != 3 or min(self.decoder_widths) < 1):
            raise ValueError(f"decoder_widths needs three positive entries (1/8, 1/4, 1/2), got {self.decoder_widths}")

    @property
    def decoder(self) -> tuple[int, int, int]:
        """Decoder output channels at 1/8, 1/4 and 1/2 resolution."""
        if self.decoder_widths is not None:
            return self.decoder_widths
        return self.widths[2], self.widths[1], self.widths[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["depths"] = list(self.depths)
        if self.decoder_widths is None:
            del d["decoder_widths"]  # the default: older readers of the metadata see no new key
        else:
            d["decoder_widths"] = list(self.decoder_widths)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetConfig:
        """Inverse of :meth:`to_dict`; unknown keys are rejected."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown network config keys: {sorted(unknown)}")
        kw = dict(data)
        for key in ("widths", "depths", "decoder_widths"):
            if kw.get(key) is not None:
                kw[key] = tuple(int(v) for v in kw[key])
        return cls(**kw)


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def _stage(cin: int, cout: int, depth: int) -> nn.Sequential:
    """Downsample by 2 then ``depth`` residual blocks."""
    return nn.Sequential(_conv_bn(cin, cout, stride=2), *[ResBlock(cout) for _ in range(depth)])


class ModalityEncoder(nn.Module):
    """Conv stem and stages of one modality (1 input channel)."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        w, d = cfg.widths, cfg.depths
        self.stem = _stage(1, w[0], d[0])
        self.stage1 = _stage(w[0], w[1], d[1])
        self.stage2 = _stage(w[1], w[2], d[2])
        self.stage3 = _stage(w[2], w[3], d[3])


class SliceInteraction(nn.Module):
    """SIM: the K slices' features interact and are fused into the centre slice's.

    Channel branch: per-slice pooled descriptors -> MLP -> softmax over slices
    (which slice to trust per channel). Spatial branch: depthwise 3x3 conv over
    all slice features -> per-slice spatial logits -> softmax over slices (which
    slice to trust where). Their average weights the slices; a depthwise +
    pointwise conv refines the sum, added to the centre slice's features.
    """

    def __init__(self, c: int, k: int, reduction: int = 4) -> None:
        super().__init__()
        self.k = k
        hidden = max(8, (k * c) // reduction)
        self.channel_mlp = nn.Sequential(nn.Linear(k * c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, k * c))
        self.spatial = nn.Sequential(
            nn.Conv2d(k * c, k * c, 3, padding=1, groups=k * c, bias=False),
            nn.BatchNorm2d(k * c),
            nn.ReLU(inplace=True),
            nn.Conv2d(k * c, k, 1),
        )
        self.refine = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=False),
            nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, C, h, w) -> (B, C, h, w)."""
        b, k, c, h, w = x.shape
        a_ch = self.channel_mlp(x.mean(dim=(3, 4)).reshape(b, k * c)).reshape(b, k, c)
        a_ch = torch.softmax(a_ch, dim=1)[..., None, None]  # (B, K, C, 1, 1)
        a_sp = torch.softmax(self.spatial(x.reshape(b, k * c, h, w)), dim=1)[:, :, None]  # (B, K, 1, h, w)
        fused = (x * (0.5 * (a_ch + a_sp))).sum(dim=1)
        return F.relu(x[:, k // 2] + self.refine(fused))


class SliceConcat(nn.Module):
    """Ablation without SIM: a 1x1 conv over the concatenated slice features."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(nn.Conv2d(k * c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k, c, h, w = x.shape
        return self.mix(x.reshape(b, k * c, h, w))


class Scan2D(nn.Module):
    """A Mamba over a 2D map read in 2 or 4 directions; directions are averaged."""

    def __init__(self, c: int, cfg: NetConfig) -> None:
        super().__init__()
        self.directions = cfg.directions
        self.norm = nn.LayerNorm(c)
        self.mamba = Mamba(c, d_state=cfg.d_state, expand=cfg.mamba_expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        rows = x.flatten(2).transpose(1, 2)  # (B, h*w, C) row-major
        seqs = [rows, rows.flip(1)]
        if self.directions == 4:
            cols = x.transpose(2, 3).flatten(2).transpose(1, 2)  # column-major
            seqs += [cols, cols.flip(1)]
        y = self.mamba(self.norm(torch.cat(seqs, dim=0)))
        ys = y.split(b, dim=0)
        out = ys[0] + ys[1].flip(1)
        if self.directions == 4:
            out_c = ys[2] + ys[3].flip(1)
            out = out + out_c.reshape(b, w, h, c).transpose(1, 2).reshape(b, h * w, c)
        out = out / self.directions
        return out.transpose(1, 2).reshape(b, c, h, w)


class CrossModalMamba(nn.Module):
    """Cross-modal interaction of one stage: PET<->CT gating, fusion, 4-direction scans.

    Returns updated PET and CT features (each gated by the other and informed by
    the fused context) and the fused map (a decoder skip).
    """

    def __init__(self, c: int, cfg: NetConfig) -> None:
        super().__init__()
        hidden = max(8, c // 4)
        self.gate_from_ct = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, c))
        self.gate_from_pet = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, c))
        self.fuse = nn.Sequential(nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.scan = Scan2D(c, cfg)
        self.back_pet = nn.Conv2d(c, c, 1)
        self.back_ct = nn.Conv2d(c, c, 1)

    def forward(self, pet: torch.Tensor, ct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g_pet = torch.sigmoid(self.gate_from_ct(ct.mean(dim=(2, 3))))[..., None, None]
        g_ct = torch.sigmoid(self.gate_from_pet(pet.mean(dim=(2, 3))))[..., None, None]
        pet = pet * (1 + g_pet)
        ct = ct * (1 + g_ct)
        fused = self.fuse(torch.cat([pet, ct], dim=1))
        fused = fused + self.scan(fused)
        return pet + self.back_pet(fused), ct + self.back_ct(fused), fused


class UpBlock(nn.Module):
    """Upsample x2, concatenate the skip, conv."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv_bn(cin + cskip, cout), _conv_bn(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class SimMamba(nn.Module):
    """The SIM-Mamba IGTV network (see the module docstring)."""

    def __init__(self, cfg: NetConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or NetConfig()
        self.cfg = cfg
        w, k = cfg.widths, cfg.slices
        if cfg.shared_encoders:
            self.encoder = ModalityEncoder(cfg)
            self.modality_embed = nn.Parameter(torch.zeros(2, 1, 1, 1))
        else:
            self.pet_encoder = ModalityEncoder(cfg)
            self.ct_encoder = ModalityEncoder(cfg)
        self.fuse0 = nn.Sequential(nn.Conv2d(2 * w[0], w[0], 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True))
        self.fuse1 = nn.Sequential(nn.Conv2d(2 * w[1], w[1], 1, bias=False), nn.BatchNorm2d(w[1]), nn.ReLU(inplace=True))
        if k > 1:
            make = (lambda c: SliceInteraction(c, k, cfg.sim_reduction)) if cfg.use_sim else (lambda c: SliceConcat(c, k))
            self.slices0 = make(w[0])
            self.slices1 = make(w[1])
        self.cross2 = CrossModalMamba(w[2], cfg)
        self.cross3 = CrossModalMamba(w[3], cfg)
        d = cfg.decoder
        self.up2 = UpBlock(w[3], w[2], d[0])
        self.up1 = UpBlock(d[0], w[1], d[1])
        self.up0 = UpBlock(d[1], w[0], d[2])
        self.refine = nn.Sequential(_conv_bn(d[2] + 2, cfg.refine_width), nn.Conv2d(cfg.refine_width, 1, 1))

    def _encoders(self) -> tuple[ModalityEncoder, ModalityEncoder]:
        if self.cfg.shared_encoders:
            return self.encoder, self.encoder
        return self.pet_encoder, self.ct_encoder

    def encoder_stages(self) -> dict[str, list[nn.Module]]:
        """Encoder modules by stage name (for ``--freeze stem`` etc.)."""
        encs = [self.encoder] if self.cfg.shared_encoders else [self.pet_encoder, self.ct_encoder]
        return {name: [getattr(e, name) for e in encs] for name in ("stem", "stage1", "stage2", "stage3")}

    def encode_planes(self, planes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-slice stages of (M, 2, H, W) planes -> (fused 1/2, fused 1/4, PET 1/4, CT 1/4) features.

        Every plane is encoded independently (eval-mode BatchNorm), so a plane
        shared by several stacks can be encoded once (see :meth:`forward_planes`).
        """
        enc_p, enc_c = self._encoders()
        pet, ct = planes[:, 0:1], planes[:, 1:2]
        if self.cfg.shared_encoders:
            pet = pet + self.modality_embed[0]
            ct = ct + self.modality_embed[1]
        p0, c0 = enc_p.stem(pet), enc_c.stem(ct)
        p1, c1 = enc_p.stage1(p0), enc_c.stage1(c0)
        return self.fuse0(torch.cat([p0, c0], dim=1)), self.fuse1(torch.cat([p1, c1], dim=1)), p1, c1

    def _head(self, s0: torch.Tensor, s1: torch.Tensor, p1: torch.Tensor, c1: torch.Tensor,
              centre: torch.Tensor) -> torch.Tensor:
        """Slice folding, centre-slice stages, decoder. s0, s1: (B, K, C, h, w); p1, c1, centre: (B, ...)."""
        k = self.cfg.slices
        if k == 1:
            s0, s1 = s0[:, 0], s1[:, 0]
        else:
            s0, s1 = self.slices0(s0), self.slices1(s1)
        enc_p, enc_c = self._encoders()
        p2, c2 = enc_p.stage2(p1), enc_c.stage2(c1)
        p2, c2, f2 = self.cross2(p2, c2)
        p3, c3 = enc_p.stage3(p2), enc_c.stage3(c2)
        _, _, f3 = self.cross3(p3, c3)
        y = self.up2(f3, f2)
        y = self.up1(y, s1)
        y = self.up0(y, s0)
        y = F.interpolate(y, size=centre.shape[-2:], mode="bilinear", align_corners=False)
        return self.refine(torch.cat([y, centre], dim=1))

    def _check(self, k: int, h: int, w: int, m: int = 2) -> None:
        if m != 2 or k != self.cfg.slices:
            raise ValueError(f"expected input (B, 2, {self.cfg.slices}, H, W), got K={k} with {m} channels")
        if h % 16 or w % 16:
            raise ValueError(f"H and W must be multiples of 16, got {h}x{w}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, K, H, W) -> logits (B, 1, H, W)."""
        b, m, k, h, w = x.shape
        self._check(k, h, w, m)
        planes = x.transpose(1, 2).reshape(b * k, 2, h, w)
        s0, s1, p1, c1 = self.encode_planes(planes)
        centre = slice(k // 2, None, k)  # the centre slice of every stack in the (B*K) batch
        return self._head(
            s0.reshape(b, k, *s0.shape[1:]), s1.reshape(b, k, *s1.shape[1:]), p1[centre], c1[centre],
            x[:, :, k // 2],
        )

    def forward_planes(self, planes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Logits of stacks given as shared planes: stack i is ``planes[index[i]]`` (index (B, K)).

        The same result as ``forward(planes[index].transpose(1, 2))`` with each plane
        encoded once; used for whole-study inference where stacks overlap.
        """
        b, k = index.shape
        self._check(k, *planes.shape[-2:], planes.shape[1])
        s0, s1, p1, c1 = self.encode_planes(planes)
        mid = index[:, k // 2]
        return self._head(s0[index], s1[index], p1[mid], c1[mid], planes[mid])


def build_network(cfg: NetConfig | dict[str, Any] | None = None) -> SimMamba:
    """A :class:`SimMamba` from a config or its dict form."""
    if isinstance(cfg, dict):
        cfg = NetConfig.from_dict(cfg)
    return SimMamba(cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())

