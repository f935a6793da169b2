"""Torch-free launcher: device pointers (ints), sizes and a CUDA stream handle in, kernels enqueued.

This is what the TensorRT plugins, the runtime and the torch wrappers (torch_ops.py) all call::

    launch_causal_conv1d(x=..., weight=..., bias=0, conv_state=..., y=..., conv_state_out=...,
                         batch=B, dim=d, seqlen=L, width=k, dtype="bfloat16",
                         activation="silu", stream=stream_handle)
    launch_selective_scan(u=..., delta=..., A=..., Bm=..., Cm=..., D=..., z=..., delta_bias=...,
                          ssm_state=..., y=..., ssm_state_out=..., batch=B, dim=d, seqlen=L,
                          dstate=n, dtype="float16", delta_softplus=True, stream=stream_handle)

Pointers are ints (0 = absent, allowed only for optional tensors). Layout is channel-major
(DESIGN.md): x, u, delta, z, y are [B, d, L]; Bm, Cm [B, n, L]; states [B, d, k-1] / [B, d, n].
Without ``strides`` every tensor is taken as contiguous and the flat entry point (TensorRT's argument
order) is launched; ``strides`` maps a tensor name to its element strides (one per dimension, for the
3-D logical shape above even when L = 1), and then the strided entry point runs. seqlen == 1 runs the
single-step kernel unless ``kernel="seq"``.

Everything is validated before any CUDA call: a bad argument raises InputError / UnsupportedError and
nothing is launched. Every CUDA driver return code is checked. Kernels are compiled on first use for
the device of the current context (compiler.get_cubin; cached on disk) and loaded once per context.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

from mamba_rt._optional import require
from mamba_rt.errors import InputError, InternalError, UnsupportedError

from . import compiler
from .compiler import DTYPES, FAMILIES, MIN_ARCH, KernelSpec

ACTIVATIONS = ("none", "silu")
CONV_THREADS = 128  # causal_conv1d.cu CONV_THREADS
CONV_ITEMS = 8      # causal_conv1d.cu CONV_ITEMS
SSU_THREADS = 128   # selective_scan.cu SSU_THREADS
# selective_scan.cu ScanCfg<NP>: padded state size -> (threads per block, channels per block)
SCAN_CFG = {8: (128, 32), 16: (128, 16), 32: (128, 16), 64: (128, 8)}
MAX_DSTATE = max(SCAN_CFG)
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------------
# capability


@dataclass(frozen=True)
class Capability:
    """What a kernel family supports; attached to the functions as ``.capability``."""

    op: str
    min_arch: int
    dtypes: tuple[str, ...]
    note: str

    def why_unsupported(self, *, arch: int | None = None, dtype: str | None = None) -> str | None:
        """None if (arch, dtype) is supported, else the reason (for a test skip or an error)."""
        if arch is not None and arch < self.min_arch:
            return (f"{self.op} needs compute capability {self.min_arch // 10}.{self.min_arch % 10}"
                    f" or newer, this GPU is {arch // 10}.{arch % 10}")
        if dtype is not None and dtype not in self.dtypes:
            return f"{self.op} supports activation dtypes {self.dtypes}, not {dtype!r}"
        return None


CONV_CAPABILITY = Capability(
    "causal_conv1d", MIN_ARCH, tuple(DTYPES),
    f"width k in {FAMILIES['causal_conv1d'].specs}; any dim; seqlen >= 1",
)
SCAN_CAPABILITY = Capability(
    "selective_scan", MIN_ARCH, tuple(DTYPES),
    f"dstate 1..{MAX_DSTATE} (16 is the fastest); any dim; seqlen >= 1; A, D, delta_bias and the"
    " state float32",
)


# --------------------------------------------------------------------------------------------------
# CUDA driver plumbing


def _driver():
    return require("cuda.bindings.driver")


def _cu(result, what: str):
    """Unpack a cuda.bindings (err, *values) tuple, raising on any error."""
    drv = _driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        _, name = drv.cuGetErrorName(err)
        _, text = drv.cuGetErrorString(err)
        name = name.decode() if isinstance(name, bytes) else str(name)
        text = text.decode() if isinstance(text, bytes) else str(text)
        if err in (drv.CUresult.CUDA_ERROR_NO_BINARY_FOR_GPU,
                   drv.CUresult.CUDA_ERROR_UNSUPPORTED_PTX_VERSION):
            raise UnsupportedError(
                f"{what} failed: {name} ({text}); the cubin from NVRTC "
                f"{'.'.join(map(str, compiler.nvrtc_version()))} does not run with this driver/GPU"
            )
        raise InternalError(f"CUDA driver call {what} failed: {name} ({text})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


_lock = threading.Lock()
_initialised = False
_primary: dict[int, object] = {}           # device ordinal -> retained primary context
_functions: dict[tuple, object] = {}      # (context, op, dtype, spec, entry stem) -> CUfunction
_modules: dict[tuple[int, str], object] = {}         # (context, cache key) -> CUmodule


def _context(device: int | None):
    """The context to launch in: the current one (e.g. torch's), or device's primary context."""
    global _initialised
    drv = _driver()
    if not _initialised:
        _cu(drv.cuInit(0), "cuInit")
        _initialised = True
    ctx = _cu(drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if int(ctx) != 0:
        if device is None or int(_cu(drv.cuCtxGetDevice(), "cuCtxGetDevice")) == device:
            return ctx
    ordinal = 0 if device is None else device
    with _lock:
        if ordinal not in _primary:
            dev = _cu(drv.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
            _primary[ordinal] = _cu(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        ctx = _primary[ordinal]
    _cu(drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    return ctx


def current_arch(device: int | None = None) -> int:
    """Compute capability of the device of the current context, as 10 * major + minor."""
    drv = _driver()
    _context(device)
    dev = _cu(drv.cuCtxGetDevice(), "cuCtxGetDevice")
    attr = drv.CUdevice_attribute
    major = _cu(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cc")
    minor = _cu(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cc")
    return 10 * major + minor


def _function(op: str, dtype: str, spec: int, stem: str, device: int | None):
    ctx = _context(device)
    fkey = (int(ctx), op, dtype, spec, stem)
    fn = _functions.get(fkey)
    if fn is not None:
        return fn
    drv = _driver()
    arch = current_arch(device)
    reason = (CONV_CAPABILITY if op == "causal_conv1d" else SCAN_CAPABILITY).why_unsupported(arch=arch)
    if reason:
        raise UnsupportedError(reason)
    ks = KernelSpec(op, dtype, spec, arch)
    key = compiler.cache_key(ks)
    cubin = compiler.get_cubin(ks)
    with _lock:
        mod = _modules.get((int(ctx), key))
        if mod is None:
            mod = _cu(drv.cuModuleLoadData(cubin), f"cuModuleLoadData({key})")
            _modules[(int(ctx), key)] = mod
        name = ks.entry(stem)
        fn = _cu(drv.cuModuleGetFunction(mod, name.encode()), f"cuModuleGetFunction({name})")
        _functions[fkey] = fn
    return fn


def _launch(fn, grid: tuple[int, int], block: int, args: list, stream: int, what: str) -> None:
    drv = _driver()
    ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    _cu(
        drv.cuLaunchKernel(fn, grid[0], grid[1], 1, block, 1, 1, 0, drv.CUstream(stream),
                           ctypes.addressof(ptrs), 0),
        f"cuLaunchKernel({what})",
    )


# --------------------------------------------------------------------------------------------------
# params structs (mirror causal_conv1d.cu ConvParams and selective_scan.cu ScanParams)

_P, _I = ctypes.c_void_p, ctypes.c_longlong


def _struct(name: str, pointers: tuple[str, ...], ints: tuple[str, ...]):
    return type(name, (ctypes.Structure,), {"_fields_": [(f, _P) for f in pointers] + [(f, _I) for f in ints]})


_ConvParams = _struct(
    "_ConvParams",
    ("x", "weight", "bias", "conv_state", "y", "conv_state_out"),
    ("batch", "dim", "seqlen", "silu", "x_bs", "x_cs", "x_ts", "w_cs", "w_ks", "b_cs",
     "s_bs", "s_cs", "s_ks", "y_bs", "y_cs", "y_ts", "so_bs", "so_cs", "so_ks"),
)
_ScanParams = _struct(
    "_ScanParams",
    ("u", "delta", "A", "Bm", "Cm", "D", "z", "delta_bias", "ssm_state", "y", "ssm_state_out"),
    ("batch", "dim", "seqlen", "dstate", "softplus", "u_bs", "u_cs", "u_ts", "d_bs", "d_cs", "d_ts",
     "A_cs", "A_ss", "B_bs", "B_ss", "B_ts", "C_bs", "C_ss", "C_ts", "D_cs", "db_cs",
     "z_bs", "z_cs", "z_ts", "h_bs", "h_cs", "h_ss", "y_bs", "y_cs", "y_ts", "ho_bs", "ho_cs", "ho_ss"),
)
# tensor name -> (prefix of its stride fields in the struct, stride field suffixes)
_CONV_STRIDE_FIELDS = {
    "x": ("x", ("bs", "cs", "ts")), "weight": ("w", ("cs", "ks")), "bias": ("b", ("cs",)),
    "conv_state": ("s", ("bs", "cs", "ks")), "y": ("y", ("bs", "cs", "ts")),
    "conv_state_out": ("so", ("bs", "cs", "ks")),
}
_SCAN_STRIDE_FIELDS = {
    "u": ("u", ("bs", "cs", "ts")), "delta": ("d", ("bs", "cs", "ts")), "A": ("A", ("cs", "ss")),
    "Bm": ("B", ("bs", "ss", "ts")), "Cm": ("C", ("bs", "ss", "ts")), "D": ("D", ("cs",)),
    "delta_bias": ("db", ("cs",)), "z": ("z", ("bs", "cs", "ts")),
    "ssm_state": ("h", ("bs", "cs", "ss")), "y": ("y", ("bs", "cs", "ts")),
    "ssm_state_out": ("ho", ("bs", "cs", "ss")),
}


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


# --------------------------------------------------------------------------------------------------
# validation


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not 1 <= value <= _INT32_MAX:
        raise InputError(f"{name} must be in [1, {_INT32_MAX}], got {value}")
    return value


def _check_dtype(op: str, dtype) -> int:
    if dtype not in DTYPES:
        raise UnsupportedError(
            f"{op}: activation dtype {dtype!r} is not supported; expected one of {tuple(DTYPES)}")
    return DTYPES[dtype][2]


def _check_ptr(op: str, name: str, ptr, itemsize: int, required: bool) -> int:
    if ptr is None:
        ptr = 0
    if isinstance(ptr, bool) or not isinstance(ptr, int):
        raise InputError(f"{op}: {name} must be a device pointer (int), got {type(ptr).__name__}")
    if ptr == 0 and required:
        raise InputError(f"{op}: {name} is required, got a null pointer")
    if ptr < 0 or ptr % itemsize:
        raise InputError(f"{op}: {name} pointer {ptr:#x} is not aligned to its {itemsize}-byte elements")
    return ptr


def _resolve_strides(op: str, shapes: dict, strides) -> dict[str, tuple[int, ...]] | None:
    """Per-tensor element strides, or None when every tensor is contiguous (flat entry point)."""
    if strides is None:
        return None
    if not isinstance(strides, dict):
        raise InputError(f"{op}: strides must be a dict of tensor name -> tuple of ints")
    unknown = set(strides) - set(shapes)
    if unknown:
        raise InputError(f"{op}: strides given for unknown tensors {sorted(unknown)}; "
                         f"expected names among {sorted(shapes)}")
    out = {}
    for name, shape in shapes.items():
        st = tuple(strides.get(name, _contiguous(shape)))
        if len(st) != len(shape) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in st):
            raise InputError(f"{op}: strides[{name!r}] must be {len(shape)} non-negative ints "
                             f"(tensor shape {shape}), got {strides.get(name)!r}")
        out[name] = st
    if all(out[n] == _contiguous(s) for n, s in shapes.items()):
        return None
    return out


def _span(ptr: int, shape, strides, itemsize: int) -> tuple[int, int]:
    return ptr, ptr + (sum((n - 1) * s for n, s in zip(shape, strides)) + 1) * itemsize


def _check_kernel(op: str, kernel: str, seqlen: int) -> bool:
    """True for the single-step kernel."""
    if kernel not in ("auto", "seq", "step"):
        raise InputError(f"{op}: kernel must be 'auto', 'seq' or 'step', got {kernel!r}")
    if kernel == "step" and seqlen != 1:
        raise InputError(f"{op}: the single-step kernel needs seqlen 1, got {seqlen}")
    return kernel == "step" or (kernel == "auto" and seqlen == 1)


def _check_stream(stream) -> int:
    if isinstance(stream, bool) or not isinstance(stream, int) or stream < 0:
        raise InputError(f"stream must be a CUDA stream handle (int, 0 = default), got {stream!r}")
    return stream


# --------------------------------------------------------------------------------------------------
# launch configuration (also what a TensorRT plugin returns from its aot_impl)


def conv_launch_config(batch: int, dim: int, seqlen: int, *, step: bool) -> tuple[tuple[int, int], int]:
    """((grid_x, grid_y), threads per block) of the causal_conv1d kernels."""
    runs = 1 if step else (seqlen + CONV_ITEMS - 1) // CONV_ITEMS
    return ((batch * dim * runs + CONV_THREADS - 1) // CONV_THREADS, 1), CONV_THREADS


def padded_dstate(dstate: int) -> int:
    """The specialisation (8, 16, 32 or 64) that serves a state size."""
    for np_ in SCAN_CFG:
        if dstate <= np_:
            return np_
    raise UnsupportedError(f"selective_scan: dstate {dstate} is not supported; expected 1..{MAX_DSTATE}")


def scan_launch_config(batch: int, dim: int, dstate: int, *, step: bool) -> tuple[tuple[int, int], int]:
    """((grid_x, grid_y), threads per block) of the selective_scan kernels."""
    np_ = padded_dstate(dstate)
    if step:
        tpc = np_ // 4
        return ((batch * dim * tpc + SSU_THREADS - 1) // SSU_THREADS, 1), SSU_THREADS
    threads, cpb = SCAN_CFG[np_]
    return ((dim + cpb - 1) // cpb, batch), threads


# --------------------------------------------------------------------------------------------------
# public launchers


def launch_causal_conv1d(
    *, x: int, weight: int, bias: int | None, conv_state: int | None, y: int, conv_state_out: int,
    batch: int, dim: int, seqlen: int, width: int, dtype: str, activation: str = "none",
    stream: int = 0, strides: dict | None = None, kernel: str = "auto", device: int | None = None,
) -> None:
    """Enqueue CausalConv1d on ``stream``. All tensors have ``dtype``; bias and conv_state may be 0.

    Shapes: x, y [batch, dim, seqlen]; weight [dim, width]; bias [dim]; conv_state, conv_state_out
    [batch, dim, width-1]. conv_state_out may be conv_state only when seqlen <= 8 (CONV_ITEMS) or
    for the single-step kernel (in-place decode update).
    """
    op = "causal_conv1d"
    itemsize = _check_dtype(op, dtype)
    batch, dim, seqlen = (_check_size(n, v) for n, v in (("batch", batch), ("dim", dim), ("seqlen", seqlen)))
    if width not in FAMILIES[op].specs:
        raise UnsupportedError(f"{op}: width (kernel size) {width!r} is not supported; expected one of "
                               f"{FAMILIES[op].specs}")
    if activation not in ACTIVATIONS:
        raise InputError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    stream = _check_stream(stream)
    step = _check_kernel(op, kernel, seqlen)
    ptrs = {
        "x": _check_ptr(op, "x", x, itemsize, True),
        "weight": _check_ptr(op, "weight", weight, itemsize, True),
        "bias": _check_ptr(op, "bias", bias, itemsize, False),
        "conv_state": _check_ptr(op, "conv_state", conv_state, itemsize, False),
        "y": _check_ptr(op, "y", y, itemsize, True),
        "conv_state_out": _check_ptr(op, "conv_state_out", conv_state_out, itemsize, True),
    }
    shapes = {"x": (batch, dim, seqlen), "weight": (dim, width), "bias": (dim,),
              "conv_state": (batch, dim, width - 1), "y": (batch, dim, seqlen),
              "conv_state_out": (batch, dim, width - 1)}
    st = _resolve_strides(op, shapes, strides)
    if not step and seqlen > CONV_ITEMS and ptrs["conv_state"]:
        full = st or {n: _contiguous(s) for n, s in shapes.items()}
        a = _span(ptrs["conv_state"], shapes["conv_state"], full["conv_state"], itemsize)
        b = _span(ptrs["conv_state_out"], shapes["conv_state_out"], full["conv_state_out"], itemsize)
        if a[0] < b[1] and b[0] < a[1]:
            raise InputError(f"{op}: conv_state_out overlaps conv_state; in-place state update is "
                             f"supported for seqlen <= {CONV_ITEMS} only (got seqlen {seqlen})")

    stem = "mrt_causal_conv1d_update" if step else "mrt_causal_conv1d_fwd"
    fn = _function(op, dtype, width, stem if st is None else stem + "_strided", device)
    grid, block = conv_launch_config(batch, dim, seqlen, step=step)
    silu = int(activation == "silu")
    if st is None:
        args = [_P(ptrs[n]) for n in ("x", "weight", "bias", "conv_state")]
        args += [ctypes.c_int(v) for v in (batch, dim, seqlen, silu)]
        args += [_P(ptrs["y"]), _P(ptrs["conv_state_out"])]
    else:
        p = _ConvParams(**ptrs, batch=batch, dim=dim, seqlen=seqlen, silu=silu)
        _fill_strides(p, st, _CONV_STRIDE_FIELDS)
        args = [p]
    _launch(fn, grid, block, args, stream, op)


def _fill_strides(p, strides: dict, fields: dict) -> None:
    for name, (prefix, suffixes) in fields.items():
        for suffix, value in zip(suffixes, strides[name]):
            setattr(p, f"{prefix}_{suffix}", value)


launch_causal_conv1d.capability = CONV_CAPABILITY


def launch_selective_scan(
    *, u: int, delta: int, A: int, Bm: int, Cm: int, D: int | None, z: int | None,
    delta_bias: int | None, ssm_state: int | None, y: int, ssm_state_out: int,
    batch: int, dim: int, seqlen: int, dstate: int, dtype: str, delta_softplus: bool = True,
    stream: int = 0, strides: dict | None = None, kernel: str = "auto", device: int | None = None,
) -> None:
    """Enqueue SelectiveScan on ``stream``.

    u, delta, z, y [batch, dim, seqlen] and Bm, Cm [batch, dstate, seqlen] have ``dtype``; A [dim,
    dstate], D, delta_bias [dim] and ssm_state, ssm_state_out [batch, dim, dstate] are float32.
    D, z, delta_bias and ssm_state may be 0; ssm_state_out may be ssm_state (in-place).
    """
    op = "selective_scan"
    itemsize = _check_dtype(op, dtype)
    batch, dim, seqlen, dstate = (
        _check_size(n, v) for n, v in (("batch", batch), ("dim", dim), ("seqlen", seqlen), ("dstate", dstate)))
    np_ = padded_dstate(dstate)
    if batch > 65535:
        raise UnsupportedError(f"{op}: batch {batch} exceeds the grid limit 65535")
    stream = _check_stream(stream)
    step = _check_kernel(op, kernel, seqlen)
    act = {"u", "delta", "Bm", "Cm", "z", "y"}
    required = {"u", "delta", "A", "Bm", "Cm", "y", "ssm_state_out"}
    given = {"u": u, "delta": delta, "A": A, "Bm": Bm, "Cm": Cm, "D": D, "z": z,
             "delta_bias": delta_bias, "ssm_state": ssm_state, "y": y, "ssm_state_out": ssm_state_out}
    ptrs = {n: _check_ptr(op, n, v, itemsize if n in act else 4, n in required) for n, v in given.items()}
    shapes = {"u": (batch, dim, seqlen), "delta": (batch, dim, seqlen), "A": (dim, dstate),
              "Bm": (batch, dstate, seqlen), "Cm": (batch, dstate, seqlen), "D": (dim,),
              "delta_bias": (dim,), "z": (batch, dim, seqlen), "ssm_state": (batch, dim, dstate),
              "y": (batch, dim, seqlen), "ssm_state_out": (batch, dim, dstate)}
    st = _resolve_strides(op, shapes, strides)

    stem = "mrt_selective_state_update" if step else "mrt_selective_scan_fwd"
    fn = _function(op, dtype, np_, stem if st is None else stem + "_strided", device)
    grid, block = scan_launch_config(batch, dim, dstate, step=step)
    softplus = int(bool(delta_softplus))
    if st is None:
        args = [_P(ptrs[n]) for n in ("u", "delta", "A", "Bm", "Cm", "D", "z", "delta_bias", "ssm_state")]
        args += [ctypes.c_int(v) for v in (batch, dim, seqlen, dstate, softplus)]
        args += [_P(ptrs["y"]), _P(ptrs["ssm_state_out"])]
    else:
        p = _ScanParams(**ptrs, batch=batch, dim=dim, seqlen=seqlen, dstate=dstate, softplus=softplus)
        _fill_strides(p, st, _SCAN_STRIDE_FIELDS)
        args = [p]
    _launch(fn, grid, block, args, stream, op)


launch_selective_scan.capability = SCAN_CAPABILITY
