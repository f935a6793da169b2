"""Bad input to the torch-free launcher fails with a clear error before any CUDA call (these run on
machines with no GPU and no driver: reaching the driver would raise a different error type)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mamba_rt.errors import InputError, UnsupportedError
from mamba_rt.plugins_cuda import launcher

P = 1 << 20  # a well-aligned fake device address; never dereferenced, validation fails first


def conv_args(**over):
    args = dict(x=P, weight=P, bias=P, conv_state=P, y=P, conv_state_out=P + 4096, batch=2, dim=8,
                seqlen=16, width=4, dtype="float16", activation="silu", stream=0)
    return {**args, **over}


def scan_args(**over):
    args = dict(u=P, delta=P, A=P, Bm=P, Cm=P, D=P, z=P, delta_bias=P, ssm_state=P, y=P,
                ssm_state_out=P, batch=2, dim=8, seqlen=16, dstate=16, dtype="bfloat16")
    return {**args, **over}


@pytest.mark.parametrize("over, error, match", [
    (dict(x=0), InputError, "x is required, got a null pointer"),
    (dict(weight=None), InputError, "weight is required"),
    (dict(y=0), InputError, "y is required"),
    (dict(conv_state_out=0), InputError, "conv_state_out is required"),
    (dict(width=5), UnsupportedError, r"width \(kernel size\) 5 is not supported; expected one of \(2, 3, 4\)"),
    (dict(width=1), UnsupportedError, "width"),
    (dict(dtype="float64"), UnsupportedError, "activation dtype 'float64' is not supported"),
    (dict(activation="gelu"), InputError, "activation must be one of"),
    (dict(seqlen=0), InputError, r"seqlen must be in \[1, "),
    (dict(dim=2.0), InputError, "dim must be an int"),
    (dict(batch=2**31), InputError, "batch must be in"),
    (dict(x=P + 1), InputError, "not aligned to its 2-byte elements"),
    (dict(stream=-1), InputError, "stream must be a CUDA stream handle"),
    (dict(kernel="step"), InputError, "single-step kernel needs seqlen 1, got 16"),
    (dict(kernel="fast"), InputError, "kernel must be"),
    (dict(conv_state_out=P, seqlen=17), InputError, "conv_state_out overlaps conv_state"),
    (dict(strides={"x": (1, 2)}), InputError, r"strides\['x'\] must be 3 non-negative ints"),
    (dict(strides={"w": (4, 1)}), InputError, r"unknown tensors \['w'\]"),
])
def test_conv_launcher_rejects(over, error, match):
    with pytest.raises(error, match=match):
        launcher.launch_causal_conv1d(**conv_args(**over))


@pytest.mark.parametrize("over, error, match", [
    (dict(u=0), InputError, "u is required"),
    (dict(A=0), InputError, "A is required"),
    (dict(Bm=0), InputError, "Bm is required"),
    (dict(Cm=None), InputError, "Cm is required"),
    (dict(ssm_state_out=0), InputError, "ssm_state_out is required"),
    (dict(dstate=65), UnsupportedError, r"dstate 65 is not supported; expected 1..64"),
    (dict(dstate=0), InputError, r"dstate must be in \[1, "),
    (dict(dtype="int8"), UnsupportedError, "activation dtype 'int8'"),
    (dict(A=P + 2), InputError, "A pointer .* not aligned to its 4-byte elements"),
    (dict(batch=70000), UnsupportedError, "grid limit 65535"),
    (dict(seqlen=3, kernel="step"), InputError, "needs seqlen 1, got 3"),
    (dict(strides={"A": (1, -8)}), InputError, r"strides\['A'\] must be 2 non-negative ints"),
])
def test_scan_launcher_rejects(over, error, match):
    with pytest.raises(error, match=match):
        launcher.launch_selective_scan(**scan_args(**over))


def test_optional_pointers_may_be_null_up_to_validation():
    """D, z, delta_bias, ssm_state, bias and conv_state are optional: validation lets 0 through and
    only a later step (context creation / launch) can fail. On a machine with no driver that step
    raises something other than the validation errors."""
    try:
        launcher.launch_selective_scan(**scan_args(D=0, z=0, delta_bias=0, ssm_state=0))
    except (InputError, UnsupportedError) as e:  # pragma: no cover - would be a validation bug
        pytest.fail(f"validation rejected optional null pointers: {e}")
    except Exception:
        pass  # no GPU/driver here


@pytest.mark.parametrize("dstate, np_", [(1, 8), (8, 8), (9, 16), (16, 16), (17, 32), (33, 64), (64, 64)])
def test_padded_dstate(dstate, np_):
    assert launcher.padded_dstate(dstate) == np_


def test_conv_launch_constants_mirror_the_kernel():
    src = (Path(launcher.__file__).parent / "causal_conv1d.cu").read_text()
    assert int(re.search(r"#define MRT_CONV_ITEMS (\d+)", src).group(1)) == launcher.CONV_ITEMS
    assert int(re.search(r"constexpr int CONV_THREADS = (\d+);", src).group(1)) == launcher.CONV_THREADS


def test_launch_configs():
    assert launcher.conv_launch_config(2, 1536, 2048, step=False) == (((2 * 1536 * 128) // 128, 1), 128)
    assert launcher.conv_launch_config(64, 5120, 1, step=True) == ((64 * 5120 // 128, 1), 128)
    assert launcher.scan_launch_config(1, 5120, 16, step=False) == ((320, 1), 128)
    assert launcher.scan_launch_config(3, 5, 64, step=False) == ((1, 3), 128)
    assert launcher.scan_launch_config(1, 5120, 16, step=True) == ((160, 1), 128)
    assert launcher.scan_launch_config(1, 1536, 16, step=False, tp=True) == ((384, 1), 128)
    assert launcher.scan_launch_config(3, 5, 64, step=False, tp=True) == ((2, 3), 128)


@pytest.mark.parametrize("kernel, batch, dim, seqlen, kind", [
    ("auto", 1, 1536, 2048, "tp"),    # 130m prompt: few rows, long sequence
    ("auto", 1, 2048, 512, "tp"),     # both limits
    ("auto", 1, 2049, 2048, "seq"),   # rows over TP_MAX_ROWS
    ("auto", 8, 1536, 2048, "seq"),
    ("auto", 1, 1536, 511, "seq"),    # shorter than TP_MIN_SEQLEN
    ("auto", 1, 1536, 1, "step"),
    ("seq", 1, 1536, 2048, "seq"), ("tp", 64, 5120, 1, "tp"), ("step", 1, 1536, 1, "step"),
])
def test_scan_kernel_choice(kernel, batch, dim, seqlen, kind):
    assert launcher._scan_kernel("selective_scan", kernel, batch, dim, seqlen) == kind


def test_scan_kernel_choice_rejects():
    with pytest.raises(InputError, match=r"kernel must be 'auto', 'seq', 'step' or 'tp', got 'fast'"):
        launcher._scan_kernel("selective_scan", "fast", 1, 1, 2)
    with pytest.raises(InputError, match="the single-step kernel needs seqlen 1, got 2"):
        launcher._scan_kernel("selective_scan", "step", 1, 1, 2)


def test_capability_reasons():
    cap = launcher.launch_selective_scan.capability
    assert cap.why_unsupported(arch=90, dtype="bfloat16") is None
    assert "compute capability 8.0 or newer, this GPU is 7.5" in cap.why_unsupported(arch=75)
    assert "float64" in cap.why_unsupported(dtype="float64")
    assert launcher.launch_causal_conv1d.capability.op == "causal_conv1d"


def test_launch_plan_packs_flat_arguments_in_entry_order():
    """The cached plan's parameter buffer: pointers where the flat entry takes pointers (two runs:
    inputs before the scalars, outputs after), the scalars in between, untouched by a call."""
    import ctypes

    flat = [("p", n) for n in launcher._SCAN_PTRS[:9]] + [("i", v) for v in (2, 8, 16, 16, 1)]
    flat += [("p", "y"), ("p", "ssm_state_out")]
    plan = launcher.LaunchPlan(7, 1, None, (3, 2), 128, "t", flat=flat)
    ptrs = tuple(P * (i + 1) for i in range(11))
    plan._set(ptrs)
    vals = list(plan._keep[0])
    assert vals[:9] == list(ptrs[:9]) and vals[14:] == list(ptrs[9:])
    assert vals[9:14] == [2, 8, 16, 16, 1]
    # kernelParams: one address per parameter, 8 bytes apart, the int read from the low 4 bytes
    params = plan._keep[1]
    assert [params[i] - params[0] for i in range(16)] == [8 * i for i in range(16)]
    assert ctypes.c_int.from_address(params[10]).value == 8
    assert plan.grid == (3, 2) and plan.block == 128


def test_launch_plan_fills_the_params_struct_pointers():
    p = launcher._ScanParams(batch=2, dim=8, seqlen=16, dstate=16, softplus=1, u_cs=16)
    plan = launcher.LaunchPlan(7, 1, None, (1, 1), 128, "t", struct=p)
    ptrs = tuple(P + 64 * i for i in range(11))
    plan._set(ptrs)
    assert [getattr(p, f) or 0 for f in launcher._SCAN_PTRS] == list(ptrs)
    assert (p.batch, p.dim, p.seqlen, p.dstate, p.softplus, p.u_cs) == (2, 8, 16, 16, 1, 16)


def test_torch_ops_reject_cpu_tensors_on_every_call():
    """Only fully validated signatures are cached: a rejected call is rejected again."""
    torch = pytest.importorskip("torch")
    from mamba_rt.plugins_cuda import torch_ops

    u = torch.randn(1, 4, 3)
    Bm = torch.randn(1, 16, 3)
    for _ in range(2):
        with pytest.raises(InputError, match="need tensors on a CUDA device"):
            torch_ops.selective_scan_fn(u, u, -torch.rand(4, 16), Bm, Bm)
        with pytest.raises(InputError, match="need tensors on a CUDA device"):
            torch_ops.causal_conv1d_fn(u, torch.randn(4, 4))
