"""Reference implementations of the ``mamba_rt`` ONNX ops for ``onnx.reference.ReferenceEvaluator``.

A plugin graph (``model.onnx``) can then be executed without TensorRT or the CUDA kernels::

    from mamba_rt.exporters.onnx_ref_ops import reference_evaluator
    sess = reference_evaluator("pkg/model.onnx")
    logits, conv_state, ssm_state = sess.run(None, {"input_ids": ids, "conv_state": c, "ssm_state": s})

Each op converts its inputs to torch and calls the ``ops_ref`` function: there is no third implementation
of the ops. ``REF_OPS_REGISTRY`` lists the OpRun classes for other tools (``new_ops=...``).
bfloat16 arrays (ml_dtypes in onnx's reference runtime) are passed through torch bit-exactly.
"""
from __future__ import annotations

import numpy as np
import torch
from onnx.reference.op_run import OpRun

from .onnx_ops import DOMAIN
from .ops_ref import causal_conv1d_ref, selective_scan_ref


def _to_torch(a: np.ndarray | None) -> torch.Tensor | None:
    if a is None:
        return None
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _to_numpy(t: torch.Tensor, like: np.ndarray) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(like.dtype)
    return t.numpy()


class CausalConv1d(OpRun):
    op_domain = DOMAIN

    def _run(self, x, weight, bias, conv_state, activation=None):
        act = activation if activation is not None else self.activation
        if isinstance(act, bytes):
            act = act.decode()
        y, s = causal_conv1d_ref(_to_torch(x), _to_torch(weight), _to_torch(bias), _to_torch(conv_state), act)
        return _to_numpy(y, x), _to_numpy(s, x)


class SelectiveScan(OpRun):
    op_domain = DOMAIN

    def _run(self, u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, delta_softplus=None):
        sp = delta_softplus if delta_softplus is not None else self.delta_softplus
        y, h = selective_scan_ref(*(_to_torch(a) for a in (u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state)),
                                  bool(sp))
        return _to_numpy(y, u), h.to(torch.float32).numpy()


REF_OPS_REGISTRY = [CausalConv1d, SelectiveScan]


def reference_evaluator(model, **kwargs):
    """``onnx.reference.ReferenceEvaluator`` for a graph with ``mamba_rt`` nodes (a path or ModelProto;
    a path loads external data relative to the graph's directory)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=REF_OPS_REGISTRY, **kwargs)
