"""The slow, obviously-correct selective scan: a Python loop over positions.

Same mathematics as mamba_ssm's ``selective_scan_ref`` (real A, variable B and C),
written independently. The fast scans in :mod:`model.scan` are tested against it,
and ``benchmarks/bench_scan.py`` times it as the baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Sequential selective scan; shapes as :func:`model.scan.selective_scan`."""
    dtype_in = u.dtype
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    u = u.to(work)
    delta = delta.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None].to(work)
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, L = u.shape
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    g = B.shape[1]
    B = B.to(work).repeat_interleave(d // g, dim=1)  # (b, d, n, L)
    C = C.to(work).repeat_interleave(d // g, dim=1)
    A = A.to(work)
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    # unbind (not indexing) per position keeps the backward linear in L
    steps = zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1), strict=False)
    for dt, ul, Bl, Cl in steps:
        dt = dt.unsqueeze(-1)  # (b, d, 1)
        h = torch.exp(dt * A) * h + dt * Bl * ul.unsqueeze(-1)
        ys.append((h * Cl).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[None, :, None].to(work)
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(dtype_in)
