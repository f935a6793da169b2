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
    assert launcher.scan_launch_config(2, 5120, 16, step=False, wide=True) == ((160, 2), 128)
    assert launcher.scan_launch_config(1, 33, 8, step=False, wide=True) == ((2, 1), 128)
    assert launcher.scan_launch_config(3, 17, 32, step=False, wide=True) == ((2, 3), 128)
    assert launcher.scan_launch_config(1, 9, 64, step=False, wide=True) == ((2, 1), 128)
    # with the SM count: blocks that spread every warp (d / 4 warps at n = 16) evenly, one or two per SM
    assert launcher.scan_launch_config(1, 5120, 16, step=False, sms=132) == ((256, 1), 160)
    assert launcher.scan_launch_config(1, 3000, 16, step=False, sms=132) == ((125, 1), 192)
    assert launcher.scan_launch_config(2, 1536, 16, step=False, sms=132) == ((64, 2), 192)
    assert launcher.scan_launch_config(1, 2048, 16, step=False, sms=132) == ((128, 1), 128)
    assert launcher.scan_launch_config(2, 5120, 16, step=False, wide=True, sms=132) == ((160, 2), 128)


@pytest.mark.parametrize("batch, dim, np_, wide, sms, warps", [
    (1, 5120, 16, False, 132, 5),    # 1280 warps: two blocks of 5 per SM (one of 10 measured slower)
    (1, 4096, 16, False, 132, 8),    # 1024 warps: one block of 8 per SM
    (1, 3072, 16, False, 132, 6),
    (1, 2048, 16, False, 132, 4),    # 512 warps: blocks of 4 already fit one per SM
    (1, 2049, 16, False, 132, 4),    # 513 warps: 129 blocks of 4
    (1, 2113, 16, False, 132, 5),    # 529 warps
    (1, 8448, 16, False, 132, 8),    # 2112 warps: the most two blocks per SM hold
    (1, 8452, 16, False, 132, 4),    # 2113 warps: the default blocks, several per SM
    (2, 5120, 16, False, 132, 4),
    (2, 4100, 16, False, 132, 8),    # 2 x 1025 warps: 129 blocks of 8 per row
    (3, 2000, 16, False, 132, 6),    # 3 x 500 warps: 84 blocks of 6 per row
    (1, 5120, 8, False, 132, 5),     # n = 8: also four channels per warp
    (1, 5120, 32, False, 132, 4),    # n = 32 keeps the default (its registers)
    (1, 5120, 16, True, 132, 4),     # so does the wide configuration
    (1, 5120, 16, False, None, 4),   # no SM count (TensorRT's launch)
    (1, 5120, 16, False, 108, 6),    # another GPU: 1280 warps over 108 SMs
])
def test_scan_block_warps(batch, dim, np_, wide, sms, warps):
    got = launcher.scan_block_warps(batch, dim, np_, wide=wide, sms=sms)
    assert got == warps
    threads, cpb = (launcher.SCAN_WIDE_CFG if wide else launcher.SCAN_CFG)[np_]
    blocks = batch * -(-dim // (cpb // (threads // 32) * got))
    if got > threads // 32:  # balanced: one block per SM, or two where more than MAX_WARPS warps each
        per_sm = 1 if batch * -(-dim // (cpb // (threads // 32))) <= sms * launcher.SCAN_MAX_WARPS else 2
        assert blocks <= per_sm * sms


def test_strides_of_size_one_dimensions_do_not_count():
    """A (1, d, L) view of a (d, L) matrix (batch stride L) addresses as a contiguous tensor: the flat
    entry point takes it. With two batch rows the same strides are a strided layout."""
    shapes = launcher._scan_shapes(1, 8, 5, 16)
    assert launcher._resolve_strides("selective_scan", shapes, {"u": (5, 5, 1), "z": (0, 5, 1)}) is None
    assert launcher._resolve_strides("selective_scan", shapes, {"u": (40, 6, 1)}) is not None
    shapes2 = launcher._scan_shapes(2, 8, 5, 16)
    assert launcher._resolve_strides("selective_scan", shapes2, {"u": (5, 10, 1)})["u"] == (5, 10, 1)
    step = launcher._scan_shapes(3, 8, 1, 16)  # L = 1: the time stride is anything
    assert launcher._resolve_strides("selective_scan", step, {"u": (8, 1, 99), "y": (8, 1, 0)}) is None


def test_scan_smem_bytes():
    """The dynamic shared memory of the sequence kernel (ScanCfg::smem_bytes), against the static
    arrays it replaced at 4 warps (n = 16, fp32 Bm / Cm): Bm and Cm [2][16][36] floats, 9216 bytes;
    dt and dt*u [4 warps][4 channels][36] floats, 4608; y planes [4 warps][8 x 164] floats, 20992."""
    assert launcher.scan_smem_bytes(16, 4, wide=False, itemsize=2) == 9216 + 4608 + 20992
    # per warp 2 x 4 x 36 + 8 x 164 floats; Bm / Cm in 16 bits in the wide configuration only
    assert launcher.scan_smem_bytes(16, 7, wide=False, itemsize=2) == 9216 + 7 * 4 * (288 + 1312)
    assert launcher.scan_smem_bytes(16, 4, wide=True, itemsize=4) > launcher.scan_smem_bytes(16, 4, wide=True,
                                                                                             itemsize=2)
    assert 2 * launcher.scan_smem_bytes(16, launcher.SCAN_MAX_WARPS, wide=False, itemsize=4) <= 227 * 1024


def test_scan_launch_constants_mirror_the_kernel():
    """SCAN_CFG / SCAN_WIDE_CFG restate ScanCfg's threads and channels per block (4 warps; a lane
    owns SPT states, 2 for n = 16 by default, twice that (at most 4) in the wide configuration)."""
    src = (Path(launcher.__file__).parent / "selective_scan.cu").read_text()
    warps = int(re.search(r"#define MRT_SCAN_WARPS (\d+)", src).group(1))
    spt16 = int(re.search(r"#define MRT_SCAN_SPT16 (\d+)", src).group(1))
    m = re.search(r"SPT0 = NP <= 8 \? (\d+) : NP == 16 \? MRT_SCAN_SPT16 : NP == 32 \? (\d+) : (\d+);", src)
    assert m and "SPT = WIDE ? (2 * SPT0 < 4 ? 2 * SPT0 : 4) : SPT0;" in src
    assert warps == 4 and all(threads == 32 * warps for threads, _ in launcher.SCAN_CFG.values())
    assert int(re.search(r"#define MRT_SCAN_MAX_WARPS (\d+)", src).group(1)) == launcher.SCAN_MAX_WARPS
    assert "MAX_WARPS = (NP <= 16 && !WIDE) ? MRT_SCAN_MAX_WARPS : WARPS;" in src
    assert [launcher.scan_max_warps(n, wide=w) for n in (8, 16, 32, 64) for w in (False, True)] == [
        8, 4, 8, 4, 4, 4, 4, 4]
    spt = {8: int(m.group(1)), 16: spt16, 32: int(m.group(2)), 64: int(m.group(3))}
    for np_, s in spt.items():
        for cfg, states in ((launcher.SCAN_CFG, s), (launcher.SCAN_WIDE_CFG, min(2 * s, 4))):
            assert cfg[np_] == (32 * warps, warps * (32 // (np_ // states))), (np_, cfg)


@pytest.mark.parametrize("kernel, batch, dim, seqlen, strided, kind", [
    ("auto", 1, 1536, 2048, False, "tp"),    # 130m prompt: few rows, long sequence
    ("auto", 1, 2048, 512, False, "tp"),     # both limits
    ("auto", 1, 2049, 2048, False, "ws"),    # rows over TP_MAX_ROWS, contiguous: warp-specialized
    ("auto", 1, 2049, 2048, True, "seq"),    # the same, strided: it has no strided entry
    ("auto", 8, 1536, 2048, False, "wide"),
    ("auto", 1, 1536, 511, False, "ws"),     # shorter than TP_MIN_SEQLEN
    ("auto", 1, 1536, 511, True, "seq"),
    ("auto", 1, 1536, 1, False, "step"),
    ("auto", 2, 5120, 2048, False, "wide"),  # 2.8b, two prompts: rows over WIDE_MIN_ROWS
    ("auto", 8, 1024, 7, True, "wide"),      # both limits, any length > 1
    ("auto", 8, 1023, 2048, True, "seq"),    # rows under WIDE_MIN_ROWS
    ("auto", 1, 5120, 2048, False, "ws"),    # 2.8b, one prompt
    ("seq", 1, 1536, 2048, False, "seq"), ("tp", 64, 5120, 1, False, "tp"), ("step", 1, 1536, 1, False, "step"),
    ("wide", 1, 40, 3, True, "wide"), ("seq", 8, 5120, 2048, False, "seq"), ("ws", 8, 5120, 1, False, "ws"),
])
def test_scan_kernel_choice(kernel, batch, dim, seqlen, strided, kind):
    assert launcher._scan_kernel("selective_scan", kernel, batch, dim, seqlen, 16, strided) == kind


@pytest.mark.parametrize("dstate, kind", [(1, "seq"), (8, "seq"), (9, "wide"), (16, "wide"), (17, "seq"),
                                         (64, "seq")])
def test_scan_kernel_choice_wide_only_for_n16(dstate, kind):
    """The wide configuration was measured for the n = 16 specialisation only (state sizes 9-16);
    the others keep "seq"."""
    assert launcher._scan_kernel("selective_scan", "auto", 8, 5120, 2048, dstate, False) == kind


@pytest.mark.parametrize("dstate, kind", [(1, "seq"), (8, "seq"), (9, "ws"), (16, "ws"), (17, "seq"), (64, "seq")])
def test_scan_kernel_choice_ws_only_for_n16(dstate, kind):
    """kernel="auto" takes the warp-specialized kernel where it was measured (padded n = 16); n = 8 has
    it too, on request only."""
    assert launcher._scan_kernel("selective_scan", "auto", 1, 5120, 2048, dstate, False) == kind


def test_scan_kernel_choice_rejects():
    with pytest.raises(InputError, match=r"kernel must be one of 'auto', 'seq', 'step', 'tp', 'wide', 'ws', got 'fast'"):
        launcher._scan_kernel("selective_scan", "fast", 1, 1, 2, 16, False)
    with pytest.raises(InputError, match="the single-step kernel needs seqlen 1, got 2"):
        launcher._scan_kernel("selective_scan", "step", 1, 1, 2, 16, False)
    with pytest.raises(UnsupportedError, match="warp-specialized kernel is built for dstate <= 16, got 17"):
        launcher._scan_kernel("selective_scan", "ws", 1, 64, 2, 17, False)
    with pytest.raises(UnsupportedError, match="takes contiguous tensors only"):
        launcher._scan_kernel("selective_scan", "ws", 1, 64, 2, 16, True)


@pytest.mark.parametrize("itemsize, batch, dim, r", [
    (2, 1, 5120, 5),   # 1,280 recurrence warps: 256 blocks of 5, two per SM
    (2, 1, 4096, 4),   # 1,024: 256 blocks of 4
    (2, 1, 3072, 4),   # WS_MIN_R
    (2, 1, 40, 4),
    (2, 8, 5120, 5),   # WS_MAX_R
    (4, 1, 5120, 4),   # float32: at most 4
])
def test_ws_block_warps(itemsize, batch, dim, r):
    assert launcher.ws_block_warps(batch, dim, 16, itemsize=itemsize, sms=132) == r
    assert launcher.ws_block_warps(batch, dim, 8, itemsize=itemsize, sms=None) == (4 if itemsize == 4 else 5)


def test_ws_smem_bytes_restates_the_kernel():
    """WsCfg::smem_bytes at n = 16: Bm / Cm 2 x 2 x 16 x 36 floats, dt / dt*u 2 x 2 x 4R x 36, the y planes
    R x 2 x 8 x 144 (ScanCfg::YPL with XMAP), 32 bytes of mbarriers."""
    for r in (4, 5):
        assert launcher.ws_smem_bytes(16, r) == 4 * (2304 + 576 * r + 2304 * r) + 32
    assert launcher.ws_smem_bytes(16, 5) == 66848
    assert launcher.ws_smem_bytes(16, 5) * 2 + 2 * 1024 <= 228 * 1024  # two blocks per SM


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
