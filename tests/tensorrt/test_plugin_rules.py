"""The TensorRT plugins' plain tier (no TensorRT, no GPU): type/rank rules, kernel choice, launch
parameters against the launcher's own, the AOT argument order against the kernels' source and PTX, and
the JIT launch arguments."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mamba_rt.errors import InputError, UnsupportedError
from mamba_rt.plugins_cuda import launcher
from mamba_rt.plugins_cuda import tensorrt_plugins as tp
from mamba_rt.plugins_cuda.tensorrt_plugins import TensorView

SRC = Path(tp.__file__).parent

# -- type rules: a base case, then rows that each change one input --------------------------------------

CONV_BASE = dict(x="float16", weight="float16", bias="float16", conv_state="float16")
SCAN_BASE = dict(u="bfloat16", delta="bfloat16", A="float32", Bm="bfloat16", Cm="bfloat16", D="float32",
                 z="bfloat16", delta_bias="float32", ssm_state="float32")


@pytest.mark.parametrize("act", ["float32", "float16", "bfloat16"])
def test_output_dtypes_follow_the_activation_dtype(act):
    assert tp.conv_output_dtypes({k: act for k in CONV_BASE}) == (act, act)
    scan = {k: ("float32" if k in tp.SCAN_FLOAT32 else act) for k in SCAN_BASE}
    assert tp.scan_output_dtypes(scan) == (act, "float32")


@pytest.mark.parametrize("name,dtype", [("weight", "float32"), ("bias", "bfloat16"), ("conv_state", "float32")])
def test_conv_refuses_a_mixed_dtype(name, dtype):
    with pytest.raises(tp.PluginSignatureError, match=f"{name} is {dtype}.*x's dtype float16"):
        tp.conv_output_dtypes({**CONV_BASE, name: dtype})


@pytest.mark.parametrize("name,dtype,want", [("A", "bfloat16", "float32"), ("ssm_state", "float16", "float32"),
                                             ("Bm", "float32", "bfloat16"), ("z", "float16", "bfloat16")])
def test_scan_refuses_a_wrong_dtype(name, dtype, want):
    with pytest.raises(tp.PluginSignatureError, match=f"{name} is {dtype}, expected {want}"):
        tp.scan_output_dtypes({**SCAN_BASE, name: dtype})


def test_refuses_unsupported_activation_dtype_and_wrong_inputs():
    with pytest.raises(tp.PluginSignatureError, match="x is int32"):
        tp.conv_output_dtypes({k: "int32" for k in CONV_BASE})
    with pytest.raises(tp.PluginSignatureError, match="expected \\['x', 'weight', 'bias', 'conv_state'\\]"):
        tp.conv_output_dtypes({"x": "float32", "weight": "float32"})


def test_rank_rules():
    tp.check_ranks(tp.CONV_NAME, dict(tp.CONV_RANKS))
    tp.check_ranks(tp.SCAN_NAME, dict(tp.SCAN_RANKS))
    with pytest.raises(tp.PluginSignatureError, match="weight has rank 3, expected 2"):
        tp.check_ranks(tp.CONV_NAME, {**tp.CONV_RANKS, "weight": 3})
    with pytest.raises(tp.PluginSignatureError, match="A has rank 1, expected 2"):
        tp.check_ranks(tp.SCAN_NAME, {**tp.SCAN_RANKS, "A": 1})


def test_static_dims_and_activation():
    assert tp.check_static(tp.CONV_NAME, "weight", 1, 4) == 4
    with pytest.raises(UnsupportedError, match="weight axis 1 must be a static size"):
        tp.check_static(tp.CONV_NAME, "weight", 1, None)
    assert (tp.activation_flag("silu"), tp.activation_flag("none")) == (1, 0)
    with pytest.raises(InputError, match="activation 'relu'"):
        tp.activation_flag("relu")


# -- kernel choice -----------------------------------------------------------------------------------


def test_step_kernel_only_for_a_decode_profile():
    assert tp.use_step_kernel(1, 1)
    assert not tp.use_step_kernel(2, 2048)
    assert not tp.use_step_kernel(1, 16)  # a range that includes 1 still needs the sequence kernel


def test_kernel_entry_names():
    assert tp.conv_kernel("float16", 4, 90, step=True).entry == "mrt_causal_conv1d_update_f16_k4"
    assert tp.conv_kernel("float32", 3, 80, step=False).entry == "mrt_causal_conv1d_fwd_f32_k3"
    c = tp.scan_kernel("bfloat16", 12, 90, step=False)  # 12 is served by the n16 specialisation
    assert (c.entry, c.spec.spec) == ("mrt_selective_scan_fwd_bf16_n16", 16)
    assert tp.scan_kernel("float32", 16, 86, step=True).entry == "mrt_selective_state_update_f32_n16"
    with pytest.raises(UnsupportedError, match="conv width 5"):
        tp.conv_kernel("float16", 5, 90, step=False)
    with pytest.raises(UnsupportedError, match="dstate 65"):
        tp.scan_kernel("float16", 65, 90, step=False)


# -- launch parameters -------------------------------------------------------------------------------


class Sym:
    """An int that offers only what tensorrt.plugin's ShapeExpr offers: +, -, *, // with the
    expression on the left (no reflected operators, no comparisons, no int())."""

    def __init__(self, v: int):
        self.v = v

    def __add__(self, o):
        return Sym(self.v + _val(o))

    def __sub__(self, o):
        return Sym(self.v - _val(o))

    def __mul__(self, o):
        return Sym(self.v * _val(o))

    def __floordiv__(self, o):
        return Sym(self.v // _val(o))

    def __bool__(self):
        raise TypeError("a symbolic size has no truth value")

    def __index__(self):
        raise TypeError("a symbolic size is not an int")


def _val(o):
    return o.v if isinstance(o, Sym) else o


def _ints(launch):
    return tuple(_val(x) for x in (launch.grid_x, launch.grid_y)), launch.block_x, tuple(_val(s) for s in launch.scalars)


SIZES = [(1, 36, 1), (1, 72, 7), (3, 72, 9), (2, 5120, 1), (4, 1536, 2048), (7, 100, 513), (64, 2560, 1)]
# (batch, dim, seqlen, step): the step kernel runs seqlen 1 only
CASES = [s + (False,) for s in SIZES] + [s + (True,) for s in SIZES if s[2] == 1]


@pytest.mark.parametrize("batch,dim,seqlen,step", CASES)
def test_conv_launch_matches_the_launcher(batch, dim, seqlen, step):
    grid, block = launcher.conv_launch_config(batch, dim, seqlen, step=step)
    for args in ((batch, dim, seqlen), (Sym(batch), Sym(dim), Sym(seqlen))):
        got = _ints(tp.conv_launch(*args, 1, step=step))
        assert got == (grid, block, (batch, dim, seqlen, 1))


@pytest.mark.parametrize("batch,dim,seqlen,step", CASES)
@pytest.mark.parametrize("dstate", [1, 4, 16, 17, 64])
def test_scan_launch_matches_the_launcher(batch, dim, seqlen, step, dstate):
    grid, block = launcher.scan_launch_config(batch, dim, dstate, step=step)
    for args in ((batch, dim, seqlen), (Sym(batch), Sym(dim), Sym(seqlen))):
        launch = tp.scan_launch(*args, dstate, 1, step=step)
        assert _ints(launch) == (grid, block, (batch, dim, seqlen, dstate, 1))
        np_ = launcher.padded_dstate(dstate)
        assert launch.shared_mem == (0 if step else launcher.scan_smem_bytes(np_, block // 32, wide=False, itemsize=4))


# -- the AOT argument order: input pointers, the launch scalars, output pointers --------------------------


def _params(sig: str) -> list[tuple[str, str]]:
    """'const T* x, int batch, T* y' -> [('ptr', 'x'), ('int', 'batch'), ('ptr', 'y')]"""
    out = []
    for p in sig.replace("\\", " ").split(","):
        p = " ".join(p.split())
        name = re.findall(r"[A-Za-z_]\w*$", p)[0]
        out.append(("ptr" if "*" in p else "int", name))
    return out


def _conv_flat_signature() -> list[tuple[str, str]]:
    text = (SRC / "causal_conv1d.cu").read_text()
    m = re.search(r"mrt_causal_conv1d_fwd_##TAG##_k##K\((.*?)\)\s*\{", text, re.S)
    return _params(m.group(1))


def _scan_flat_signature() -> list[tuple[str, str]]:
    text = (SRC / "selective_scan.cu").read_text()
    m = re.search(r"#define MRT_SCAN_FLAT_ARGS\(T\)(.*?)\n#define", text, re.S)
    return _params(m.group(1))


def test_conv_entry_takes_inputs_scalars_outputs_in_plugin_order():
    scalars = ("batch", "dim", "seqlen", "silu")
    want = ([("ptr", n) for n in tp.CONV_INPUTS] + [("int", n) for n in scalars]
            + [("ptr", n) for n in tp.CONV_OUTPUTS])
    assert _conv_flat_signature() == want
    assert len(tp.conv_launch(1, 1, 1, 0, step=False).scalars) == len(scalars)


def test_scan_entry_takes_inputs_scalars_outputs_in_plugin_order():
    scalars = ("batch", "dim", "seqlen", "dstate", "delta_softplus")
    want = ([("ptr", n) for n in tp.SCAN_INPUTS] + [("int", n) for n in scalars]
            + [("ptr", n) for n in tp.SCAN_OUTPUTS])
    assert _scan_flat_signature() == want
    assert len(tp.scan_launch(1, 1, 1, 16, 1, step=False).scalars) == len(scalars)


def _ptx_params(ptx: str, entry: str) -> list[str]:
    m = re.search(rf"\.entry {entry}\((.*?)\)", ptx, re.S)
    assert m, f"{entry} is not in the PTX"
    return re.findall(r"\.param \.(\w+)", m.group(1))


@pytest.mark.parametrize("op", ["conv", "scan"])
def test_ptx_that_the_aot_plugin_embeds_has_the_flat_signature(op):
    """What TensorRT gets from aot_impl: PTX whose entry takes 64-bit pointers and 32-bit ints in the
    plugin order, for the sequence and the step kernel alike."""
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (extra 'gpu') compiles the kernels")
    from mamba_rt.plugins_cuda import compiler

    if op == "conv":
        choices = [tp.conv_kernel("float16", 4, 90, step=s) for s in (False, True)]
        want = ["u64"] * 4 + ["u32"] * 4 + ["u64"] * 2
    else:
        choices = [tp.scan_kernel("bfloat16", 16, 90, step=s) for s in (False, True)]
        want = ["u64"] * 9 + ["u32"] * 5 + ["u64"] * 2
    assert choices[0].spec == choices[1].spec  # one program holds both entry points
    ptx = compiler.compile_spec(choices[0].spec, output="ptx").decode()
    for c in choices:
        assert _ptx_params(ptx, c.entry) == want


# -- JIT launch arguments ----------------------------------------------------------------------------


def _view(ptr, shape, dtype, strides=None):
    return TensorView(ptr, shape, strides or tp._contiguous(shape), dtype)


def _conv_views(b=2, d=36, L=5, k=4, dtype="float16"):
    ins = [_view(0x1000, (b, d, L), dtype), _view(0x2000, (d, k), dtype), _view(0x3000, (d,), dtype),
           _view(0x4000, (b, d, k - 1), dtype)]
    outs = [_view(0x5000, (b, d, L), dtype), _view(0x6000, (b, d, k - 1), dtype)]
    return ins, outs


def test_conv_launch_kwargs():
    ins, outs = _conv_views()
    kw = tp.conv_launch_kwargs(ins, outs, "silu", stream=7)
    assert kw == dict(x=0x1000, weight=0x2000, bias=0x3000, conv_state=0x4000, y=0x5000, conv_state_out=0x6000,
                      batch=2, dim=36, seqlen=5, width=4, dtype="float16", activation="silu", stream=7, strides=None)


def test_conv_launch_kwargs_pass_strides_of_a_non_contiguous_tensor():
    ins, outs = _conv_views()
    ins[0] = _view(0x1000, (2, 36, 5), "float16", strides=(36 * 8, 8, 1))
    kw = tp.conv_launch_kwargs(ins, outs, "none", stream=0)
    assert kw["strides"]["x"] == (288, 8, 1)
    assert kw["strides"]["y"] == (180, 5, 1)


def test_conv_launch_kwargs_refuse_bad_io():
    ins, outs = _conv_views()
    with pytest.raises(InputError, match="3 inputs and 2 outputs, expected 4 and 2"):
        tp.conv_launch_kwargs(ins[:3], outs, "none", stream=0)
    ins[2] = _view(0x3000, (36,), "float32")
    with pytest.raises(InputError, match="bias is float32"):
        tp.conv_launch_kwargs(ins, outs, "none", stream=0)


def test_scan_launch_kwargs():
    b, d, L, n, act = 3, 40, 9, 16, "bfloat16"
    shapes = dict(u=(b, d, L), delta=(b, d, L), A=(d, n), Bm=(b, n, L), Cm=(b, n, L), D=(d,), z=(b, d, L),
                  delta_bias=(d,), ssm_state=(b, d, n))
    ins = [_view(0x100 * (i + 1), shapes[nm], "float32" if nm in tp.SCAN_FLOAT32 else act)
           for i, nm in enumerate(tp.SCAN_INPUTS)]
    outs = [_view(0xA000, (b, d, L), act), _view(0xB000, (b, d, n), "float32")]
    kw = tp.scan_launch_kwargs(ins, outs, 1, stream=3)
    assert [kw[nm] for nm in tp.SCAN_INPUTS] == [0x100 * (i + 1) for i in range(9)]
    assert (kw["y"], kw["ssm_state_out"]) == (0xA000, 0xB000)
    assert (kw["batch"], kw["dim"], kw["seqlen"], kw["dstate"], kw["dtype"]) == (b, d, L, n, act)
    assert kw["delta_softplus"] is True and kw["strides"] is None and kw["stream"] == 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("seqlen", [1, 13])
def test_jit_launch_arguments_run_the_kernels_like_the_reference(dtype, seqlen):
    """The JIT implementation's path without TensorRT: views of device tensors -> kwargs -> launcher,
    against the pure-PyTorch twins (output and updated state)."""
    import torch

    from mamba_rt.exporters.ops_ref import causal_conv1d_ref, selective_scan_ref
    from tests.helpers import rel_err

    td = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    tol = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}[dtype]
    g = torch.Generator().manual_seed(0)
    dev = "cuda"

    def rnd(*shape, dt=td):
        return torch.randn(*shape, generator=g).to(dev, dt)

    def view(t):
        name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[t.dtype]
        return TensorView(t.data_ptr(), tuple(t.shape), tuple(t.stride()), name)

    b, d, k, n = 2, 36, 4, 16
    x, w, bias, cs = rnd(b, d, seqlen), rnd(d, k), rnd(d), rnd(b, d, k - 1)
    y, cso = torch.empty_like(x), torch.empty_like(cs)
    stream = torch.cuda.current_stream().cuda_stream
    launcher.launch_causal_conv1d(**tp.conv_launch_kwargs([view(t) for t in (x, w, bias, cs)], [view(y), view(cso)],
                                                          "silu", stream))
    ry, rcs = causal_conv1d_ref(x, w, bias, cs, "silu")
    torch.cuda.synchronize()
    assert rel_err(y, ry) < tol and rel_err(cso, rcs) == 0.0

    u, delta, Bm, Cm, z = rnd(b, d, seqlen), rnd(b, d, seqlen), rnd(b, n, seqlen), rnd(b, n, seqlen), rnd(b, d, seqlen)
    A, D, db, h = -torch.rand(d, n, generator=g).to(dev), rnd(d, dt=torch.float32), rnd(d, dt=torch.float32), \
        rnd(b, d, n, dt=torch.float32)
    y2, ho = torch.empty_like(u), torch.empty_like(h)
    launcher.launch_selective_scan(**tp.scan_launch_kwargs([view(t) for t in (u, delta, A, Bm, Cm, D, z, db, h)],
                                                           [view(y2), view(ho)], 1, stream))
    ry2, rh = selective_scan_ref(u, delta, A, Bm, Cm, D, z, db, h, True)
    torch.cuda.synchronize()
    assert rel_err(y2, ry2) < tol and rel_err(ho, rh) < 1e-4


def test_module_imports_no_tensorrt():
    import subprocess
    import sys

    code = ("import sys, mamba_rt.plugins_cuda.tensorrt_plugins; "
            "print(sorted(m for m in ('tensorrt', 'torch', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
