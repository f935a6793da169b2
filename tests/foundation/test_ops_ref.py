"""The reference ops against the op contracts written out step by step (float64), and their gradients
(the demo models train through them)."""
import math

import pytest
import torch
import torch.nn.functional as F

from mamba_rt.exporters import ops_ref
from mamba_rt.exporters.ops_ref import (causal_conv1d_ref, causal_conv1d_update_ref, selective_scan_ref,
                                         selective_state_update_ref)
from tests.helpers import rel_err


def _naive_scan(u, delta, A, Bm, Cm, D, z, bias, h, softplus):
    """DESIGN.md's formula, one scalar recurrence per (batch, channel, state), in float64."""
    B, d, L = u.shape
    n = A.shape[1]
    y = torch.zeros(B, d, L, dtype=torch.float64)
    h = torch.zeros(B, d, n, dtype=torch.float64) if h is None else h.double().clone()
    for b in range(B):
        for c in range(d):
            for t in range(L):
                dt = float(delta[b, c, t]) + (float(bias[c]) if bias is not None else 0.0)
                if softplus:
                    dt = dt if dt > 20 else math.log1p(math.exp(dt))
                acc = 0.0
                for s in range(n):
                    h[b, c, s] = math.exp(dt * float(A[c, s])) * h[b, c, s] + dt * float(Bm[b, s, t]) * float(u[b, c, t])
                    acc += float(Cm[b, s, t]) * float(h[b, c, s])
                if D is not None:
                    acc += float(D[c]) * float(u[b, c, t])
                if z is not None:
                    zz = float(z[b, c, t])
                    acc *= zz / (1 + math.exp(-zz))
                y[b, c, t] = acc
    return y, h


# base case, then rows that change one thing (odd sizes; optional inputs off; no softplus; L = 1;
# a sequence that crosses the reference's internal block of steps)
SCAN_CASES = {
    "base": dict(B=2, d=5, n=3, L=7),
    "no_optionals": dict(B=1, d=5, n=3, L=7, D=False, z=False, bias=False, state=False),
    "no_softplus": dict(B=2, d=5, n=3, L=7, softplus=False),
    "one_step": dict(B=3, d=4, n=2, L=1),
    "crosses_block": dict(B=1, d=2, n=2, L=ops_ref._SCAN_CHUNK + 5),
}


def _scan_inputs(g, B, d, n, L, D=True, z=True, bias=True, state=True, softplus=True, dtype=torch.float64):
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    delta = 0.5 * r(B, d, L)
    if not softplus:
        delta = 0.1 * delta.abs()
    return (r(B, d, L), delta, -(torch.rand(d, n, generator=g, dtype=dtype) * 3 + 0.1), r(B, n, L), r(B, n, L),
            r(d) if D else None, r(B, d, L) if z else None, 0.5 * r(d) if bias else None,
            r(B, d, n) if state else None, softplus)


@pytest.mark.parametrize("name", list(SCAN_CASES))
def test_selective_scan_ref_is_the_formula(name):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    args = _scan_inputs(g, **SCAN_CASES[name])
    y, h = selective_scan_ref(*args)
    y0, h0 = _naive_scan(*args)
    assert y.dtype == torch.float64 and h.dtype == torch.float64
    assert rel_err(y, y0) < 1e-12 and rel_err(h, h0) < 1e-12


def test_selective_scan_ref_gradients_are_exact():
    """gradcheck: the analytic gradients (what training uses) against finite differences, in float64."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    args = list(_scan_inputs(g, B=1, d=3, n=2, L=5))
    tensors = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]

    def f(*ts):
        return selective_scan_ref(*ts, args[-1])

    assert torch.autograd.gradcheck(f, tuple(tensors[:-1]), eps=1e-6, atol=1e-7)


def test_conv_ref_is_the_formula_and_updates_state():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    B, d, L, k = 2, 5, 9, 4
    x, w, b, s = (torch.randn(B, d, L, generator=g, dtype=torch.float64), torch.randn(d, k, generator=g, dtype=torch.float64),
                  torch.randn(d, generator=g, dtype=torch.float64), torch.randn(B, d, k - 1, generator=g, dtype=torch.float64))
    y, s_out = causal_conv1d_ref(x, w, b, s, "silu")
    xt = torch.cat([s, x], -1)
    want = F.silu(b[None, :, None] + sum(w[None, :, j, None] * xt[..., j:j + L] for j in range(k)))
    assert rel_err(y, want) < 1e-14 and torch.equal(s_out, xt[..., -(k - 1):])
    # the one-step twin, state in place
    st = s.clone()
    y1 = causal_conv1d_update_ref(x[..., 0], st, w, b, "silu")
    assert rel_err(y1, y[..., 0]) < 1e-14 and torch.equal(st, xt[..., 1:k])


def test_state_update_twin_equals_one_scan_step():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    u, delta, A, Bm, Cm, D, z, bias, state, sp = _scan_inputs(g, B=2, d=4, n=3, L=1)
    y, h = selective_scan_ref(u, delta, A, Bm, Cm, D, z, bias, state, sp)
    st = state.clone()
    y1 = selective_state_update_ref(st, u[..., 0], delta[..., 0], A, Bm[..., 0], Cm[..., 0], D, z[..., 0], bias, sp)
    assert rel_err(y1, y[..., 0]) < 1e-14 and rel_err(st, h) < 1e-14
