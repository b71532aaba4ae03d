"""Portable selective scan with mamba_ssm's parameterisation.

``selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)`` computes,
for every batch ``b`` and channel ``d``::

    dt_l   = softplus(delta_l + bias)        (or delta_l + bias without softplus)
    h_l    = exp(dt_l * A) * h_{l-1} + dt_l * B_l * u_l      (state of size n)
    y_l    = <h_l, C_l> + D * u_l
    out_l  = y_l * silu(z_l)                  (when z is given)

with the shapes of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``:
u, delta, z: (b, d, L); A: (d, n); B, C: (b, n, L) or (b, g, n, L) with d % g == 0;
D, delta_bias: (d,). Only real-valued A and input-dependent B, C are supported
(what Mamba uses).

Two backends:

* ``numba``: a compiled kernel, parallel over channels and sequential over
  positions, with its own backward pass (states are recomputed per channel
  block, so no (b, d, L, n) tensor is kept). Default on CPU.
* ``torch``: a chunked pure-torch scan (autograd does the backward); used when
  numba cannot be imported, and on non-CPU devices.

The obviously-correct sequential reference lives in the tests
(``tests/model/reference_scan.py``) and the fast paths are compared against it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_NUMBA: Any = None  # None = not tried, False = unavailable, else the kernel module
_NUMBA_ERROR: str | None = None


def _load_numba() -> Any:
    """Import the numba kernels once; return the module or False."""
    global _NUMBA, _NUMBA_ERROR
    if _NUMBA is None:
        try:
            from model import _scan_numba

            _NUMBA = _scan_numba
        except Exception as exc:  # numba missing or broken: fall back quietly
            _NUMBA = False
            _NUMBA_ERROR = f"{type(exc).__name__}: {exc}"
            log.debug("numba selective scan unavailable (%s); using torch scan", _NUMBA_ERROR)
    return _NUMBA


def available_backends() -> list[str]:
    """Backends usable in this process, fastest first."""
    return (["numba"] if _load_numba() else []) + ["torch"]


def _expand_groups(M: torch.Tensor, dim: int) -> torch.Tensor:
    """(b, n, L) or (b, g, n, L) -> (b, g, n, L) with g dividing ``dim``."""
    if M.dim() == 3:
        M = M.unsqueeze(1)
    if M.dim() != 4 or dim % M.shape[1] != 0:
        raise ValueError(f"B/C must be (b, n, L) or (b, g, n, L) with d % g == 0, got {tuple(M.shape)}")
    return M


def _check(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (b, d, L); got {tuple(u.shape)}, {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"A must be (d, n) with d={u.shape[1]}, got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported by the portable scan")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Selective scan, numerically the same as mamba_ssm's ``selective_scan_fn``.

    Parameters
    ----------
    u, delta:
        (b, d, L) input and (pre-activation) step sizes.
    A:
        (d, n) real state matrix (mamba: ``-exp(A_log)``).
    B, C:
        (b, n, L) or (b, g, n, L) input-dependent projections.
    D, delta_bias:
        Optional (d,) skip weights and step bias.
    z:
        Optional (b, d, L) gate; the output is multiplied by ``silu(z)``.
    delta_softplus:
        Apply softplus to ``delta + delta_bias``.
    backend:
        "auto" (numba on CPU when available, else torch), "numba" or "torch".

    Returns
    -------
    torch.Tensor
        (b, d, L), dtype of ``u``.
    """
    _check(u, delta, A)
    B = _expand_groups(B, u.shape[1])
    C = _expand_groups(C, u.shape[1])
    if backend == "auto":
        backend = "numba" if (u.device.type == "cpu" and _load_numba()) else "torch"
    if backend == "numba":
        if not _load_numba():
            raise RuntimeError(f"numba backend unavailable: {_NUMBA_ERROR}")
        if u.device.type != "cpu":
            raise ValueError("the numba scan runs on CPU tensors only")
        return _NumbaScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend == "torch":
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    raise ValueError(f"unknown scan backend {backend!r}")


# --------------------------------------------------------------------------- torch


def _chunk_states(dA: torch.Tensor, dBu: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """States of one chunk via a stable segment sum.

    dA: (b, d, T, n) log-decays (<= 0 for stable A), dBu: (b, d, T, n), h0: (b, d, n).
    Returns states (b, d, T, n).
    """
    T = dA.shape[2]
    S = torch.cumsum(dA, dim=2)  # (b, d, T, n)
    # decay from position k to l (k <= l): exp(S_l - S_k); masked above the diagonal
    seg = S.unsqueeze(3) - S.unsqueeze(2)  # (b, d, T_l, T_k, n)
    mask = torch.ones(T, T, dtype=torch.bool, device=dA.device).tril()
    seg = seg.masked_fill(~mask[None, None, :, :, None], float("-inf"))
    h = torch.einsum("bdlkn,bdkn->bdln", torch.exp(seg), dBu)
    return h + torch.exp(S) * h0.unsqueeze(2)


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int = 32,
) -> torch.Tensor:
    """Pure-torch chunked scan: exact within chunks, sequential across chunks."""
    dtype_in = u.dtype
    B = _expand_groups(B, u.shape[1])
    C = _expand_groups(C, u.shape[1])
    b, d, L = u.shape
    g = B.shape[1]
    uf, dt = u.float() if u.dtype != torch.float64 else u, delta.to(u.dtype if u.dtype == torch.float64 else torch.float32)
    if delta_bias is not None:
        dt = dt + delta_bias[None, :, None].to(dt.dtype)
    if delta_softplus:
        dt = F.softplus(dt)
    Af = A.to(dt.dtype)
    # per-group channel expansion of B and C: (b, d, n, L)
    Bd = B.to(dt.dtype).repeat_interleave(d // g, dim=1)
    Cd = C.to(dt.dtype).repeat_interleave(d // g, dim=1)
    h = uf.new_zeros(b, d, A.shape[1])
    ys = []
    for s in range(0, L, chunk):
        e = min(L, s + chunk)
        dtc = dt[:, :, s:e]  # (b, d, T)
        dA = dtc.unsqueeze(-1) * Af[None, :, None, :]  # (b, d, T, n)
        dBu = (dtc * uf[:, :, s:e]).unsqueeze(-1) * Bd[:, :, :, s:e].transpose(2, 3)
        hs = _chunk_states(dA, dBu, h)
        ys.append(torch.einsum("bdln,bdnl->bdl", hs, Cd[:, :, :, s:e]))
        h = hs[:, :, -1]
    y = torch.cat(ys, dim=2)
    if D is not None:
        y = y + uf * D[None, :, None].to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_in)


# --------------------------------------------------------------------------- numba


class _NumbaScan(torch.autograd.Function):
    """autograd wrapper around the numba forward and backward kernels."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):  # type: ignore[override]
        kern = _NUMBA
        dtype_in = u.dtype
        npdt = np.float64 if u.dtype == torch.float64 else np.float32
        tdt = torch.float64 if npdt is np.float64 else torch.float32
        b, d, L = u.shape
        n = A.shape[1]
        arrs = [t.detach().to(tdt).contiguous() for t in (u, delta, A, B, C)]
        Dt = (D if D is not None else torch.zeros(d, dtype=tdt)).detach().to(tdt).contiguous()
        bias = (delta_bias if delta_bias is not None else torch.zeros(d, dtype=tdt)).detach().to(tdt).contiguous()
        zt = z.detach().to(tdt).contiguous() if z is not None else torch.zeros(1, 1, 1, dtype=tdt)
        y = np.empty((b, d, L), dtype=npdt)
        out = np.empty((b, d, L), dtype=npdt)
        kern.scan_forward(
            *(a.numpy() for a in arrs), Dt.numpy(), bias.numpy(), zt.numpy(),
            z is not None, bool(delta_softplus), y, out,
        )
        ctx.save_for_backward(*arrs, Dt, bias, zt)
        ctx.flags = (z is not None, bool(delta_softplus), D is not None, delta_bias is not None, n, dtype_in)
        ctx.input_dtypes = tuple(t.dtype if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias))
        return torch.from_numpy(out).to(dtype_in)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        u, delta, A, B, C, Dt, bias, zt = ctx.saved_tensors
        has_z, softplus, has_D, has_bias, n, _ = ctx.flags
        npdt = np.float64 if u.dtype == torch.float64 else np.float32
        dout_np = dout.detach().to(u.dtype).contiguous().numpy()
        b, d, L = u.shape
        g = B.shape[1]
        nblk = _backward_blocks(b * d)
        du = np.zeros((b, d, L), dtype=npdt)
        ddelta = np.zeros((b, d, L), dtype=npdt)
        dA = np.zeros((nblk, d, n), dtype=npdt)
        dB = np.zeros((nblk, b, g, n, L), dtype=npdt)
        dC = np.zeros((nblk, b, g, n, L), dtype=npdt)
        dD = np.zeros((nblk, d), dtype=npdt)
        dbias = np.zeros((nblk, d), dtype=npdt)
        dz = np.zeros((b, d, L) if has_z else (1, 1, 1), dtype=npdt)
        _NUMBA.scan_backward(
            u.numpy(), delta.numpy(), A.numpy(), B.numpy(), C.numpy(), Dt.numpy(), bias.numpy(),
            zt.numpy(), has_z, softplus, dout_np, nblk, du, ddelta, dA, dB, dC, dD, dbias, dz,
        )
        dt_ = ctx.input_dtypes

        def back(a: np.ndarray, i: int) -> torch.Tensor:
            return torch.from_numpy(a).to(dt_[i])

        return (
            back(du, 0),
            back(ddelta, 1),
            back(dA.sum(axis=0), 2),
            back(dB.sum(axis=0), 3),
            back(dC.sum(axis=0), 4),
            back(dD.sum(axis=0), 5) if has_D else None,
            back(dz, 6) if has_z else None,
            back(dbias.sum(axis=0), 7) if has_bias else None,
            None,
        )


def _backward_blocks(channels: int) -> int:
    """Channel blocks of the backward kernel (one partial gradient buffer each)."""
    return max(1, min(channels, 2 * _NUMBA.num_threads()))
