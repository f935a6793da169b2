"""TensorRT plugins ``mamba_rt::CausalConv1d`` and ``mamba_rt::SelectiveScan`` (TensorRT's Python plugin
API, ``tensorrt.plugin``, TensorRT 10.x and 11.x).

Two tiers, kept apart so that everything but the TensorRT calls is tested in CI:

* Plain functions (no TensorRT, no GPU): the dtype and rank rules of the shape/type functions
  (:func:`conv_output_dtypes`, :func:`scan_output_dtypes`, :func:`check_ranks`), the kernel choice
  (:func:`conv_kernel`, :func:`scan_kernel`), the launch parameters and the kernels' scalar arguments
  (:func:`conv_launch`, :func:`scan_launch`: plain arithmetic that works on ints *and* on
  ``tensorrt.plugin`` shape expressions, so the one formula serves the tests and the engine), and the
  keyword arguments of the JIT launch (:func:`conv_launch_kwargs`, :func:`scan_launch_kwargs`).
* :func:`register_plugins` imports ``tensorrt.plugin`` and registers, once per process:

  - ``@trtp.register``: outputs ``y`` like ``x`` / ``u``, and the state out like the state in;
  - ``@trtp.aot_impl`` (where TensorRT has it): the PTX of the kernels' flat ``extern "C"`` entry points
    (``plugins_cuda/*.cu``; argument order input pointers, the scalars of :func:`conv_launch` /
    :func:`scan_launch`, output pointers, exactly what TensorRT passes) compiled by NVRTC for the
    building GPU, so the engine runs without Python;
  - ``@trtp.impl``: the Python (JIT) implementation, launching the same kernels through
    :mod:`mamba_rt.plugins_cuda.launcher` on TensorRT's stream.

TensorRT's ONNX parser maps an ONNX node to a plugin when the node's op type is the plugin's name and it
carries a string attribute ``plugin_namespace``; ``mamba_rt.exporters.tensorrt_build`` adds that
attribute to the exported nodes before parsing. The op attributes (``activation`` and ``delta_softplus``)
reach the plugins as plugin fields.

This module must not use ``from __future__ import annotations``: ``tensorrt.plugin`` reads the
decorated functions' annotations as classes.
"""
import dataclasses
import threading
from typing import Mapping, NamedTuple, Optional, Sequence, Tuple

from mamba_rt._optional import require
from mamba_rt.errors import InputError, MissingDependencyError, UnsupportedError

from . import compiler, launcher
from .compiler import DTYPES, FAMILIES, KernelSpec

NAMESPACE = "mamba_rt"
CONV_NAME = "CausalConv1d"
SCAN_NAME = "SelectiveScan"
CONV_ID = f"{NAMESPACE}::{CONV_NAME}"
SCAN_ID = f"{NAMESPACE}::{SCAN_NAME}"

CONV_INPUTS = ("x", "weight", "bias", "conv_state")
CONV_OUTPUTS = ("y", "conv_state_out")
SCAN_INPUTS = ("u", "delta", "A", "Bm", "Cm", "D", "z", "delta_bias", "ssm_state")
SCAN_OUTPUTS = ("y", "ssm_state_out")
CONV_RANKS = {"x": 3, "weight": 2, "bias": 1, "conv_state": 3}
SCAN_RANKS = {"u": 3, "delta": 3, "A": 2, "Bm": 3, "Cm": 3, "D": 1, "z": 3, "delta_bias": 1, "ssm_state": 3}
SCAN_FLOAT32 = ("A", "D", "delta_bias", "ssm_state")  # always float32 (DESIGN.md, the two custom ops)
ACT_DTYPES = tuple(DTYPES)  # float32, float16, bfloat16


class PluginSignatureError(InputError):
    """A plugin node's inputs do not match the op contract (DESIGN.md 'The two custom ops')."""


# --------------------------------------------------------------------------------------------------
# shape / type rules (what @trtp.register enforces)


def check_ranks(op: str, ranks: Mapping[str, int]) -> None:
    """Every input of ``op`` ('CausalConv1d' or 'SelectiveScan') has the contract's rank."""
    want = CONV_RANKS if op == CONV_NAME else SCAN_RANKS
    if list(ranks) != list(want):
        raise PluginSignatureError(f"{NAMESPACE}::{op}: inputs {list(ranks)}, expected {list(want)}")
    bad = [f"{n} has rank {r}, expected {want[n]}" for n, r in ranks.items() if r != want[n]]
    if bad:
        raise PluginSignatureError(f"{NAMESPACE}::{op}: " + "; ".join(bad))


def conv_output_dtypes(dtypes: Mapping[str, str]) -> Tuple[str, str]:
    """Input dtype names (x, weight, bias, conv_state) -> (y, conv_state_out) dtype names.
    Every input has the activation dtype."""
    _check_names(CONV_NAME, dtypes, CONV_INPUTS)
    act = dtypes["x"]
    if act not in ACT_DTYPES:
        raise PluginSignatureError(f"{CONV_ID}: x is {act}, expected one of {ACT_DTYPES}")
    bad = [f"{n} is {dtypes[n]}" for n in CONV_INPUTS if dtypes[n] != act]
    if bad:
        raise PluginSignatureError(f"{CONV_ID}: {', '.join(bad)}; expected every input in x's dtype {act}")
    return act, act


def scan_output_dtypes(dtypes: Mapping[str, str]) -> Tuple[str, str]:
    """Input dtype names -> (y, ssm_state_out): u, delta, Bm, Cm, z in the activation dtype;
    A, D, delta_bias, ssm_state float32."""
    _check_names(SCAN_NAME, dtypes, SCAN_INPUTS)
    act = dtypes["u"]
    if act not in ACT_DTYPES:
        raise PluginSignatureError(f"{SCAN_ID}: u is {act}, expected one of {ACT_DTYPES}")
    bad = []
    for n in SCAN_INPUTS:
        want = "float32" if n in SCAN_FLOAT32 else act
        if dtypes[n] != want:
            bad.append(f"{n} is {dtypes[n]}, expected {want}")
    if bad:
        raise PluginSignatureError(f"{SCAN_ID}: " + "; ".join(bad))
    return act, "float32"


def _check_names(op: str, given: Mapping[str, object], want: Sequence[str]) -> None:
    if list(given) != list(want):
        raise PluginSignatureError(f"{NAMESPACE}::{op}: inputs {list(given)}, expected {list(want)}")


def check_static(op: str, name: str, axis: int, value) -> int:
    """A dimension that selects the kernel (conv width, state size) must be a build-time constant."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedError(f"{NAMESPACE}::{op}: {name} axis {axis} must be a static size >= 1 "
                               f"(it selects the kernel), got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# kernel choice and launch parameters


class KernelChoice(NamedTuple):
    spec: KernelSpec
    entry: str  # the flat extern "C" entry point
    step: bool  # the single-step (decode) kernel


def use_step_kernel(seq_min: int, seq_max: int) -> bool:
    """The single-step kernel serves a profile only when its sequence range is exactly [1, 1]; the
    sequence kernel is correct for every length, so it serves every other range."""
    return seq_min == 1 and seq_max == 1


def conv_kernel(dtype: str, width: int, arch: int, *, step: bool) -> KernelChoice:
    if width not in FAMILIES["causal_conv1d"].specs:
        raise UnsupportedError(f"{CONV_ID}: conv width {width} has no kernel; expected one of "
                               f"{FAMILIES['causal_conv1d'].specs}")
    spec = KernelSpec("causal_conv1d", dtype, width, arch)
    return KernelChoice(spec, spec.entry("mrt_causal_conv1d_update" if step else "mrt_causal_conv1d_fwd"), step)


def scan_kernel(dtype: str, dstate: int, arch: int, *, step: bool) -> KernelChoice:
    """The ahead-of-time kernel: the channel-parallel scan for sequences. The launcher's time-parallel
    kernel (chosen at run time by rows and length, which an engine's profile does not fix) runs only
    through the JIT path and the torch backend."""
    spec = KernelSpec("selective_scan", dtype, launcher.padded_dstate(dstate), arch)
    return KernelChoice(spec, spec.entry("mrt_selective_state_update" if step else "mrt_selective_scan_fwd"), step)


class Launch(NamedTuple):
    """Grid, block and the kernel's scalar arguments (in the entry point's order). Each value is an int
    or, inside TensorRT, a symbolic expression of the input shapes."""

    grid_x: object
    grid_y: object
    block_x: int
    scalars: tuple
    shared_mem: int = 0  # dynamic shared memory, bytes


def _cdiv(a, b: int):
    # written with + and // only, which both ints and tensorrt.plugin ShapeExprs support
    return (a + (b - 1)) // b


def conv_launch(batch, dim, seqlen, silu: int, *, step: bool) -> Launch:
    """Launch of the CausalConv1d entry point; scalars (batch, dim, seqlen, silu). Mirrors
    ``launcher.conv_launch_config``."""
    runs = 1 if step else _cdiv(seqlen, launcher.CONV_ITEMS)
    return Launch(_cdiv(batch * dim * runs, launcher.CONV_THREADS), 1, launcher.CONV_THREADS,
                  (batch, dim, seqlen, int(silu)))


def scan_launch(batch, dim, seqlen, dstate: int, delta_softplus: int, *, step: bool) -> Launch:
    """Launch of the SelectiveScan entry point; scalars (batch, dim, seqlen, dstate, delta_softplus).
    Mirrors ``launcher.scan_launch_config``; ``dstate`` is static (it picks the specialisation)."""
    np_ = launcher.padded_dstate(dstate)
    if step:
        tpc = np_ // 4
        return Launch(_cdiv(batch * dim * tpc, launcher.SSU_THREADS), 1, launcher.SSU_THREADS,
                      (batch, dim, seqlen, dstate, int(delta_softplus)))
    # the default blocks (scan_launch_config with sms None); outside the wide configuration Bm / Cm
    # are staged as fp32 whatever the dtype, so the itemsize below does not change the bytes
    threads, cpb = launcher.SCAN_CFG[np_]
    return Launch(_cdiv(dim, cpb), batch, threads, (batch, dim, seqlen, dstate, int(delta_softplus)),
                  launcher.scan_smem_bytes(np_, threads // 32, wide=False, itemsize=4))


def activation_flag(activation: str) -> int:
    if activation not in launcher.ACTIVATIONS:
        raise PluginSignatureError(f"{CONV_ID}: activation {activation!r}, expected one of {launcher.ACTIVATIONS}")
    return int(activation == "silu")


# --------------------------------------------------------------------------------------------------
# JIT launch arguments (what @trtp.impl hands the launcher)


class TensorView(NamedTuple):
    """A device tensor as the JIT implementation sees it: pointer, shape, element strides, dtype name."""

    ptr: int
    shape: Tuple[int, ...]
    strides: Tuple[int, ...]
    dtype: str


def _contiguous(shape) -> Tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _strides_or_none(views: Mapping[str, TensorView]) -> Optional[dict]:
    if all(tuple(v.strides) == _contiguous(v.shape) for v in views.values()):
        return None
    return {n: tuple(v.strides) for n, v in views.items()}


def _launch_kwargs(op_id: str, in_names, out_names, check_dtypes, inputs, outputs, stream) -> tuple[dict, dict]:
    """(the inputs by name, the keyword arguments every launcher takes: pointers by name, batch / dim /
    seqlen and dtype of the first input, stream, strides) for one plugin execution."""
    if len(inputs) != len(in_names) or len(outputs) != len(out_names):
        raise PluginSignatureError(f"{op_id}: {len(inputs)} inputs and {len(outputs)} outputs, expected "
                                   f"{len(in_names)} and {len(out_names)}")
    ins = dict(zip(in_names, inputs))
    every = {**ins, **dict(zip(out_names, outputs))}
    check_dtypes({n: v.dtype for n, v in ins.items()})
    first = ins[in_names[0]]
    batch, dim, seqlen = first.shape
    return ins, dict(**{n: v.ptr for n, v in every.items()}, batch=batch, dim=dim, seqlen=seqlen,
                     dtype=first.dtype, stream=int(stream), strides=_strides_or_none(every))


def conv_launch_kwargs(inputs: Sequence[TensorView], outputs: Sequence[TensorView], activation: str,
                       stream: int) -> dict:
    """Keyword arguments of ``launcher.launch_causal_conv1d`` for one plugin execution."""
    ins, kw = _launch_kwargs(CONV_ID, CONV_INPUTS, CONV_OUTPUTS, conv_output_dtypes, inputs, outputs, stream)
    return dict(kw, width=ins["weight"].shape[1], activation=activation)


def scan_launch_kwargs(inputs: Sequence[TensorView], outputs: Sequence[TensorView], delta_softplus: int,
                       stream: int) -> dict:
    """Keyword arguments of ``launcher.launch_selective_scan`` for one plugin execution."""
    ins, kw = _launch_kwargs(SCAN_ID, SCAN_INPUTS, SCAN_OUTPUTS, scan_output_dtypes, inputs, outputs, stream)
    return dict(kw, dstate=ins["A"].shape[1], delta_softplus=bool(delta_softplus))


# --------------------------------------------------------------------------------------------------
# registration with TensorRT (the thin, TensorRT-only tier)


@dataclasses.dataclass(frozen=True)
class Registration:
    """What :func:`register_plugins` registered: TensorRT's version and whether AOT is available."""

    tensorrt_version: str
    aot: bool


_lock = threading.Lock()
_registered: Optional[Registration] = None


def dtype_name(trt, dt) -> str:
    """trt.DataType -> numpy-style name (float32, float16, bfloat16, ...)."""
    names = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.BF16: "bfloat16",
             trt.DataType.INT32: "int32", trt.DataType.INT64: "int64"}
    return names.get(dt, str(dt))


def register_plugins() -> Registration:
    """Register both plugins with TensorRT's plugin registry (idempotent, thread-safe). Needs
    ``tensorrt`` (extra 'tensorrt'); must run before an engine that contains them is built or
    deserialized (a JIT engine calls back into this process; an AOT engine only needs it to build)."""
    global _registered
    with _lock:
        if _registered is None:
            _registered = _register()
        return _registered


def _register() -> Registration:
    trt = require("tensorrt")
    try:
        import tensorrt.plugin as trtp
    except ImportError as e:  # TensorRT older than 10.6 has no tensorrt.plugin
        raise MissingDependencyError(f"TensorRT {trt.__version__} has no tensorrt.plugin module (needs "
                                     f">= 10.8): pip install 'mamba-rt[tensorrt]' ({e})") from e
    aot = hasattr(trt, "QuickPluginCreationRequest") and hasattr(trtp, "aot_impl")
    if hasattr(trtp.op, NAMESPACE) and hasattr(getattr(trtp.op, NAMESPACE), CONV_NAME):
        return Registration(trt.__version__, aot)  # registered by another copy of this module

    def ranks(*descs):
        return [len(d.shape_expr) for d in descs]

    # -- CausalConv1d ---------------------------------------------------------------------------------
    @trtp.register(CONV_ID)
    def _conv_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc,
                   conv_state: trtp.TensorDesc, activation: str) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        check_ranks(CONV_NAME, dict(zip(CONV_INPUTS, ranks(x, weight, bias, conv_state))))
        conv_output_dtypes({n: dtype_name(trt, d.dtype) for n, d in zip(CONV_INPUTS, (x, weight, bias, conv_state))})
        activation_flag(activation)
        return x.like(), conv_state.like()

    @trtp.impl(CONV_ID)
    def _conv_impl(x: trtp.Tensor, weight: trtp.Tensor, bias: trtp.Tensor, conv_state: trtp.Tensor,
                   activation: str, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        views = [_view(trt, t) for t in (x, weight, bias, conv_state)]
        launcher.launch_causal_conv1d(**conv_launch_kwargs(views, [_view(trt, t) for t in outputs],
                                                           activation, stream))

    if aot:
        @trtp.aot_impl(CONV_ID)
        def _conv_aot(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc,
                      conv_state: trtp.TensorDesc, activation: str, outputs: Tuple[trtp.TensorDesc],
                      tactic: int) -> Tuple[str, bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
            dtype = dtype_name(trt, x.dtype)
            width = check_static(CONV_NAME, "weight", 1, _constant(weight.shape_expr[1]))
            choice = conv_kernel(dtype, width, launcher.current_arch(), step=_decode_profile(x))
            b, d, L = x.shape_expr[0], x.shape_expr[1], x.shape_expr[2]
            return _aot_result(trtp, choice, conv_launch(b, d, L, activation_flag(activation), step=choice.step))

    # -- SelectiveScan --------------------------------------------------------------------------------
    @trtp.register(SCAN_ID)
    def _scan_desc(u: trtp.TensorDesc, delta: trtp.TensorDesc, A: trtp.TensorDesc, Bm: trtp.TensorDesc,
                   Cm: trtp.TensorDesc, D: trtp.TensorDesc, z: trtp.TensorDesc, delta_bias: trtp.TensorDesc,
                   ssm_state: trtp.TensorDesc, delta_softplus: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        descs = (u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state)
        check_ranks(SCAN_NAME, dict(zip(SCAN_INPUTS, ranks(*descs))))
        scan_output_dtypes({n: dtype_name(trt, t.dtype) for n, t in zip(SCAN_INPUTS, descs)})
        return u.like(), ssm_state.like()

    @trtp.impl(SCAN_ID)
    def _scan_impl(u: trtp.Tensor, delta: trtp.Tensor, A: trtp.Tensor, Bm: trtp.Tensor, Cm: trtp.Tensor,
                   D: trtp.Tensor, z: trtp.Tensor, delta_bias: trtp.Tensor, ssm_state: trtp.Tensor,
                   delta_softplus: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        views = [_view(trt, t) for t in (u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state)]
        launcher.launch_selective_scan(**scan_launch_kwargs(views, [_view(trt, t) for t in outputs],
                                                            delta_softplus, stream))

    if aot:
        @trtp.aot_impl(SCAN_ID)
        def _scan_aot(u: trtp.TensorDesc, delta: trtp.TensorDesc, A: trtp.TensorDesc, Bm: trtp.TensorDesc,
                      Cm: trtp.TensorDesc, D: trtp.TensorDesc, z: trtp.TensorDesc, delta_bias: trtp.TensorDesc,
                      ssm_state: trtp.TensorDesc, delta_softplus: int, outputs: Tuple[trtp.TensorDesc],
                      tactic: int) -> Tuple[str, bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
            dtype = dtype_name(trt, u.dtype)
            dstate = check_static(SCAN_NAME, "A", 1, _constant(A.shape_expr[1]))
            choice = scan_kernel(dtype, dstate, launcher.current_arch(), step=_decode_profile(u))
            b, d, L = u.shape_expr[0], u.shape_expr[1], u.shape_expr[2]
            return _aot_result(trtp, choice, scan_launch(b, d, L, dstate, delta_softplus, step=choice.step))

    return Registration(trt.__version__, aot)


def _view(trt, t) -> TensorView:
    return TensorView(int(t.data_ptr), tuple(int(s) for s in t.shape), tuple(int(s) for s in t.strides),
                      dtype_name(trt, t.dtype))


def _constant(expr):
    return expr.constant_value() if (not expr.is_fake and expr.is_constant) else None


def _decode_profile(desc) -> bool:
    """True when this build call is for the decode profile (sequence axis fixed at 1)."""
    if desc.has_shape:
        shape = desc.shape
        if shape.is_dynamic:  # min / max of the profile being built
            return use_step_kernel(int(shape.min[2]), int(shape.max[2]))
        return int(shape[2]) == 1
    expr = desc.shape_expr[2]
    return _constant(expr) == 1


_ptx_memo: dict = {}
_ptx_lock = threading.Lock()


def _ptx(spec: KernelSpec) -> bytes:
    """PTX of one specialisation, compiled once per process (every layer of a model shares it)."""
    with _ptx_lock:
        if spec not in _ptx_memo:
            _ptx_memo[spec] = compiler.compile_spec(spec, output="ptx")
        return _ptx_memo[spec]


def _aot_result(trtp, choice: KernelChoice, launch: Launch):
    ptx = _ptx(choice.spec)
    params = trtp.KernelLaunchParams()
    params.grid_x = launch.grid_x
    params.grid_y = launch.grid_y
    params.block_x = launch.block_x
    params.shared_mem = launch.shared_mem
    extra = trtp.SymIntExprs(len(launch.scalars))
    for i, s in enumerate(launch.scalars):
        extra[i] = trtp.SymInt32(s)
    return choice.entry, ptx, params, extra
