"""A Mamba block whose parameters match ``mamba_ssm.modules.mamba_simple.Mamba``.

Parameter names and shapes (in_proj, conv1d, x_proj, dt_proj, A_log, D,
out_proj) and the initialisation follow mamba_ssm, so a state dict moves
between the two. On CUDA tensors with mamba_ssm importable, its fused
selective-scan kernel is used; otherwise the portable :mod:`model.scan`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.scan import selective_scan

log = logging.getLogger(__name__)

_CUDA_SCAN: Any = None  # None = not tried, False = unavailable


def _cuda_selective_scan() -> Any:
    """mamba_ssm's CUDA ``selective_scan_fn`` or False (imported lazily, once, quietly)."""
    global _CUDA_SCAN
    if _CUDA_SCAN is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            _CUDA_SCAN = selective_scan_fn
        except Exception as exc:  # not installed, or built without CUDA
            _CUDA_SCAN = False
            log.debug("mamba_ssm CUDA kernels unavailable (%s); using the portable scan", exc)
    return _CUDA_SCAN


class Mamba(nn.Module):
    """Selective state-space block on (batch, length, d_model) sequences.

    Parameters
    ----------
    d_model:
        Feature width of the sequence.
    d_state, d_conv, expand:
        SSM state size, causal depthwise-conv width, inner expansion.
    dt_rank:
        Rank of the step-size projection; "auto" means ``ceil(d_model / 16)``.
    dt_min, dt_max, dt_init, dt_scale, dt_init_floor:
        Step-size initialisation as in mamba_ssm.
    conv_bias, bias:
        Bias of the conv1d and of in/out projections.
    use_cuda_kernels:
        Use mamba_ssm's kernels on CUDA tensors when importable.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_cuda_kernels: bool = True,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_cuda_kernels = use_cuda_kernels

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
            padding=d_conv - 1, bias=conv_bias,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        # bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max]
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]

        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, length, d_model) -> same shape."""
        _, L, _ = hidden_states.shape
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (b, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :L])
        x_dbl = self.x_proj(x.transpose(1, 2))  # (b, L, dt_rank + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (b, d_inner, L); bias added in the scan
        B = B.transpose(1, 2).contiguous()
        C = C.transpose(1, 2).contiguous()
        A = -torch.exp(self.A_log.float())
        scan = selective_scan
        if self.use_cuda_kernels and hidden_states.is_cuda and _cuda_selective_scan():
            scan = _cuda_selective_scan()
        y = scan(
            x.contiguous(), dt.contiguous(), A, B, C, self.D.float(), z=z.contiguous(),
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2))
