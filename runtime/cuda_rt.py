"""The CUDA runtime API through cuda-python, with checked errors (no torch).

Shared by the backends that manage device memory themselves (onnxruntime on CUDA, TensorRT).
``check(result, what)`` unpacks a cuda-python ``(err, *values)`` result: out of memory is a
:class:`~mamba_rt.errors.MambaRTError` (the user asked for more than fits), any other failure an
:class:`~mamba_rt.errors.InternalError` naming the call.
"""
from __future__ import annotations

from mamba_rt._optional import require
from mamba_rt.errors import InternalError, MambaRTError


def rt():
    """The cuda-python runtime module (``cuda.bindings.runtime``; older cuda-python: ``cuda.cudart``)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        runtime = require("cuda.cudart")
    return runtime


def check(result, what: str):
    """Raise on a failed call; return its value (None, one value, or a tuple of values)."""
    r = rt()
    err, *vals = result if isinstance(result, tuple) else (result,)
    if err != r.cudaError_t.cudaSuccess:
        _, msg = r.cudaGetErrorString(err)
        msg = msg.decode() if isinstance(msg, bytes) else str(msg)
        if err == r.cudaError_t.cudaErrorMemoryAllocation:
            raise MambaRTError(f"{what}: out of GPU memory ({msg})")
        raise InternalError(f"CUDA call {what} failed: {getattr(err, 'name', err)} ({msg})")
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else tuple(vals)
