"""The two custom ops as ``torch.library`` custom ops, so they survive ``torch.export`` as single nodes.

``mamba_rt::causal_conv1d`` and ``mamba_rt::selective_scan`` have the signatures of
:mod:`mamba_rt.exporters.ops_ref` (with ``bias`` / ``D`` / ``z`` / ``delta_bias`` required when traced
from the model, optional in the schema). Their eager implementation *is* the ``_ref`` function and their
fake (meta) implementation only computes shapes, so tracing never touches weight values: the exporter
traces a model whose parameters live on the ``meta`` device.

``EXPORT_OPS`` is the :class:`~mamba_rt.exporters.model.OpSet` to set as ``model.ops`` while exporting;
the ONNX translations of the two ops live in :mod:`mamba_rt.exporters.onnx_ops`.
"""
from __future__ import annotations

import torch

from .model import OpSet
from .ops_ref import causal_conv1d_ref, selective_scan_ref


@torch.library.custom_op("mamba_rt::causal_conv1d", mutates_args=())
def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, d, L), weight (d, k), bias (d,), conv_state (B, d, k-1) -> (y (B, d, L), conv_state_out)."""
    y, s = causal_conv1d_ref(x, weight, bias, conv_state, activation)
    return y, s.clone()


@causal_conv1d.register_fake
def _(x, weight, bias, conv_state, activation):
    return torch.empty_like(x), torch.empty_like(conv_state, dtype=x.dtype)


@torch.library.custom_op("mamba_rt::selective_scan", mutates_args=())
def selective_scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
    ssm_state: torch.Tensor, delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """u, delta, z (B, d, L); A (d, n); Bm, Cm (B, n, L); D, delta_bias (d,); ssm_state (B, d, n) fp32
    -> (y (B, d, L) in u's dtype, ssm_state_out (B, d, n) fp32)."""
    y, h = selective_scan_ref(u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, delta_softplus)
    return y, h.to(torch.float32)


@selective_scan.register_fake
def _(u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, delta_softplus):
    return torch.empty_like(u), torch.empty_like(ssm_state, dtype=torch.float32)


EXPORT_OPS = OpSet(causal_conv1d, selective_scan, "export")
