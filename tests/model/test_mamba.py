"""The Mamba block keeps mamba_ssm's parameter names, shapes and mathematics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from reference_scan import selective_scan_reference

from model.mamba import Mamba


def _expected_state_dict_shapes(d_model, d_state=16, d_conv=4, expand=2):
    """Names and shapes of mamba_ssm.modules.mamba_simple.Mamba (bias=False, conv_bias=True)."""
    d_inner = expand * d_model
    dt_rank = math.ceil(d_model / 16)
    return {
        "A_log": (d_inner, d_state),
        "D": (d_inner,),
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }


def test_state_dict_matches_mamba_ssm_naming():
    for d_model, d_state in [(32, 16), (96, 8)]:
        m = Mamba(d_model, d_state=d_state)
        got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        assert got == _expected_state_dict_shapes(d_model, d_state)


def test_initialisation_follows_mamba():
    torch.manual_seed(0)
    m = Mamba(64)
    assert torch.allclose(-torch.exp(m.A_log[0]), -torch.arange(1, 17, dtype=torch.float32))
    assert torch.all(m.D == 1)
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


def test_forward_matches_reference_composition_and_loads_state_dict():
    torch.manual_seed(1)
    m = Mamba(16, d_state=4).double()
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    y = m(x)
    # the same computation written out with the reference scan
    xz = m.in_proj(x).transpose(1, 2)
    xi, z = xz.chunk(2, dim=1)
    xi = F.silu(m.conv1d(xi)[..., :23])
    dbl = m.x_proj(xi.transpose(1, 2))
    dt, B, C = torch.split(dbl, [m.dt_rank, 4, 4], dim=-1)
    dt = (dt @ m.dt_proj.weight.t()).transpose(1, 2)
    yr = selective_scan_reference(xi, dt, -torch.exp(m.A_log), B.transpose(1, 2), C.transpose(1, 2),
                                  m.D, z=z, delta_bias=m.dt_proj.bias, delta_softplus=True)
    torch.testing.assert_close(y, m.out_proj(yr.transpose(1, 2)), atol=1e-8, rtol=1e-6)
    m2 = Mamba(16, d_state=4).double()
    m2.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(m2(x), y)
