"""numba kernels of the selective scan (forward and hand-written backward).

Parallel over channels (``prange``), sequential over positions. Shapes follow
:mod:`model.scan`, except that B and C (and their gradients) come expanded to
groups and laid out (b, g, L, n), so the inner loop over the state reads
contiguous memory. Importing this module raises ImportError when numba is
missing; :mod:`model.scan` then falls back to the torch scan.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange


@njit(inline="always")
def _softplus(x):
    if x > 20.0:
        return x
    return math.log1p(math.exp(x))


@njit(inline="always")
def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@njit(parallel=True, cache=True, fastmath=False)
def scan_forward(u, delta, A, B, C, D, bias, z, has_z, softplus, y, out):
    """Fill ``y`` (before gating) and ``out`` (after the optional silu(z) gate)."""
    b, d, L = u.shape
    g = B.shape[1]
    n = A.shape[1]
    per_group = d // g
    for bd in prange(b * d):
        bi = bd // d
        di = bd % d
        gi = di // per_group
        h = np.zeros(n, dtype=u.dtype)
        for t in range(L):
            dt = delta[bi, di, t] + bias[di]
            if softplus:
                dt = _softplus(dt)
            ul = u[bi, di, t]
            acc = 0.0
            for k in range(n):
                h[k] = math.exp(dt * A[di, k]) * h[k] + dt * B[bi, gi, t, k] * ul
                acc += h[k] * C[bi, gi, t, k]
            yl = acc + D[di] * ul
            y[bi, di, t] = yl
            if has_z:
                zl = z[bi, di, t]
                out[bi, di, t] = yl * zl * _sigmoid(zl)
            else:
                out[bi, di, t] = yl


@njit(parallel=True, cache=True, fastmath=False)
def scan_backward(u, delta, A, B, C, D, bias, z, has_z, softplus, dout, nblk,
                  du, ddelta, dA, dB, dC, dD, dbias, dz):
    """Gradients of the scan. dA, dB, dC, dD and dbias get one partial buffer per
    channel block (first axis, summed by the caller) so parallel blocks never race."""
    b, d, L = u.shape
    g = B.shape[1]
    n = A.shape[1]
    per_group = d // g
    total = b * d
    for blk in prange(nblk):
        start = (total * blk) // nblk
        stop = (total * (blk + 1)) // nblk
        hs = np.empty((L + 1, n), dtype=u.dtype)  # hs[t + 1] = state after position t
        dts = np.empty(L, dtype=u.dtype)
        gcar = np.empty(n, dtype=u.dtype)
        for bd in range(start, stop):
            bi = bd // d
            di = bd % d
            gi = di // per_group
            # recompute states
            for k in range(n):
                hs[0, k] = 0.0
            for t in range(L):
                dt = delta[bi, di, t] + bias[di]
                if softplus:
                    dt = _softplus(dt)
                dts[t] = dt
                ul = u[bi, di, t]
                for k in range(n):
                    hs[t + 1, k] = math.exp(dt * A[di, k]) * hs[t, k] + dt * B[bi, gi, t, k] * ul
            # reverse sweep
            for k in range(n):
                gcar[k] = 0.0
            dDacc = 0.0
            dbacc = 0.0
            for t in range(L - 1, -1, -1):
                ul = u[bi, di, t]
                dt = dts[t]
                go = dout[bi, di, t]
                if has_z:
                    zl = z[bi, di, t]
                    sg = _sigmoid(zl)
                    acc = 0.0
                    for k in range(n):
                        acc += hs[t + 1, k] * C[bi, gi, t, k]
                    yl = acc + D[di] * ul
                    dy = go * zl * sg
                    dz[bi, di, t] = go * yl * sg * (1.0 + zl * (1.0 - sg))
                else:
                    dy = go
                dDacc += dy * ul
                dul = dy * D[di]
                ddt = 0.0
                for k in range(n):
                    Ck = C[bi, gi, t, k]
                    Bk = B[bi, gi, t, k]
                    dC[blk, bi, gi, t, k] += dy * hs[t + 1, k]
                    G = gcar[k] + dy * Ck  # dL/dh_l
                    a = math.exp(dt * A[di, k])
                    # h_l = a * h_{t-1} + dt * B * u
                    dB[blk, bi, gi, t, k] += G * dt * ul
                    dul += G * dt * Bk
                    da = G * hs[t, k] * a  # dL/d(dt*A)
                    ddt += G * Bk * ul + da * A[di, k]
                    dA[blk, di, k] += da * dt
                    gcar[k] = G * a
                du[bi, di, t] = dul
                if softplus:
                    ddt = ddt * _sigmoid(delta[bi, di, t] + bias[di])
                ddelta[bi, di, t] = ddt
                dbacc += ddt
            dD[blk, di] += dDacc
            dbias[blk, di] += dbacc


def num_threads() -> int:
    """Threads numba runs its parallel loops on."""
    return numba.get_num_threads()
