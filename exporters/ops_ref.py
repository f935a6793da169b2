"""Pure-PyTorch reference implementations of mamba-rt's two custom ops.

These are the numerical contracts of DESIGN.md ("The two custom ops"), written for clarity, not speed
(except the scan, chunked over time so that training and long references stay practical). The
reference model calls them; the CUDA kernels in ``mamba_rt.plugins_cuda`` are their twins and are
tested against them. Layout is channel-major: x is ``(batch, dim, seqlen)``.

Arithmetic is done in float32 (float64 when any floating input is float64, which the tests use as the
oracle); outputs are returned in the activation dtype, the SSM state in float32 (float64 in the oracle).

Sequence ops (any L >= 1):
    causal_conv1d_ref(x, weight, bias, conv_state, activation)            -> (y, conv_state_out)
    selective_scan_ref(u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, delta_softplus)
                                                                          -> (y, ssm_state_out)
Single-step twins (one token, state updated in place, like mamba_ssm's ``*_update``):
    causal_conv1d_update_ref(x, conv_state, weight, bias, activation)     -> y
    selective_state_update_ref(ssm_state, u, delta, A, Bm, Cm, D, z, delta_bias, delta_softplus) -> y
The model's pre-norm residual step (not an exported op: it stays standard ONNX ops in the graphs; the
torch backend's twin is ``plugins_cuda.torch_ops.add_rms_norm``):
    add_rms_norm_ref(x, residual, weight, eps, residual_fp32)              -> (normed, residual_out)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "silu")
_SCAN_CHUNK = 256  # time steps per precomputed block in selective_scan_ref


def _compute_dtype(*tensors) -> torch.dtype:
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    conv_state: torch.Tensor | None = None,
    activation: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal 1-D convolution with a carried state.

    x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,) or None;
    conv_state: (batch, dim, width - 1) or None (zeros): the last width-1 inputs before x.
    Returns y: (batch, dim, seqlen) in x.dtype, with
        y[:, c, t] = act(bias[c] + sum_j weight[c, j] * xt[:, c, t + j]),  xt = cat(conv_state, x)
    and conv_state_out: (batch, dim, width - 1) in x.dtype, the last width-1 columns of xt.
    """
    _check_activation(activation)
    batch, dim, seqlen = x.shape
    width = weight.shape[-1]
    if conv_state is None:
        conv_state = x.new_zeros(batch, dim, width - 1)
    xt = torch.cat([conv_state.to(x.dtype), x], dim=-1)
    cd = _compute_dtype(x, weight, bias, conv_state)
    xc = xt.to(cd)
    w = weight.reshape(dim, width).to(cd)
    acc = w[None, :, 0, None] * xc[..., 0:seqlen]
    for j in range(1, width):
        acc = acc + w[None, :, j, None] * xc[..., j : j + seqlen]
    if bias is not None:
        acc = acc + bias.to(cd)[None, :, None]
    if activation == "silu":
        acc = F.silu(acc)
    return acc.to(x.dtype), xt[..., seqlen:].contiguous()


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
) -> torch.Tensor:
    """One decode step. x: (batch, dim); conv_state: (batch, dim, width - 1), updated in place.
    Returns y: (batch, dim)."""
    y, new_state = causal_conv1d_ref(x.unsqueeze(-1), weight, bias, conv_state, activation)
    conv_state.copy_(new_state)
    return y.squeeze(-1)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    ssm_state: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective scan (Mamba-1 S6) with a carried state.

    u, delta, z: (batch, dim, seqlen); A: (dim, dstate) float32; Bm, Cm: (batch, dstate, seqlen);
    D, delta_bias: (dim,) float32 or None; ssm_state: (batch, dim, dstate) float32 or None (zeros).
    With dt = softplus(delta + delta_bias) (softplus only if delta_softplus):
        h_t = exp(dt_t * A) * h_{t-1} + dt_t * Bm_t * u_t
        y_t = (Cm_t . h_t + D * u_t) * silu(z_t)      (the gate only when z is given)
    Returns y: (batch, dim, seqlen) in u.dtype and ssm_state_out: (batch, dim, dstate), float32
    (float64 when computing in float64).
    """
    batch, dim, seqlen = u.shape
    dstate = A.shape[-1]
    cd = _compute_dtype(u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state)
    dt = delta.to(cd)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cd)[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    uc = u.to(cd)
    Ac = A.to(cd)
    h = (
        torch.zeros(batch, dim, dstate, dtype=cd, device=u.device)
        if ssm_state is None
        else ssm_state.to(cd).clone()
    )
    # Time-major chunks: exp(dt A) and dt B u for a chunk of steps at once, then one multiply-add and
    # one (dim, dstate) x (dstate, 1) product per step. Fewer kernels per step (this is also what the
    # demo model trains with); memory O(chunk * batch * dim * dstate), whatever the sequence length.
    ys = []
    for t0 in range(0, seqlen, _SCAN_CHUNK):
        t1 = min(seqlen, t0 + _SCAN_CHUNK)
        dt_l = dt[:, :, t0:t1].permute(2, 0, 1)  # (T, batch, dim)
        dA = torch.exp(dt_l[..., None] * Ac)  # (T, batch, dim, dstate)
        dBu = (dt_l * uc[:, :, t0:t1].permute(2, 0, 1))[..., None] * \
            Bm[:, :, t0:t1].to(cd).permute(2, 0, 1)[:, :, None, :]
        C_l = Cm[:, :, t0:t1].to(cd).permute(2, 0, 1)[..., None]  # (T, batch, dstate, 1)
        # unbind rather than index: under autograd its backward is one stack, not a tensor per step
        for dA_t, dBu_t, C_t in zip(dA.unbind(0), dBu.unbind(0), C_l.unbind(0)):
            h = torch.addcmul(dBu_t, dA_t, h)
            ys.append(torch.bmm(h, C_t).squeeze(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(cd)[None, :, None] * uc
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(u.dtype), h


def selective_state_update_ref(
    ssm_state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """One decode step. ssm_state: (batch, dim, dstate) float32, updated in place; u, delta, z:
    (batch, dim); Bm, Cm: (batch, dstate). Returns y: (batch, dim)."""
    y, new_state = selective_scan_ref(
        u.unsqueeze(-1), delta.unsqueeze(-1), A, Bm.unsqueeze(-1), Cm.unsqueeze(-1), D,
        None if z is None else z.unsqueeze(-1), delta_bias, ssm_state, delta_softplus,
    )
    ssm_state.copy_(new_state)
    return y.squeeze(-1)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     residual_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm residual step of Mamba's blocks (mamba_ssm's ``prenorm`` RMSNorm).

    x (..., K) in the model dtype (a block's output; the embedding before the first block); residual
    (..., K) or None (before the first block); weight (K,). Returns (normed, residual_out) with
    residual_out = x + residual (x itself when residual is None), in float32 when ``residual_fp32``
    (else in x's dtype, rounded after the add), and normed = rms_norm(residual_out) * weight computed in
    float32 and rounded once to weight's dtype.
    """
    h = x if residual is None else residual + x
    if residual_fp32:
        h = h.float()
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return normed.to(weight.dtype), h
