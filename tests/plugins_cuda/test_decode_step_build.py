"""The fused decode kernels (plugins_cuda/decode_step.cu) compile with NVRTC on a machine without a GPU
(the GPU numerics are tests/runtime/test_fused_decode.py), and the shape limits are reported clearly."""
import pytest

from mamba_rt.plugins_cuda import decode_step
from mamba_rt.plugins_cuda.compiler import DTYPES


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_entry_point_compiles(dtype, arch):
    pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC comes with cuda-python")
    cubin = decode_step.compile_cubin(dtype, arch)
    assert cubin[:4] == b"\x7fELF"
    tag = DTYPES[dtype][0]
    names = [f"mrt_norm_gemv_{tag}_b1", f"mrt_gemv_residual_{tag}_b2", f"mrt_conv_xproj_{tag}_b1",
             f"mrt_conv_only_{tag}", f"mrt_embed_{tag}", f"mrt_residual_norm_{tag}"]
    names += [f"mrt_ssm_step_{tag}_n{n}" for n in decode_step.STATE_SIZES]
    names += [f"mrt_draw_{tag}"] if arch >= 90 else []  # thread block clusters
    names += [f"mrt_layers_{tag}"] if DTYPES[dtype][2] == 2 else []  # the persistent kernel (16-bit)
    for name in names:
        assert name.encode() in cubin, name


def test_shape_limits_are_named():
    assert decode_step.why_unsupported(16, 4, 160, "float16") is None
    assert "d_state 12" in decode_step.why_unsupported(12, 4, 8, "float16")
    assert "d_conv 9" in decode_step.why_unsupported(16, 9, 8, "float16")
    assert "exceeds" in decode_step.why_unsupported(16, 4, 1000, "float16")
    assert "float64" in decode_step.why_unsupported(16, 4, 8, "float64")
