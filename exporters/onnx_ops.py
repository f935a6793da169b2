"""ONNX translations of the two custom ops, for ``torch.onnx.export(custom_translation_table=...)``.

Three tables, one per kind of graph, all applied to a trace of the one reference model:

``PLUGIN_TABLE``
    one ``mamba_rt::CausalConv1d`` / ``mamba_rt::SelectiveScan`` node per op (ONNX domain ``mamba_rt``,
    version 1), inputs, outputs and typed attributes exactly as DESIGN.md specifies. Their schemas are
    :data:`CAUSAL_CONV1D_SCHEMA` / :data:`SELECTIVE_SCAN_SCHEMA` (:func:`register_schemas` makes
    ``onnx.checker`` validate plugin nodes against them).
``PREFILL_TABLE``
    standard ONNX ops, any length: the convolution as k shifted Slice/Mul/Add taps, the scan as an ONNX
    ``Scan`` over time whose body is one recurrence step.
``DECODE_TABLE``
    standard ONNX ops for a graph traced with seq = 1: the convolution as above, the scan as one
    element-wise step (no loop).

Portable translations compute in float32 and cast back to the activation dtype, like ``ops_ref``.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx.defs import OpSchema
from onnxscript import opset20 as op
from onnxscript import values

DOMAIN = "mamba_rt"
DOMAIN_VERSION = 1
OPSET_VERSION = 20  # default-domain opset of every exported graph (ONNX Runtime 1.31 reads up to 23)
IR_VERSION = 10  # ONNX IR of every exported graph (ONNX Runtime 1.31 reads up to 13; onnx 1.23 writes 14)

_FP = OpSchema.FormalParameter
_ACT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_F32 = ir.DataType.FLOAT

CAUSAL_CONV1D_SCHEMA = OpSchema(
    "CausalConv1d", DOMAIN, DOMAIN_VERSION,
    doc="Depthwise causal 1-D convolution with carried state (DESIGN.md). x [B,d,L], weight [d,k], bias [d], "
        "conv_state [B,d,k-1] -> y [B,d,L], conv_state_out [B,d,k-1].",
    inputs=[_FP("x", "T"), _FP("weight", "T"), _FP("bias", "T"), _FP("conv_state", "T")],
    outputs=[_FP("y", "T"), _FP("conv_state_out", "T")],
    type_constraints=[("T", _ACT_TYPES, "activation dtype")],
    attributes=[OpSchema.Attribute("activation", OpSchema.AttrType.STRING, "'none' or 'silu'")],
)

SELECTIVE_SCAN_SCHEMA = OpSchema(
    "SelectiveScan", DOMAIN, DOMAIN_VERSION,
    doc="Mamba-1 selective scan with carried state (DESIGN.md). u, delta, z [B,d,L]; A [d,n]; Bm, Cm [B,n,L]; "
        "D, delta_bias [d]; ssm_state [B,d,n] -> y [B,d,L], ssm_state_out [B,d,n].",
    inputs=[_FP("u", "T"), _FP("delta", "T"), _FP("A", "F"), _FP("Bm", "T"), _FP("Cm", "T"), _FP("D", "F"),
            _FP("z", "T"), _FP("delta_bias", "F"), _FP("ssm_state", "F")],
    outputs=[_FP("y", "T"), _FP("ssm_state_out", "F")],
    type_constraints=[("T", _ACT_TYPES, "activation dtype"), ("F", ["tensor(float)"], "float32")],
    attributes=[OpSchema.Attribute("delta_softplus", OpSchema.AttrType.INT, "1: dt = softplus(delta + delta_bias)")],
)

_MAMBA_RT = values.Opset(DOMAIN, DOMAIN_VERSION)
_CausalConv1d = values.Op(_MAMBA_RT, "CausalConv1d", CAUSAL_CONV1D_SCHEMA)
_SelectiveScan = values.Op(_MAMBA_RT, "SelectiveScan", SELECTIVE_SCAN_SCHEMA)

# The standard Scan with a variadic signature would get one output from the exporter's op recorder; this
# view of Scan-19 fixes the arity to what the translation uses: 1 state + 4 scanned inputs -> 1 state + 1
# scanned output. The node it produces is an ordinary ONNX Scan.
_SCAN_1x4 = OpSchema(
    "Scan", "", 19, doc="Scan with one state, four scan inputs and one scan output",
    inputs=[_FP("h0", "F"), _FP("dt", "F"), _FP("du", "F"), _FP("b", "F"), _FP("c", "F")],
    outputs=[_FP("h", "F"), _FP("y", "F")],
    type_constraints=[("F", ["tensor(float)"], "")],
    attributes=[
        OpSchema.Attribute("body", OpSchema.AttrType.GRAPH, ""),
        OpSchema.Attribute("num_scan_inputs", OpSchema.AttrType.INT, ""),
        OpSchema.Attribute("scan_input_axes", OpSchema.AttrType.INTS, ""),
        OpSchema.Attribute("scan_output_axes", OpSchema.AttrType.INTS, ""),
    ],
)
_Scan_1x4 = values.Op(values.Opset("", 19), "Scan", _SCAN_1x4)


def register_schemas() -> None:
    """Register the two ``mamba_rt`` schemas with onnx (idempotent), so ``onnx.checker`` checks plugin
    nodes' arity, types and attributes instead of skipping an unknown domain."""
    for s in (CAUSAL_CONV1D_SCHEMA, SELECTIVE_SCAN_SCHEMA):
        if not onnx.defs.has(s.name, s.domain):
            onnx.defs.register_schema(s)


# -- plugin graph ---------------------------------------------------------------------------------------
def causal_conv1d_plugin(x, weight, bias, conv_state, activation: str):
    return _CausalConv1d(x, weight, bias, conv_state, activation=activation)


def selective_scan_plugin(u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, delta_softplus: bool):
    return _SelectiveScan(u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, delta_softplus=int(delta_softplus))


# -- portable graphs -----------------------------------------------------------------------------------
def _static_dim(v, axis: int, what: str) -> int:
    d = v.shape[axis] if v.shape is not None else None
    if not isinstance(d, int):
        raise NotImplementedError(f"{what}: expected a static size on axis {axis}, got {v.shape}")
    return d


def causal_conv1d_portable(x, weight, bias, conv_state, activation: str):
    """k shifted taps over cat(conv_state, x): y = act(bias + sum_j w[:, j] * xt[:, :, j:j+L])."""
    k = _static_dim(weight, 1, "CausalConv1d weight")
    xt = op.Concat(conv_state, x, axis=2)
    xf = op.Cast(xt, to=_F32)
    wf = op.Cast(weight, to=_F32)
    length = op.Shape(x, start=2, end=3)
    acc = None
    for j in range(k):
        start = op.Constant(value_ints=[j])
        tap = op.Slice(xf, start, op.Add(start, length), op.Constant(value_ints=[2]))
        wj = op.Slice(wf, op.Constant(value_ints=[j]), op.Constant(value_ints=[j + 1]), op.Constant(value_ints=[1]))
        term = op.Mul(wj, tap)  # wj [d,1] broadcasts over [B,d,L]
        acc = term if acc is None else op.Add(acc, term)
    if bias is not None:
        acc = op.Add(acc, op.Unsqueeze(op.Cast(bias, to=_F32), op.Constant(value_ints=[1])))
    if activation == "silu":
        acc = op.Mul(acc, op.Sigmoid(acc))
    elif activation != "none":
        raise NotImplementedError(f"CausalConv1d activation {activation!r}: expected 'none' or 'silu'")
    state_out = op.Slice(xt, op.Constant(value_ints=[-(k - 1)]), op.Constant(value_ints=[np.iinfo(np.int64).max]),
                         op.Constant(value_ints=[2]))
    return op.Cast(acc, to=x.dtype), state_out


def _scan_prologue(u, delta, Bm, Cm, delta_bias, delta_softplus):
    dt = op.Cast(delta, to=_F32)
    if delta_bias is not None:
        dt = op.Add(dt, op.Unsqueeze(delta_bias, op.Constant(value_ints=[1])))
    if delta_softplus:
        dt = op.Softplus(dt)
    uf = op.Cast(u, to=_F32)
    return dt, uf, op.Mul(dt, uf), op.Cast(Bm, to=_F32), op.Cast(Cm, to=_F32)


def _scan_epilogue(y, u, uf, D, z):
    if D is not None:
        y = op.Add(y, op.Mul(op.Unsqueeze(D, op.Constant(value_ints=[1])), uf))
    if z is not None:
        zf = op.Cast(z, to=_F32)
        y = op.Mul(y, op.Mul(zf, op.Sigmoid(zf)))
    return op.Cast(y, to=u.dtype)


def _scan_body(A: ir.Value, d: int, n: int) -> ir.Graph:
    """One step of the recurrence: (h [B,d,n]; dt_t, du_t [B,d]; b_t, c_t [B,n]) -> (h', y_t [B,d]).
    A [d,n] is read from the outer graph. Node and value names carry a per-layer prefix, unique in the
    model (TensorRT's parser warns about names repeated across Scan bodies)."""
    p = f"{A.name or 'A'}_step_"

    def inp(name, shape):
        return ir.Value(name=p + name, type=ir.TensorType(_F32), shape=ir.Shape(shape))

    h, dt, du, b, c = inp("h", ["B", d, n]), inp("dt_t", ["B", d]), inp("du_t", ["B", d]), \
        inp("b_t", ["B", n]), inp("c_t", ["B", n])
    tape = ir.tape.Tape()
    ax1 = tape.op("Constant", [], {"value_ints": [1]})
    ax2 = tape.op("Constant", [], {"value_ints": [2]})
    dA = tape.op("Exp", [tape.op("Mul", [tape.op("Unsqueeze", [dt, ax2]), A])])
    dBu = tape.op("Mul", [tape.op("Unsqueeze", [du, ax2]), tape.op("Unsqueeze", [b, ax1])])
    h_new = tape.op("Add", [tape.op("Mul", [dA, h]), dBu])
    h_out = tape.op("Identity", [h_new])
    y = tape.op("ReduceSum", [tape.op("Mul", [h_new, tape.op("Unsqueeze", [c, ax1])]), ax2], {"keepdims": 0})
    for i, node in enumerate(tape.nodes):
        node.name = f"{p}{node.op_type}_{i}"
        for j, v in enumerate(node.outputs):
            v.name = f"{p}{i}_{j}"
    h_out.name, y.name = p + "h_out", p + "y_t"
    return ir.Graph([h, dt, du, b, c], [h_out, y], nodes=tape.nodes, name=p + "body")


def selective_scan_prefill(u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, delta_softplus: bool):
    """Any length: an ONNX Scan over time, one recurrence step per iteration. The scanned tensors are
    made time-major first, so the Scan runs over axis 0 (the form every ONNX runtime implements)."""
    d, n = _static_dim(A, 0, "SelectiveScan A"), _static_dim(A, 1, "SelectiveScan A")
    dt, uf, du, bf, cf = _scan_prologue(u, delta, Bm, Cm, delta_bias, delta_softplus)
    tm = [2, 0, 1]  # [B, *, L] -> [L, B, *]
    h, y = _Scan_1x4(ssm_state, op.Transpose(dt, perm=tm), op.Transpose(du, perm=tm), op.Transpose(bf, perm=tm),
                     op.Transpose(cf, perm=tm), body=_scan_body(A, d, n), num_scan_inputs=4,
                     scan_input_axes=[0, 0, 0, 0], scan_output_axes=[0])
    return _scan_epilogue(op.Transpose(y, perm=[1, 2, 0]), u, uf, D, z), h


def selective_scan_decode(u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, delta_softplus: bool):
    """seq = 1 only (the decode graph is traced with a static length of 1): one element-wise step.
    With L = 1 the time axis broadcasts against the state axis: dt [B,d,1] * A [d,n] -> [B,d,n]."""
    L = _static_dim(u, 2, "SelectiveScan u (decode graph)")
    if L != 1:
        raise NotImplementedError(f"decode translation of SelectiveScan: expected seq = 1, got {L}")
    dt, uf, du, bf, cf = _scan_prologue(u, delta, Bm, Cm, delta_bias, delta_softplus)
    perm = [0, 2, 1]
    h = op.Add(op.Mul(op.Exp(op.Mul(dt, A)), ssm_state), op.Mul(du, op.Transpose(bf, perm=perm)))
    y = op.ReduceSum(op.Mul(h, op.Transpose(cf, perm=perm)), op.Constant(value_ints=[2]), keepdims=1)
    return _scan_epilogue(y, u, uf, D, z), h


def _table(conv, scan) -> dict:
    import torch

    from . import torch_ops  # noqa: F401  (defines the torch.ops.mamba_rt namespace)

    return {torch.ops.mamba_rt.causal_conv1d.default: conv, torch.ops.mamba_rt.selective_scan.default: scan}


def translation_table(kind: str) -> dict:
    """``kind``: "plugin", "prefill" or "decode" -> the custom_translation_table for torch.onnx.export."""
    tables = {
        "plugin": (causal_conv1d_plugin, selective_scan_plugin),
        "prefill": (causal_conv1d_portable, selective_scan_prefill),
        "decode": (causal_conv1d_portable, selective_scan_decode),
    }
    return _table(*tables[kind])
