"""Thin torch wrappers over the CUDA kernels, for the torch backend and the tests.

Same positional signatures and semantics as the ``*_ref`` twins in ``mamba_rt.exporters.ops_ref``:

    causal_conv1d_fn(x, weight, bias=None, conv_state=None, activation="none")   -> (y, conv_state_out)
    causal_conv1d_update(x, conv_state, weight, bias=None, activation="none")    -> y   (state in place)
    selective_scan_fn(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, ssm_state=None,
                      delta_softplus=True)                                        -> (y, ssm_state_out)
    selective_state_update(ssm_state, u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None,
                           delta_softplus=True)                                   -> y   (state in place)
    add_rms_norm(x, residual, weight, eps, residual_fp32)                        -> (normed, residual)
                                                                        (residual updated in place)

Each also takes keyword-only output buffers (``out=``, ``conv_state_out=`` / ``ssm_state_out=``) so a
caller (CUDA graphs, the tests' poisoned outputs) can own the memory. Inputs may be non-contiguous:
their strides go to the kernels' strided entry points, no copies are made. Activations (x, u, delta,
z, Bm, Cm, conv weight/bias/state) share one dtype, float32, float16 or bfloat16; A, D, delta_bias and
the SSM state are float32. Kernels run on ``torch.cuda.current_stream()`` of the tensors' device.
Each function carries ``.capability`` (launcher.Capability) for skip decisions.

Host cost of an eager call: the first call with a given signature (every tensor's shape, strides,
dtype and device, which are None, the flags) validates everything and builds a launcher.LaunchPlan;
later calls with the same signature look the plan up by that signature (which is everything the
validation depends on) and only read the pointers and the current stream.

This is the only module of plugins_cuda that imports torch.
"""
from __future__ import annotations

import torch

from mamba_rt.errors import InputError, UnsupportedError

from . import launcher

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _act_dtype(op: str, t: torch.Tensor, name: str) -> str:
    if t.dtype not in _DTYPE_NAMES:
        raise UnsupportedError(f"{op}: {name} has dtype {t.dtype}; supported activation dtypes are "
                               f"{tuple(str(d) for d in _DTYPE_NAMES)}")
    return _DTYPE_NAMES[t.dtype]


def _check(op: str, name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device,
           required: bool = False) -> None:
    if t is None:
        if required:
            raise InputError(f"{op}: {name} is required, got None")
        return
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise InputError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        raise InputError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise InputError(f"{op}: {name} is on {t.device}, expected {device} (where the first input is)")


def _device(op: str, t: torch.Tensor, name: str) -> torch.device:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise InputError(f"{op}: {name} is on {t.device}; the CUDA kernels need tensors on a CUDA "
                         f"device (the *_ref functions in mamba_rt.exporters.ops_ref run anywhere)")
    return t.device


def _shape(op: str, t: torch.Tensor, name: str, rank: int, what: str) -> tuple[int, ...]:
    if t.dim() != rank:
        raise InputError(f"{op}: {name} must be {what} ({rank}-D), got shape {tuple(t.shape)}")
    return tuple(t.shape)


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _strides(tensors: dict) -> dict:
    """Element strides for the launcher, 2-D activations seen as [B, d, 1]."""
    out = {}
    for name, (t, logical_rank) in tensors.items():
        if t is None:
            continue
        st = tuple(t.stride())
        out[name] = st + (1,) * (logical_rank - len(st))
    return out


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(device: torch.device) -> int:
    if _raw_stream is not None:
        return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream


def _meta(t):
    """What validation and the launch plan depend on, per tensor (AttributeError for non-tensors)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


# signature -> (plan, device); filled only after a full validation of that signature
_plans: dict = {}


def _lookup(op: str, tensors: tuple, flags: tuple):
    """(signature, cached (plan, device, extra) or None) of a call; (None, None) when an argument is not a
    tensor or not hashable (then the checked path runs and reports it)."""
    try:
        key = (op, *(_meta(t) for t in tensors), *flags)
        return key, _plans.get(key)
    except (AttributeError, TypeError, RuntimeError):
        return None, None


def _alloc(op: str, name: str, given, shape, dtype, device) -> torch.Tensor:
    if given is None:
        return torch.empty(shape, dtype=dtype, device=device)
    _check(op, name, given, shape, dtype, device, required=True)
    return given


def _conv_weight(op: str, weight, dim: int) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise InputError(f"{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0, :]  # conv1d layout [d, 1, k]: a strided view, no copy
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise InputError(f"{op}: weight must be (dim, width) = ({dim}, k) or ({dim}, 1, k), got shape "
                         f"{tuple(weight.shape)}")
    return weight


def causal_conv1d_fn(x, weight, bias=None, conv_state=None, activation="none", *, out=None,
                     conv_state_out=None, kernel="auto"):
    """x: (batch, dim, seqlen); weight: (dim, width) or (dim, 1, width), width in 2..4; bias: (dim,);
    conv_state: (batch, dim, width-1) or None (zeros); all in x's dtype. Returns y (batch, dim,
    seqlen) and conv_state_out (batch, dim, width-1), as causal_conv1d_ref. ``kernel``: "auto"
    (seqlen 1 takes the single-step kernel), "seq" or "step" (tests and benchmarks)."""
    key, hit = _lookup("conv", (x, weight, bias, conv_state, out, conv_state_out), (activation, kernel))
    if hit is not None:
        plan, dev, extra = hit
        y = torch.empty(x.shape, dtype=x.dtype, device=dev) if out is None else out
        so = (torch.empty((x.shape[0], x.shape[1], extra[0]), dtype=x.dtype, device=dev)
              if conv_state_out is None else conv_state_out)
        ptrs = (x.data_ptr(), weight.data_ptr(), _ptr(bias), _ptr(conv_state), y.data_ptr(), so.data_ptr())
        if not (ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3] | ptrs[4] | ptrs[5]) & extra[1]:
            plan.launch(ptrs, _stream(dev))
            return y, so
        key = None
    op = "causal_conv1d_fn"
    dev = _device(op, x, "x")
    batch, dim, seqlen = _shape(op, x, "x", 3, "(batch, dim, seqlen)")
    _act_dtype(op, x, "x")
    w2 = _conv_weight(op, weight, dim)
    width = w2.shape[1]
    _check(op, "weight", w2, (dim, width), x.dtype, dev)
    _check(op, "bias", bias, (dim,), x.dtype, dev)
    _check(op, "conv_state", conv_state, (batch, dim, width - 1), x.dtype, dev)
    y = _alloc(op, "out", out, (batch, dim, seqlen), x.dtype, dev)
    so = _alloc(op, "conv_state_out", conv_state_out, (batch, dim, width - 1), x.dtype, dev)
    plan = _launch_conv(x, w2, bias, conv_state, y, so, activation, kernel, dev)
    _remember(key, plan, dev, (width - 1, x.element_size() - 1))
    return y, so


def _scan_aligned(p, amask: int) -> bool:
    """Activation pointers aligned to their element size, float32 ones to 4 bytes."""
    return not ((p[0] | p[1] | p[3] | p[4] | p[6] | p[9]) & amask or (p[2] | p[5] | p[7] | p[8] | p[10]) & 3)


def _remember(key, plan, dev, extra) -> None:
    if key is not None:  # _lookup hashed it already
        _plans[key] = (plan, dev, extra)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation="none", *, out=None):
    """One decode step. x: (batch, dim); conv_state: (batch, dim, width-1), updated in place;
    weight: (dim, width) or (dim, 1, width); bias: (dim,). Returns y: (batch, dim)."""
    key, hit = _lookup("conv_update", (x, conv_state, weight, bias, out), (activation,))
    if hit is not None:
        plan, dev, extra = hit
        y = torch.empty(x.shape, dtype=x.dtype, device=dev) if out is None else out
        cs = conv_state.data_ptr()
        ptrs = (x.data_ptr(), weight.data_ptr(), _ptr(bias), cs, y.data_ptr(), cs)
        if not (ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3] | ptrs[4]) & extra[1]:
            plan.launch(ptrs, _stream(dev))
            return y
        key = None
    op = "causal_conv1d_update"
    dev = _device(op, x, "x")
    batch, dim = _shape(op, x, "x", 2, "(batch, dim)")
    _act_dtype(op, x, "x")
    w2 = _conv_weight(op, weight, dim)
    width = w2.shape[1]
    _check(op, "weight", w2, (dim, width), x.dtype, dev)
    _check(op, "bias", bias, (dim,), x.dtype, dev)
    _check(op, "conv_state", conv_state, (batch, dim, width - 1), x.dtype, dev, required=True)
    y = _alloc(op, "out", out, (batch, dim), x.dtype, dev)
    plan = _launch_conv(x, w2, bias, conv_state, y, conv_state, activation, "step", dev)
    _remember(key, plan, dev, (width - 1, x.element_size() - 1))
    return y


def _launch_conv(x, weight, bias, conv_state, y, state_out, activation, kernel, dev):
    """Validated launch through the launcher; returns the LaunchPlan for later calls."""
    batch, dim = x.shape[:2]
    seqlen = x.shape[2] if x.dim() == 3 else 1
    dtype = _DTYPE_NAMES[x.dtype]
    strides = _strides({"x": (x, 3), "weight": (weight, 2), "bias": (bias, 1), "conv_state": (conv_state, 3),
                        "y": (y, 3), "conv_state_out": (state_out, 3)})
    return launcher.launch_causal_conv1d(
        x=x.data_ptr(), weight=weight.data_ptr(), bias=_ptr(bias), conv_state=_ptr(conv_state),
        y=y.data_ptr(), conv_state_out=state_out.data_ptr(), batch=batch, dim=dim, seqlen=seqlen,
        width=weight.shape[1], dtype=dtype, activation=activation, stream=_stream(dev), kernel=kernel,
        device=dev.index, strides=strides,
    )


def _check_scan(op, dev, batch, dim, seqlen, u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, step):
    """Validate SelectiveScan inputs; returns dstate. Step tensors are 2-D (no time axis)."""
    act = u.dtype
    tail = () if step else (seqlen,)
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != dim:
        raise InputError(f"{op}: A must be (dim, dstate) = ({dim}, n), got "
                         f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
    dstate = A.shape[1]
    if not 1 <= dstate <= launcher.MAX_DSTATE:
        raise UnsupportedError(f"{op}: dstate (A.shape[1]) is {dstate}; supported: 1..{launcher.MAX_DSTATE}")
    _check(op, "A", A, (dim, dstate), torch.float32, dev)
    _check(op, "delta", delta, (batch, dim) + tail, act, dev, required=True)
    _check(op, "Bm", Bm, (batch, dstate) + tail, act, dev, required=True)
    _check(op, "Cm", Cm, (batch, dstate) + tail, act, dev, required=True)
    _check(op, "z", z, (batch, dim) + tail, act, dev)
    _check(op, "D", D, (dim,), torch.float32, dev)
    _check(op, "delta_bias", delta_bias, (dim,), torch.float32, dev)
    _check(op, "ssm_state", ssm_state, (batch, dim, dstate), torch.float32, dev, required=step)
    return dstate


def selective_scan_fn(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, ssm_state=None,
                      delta_softplus=True, *, out=None, ssm_state_out=None, kernel="auto"):
    """u, delta, z: (batch, dim, seqlen); Bm, Cm: (batch, dstate, seqlen), all in u's dtype;
    A: (dim, dstate), D, delta_bias: (dim,), ssm_state: (batch, dim, dstate), float32.
    Returns y (batch, dim, seqlen) in u's dtype and ssm_state_out (batch, dim, dstate) float32, as
    selective_scan_ref. ssm_state_out may be ssm_state (in-place). ``kernel``: "auto" (seqlen 1: the
    single-step kernel; long sequences over few rows: the time-parallel one; many rows of n = 16: the
    channel-parallel one's wide configuration; else for n 9-16 and contiguous tensors its
    warp-specialized form, otherwise the channel-parallel one itself, see launcher.TP_MAX_ROWS,
    WIDE_MIN_ROWS and WS_MIN_R), "seq", "tp", "wide", "ws" or "step" (tests and benchmarks)."""
    key, hit = _lookup("scan", (u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, out, ssm_state_out),
                       (bool(delta_softplus), kernel))
    if hit is not None:
        plan, dev, extra = hit
        y = torch.empty(u.shape, dtype=u.dtype, device=dev) if out is None else out
        so = (torch.empty((u.shape[0], u.shape[1], A.shape[1]), dtype=torch.float32, device=dev)
              if ssm_state_out is None else ssm_state_out)
        ptrs = (u.data_ptr(), delta.data_ptr(), A.data_ptr(), Bm.data_ptr(), Cm.data_ptr(), _ptr(D), _ptr(z),
                _ptr(delta_bias), _ptr(ssm_state), y.data_ptr(), so.data_ptr())
        if _scan_aligned(ptrs, extra):
            plan.launch(ptrs, _stream(dev))
            return y, so
        key = None  # a misaligned view: the checked path below reports it
    op = "selective_scan_fn"
    dev = _device(op, u, "u")
    batch, dim, seqlen = _shape(op, u, "u", 3, "(batch, dim, seqlen)")
    _act_dtype(op, u, "u")
    dstate = _check_scan(op, dev, batch, dim, seqlen, u, delta, A, Bm, Cm, D, z, delta_bias,
                         ssm_state, False)
    y = _alloc(op, "out", out, (batch, dim, seqlen), u.dtype, dev)
    so = _alloc(op, "ssm_state_out", ssm_state_out, (batch, dim, dstate), torch.float32, dev)
    plan = _launch_scan(u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, y, so, delta_softplus, kernel, dev)
    _remember(key, plan, dev, u.element_size() - 1)
    return y, so


def selective_state_update(ssm_state, u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None,
                           delta_softplus=True, *, out=None):
    """One decode step. ssm_state: (batch, dim, dstate) float32, updated in place; u, delta, z:
    (batch, dim); Bm, Cm: (batch, dstate). Returns y: (batch, dim)."""
    key, hit = _lookup("ssu", (ssm_state, u, delta, A, Bm, Cm, D, z, delta_bias, out), (bool(delta_softplus),))
    if hit is not None:
        plan, dev, extra = hit
        y = torch.empty(u.shape, dtype=u.dtype, device=dev) if out is None else out
        h = ssm_state.data_ptr()
        ptrs = (u.data_ptr(), delta.data_ptr(), A.data_ptr(), Bm.data_ptr(), Cm.data_ptr(), _ptr(D), _ptr(z),
                _ptr(delta_bias), h, y.data_ptr(), h)
        if _scan_aligned(ptrs, extra):
            plan.launch(ptrs, _stream(dev))
            return y
        key = None
    op = "selective_state_update"
    dev = _device(op, u, "u")
    batch, dim = _shape(op, u, "u", 2, "(batch, dim)")
    _act_dtype(op, u, "u")
    _check_scan(op, dev, batch, dim, 1, u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, True)
    y = _alloc(op, "out", out, (batch, dim), u.dtype, dev)
    plan = _launch_scan(u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, y, ssm_state, delta_softplus,
                        "step", dev)
    _remember(key, plan, dev, u.element_size() - 1)
    return y


def _launch_scan(u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, y, state_out, delta_softplus,
                 kernel, dev):
    """Validated launch through the launcher; returns the LaunchPlan for later calls."""
    batch, dim = u.shape[:2]
    seqlen = u.shape[2] if u.dim() == 3 else 1
    dtype = _DTYPE_NAMES[u.dtype]
    strides = _strides({"u": (u, 3), "delta": (delta, 3), "A": (A, 2), "Bm": (Bm, 3), "Cm": (Cm, 3),
                        "D": (D, 1), "z": (z, 3), "delta_bias": (delta_bias, 1), "ssm_state": (ssm_state, 3),
                        "y": (y, 3), "ssm_state_out": (state_out, 3)})
    return launcher.launch_selective_scan(
        u=u.data_ptr(), delta=delta.data_ptr(), A=A.data_ptr(), Bm=Bm.data_ptr(), Cm=Cm.data_ptr(),
        D=_ptr(D), z=_ptr(z), delta_bias=_ptr(delta_bias), ssm_state=_ptr(ssm_state),
        y=y.data_ptr(), ssm_state_out=state_out.data_ptr(), batch=batch, dim=dim, seqlen=seqlen,
        dstate=A.shape[1], dtype=dtype, delta_softplus=bool(delta_softplus), stream=_stream(dev),
        kernel=kernel, device=dev.index, strides=strides,
    )


causal_conv1d_fn.capability = launcher.CONV_CAPABILITY
causal_conv1d_update.capability = launcher.CONV_CAPABILITY
selective_scan_fn.capability = launcher.SCAN_CAPABILITY
selective_state_update.capability = launcher.SCAN_CAPABILITY


def add_rms_norm(x, residual, weight, eps, residual_fp32, *, out=None):
    """The model's pre-norm residual step, ``add_rms_norm_ref``'s twin: x (..., K) in the model dtype,
    residual (..., K) float32 or None, weight (K,) -> (normed, residual_out). With a float32 residual
    stream, contiguous rows and x on a GPU of compute capability 8.0+, one block per row of
    decode_step.cu's ``residual_norm`` adds x into ``residual`` **in place** (returned as residual_out)
    and writes normed (into ``out`` if given) in one pass; otherwise (the first block, whose residual is
    the embedding; a residual stream in the model dtype) the reference runs."""
    from mamba_rt.exporters.ops_ref import add_rms_norm_ref

    K = x.shape[-1]
    if (residual is None or not residual_fp32 or residual.dtype != torch.float32 or x.dtype not in _DTYPE_NAMES
            or residual.shape != x.shape or weight.shape != (K,) or weight.dtype != x.dtype or not x.is_cuda
            or not (x.is_contiguous() and residual.is_contiguous() and weight.is_contiguous())
            or torch.cuda.get_device_capability(x.device) < (8, 0)):
        normed, residual = add_rms_norm_ref(x, residual, weight, eps, residual_fp32)
        if out is None:
            return normed, residual
        out.copy_(normed)
        return out, residual
    from . import decode_step

    if residual.device != x.device or weight.device != x.device:
        raise InputError(f"add_rms_norm: x is on {x.device}, residual on {residual.device}, weight on "
                         f"{weight.device}; expected one device")
    with torch.cuda.device(x.device):
        k = decode_step.kernels(_DTYPE_NAMES[x.dtype], int(launcher._context(x.device.index)))
        if out is None:
            out = torch.empty_like(x)
        else:
            _check("add_rms_norm", "out", out, tuple(x.shape), x.dtype, x.device)
            if not out.is_contiguous():
                raise InputError("add_rms_norm: out must be contiguous")
        rows = x.numel() // K
        if rows:
            k.launch(k.residual_norm(h=residual.data_ptr(), o=x.data_ptr(), norm_w=weight.data_ptr(),
                                     xn=out.data_ptr(), B=rows, K=K, res_fp32=True, eps=float(eps)),
                     _stream(x.device))
    return out, residual
