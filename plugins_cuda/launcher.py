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
single-step kernel unless ``kernel="seq"``. Longer sequences run the channel-parallel sequence
kernel (``"seq"``), for few rows (``TP_MAX_ROWS``, ``TP_MIN_SEQLEN``) the time-parallel one
(``"tp"``), for many rows of n = 16 (``WIDE_MIN_ROWS``) the channel-parallel kernel's wide
configuration (``"wide"``), and otherwise, for n 9-16 and contiguous tensors, its warp-specialized
form (``"ws"``, ``WS_MIN_R``); ``kernel`` forces any of them.

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
CONV_ITEMS = 16     # causal_conv1d.cu CONV_ITEMS
SSU_THREADS = 128   # selective_scan.cu SSU_THREADS
# selective_scan.cu ScanCfg<NP>: padded state size -> (threads per block, channels per block)
SCAN_CFG = {8: (128, 16), 16: (128, 16), 32: (128, 8), 64: (128, 8)}
# ScanCfg<NP, true>, the "wide" configuration (twice the states per lane, at most 4)
SCAN_WIDE_CFG = {8: (128, 32), 16: (128, 32), 32: (128, 16), 64: (128, 8)}
# ScanCfg::MAX_WARPS: blocks of the sequence kernel may have up to this many warps for n <= 16 outside
# the wide configuration (the others keep the 4 above); scan_block_warps picks the count.
SCAN_MAX_WARPS = 8
# selective_scan.cu TpCfg (the time-parallel kernel, every NP): threads per block, channels per block
TP_CFG = (128, 4)
# kernel="auto" takes the time-parallel kernel for sequences of at least TP_MIN_SEQLEN steps over at
# most TP_MAX_ROWS (batch x channel) rows: there the channel-parallel kernel has fewer blocks than an
# H100 has SMs, while the time-parallel one's 4-warp blocks, one warp per row, still fill them at 4
# blocks per SM (132 x 16 = 2112 warps). Shorter sequences leave most of its 512-step chunk idle.
# benchmarks/NOTES.md, item 21.
TP_MAX_ROWS = 2048
TP_MIN_SEQLEN = 512
# kernel="auto" takes the wide configuration for n = 16 (the one measured) over at least WIDE_MIN_ROWS
# rows: half the warps of "seq", each with fewer shared-memory accesses per state-step. On the H100
# 5-19 % faster from 8,192 rows up, 10-20 % slower at 3,072-6,144 (benchmarks/NOTES.md, item 31).
WIDE_MIN_ROWS = 8192
# selective_scan.cu scan_fwd_ws (the warp-specialized sequence kernel, WsCfg): padded state sizes it is
# built for, and its blocks' recurrence warps (each with a side warp): at least WS_MIN_R[np] (one
# Bm / Cm run per side thread), at most WS_MAX_R[input itemsize] (WsCfg::MAX_R). kernel="auto" takes it
# instead of "seq" for n 9-16 (padded 16, the size measured; n <= 8 keeps "seq") where every tensor is
# contiguous (it has a flat entry only): d_inner 5120 at batch 1, 2048 steps, bf16 on the H100 0.099-0.101 ms against 0.107
# (benchmarks/NOTES.md, item 85).
WS_MIN_R = {8: 2, 16: 4}
WS_MAX_R = {2: 5, 4: 4}
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


def mapped_host_address(ptr: int, device: int | None = None) -> int:
    """The device address of page-locked host memory at ``ptr`` (cuMemHostGetDevicePointer), where a
    kernel can store to it directly, or 0 where the memory is not mapped into the device's address
    space (the caller then copies instead)."""
    drv = _driver()
    _context(device)
    err, dptr = drv.cuMemHostGetDevicePointer(ptr, 0)
    return int(dptr) if err == drv.CUresult.CUDA_SUCCESS else 0


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


_sms: dict[int, int] = {}  # raw context handle -> its device's SM count
_smem_allowed: dict[int, int] = {}  # function handle -> dynamic shared memory allowed so far


def _sm_count(ctx: int) -> int:
    """Multiprocessor count of the device of context ``ctx`` (the current one, as _current_context)."""
    n = _sms.get(ctx)
    if n is None:
        drv = _driver()
        dev = _cu(drv.cuCtxGetDevice(), "cuCtxGetDevice")
        attr = drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
        n = _sms[ctx] = int(_cu(drv.cuDeviceGetAttribute(attr, dev), "cuDeviceGetAttribute"))
    return n


def allow_smem(fn, nbytes: int) -> None:
    """Let ``fn`` take ``nbytes`` of dynamic shared memory (past the 48 KB every kernel may take
    without asking). Only ever raised, so that plans built earlier keep launching."""
    if nbytes <= 48 * 1024 or _smem_allowed.get(int(fn), 0) >= nbytes:
        return
    drv = _driver()
    attr = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    _cu(drv.cuFuncSetAttribute(fn, attr, nbytes), "cuFuncSetAttribute(max dynamic shared memory)")
    _smem_allowed[int(fn)] = nbytes


def _launch(fn, grid: tuple[int, int], block: int, args: list, stream: int, what: str) -> None:
    drv = _driver()
    ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    _cu(
        drv.cuLaunchKernel(fn, grid[0], grid[1], 1, block, 1, 1, 0, drv.CUstream(stream),
                           ctypes.addressof(ptrs), 0),
        f"cuLaunchKernel({what})",
    )


# --------------------------------------------------------------------------------------------------
# the per-call fast path: cached launch plans, driver entry points called through ctypes
#
# An eager call through cuda-python costs tens of microseconds (argument conversion and its object
# wrappers on every call, a context query per call, a new pointer array per launch). A LaunchPlan
# holds everything of a launch but the tensor pointers and the stream: the function handle, grid,
# block and a preallocated kernel-parameter buffer; a call writes the pointers into the buffer and
# calls cuLaunchKernel through ctypes (same libcuda, same handles as cuda-python). The current
# context is checked on every call (one cuCtxGetCurrent), never assumed.

_cuda_dll = None
_cuda_dll_tried = False
_ctx_device: dict[int, int] = {}  # raw context handle -> device ordinal (fixed for its lifetime)


def _libcuda():
    """ctypes view of the driver library cuda-python uses, or None (then cuda-python is used)."""
    global _cuda_dll, _cuda_dll_tried
    if _cuda_dll_tried:
        return _cuda_dll
    with _lock:
        if not _cuda_dll_tried:
            lib = None
            for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
                try:
                    lib = ctypes.CDLL(name)
                    break
                except OSError:
                    continue
            if lib is not None:
                try:
                    lib.cuLaunchKernel.argtypes = [
                        ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                        ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
                        ctypes.c_void_p]
                    lib.cuLaunchKernel.restype = ctypes.c_int
                    lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
                    lib.cuCtxGetCurrent.restype = ctypes.c_int
                except AttributeError:
                    lib = None
            _cuda_dll = lib
            _cuda_dll_tried = True
    return _cuda_dll


def _current_context(device: int | None) -> int:
    """Raw handle of the context to launch in (as _context); fast when it is already current."""
    lib = _libcuda()
    if lib is not None:
        cur = ctypes.c_void_p()
        if lib.cuCtxGetCurrent(ctypes.byref(cur)) == 0 and cur.value:
            if device is None or _ctx_device.get(cur.value) == device:
                return cur.value
    ctx = _context(device)
    handle = int(ctx)
    if handle not in _ctx_device:
        drv = _driver()
        _ctx_device[handle] = int(_cu(drv.cuCtxGetDevice(), "cuCtxGetDevice"))
    return handle


class LaunchPlan:
    """A validated launch with everything fixed but the tensor pointers and the stream.

    ``launch(ptrs, stream)`` takes the pointers in the order of the params struct's pointer fields
    (which is also the order of the flat entry's pointer parameters). Plans are built and cached by
    :func:`scan_plan` / :func:`conv_plan` (and the ``launch_*`` functions), one per context."""

    __slots__ = ("fn", "handle", "ctx", "device", "grid", "block", "smem", "what", "_keep", "_set",
                 "_params", "_lock", "_check", "_rebuild")

    def __init__(self, fn, ctx: int, device, grid, block, what, *, flat=None, struct=None, check=None,
                 smem: int = 0):
        self.fn, self.ctx, self.device = fn, ctx, device
        self.handle = int(fn)
        self.grid, self.block, self.what = (int(grid[0]), int(grid[1])), int(block), what
        self.smem = int(smem)  # dynamic shared memory, bytes
        self._check, self._rebuild = check, None  # _plan sets _rebuild (this key in another context)
        self._lock = threading.Lock()
        if struct is not None:  # strided entry: the struct by value; its leading pointer fields
            nptr = sum(1 for _, t in struct._fields_ if t is ctypes.c_void_p)
            view = (ctypes.c_uint64 * nptr).from_buffer(struct)
            params = (ctypes.c_void_p * 1)(ctypes.addressof(struct))
            self._keep = (struct, view, params)

            def _set(ptrs, view=view):
                view[:] = ptrs
        else:  # flat entry: one 8-byte slot per parameter (ints are read from the low 4 bytes):
            # the input pointers, the scalars, the output pointers
            vals = (ctypes.c_uint64 * len(flat))()
            kinds = "".join(kind for kind, _ in flat)
            a1 = kinds.index("i")
            b0 = kinds.index("p", a1)
            if kinds != "p" * a1 + "i" * (b0 - a1) + "p" * (len(kinds) - b0):
                raise InternalError(f"{what}: flat parameters must be pointers, ints, pointers; got {kinds}")
            for i in range(a1, b0):
                vals[i] = flat[i][1]
            params = (ctypes.c_void_p * len(flat))(*[ctypes.addressof(vals) + 8 * i for i in range(len(flat))])
            self._keep = (vals, params)

            def _set(ptrs, vals=vals, a1=a1, b0=b0):
                vals[:a1] = ptrs[:a1]
                vals[b0:] = ptrs[a1:]
        self._set = _set
        self._params = ctypes.addressof(params)

    def launch(self, ptrs, stream: int = 0) -> None:
        if self._check is not None:
            self._check(ptrs)
        self._enqueue(ptrs, stream)

    def _enqueue(self, ptrs, stream: int) -> None:
        """launch() without the plan's pointer check (for callers that ran it already)."""
        ctx = _current_context(self.device)
        if ctx != self.ctx:  # another context is current (a different device or a foreign context)
            self._rebuild()._enqueue(ptrs, stream)
            return
        lib = _libcuda()
        with self._lock:
            self._set(ptrs)
            if lib is not None:
                err = lib.cuLaunchKernel(self.handle, self.grid[0], self.grid[1], 1, self.block, 1, 1,
                                         self.smem, stream or None, self._params, None)
            else:
                drv = _driver()
                err = drv.cuLaunchKernel(self.fn, self.grid[0], self.grid[1], 1, self.block, 1, 1, self.smem,
                                         drv.CUstream(stream), self._params, 0)[0]
        if err:
            drv = _driver()
            _cu((drv.CUresult(int(err)),), f"cuLaunchKernel({self.what})")


_plans: dict[tuple, LaunchPlan] = {}


def _plan(key: tuple, device, build) -> LaunchPlan:
    """The cached plan for key in the context that launches for device (built on first use)."""
    ctx = _current_context(device)
    plan = _plans.get((ctx,) + key)
    if plan is None:
        plan = build(ctx)
        plan._rebuild = lambda: _plan(key, device, build)
        with _lock:
            plan = _plans.setdefault((ctx,) + key, plan)
    return plan


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
    """Per-tensor element strides, or None when every tensor is contiguous (flat entry point). The
    stride of a dimension of size 1 never moves an address, so it does not count (a prompt's
    (1, d, L) views of (d, L) projections run the flat entry)."""
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
    if all(all(n == 1 or a == b for n, a, b in zip(shape, out[name], _contiguous(shape)))
           for name, shape in shapes.items()):
        return None
    return out


def _span(ptr: int, shape, strides, itemsize: int) -> tuple[int, int]:
    return ptr, ptr + (sum((n - 1) * s for n, s in zip(shape, strides)) + 1) * itemsize


SCAN_KERNELS = ("auto", "seq", "step", "tp", "wide", "ws")


def _scan_kernel(op: str, kernel: str, batch: int, dim: int, seqlen: int, dstate: int, strided: bool) -> str:
    """The SelectiveScan kernel a launch runs: 'step', 'seq', 'tp', 'wide' or 'ws' (strided: some
    tensor is not contiguous)."""
    if kernel not in SCAN_KERNELS:
        raise InputError(f"{op}: kernel must be one of {', '.join(map(repr, SCAN_KERNELS))}, got {kernel!r}")
    if kernel == "ws":
        if padded_dstate(dstate) not in WS_MIN_R:
            raise UnsupportedError(f"{op}: the warp-specialized kernel is built for dstate <= "
                                   f"{max(WS_MIN_R)}, got {dstate}")
        if strided:
            raise UnsupportedError(f"{op}: the warp-specialized kernel takes contiguous tensors only; "
                                   "got strides (use kernel='seq' or 'auto')")
        return kernel
    if kernel in ("tp", "wide"):
        return kernel
    if _check_kernel(op, kernel, seqlen):
        return "step"
    if kernel == "auto" and seqlen >= TP_MIN_SEQLEN and batch * dim <= TP_MAX_ROWS:
        return "tp"
    if kernel == "auto" and batch * dim >= WIDE_MIN_ROWS and padded_dstate(dstate) == 16:
        return "wide"
    if kernel == "auto" and not strided and padded_dstate(dstate) == 16:
        return "ws"
    return "seq"


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


def _scan_cfg(np_: int, wide: bool) -> tuple[int, int]:
    """(ScanCfg::WARPS, ScanCfg::CPW) of the sequence kernel: its default warps per block, and the
    channels each warp holds."""
    threads, cpb = (SCAN_WIDE_CFG if wide else SCAN_CFG)[np_]
    return threads // 32, cpb // (threads // 32)


def scan_max_warps(np_: int, *, wide: bool) -> int:
    """ScanCfg::MAX_WARPS: the most warps a block of the sequence kernel may have."""
    return SCAN_MAX_WARPS if np_ <= 16 and not wide else _scan_cfg(np_, wide)[0]


def scan_block_warps(batch: int, dim: int, np_: int, *, wide: bool, sms: int | None) -> int:
    """Warps per block of the sequence kernel (seq or wide) on a device with ``sms`` SMs.

    The default blocks of 4 warps leave the SMs unevenly loaded when there are a few per SM (320 at
    d = 5120: 56 of 132 SMs run three, the rest two, and the kernel lasts as long as the SMs with
    three). Where every warp fits in one block per SM, or else in two, of at most ScanCfg::MAX_WARPS
    warps each, the blocks are sized so: every SM then runs the same number of warps, give or take
    one (H100, n = 16, B = 1, L = 2048: d 5120 in 256 blocks of 5, 0.124 -> 0.115 ms; d 4096 in 128 of
    8, 0.100 -> 0.097; d 3072 in 128 of 6, 0.099 -> 0.086; one block of 10 per SM at d 5120 took
    0.121: benchmarks/NOTES.md, item 52). Elsewhere (sms None, few rows, more warps than two blocks
    per SM hold, or a configuration whose blocks stay at 4) the default."""
    base, cpw = _scan_cfg(np_, wide)
    row_warps = (dim + cpw - 1) // cpw
    total = batch * row_warps
    top = scan_max_warps(np_, wide=wide)
    if not sms or top <= base or total <= sms * base or total > 2 * sms * top:
        return base
    per_sm = (total + sms * top - 1) // (sms * top)  # blocks per SM: 1, or 2 past `top` warps each
    w = (total + per_sm * sms - 1) // (per_sm * sms)
    while w <= top and batch * ((row_warps + w - 1) // w) > per_sm * sms:
        w += 1
    return w if w <= top else base


def scan_smem_bytes(np_: int, warps: int, *, wide: bool, itemsize: int) -> int:
    """Dynamic shared memory of a block of the sequence kernel (ScanCfg::smem_bytes): Bm and Cm
    double-buffered ([2][NP][RS], 16-bit in the wide configuration of 16-bit inputs, else fp32), then
    per warp dt and dt*u ([CPW][RS] floats each) and the y partial planes (TPC x YPL floats)."""
    return _scan_smem(np_, _scan_cfg(np_, wide)[1], warps, 2 if wide and itemsize == 2 else 4)


def _scan_smem(np_: int, cpw: int, warps: int, bc_bytes: int, tch: int | None = None) -> int:
    """scan_smem_bytes by channels per warp, bytes per staged Bm / Cm value and steps per chunk
    (ScanCfg::TCH: 16 for n = 64, else 32 unless a benchmark variant says otherwise). The y planes' offset
    is the one of the items' lane mapping (ScanCfg::YPL_TARGET without XMAP); with XMAP, the kernel's
    default since item 83, its planes pad less (at n = 16: 144 floats a plane, not 164), so this is an
    upper bound there (640 bytes a warp more at n = 16) that also fits benchmark variants built with
    MRT_SCAN_XMAP=0 (benchmarks/NOTES.md, item 84)."""
    tpc = 32 // cpw
    rs = (tch or (16 if np_ == 64 else 32)) + 4
    return 4 * np_ * rs * bc_bytes + 4 * (2 * cpw * rs + tpc * _ypl(cpw, rs, 8 if tpc == 4 else 4)) * warps


def _ypl(cpw: int, rs: int, target: int) -> int:
    """ScanCfg::YPL, the floats between y partial planes: CPW rows of RS, padded so that the plane
    offset falls `target` banks (mod 32) along."""
    return cpw * rs + ((target - (cpw * rs) % 32) + 32) % 32


def ws_block_warps(batch: int, dim: int, np_: int, *, itemsize: int, sms: int | None) -> int:
    """Recurrence warps R per block of the warp-specialized kernel (blocks of 2 R warps, two per SM):
    as few as fill two blocks per SM (H100, d_inner 5120 at batch 1: 1,280 recurrence warps in 256
    blocks of R = 5), within WsCfg's WS_MIN_R[np] .. WS_MAX_R[itemsize]. sms None: the latter."""
    lo, hi = WS_MIN_R[np_], WS_MAX_R[itemsize]
    if not sms:
        return hi
    cpw = _scan_cfg(np_, False)[1]
    total = batch * ((dim + cpw - 1) // cpw)
    return min(hi, max(lo, (total + 2 * sms - 1) // (2 * sms)))


def ws_smem_bytes(np_: int, r: int) -> int:
    """Dynamic shared memory of a block of the warp-specialized kernel (WsCfg::smem_bytes): Bm and Cm
    [2][NP][RS] fp32, dt and dt*u [2][CPW R][RS], the y planes [R][2][TPC][YPL] (XMAP's offset), four
    mbarriers."""
    cpw = _scan_cfg(np_, False)[1]
    tpc, rs = 32 // cpw, 32 + 4
    return 4 * (2 * 2 * np_ * rs + 2 * 2 * cpw * r * rs + 2 * tpc * _ypl(cpw, rs, 4 * cpw) * r) + 32


def ws_launch_config(batch: int, dim: int, np_: int, r: int) -> tuple[tuple[int, int], int, int]:
    """(grid, threads per block, dynamic shared bytes) of the warp-specialized kernel in blocks of r
    recurrence warps (each with a side warp and CPW channels)."""
    cpb = _scan_cfg(np_, False)[1] * r
    return ((dim + cpb - 1) // cpb, batch), 64 * r, ws_smem_bytes(np_, r)


def scan_launch_config(batch: int, dim: int, dstate: int, *, step: bool, tp: bool = False,
                       wide: bool = False, sms: int | None = None) -> tuple[tuple[int, int], int]:
    """((grid_x, grid_y), threads per block) of the selective_scan kernels (tp: the time-parallel one,
    wide: the sequence kernel's wide configuration; sms: the device's SM count, which sizes the
    sequence kernel's blocks, scan_block_warps; None keeps its default 4 warps, as TensorRT does).
    The sequence kernel also takes scan_smem_bytes of dynamic shared memory."""
    np_ = padded_dstate(dstate)
    if step:
        tpc = np_ // 4
        return ((batch * dim * tpc + SSU_THREADS - 1) // SSU_THREADS, 1), SSU_THREADS
    if tp:
        threads, cpb = TP_CFG
        return ((dim + cpb - 1) // cpb, batch), threads
    warps = scan_block_warps(batch, dim, np_, wide=wide, sms=sms)
    cpb = _scan_cfg(np_, wide)[1] * warps
    return ((dim + cpb - 1) // cpb, batch), 32 * warps


# --------------------------------------------------------------------------------------------------
# public launchers


def _conv_args(op: str, batch, dim, seqlen, width, dtype, activation) -> tuple[int, int, int, int]:
    """(itemsize, batch, dim, seqlen) of a CausalConv1d launch, every argument checked."""
    itemsize = _check_dtype(op, dtype)
    batch, dim, seqlen = (_check_size(n, v) for n, v in (("batch", batch), ("dim", dim), ("seqlen", seqlen)))
    if width not in FAMILIES[op].specs:
        raise UnsupportedError(f"{op}: width (kernel size) {width!r} is not supported; expected one of "
                               f"{FAMILIES[op].specs}")
    if activation not in ACTIVATIONS:
        raise InputError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return itemsize, batch, dim, seqlen


def _conv_shapes(batch, dim, seqlen, width) -> dict:
    return {"x": (batch, dim, seqlen), "weight": (dim, width), "bias": (dim,),
            "conv_state": (batch, dim, width - 1), "y": (batch, dim, seqlen),
            "conv_state_out": (batch, dim, width - 1)}


def _conv_overlap_check(op, shapes, st, itemsize, seqlen, step):
    """None, or a check of the pointer tuple that refuses a conv_state_out overlapping conv_state where
    the kernel does not allow it (the sequence kernel beyond CONV_ITEMS steps)."""
    if step or seqlen <= CONV_ITEMS:
        return None
    full = st or {n: _contiguous(s) for n, s in shapes.items()}
    ext_in = _span(0, shapes["conv_state"], full["conv_state"], itemsize)[1]
    ext_out = _span(0, shapes["conv_state_out"], full["conv_state_out"], itemsize)[1]

    def _overlap(ptrs):
        a, b = ptrs[3], ptrs[5]
        if a and a < b + ext_out and b < a + ext_in:
            raise InputError(f"{op}: conv_state_out overlaps conv_state; in-place state update is "
                             f"supported for seqlen <= {CONV_ITEMS} only (got seqlen {seqlen})")

    return _overlap


def conv_plan(
    *, batch: int, dim: int, seqlen: int, width: int, dtype: str, activation: str = "none",
    strides: dict | None = None, kernel: str = "auto", device: int | None = None,
) -> LaunchPlan:
    """Validate everything of a CausalConv1d launch but the pointers and return its (cached) plan;
    ``plan.launch((x, weight, bias, conv_state, y, conv_state_out), stream)`` enqueues it. The plan
    refuses a conv_state_out that overlaps conv_state where the kernel does not allow it."""
    op = "causal_conv1d"
    itemsize, batch, dim, seqlen = _conv_args(op, batch, dim, seqlen, width, dtype, activation)
    step = _check_kernel(op, kernel, seqlen)
    shapes = _conv_shapes(batch, dim, seqlen, width)
    st = _resolve_strides(op, shapes, strides)
    check = _conv_overlap_check(op, shapes, st, itemsize, seqlen, step)
    return _conv_plan(batch, dim, seqlen, width, dtype, activation, st, step, check, device)


def _conv_plan(batch, dim, seqlen, width, dtype, activation, st, step, check, device) -> LaunchPlan:
    """conv_plan for arguments already checked (st: resolved strides; check: the overlap check)."""
    op = "causal_conv1d"
    silu = int(activation == "silu")
    key = (op, dtype, width, batch, dim, seqlen, silu, step, None if st is None else tuple(sorted(st.items())))

    def build(ctx: int) -> LaunchPlan:
        stem = "mrt_causal_conv1d_update" if step else "mrt_causal_conv1d_fwd"
        fn = _function(op, dtype, width, stem if st is None else stem + "_strided", device)
        grid, block = conv_launch_config(batch, dim, seqlen, step=step)
        if st is None:
            flat = [("p", n) for n in ("x", "weight", "bias", "conv_state")]
            flat += [("i", v) for v in (batch, dim, seqlen, silu)]
            flat += [("p", "y"), ("p", "conv_state_out")]
            return LaunchPlan(fn, ctx, device, grid, block, op, flat=flat, check=check)
        p = _ConvParams(batch=batch, dim=dim, seqlen=seqlen, silu=silu)
        _fill_strides(p, st, _CONV_STRIDE_FIELDS)
        return LaunchPlan(fn, ctx, device, grid, block, op, struct=p, check=check)

    return _plan(key, device, build)


def launch_causal_conv1d(
    *, x: int, weight: int, bias: int | None, conv_state: int | None, y: int, conv_state_out: int,
    batch: int, dim: int, seqlen: int, width: int, dtype: str, activation: str = "none",
    stream: int = 0, strides: dict | None = None, kernel: str = "auto", device: int | None = None,
) -> LaunchPlan:
    """Enqueue CausalConv1d on ``stream``; returns the plan it launched (for later calls with other
    pointers). All tensors have ``dtype``; bias and conv_state may be 0.

    Shapes: x, y [batch, dim, seqlen]; weight [dim, width]; bias [dim]; conv_state, conv_state_out
    [batch, dim, width-1]. conv_state_out may be conv_state only when seqlen <= 16 (CONV_ITEMS) or
    for the single-step kernel (in-place decode update).
    """
    op = "causal_conv1d"
    itemsize, batch, dim, seqlen = _conv_args(op, batch, dim, seqlen, width, dtype, activation)
    stream = _check_stream(stream)
    step = _check_kernel(op, kernel, seqlen)
    ptrs = (
        _check_ptr(op, "x", x, itemsize, True),
        _check_ptr(op, "weight", weight, itemsize, True),
        _check_ptr(op, "bias", bias, itemsize, False),
        _check_ptr(op, "conv_state", conv_state, itemsize, False),
        _check_ptr(op, "y", y, itemsize, True),
        _check_ptr(op, "conv_state_out", conv_state_out, itemsize, True),
    )
    shapes = _conv_shapes(batch, dim, seqlen, width)
    st = _resolve_strides(op, shapes, strides)
    check = _conv_overlap_check(op, shapes, st, itemsize, seqlen, step)
    if check:  # before the driver is touched
        check(ptrs)
    plan = _conv_plan(batch, dim, seqlen, width, dtype, activation, st, step, check, device)
    plan._enqueue(ptrs, stream)
    return plan


def _fill_strides(p, strides: dict, fields: dict) -> None:
    for name, (prefix, suffixes) in fields.items():
        for suffix, value in zip(suffixes, strides[name]):
            setattr(p, f"{prefix}_{suffix}", value)


launch_causal_conv1d.capability = CONV_CAPABILITY


_SCAN_PTRS = ("u", "delta", "A", "Bm", "Cm", "D", "z", "delta_bias", "ssm_state", "y", "ssm_state_out")


def _scan_shapes(batch, dim, seqlen, dstate) -> dict:
    return {"u": (batch, dim, seqlen), "delta": (batch, dim, seqlen), "A": (dim, dstate),
            "Bm": (batch, dstate, seqlen), "Cm": (batch, dstate, seqlen), "D": (dim,),
            "delta_bias": (dim,), "z": (batch, dim, seqlen), "ssm_state": (batch, dim, dstate),
            "y": (batch, dim, seqlen), "ssm_state_out": (batch, dim, dstate)}


def _scan_args(op: str, batch, dim, seqlen, dstate, dtype) -> tuple[int, int, int, int, int]:
    """(itemsize, batch, dim, seqlen, dstate) of a SelectiveScan launch, every argument checked."""
    itemsize = _check_dtype(op, dtype)
    batch, dim, seqlen, dstate = (
        _check_size(n, v) for n, v in (("batch", batch), ("dim", dim), ("seqlen", seqlen), ("dstate", dstate)))
    padded_dstate(dstate)
    if batch > 65535:
        raise UnsupportedError(f"{op}: batch {batch} exceeds the grid limit 65535")
    return itemsize, batch, dim, seqlen, dstate


def scan_plan(
    *, batch: int, dim: int, seqlen: int, dstate: int, dtype: str, delta_softplus: bool = True,
    strides: dict | None = None, kernel: str = "auto", device: int | None = None,
) -> LaunchPlan:
    """Validate everything of a SelectiveScan launch but the pointers and return its (cached) plan;
    ``plan.launch((u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, y, ssm_state_out), stream)``
    enqueues it (D, z, delta_bias, ssm_state may be 0)."""
    op = "selective_scan"
    _, batch, dim, seqlen, dstate = _scan_args(op, batch, dim, seqlen, dstate, dtype)
    st = _resolve_strides(op, _scan_shapes(batch, dim, seqlen, dstate), strides)
    kind = _scan_kernel(op, kernel, batch, dim, seqlen, dstate, st is not None)
    return _scan_plan(batch, dim, seqlen, dstate, dtype, delta_softplus, st, kind, device)


_SCAN_STEMS = {"step": "mrt_selective_state_update", "seq": "mrt_selective_scan_fwd",
               "tp": "mrt_selective_scan_tp_fwd", "wide": "mrt_selective_scan_wide_fwd",
               "ws": "mrt_selective_scan_ws_fwd"}


def _scan_plan(batch, dim, seqlen, dstate, dtype, delta_softplus, st, kind, device) -> LaunchPlan:
    """scan_plan for arguments already checked (st: resolved strides; kind: _scan_kernel's)."""
    op = "selective_scan"
    softplus = int(bool(delta_softplus))
    key = (op, dtype, batch, dim, seqlen, dstate, softplus, kind, None if st is None else tuple(sorted(st.items())))

    def build(ctx: int) -> LaunchPlan:
        stem = _SCAN_STEMS[kind]
        np_ = padded_dstate(dstate)
        fn = _function(op, dtype, np_, stem if st is None else stem + "_strided", device)
        seq = kind in ("seq", "wide")
        smem = 0
        if kind == "ws":
            r = ws_block_warps(batch, dim, np_, itemsize=DTYPES[dtype][2], sms=_sm_count(ctx))
            grid, block, smem = ws_launch_config(batch, dim, np_, r)
            allow_smem(fn, smem)
        else:
            grid, block = scan_launch_config(batch, dim, dstate, step=kind == "step", tp=kind == "tp",
                                             wide=kind == "wide", sms=_sm_count(ctx) if seq else None)
        if seq:
            wide, itemsize = kind == "wide", DTYPES[dtype][2]
            smem = scan_smem_bytes(np_, block // 32, wide=wide, itemsize=itemsize)
            allow_smem(fn, smem)
        if st is None:
            flat = [("p", n) for n in _SCAN_PTRS[:9]]
            flat += [("i", v) for v in (batch, dim, seqlen, dstate, softplus)]
            flat += [("p", "y"), ("p", "ssm_state_out")]
            return LaunchPlan(fn, ctx, device, grid, block, op, flat=flat, smem=smem)
        p = _ScanParams(batch=batch, dim=dim, seqlen=seqlen, dstate=dstate, softplus=softplus)
        _fill_strides(p, st, _SCAN_STRIDE_FIELDS)
        return LaunchPlan(fn, ctx, device, grid, block, op, struct=p, smem=smem)

    return _plan(key, device, build)


def launch_selective_scan(
    *, u: int, delta: int, A: int, Bm: int, Cm: int, D: int | None, z: int | None,
    delta_bias: int | None, ssm_state: int | None, y: int, ssm_state_out: int,
    batch: int, dim: int, seqlen: int, dstate: int, dtype: str, delta_softplus: bool = True,
    stream: int = 0, strides: dict | None = None, kernel: str = "auto", device: int | None = None,
) -> LaunchPlan:
    """Enqueue SelectiveScan on ``stream``; returns the plan it launched (for later calls with other
    pointers).

    u, delta, z, y [batch, dim, seqlen] and Bm, Cm [batch, dstate, seqlen] have ``dtype``; A [dim,
    dstate], D, delta_bias [dim] and ssm_state, ssm_state_out [batch, dim, dstate] are float32.
    D, z, delta_bias and ssm_state may be 0; ssm_state_out may be ssm_state (in-place).
    """
    op = "selective_scan"
    itemsize, batch, dim, seqlen, dstate = _scan_args(op, batch, dim, seqlen, dstate, dtype)
    stream = _check_stream(stream)
    act = {"u", "delta", "Bm", "Cm", "z", "y"}
    required = {"u", "delta", "A", "Bm", "Cm", "y", "ssm_state_out"}
    given = {"u": u, "delta": delta, "A": A, "Bm": Bm, "Cm": Cm, "D": D, "z": z,
             "delta_bias": delta_bias, "ssm_state": ssm_state, "y": y, "ssm_state_out": ssm_state_out}
    ptrs = tuple(_check_ptr(op, n, given[n], itemsize if n in act else 4, n in required) for n in _SCAN_PTRS)
    st = _resolve_strides(op, _scan_shapes(batch, dim, seqlen, dstate), strides)
    kind = _scan_kernel(op, kernel, batch, dim, seqlen, dstate, st is not None)
    plan = _scan_plan(batch, dim, seqlen, dstate, dtype, delta_softplus, st, kind, device)
    plan._enqueue(ptrs, stream)
    return plan


launch_selective_scan.capability = SCAN_CAPABILITY
