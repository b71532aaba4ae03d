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
* ``torch``: a two-level chunked pure-torch scan (autograd does the backward); used when
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
    chunk: int = 64,
) -> torch.Tensor:
    """Pure-torch two-level scan: O(chunk + L/chunk) Python steps instead of O(L).

    1. every chunk is scanned from a zero state, all chunks at once (chunk steps);
    2. the chunks' end states are chained (L/chunk steps) with the chunk decays
       ``exp(sum dt*A)``;
    3. each position adds its chunk's carried-in state times ``exp(cumsum dt*A)``.
    Only products of decays are exponentiated (no division), so it is as stable
    as the sequential scan. Autograd does the backward.
    """
    dtype_in = u.dtype
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    B = _expand_groups(B, u.shape[1])
    C = _expand_groups(C, u.shape[1])
    b, d, L = u.shape
    g, n = B.shape[1], A.shape[1]
    uf, dt = u.to(work), delta.to(work)
    if delta_bias is not None:
        dt = dt + delta_bias[None, :, None].to(work)
    if delta_softplus:
        dt = F.softplus(dt)
    T = max(1, min(chunk, L))
    nc = -(-L // T)
    pad = nc * T - L
    # padded positions have dt = 0 and u = 0: decay 1, no input -> the state passes through
    dt_p = F.pad(dt, (0, pad)).reshape(b, d, nc, T)
    u_p = F.pad(uf, (0, pad)).reshape(b, d, nc, T)
    Bd = F.pad(B.to(work), (0, pad)).repeat_interleave(d // g, dim=1).reshape(b, d, n, nc, T)
    Cd = F.pad(C.to(work), (0, pad)).repeat_interleave(d // g, dim=1).reshape(b, d, n, nc, T)
    dA = dt_p.unsqueeze(-1) * A.to(work)[None, :, None, None, :]  # (b, d, nc, T, n)
    bx = (dt_p * u_p).unsqueeze(-1) * Bd.permute(0, 1, 3, 4, 2)  # (b, d, nc, T, n)
    h = uf.new_zeros(b, d, nc, n)
    local = []
    for dA_t, bx_t in zip(dA.unbind(3), bx.unbind(3), strict=False):  # unbind keeps the backward linear
        h = torch.exp(dA_t) * h + bx_t
        local.append(h)
    local_s = torch.stack(local, dim=3)  # (b, d, nc, T, n)
    S = torch.cumsum(dA, dim=3)
    decay = torch.exp(S[:, :, :, -1])  # (b, d, nc, n)
    carry = uf.new_zeros(b, d, n)
    carries = []
    for P_c, last_c in zip(decay.unbind(2), local_s[:, :, :, -1].unbind(2), strict=False):
        carries.append(carry)
        carry = P_c * carry + last_c
    h_in = torch.stack(carries, dim=2)  # (b, d, nc, n): state entering each chunk
    states = local_s + torch.exp(S) * h_in.unsqueeze(3)
    y = (states * Cd.permute(0, 1, 3, 4, 2)).sum(-1).reshape(b, d, nc * T)[..., :L]
    if D is not None:
        y = y + uf * D[None, :, None].to(work)
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(dtype_in)


# --------------------------------------------------------------------------- numba


#: Below this many state updates (b*d*L*n) the numba kernels run on the calling thread only:
#: a second OpenMP pool spinning beside torch's costs more than it gains on small scans,
#: and under CPU contention the spinning pools can stall each other.
PARALLEL_MIN_WORK = 16_000_000


def _run_kernel(kernel: Any, work: int, *args: Any) -> None:
    """Call a numba kernel, single-threaded when ``work`` is small."""
    import numba

    if work >= PARALLEL_MIN_WORK or numba.get_num_threads() == 1:
        kernel(*args)
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(previous)


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
        # B, C as (b, g, L, n): the kernels' inner loop over n then reads contiguous memory
        arrs = [t.detach().to(tdt).contiguous() for t in (u, delta, A, B.transpose(2, 3), C.transpose(2, 3))]
        Dt = (D if D is not None else torch.zeros(d, dtype=tdt)).detach().to(tdt).contiguous()
        bias = (delta_bias if delta_bias is not None else torch.zeros(d, dtype=tdt)).detach().to(tdt).contiguous()
        zt = z.detach().to(tdt).contiguous() if z is not None else torch.zeros(1, 1, 1, dtype=tdt)
        y = np.empty((b, d, L), dtype=npdt)
        out = np.empty((b, d, L), dtype=npdt)
        _run_kernel(
            kern.scan_forward, b * d * L * n,
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
        work = b * d * L * n
        nblk = _backward_blocks(b * d) if work >= PARALLEL_MIN_WORK else 1
        du = np.zeros((b, d, L), dtype=npdt)
        ddelta = np.zeros((b, d, L), dtype=npdt)
        dA = np.zeros((nblk, d, n), dtype=npdt)
        dB = np.zeros((nblk, b, g, L, n), dtype=npdt)
        dC = np.zeros((nblk, b, g, L, n), dtype=npdt)
        dD = np.zeros((nblk, d), dtype=npdt)
        dbias = np.zeros((nblk, d), dtype=npdt)
        dz = np.zeros((b, d, L) if has_z else (1, 1, 1), dtype=npdt)
        _run_kernel(
            _NUMBA.scan_backward, work, u.numpy(), delta.numpy(), A.numpy(), B.numpy(), C.numpy(), Dt.numpy(), bias.numpy(),
            zt.numpy(), has_z, softplus, dout_np, nblk, du, ddelta, dA, dB, dC, dD, dbias, dz,
        )
        dt_ = ctx.input_dtypes

        def back(a: np.ndarray, i: int) -> torch.Tensor:
            return torch.from_numpy(a).to(dt_[i])

        return (
            back(du, 0),
            back(ddelta, 1),
            back(dA.sum(axis=0), 2),
            back(dB.sum(axis=0).transpose(0, 1, 3, 2), 3),
            back(dC.sum(axis=0).transpose(0, 1, 3, 2), 4),
            back(dD.sum(axis=0), 5) if has_D else None,
            back(dz, 6) if has_z else None,
            back(dbias.sum(axis=0), 7) if has_bias else None,
            None,
        )


def _backward_blocks(channels: int) -> int:
    """Channel blocks of the backward kernel (one partial gradient buffer each)."""
    return max(1, min(channels, 2 * _NUMBA.num_threads()))
