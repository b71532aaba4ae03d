"""The fast selective scans agree with the sequential reference in values and gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference_scan import selective_scan_reference

from model.scan import available_backends, selective_scan

BACKENDS = available_backends()


def _inputs(b=2, d=6, L=37, n=4, groups=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u = r(b, d, L)
    delta = 0.5 * r(b, d, L)
    A = -torch.exp(0.5 * r(d, n))
    shape = (b, n, L) if groups is None else (b, groups, n, L)
    B, C = r(*shape), r(*shape)
    D, z, bias = r(d), r(b, d, L), 0.3 * r(d)
    return u, delta, A, B, C, D, z, bias


def test_numba_backend_is_available():
    """numba is a declared dependency, so the compiled path must load here."""
    assert "numba" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_D,use_z,use_bias,softplus", list(itertools.product([False, True], repeat=4)))
def test_forward_and_gradients_match_reference(backend, use_D, use_z, use_bias, softplus):
    u, delta, A, B, C, D, z, bias = _inputs()
    args = [u, delta, A, B, C]
    kw = dict(D=D if use_D else None, z=z if use_z else None,
              delta_bias=bias if use_bias else None, delta_softplus=softplus)
    leaves = args + [t for t in kw.values() if isinstance(t, torch.Tensor)]
    for t in leaves:
        t.requires_grad_(True)
    y_ref = selective_scan_reference(*args, **kw)
    y = selective_scan(*args, **kw, backend=backend)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    w = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad((y_ref * w).sum(), leaves)
    g = torch.autograd.grad((y * w).sum(), leaves)
    for a, e in zip(g, g_ref, strict=False):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_B_C_and_float32(backend):
    u, delta, A, B, C, D, z, bias = _inputs(b=1, d=8, L=50, n=3, groups=2, dtype=torch.float32, seed=3)
    for t in (u, delta, B, C):
        t.requires_grad_(True)
    kw = dict(D=D, z=z, delta_bias=bias, delta_softplus=True)
    y_ref = selective_scan_reference(u, delta, A, B, C, **kw)
    y = selective_scan(u, delta, A, B, C, **kw, backend=backend)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    g_ref = torch.autograd.grad(y_ref.sum(), (u, delta, B, C))
    g = torch.autograd.grad(y.sum(), (u, delta, B, C))
    for a, e in zip(g, g_ref, strict=False):
        torch.testing.assert_close(a, e, atol=2e-4, rtol=1e-3)


def test_bad_shapes_are_rejected():
    u, delta, A, B, C, *_ = _inputs()
    with pytest.raises(ValueError):
        selective_scan(u, delta[:, :, :-1], A, B, C)
    with pytest.raises(ValueError):
        selective_scan(u, delta, A[:-1], B, C)
    with pytest.raises(ValueError):
        selective_scan(u, delta, A, B.unsqueeze(1).expand(-1, 4, -1, -1), C)  # 6 % 4 != 0


@pytest.mark.parametrize("chunk", [1, 8, 13])
def test_chunked_torch_scan_chains_chunks(chunk):
    """L spanning several chunks (and a ragged last chunk) matches the reference."""
    from model.scan import selective_scan_chunked

    u, delta, A, B, C, D, z, bias = _inputs(L=50)
    leaves = [u, delta, A, B, C]
    for t in leaves:
        t.requires_grad_(True)
    kw = dict(D=D, z=z, delta_bias=bias, delta_softplus=True)
    y_ref = selective_scan_reference(*leaves, **kw)
    y = selective_scan_chunked(*leaves, **kw, chunk=chunk)
    torch.testing.assert_close(y, y_ref, atol=1e-8, rtol=1e-8)
    g_ref = torch.autograd.grad(y_ref.sum(), leaves)
    g = torch.autograd.grad(y.sum(), leaves)
    for a, e in zip(g, g_ref, strict=False):
        torch.testing.assert_close(a, e, atol=1e-8, rtol=1e-8)
