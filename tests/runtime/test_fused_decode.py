"""The fused decode step (runtime/fused_decode.py, plugins_cuda/decode_step.cu) against its reference
twin, the reference model's forward at L = 1, computed in higher precision (float64 for fp32 models,
float32 for half-precision ones, from the same weights), on random weights, random state and random
slots; outputs poisoned with NaN before every step; untouched slots checked bit for bit. The first
step runs eagerly, the next two replay it captured in a CUDA graph.

Relative L2 tolerances: fp32 1e-4 (observed ~1e-6), fp16 2e-2, bf16 6e-2 (the half-precision model
rounds every intermediate to its dtype, as the reference in that dtype does).
"""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch", reason="the fused decode step runs through torch on a GPU")

from mamba_rt.config import MambaConfig  # noqa: E402
from mamba_rt.exporters.model import REF_OPS, MambaState, model_from_weights, random_weights  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

TOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2}
CASES = {
    # scalar paths everywhere: d_model 36, d_inner 72 (not multiples of the 16-byte vector), n 4, k 3
    "tiny": dict(d_model=36, n_layer=2, vocab_size=101, d_state=4, d_conv=3, dt_rank=5, pad_vocab_size_multiple=1),
    # vector paths, the published shape family (n 16, k 4), 3 x_proj chunks with a partial last one
    "mid": dict(d_model=160, n_layer=3, vocab_size=1000, d_state=16, d_conv=4),
    # biases everywhere, residual in the model dtype, n 8, k 2; d_model 136: rows of whole 16-byte
    # vectors but not of 16-wide steps (the copy-engine GEMV falls back to the load-fed one there)
    "bias": dict(d_model=136, n_layer=2, vocab_size=500, d_state=8, d_conv=2, bias=True, conv_bias=True,
                 residual_in_fp32=False),
    # rows of several copy-engine stages with a partial last one (544 = 512 + 32, 1088 = 2 x 512 + 64),
    # and a head of 20000 rows: several groups of 16 rows per block, the stage ring wrapping around
    "wide": dict(d_model=544, n_layer=2, vocab_size=20000, d_state=16, d_conv=4),
}


def _models(cfg, dtype, seed):
    w = random_weights(cfg, dtype, seed=seed)
    model = model_from_weights(cfg, w, dtype, "cuda", REF_OPS)
    hi = model_from_weights(cfg, {k: v.float() for k, v in w.items()}, "fp32", "cuda", REF_OPS)
    if dtype == "fp32":
        hi = hi.double()
    return model, hi


@pytest.mark.parametrize("batch", [1, 2, 3, 16])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_steps_match_reference(case, dtype, batch):
    _check_steps(case, dtype, batch, gemv=None)


@pytest.mark.parametrize("gemv", ["fma", "mma"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_steps_other_gemv(case, dtype, batch, gemv):
    """The GEMV buckets of 1 and 2 rows with the matrix-vector kernels a model gets only when asked for
    on sm_90+ (the default, tested above, is the tensor cores fed by the copy engine there): the FMA loop
    in every dtype, and the tensor cores fed by loads (the default below sm_90)."""
    _check_steps(case, dtype, batch, gemv=gemv)


@pytest.mark.parametrize("fold", [(True, True), (True, False), (False, False)],
                         ids=["dt-and-x-folded", "dt-in-ssm-step", "dt-gemm"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_steps_gemm_path_dt_proj_both_ways(case, dtype, fold, monkeypatch):
    """The GEMM path's dt_proj and x_proj every way, whatever the size thresholds pick for these small
    models: x_proj inside conv_xproj (its sums in a float32 accumulator) with dt_proj inside ssm_step;
    x_proj a cuBLAS GEMM with dt_proj inside ssm_step (from x_proj's output row); both GEMMs, feeding
    ssm_step_pre."""
    from mamba_rt.plugins_cuda import decode_step

    monkeypatch.setattr(decode_step, "DT_FOLD_MAX_ROW_CHANNELS", 1 << 40 if fold[0] else 0)
    monkeypatch.setattr(decode_step, "XPROJ_FOLD_MAX_ROWS", 16 if fold[1] else 0)
    monkeypatch.setattr(decode_step, "ROWS_MIN_ROWS", 0)  # not the tensor-core kernels below
    _check_steps(case, dtype, 16, gemv=None, fold=fold)


ROWS_CASES = dict(CASES, n32=dict(d_model=96, n_layer=2, vocab_size=300, d_state=32, d_conv=4),
                  n64=dict(d_model=64, n_layer=2, vocab_size=300, d_state=64, d_conv=4))


@pytest.mark.parametrize("batch", [9, 40, 64])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("case", list(ROWS_CASES))
def test_fused_steps_rows_kernels(case, dtype, batch, monkeypatch):
    """The GEMM path's x_proj and dt_proj on the tensor cores, whatever the thresholds pick for these small
    models: conv_xproj_rows (conv + x_proj's share of 128 channels x 32 rows per block, into a float32
    accumulator), dt_rows (dt_proj of 32 channels x 64 rows per block from it), then ssm_step_pre; at 9,
    40 and 64 rows: partial blocks of rows (9; 40 = 32 + 8) and whole ones, channels in partial blocks,
    weight rows that are not 16-byte pieces (dt_rank 5, 9, 10, 34: read element by element), n 4 to 64."""
    from mamba_rt.plugins_cuda import decode_step

    monkeypatch.setattr(decode_step, "ROWS_MIN_ROWS", 9)
    monkeypatch.setattr(decode_step, "ROWS_MAX_ROWS", 64)
    monkeypatch.setattr(decode_step, "ROWS_MIN_DINNER", 0)
    _check_steps(ROWS_CASES[case], dtype, batch, gemv=None, bucket=batch, rows=True)


@pytest.mark.parametrize("batch", [16, 40])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_steps_dt_rows_after_proj_wg(case, dtype, batch, monkeypatch):
    """decode_step.DT_ROWS_*: x_proj on proj_wg with its sums in float32, then dt_rows (dt_proj on the tensor cores
    from them rounded to T; the rows in two row blocks: 8 + 8, and 24 + 16 of the bucket of 64), then ssm_step_pre,
    instead of the dt_proj GEMM; at 16 rows and 40 in the bucket of 64 (proj_wg's x_proj then under PROJ_WG_MANY),
    dt_rank 5-34 (dt_proj rows read element by element), n 4-16; the tiny case's d_model (36) keeps in_proj on
    cuBLAS."""
    from mamba_rt.plugins_cuda import decode_step

    _proj_kernels(dtype)
    monkeypatch.setattr(decode_step, "DT_ROWS_MIN_ROWS", 3)
    monkeypatch.setattr(decode_step, "DT_FOLD_MAX_ROW_CHANNELS", 0)
    monkeypatch.setattr(decode_step, "ROWS_MIN_ROWS", 0)
    _check_steps(case, dtype, batch, gemv=None, dtr=True)


def test_dt_rows_by_default_to_128_rows_and_to_32_for_big_models(monkeypatch):
    """By default dt_rows takes dt_proj at 17-128 rows where proj_wg takes x_proj (sm_90, 16-bit), at 17-32 for a
    model whose in_proj has decode_step.PROJ_WG_BIG_BYTES (0 here: every model counts); not below 17, not past
    128, not in fp32."""
    from mamba_rt.plugins_cuda import decode_step

    _proj_kernels("fp16")
    cfg = MambaConfig(d_model=128, n_layer=1, vocab_size=300, d_state=16, d_conv=4)
    for dtype, big, want in (("fp16", False, {16: False, 17: True, 64: True, 128: True, 129: False}),
                             ("fp16", True, {17: True, 32: True, 33: False, 64: False}),
                             ("fp32", False, {64: False})):
        monkeypatch.setattr(decode_step, "PROJ_WG_BIG_BYTES", 0 if big else 32 << 20)
        dec = _zero_state_decoder(cfg, dtype, 4)
        assert {B: dec.dt_rows_path(B) for B in want} == want, (dtype, big)


def test_rows_kernels_by_default_from_mamba_1_4b_at_16_rows():
    """By default conv_xproj_rows / dt_rows serve buckets of 9 to 16 rows of models with d_inner from 4096
    (mamba-1.4b's): not the 64-row bucket, not a smaller model, not fp32."""
    for dm, dtype, want in ((2048, "fp16", {16: True, 64: False}), (1024, "bf16", {16: False}),
                            (2048, "fp32", {16: False})):
        cfg = MambaConfig(d_model=dm, n_layer=1, vocab_size=300, d_state=16, d_conv=4)
        dec = _zero_state_decoder(cfg, dtype, 64)
        assert {B: dec.rows_path(B) for B in want} == want, (dm, dtype)


def _zero_state_decoder(cfg, dtype, slots):
    """A FusedDecoder of cfg (random weights) over zeroed state buffers of ``slots`` slots: for its choices."""
    from mamba_rt.runtime.fused_decode import FusedDecoder

    model, _ = _models(cfg, dtype, 0)
    shapes = cfg.state_shapes(slots)
    conv = torch.zeros(shapes["conv_state"], dtype=model.dtype, device="cuda")
    ssm = torch.zeros(shapes["ssm_state"], device="cuda")
    return FusedDecoder(model, conv, ssm, dtype)


@pytest.fixture
def layers_any_size(monkeypatch):
    """The persistent kernel for the small test models too (decode_step.LY_MIN_DMODEL: 1024 otherwise; and
    ssm_out off, which takes their batch-1 steps where it serves)."""
    from mamba_rt.plugins_cuda import decode_step

    monkeypatch.setattr(decode_step, "LY_MIN_DMODEL", 0)
    monkeypatch.setattr(decode_step, "SSM_OUT", 0)


LAYERS_CASE = dict(d_model=160, n_layer=3, vocab_size=700, d_state=8, d_conv=2, bias=True, conv_bias=True,
                   residual_in_fp32=False)


def _proj_kernels(dtype):
    """The decode kernels of dtype ("fp16", "bf16") in this process's context, or a skip where proj_wg does not
    run (it needs wgmma: compute capability 9.0)."""
    from mamba_rt.plugins_cuda import decode_step

    k = decode_step.kernels({"fp16": "float16", "bf16": "bfloat16"}[dtype], int(decode_step.launcher._context(0)))
    if not k.proj_serves():
        pytest.skip(f"proj_wg needs wgmma (compute capability 9.0), this GPU is sm_{k.arch}")
    return k


PROJ_SHAPES = {  # (rows B, outputs N, K)
    "few-rows-odd-n": (3, 37, 48),        # N not a multiple of 8 or of any tile, K a partial stage
    "x_proj-2.8b": (16, 192, 5120),       # many stages, every split
    "partial-stage": (64, 2560, 1088),    # K = 4.25 stages of 256 columns
    "two-row-blocks": (100, 1000, 136),   # rows past wgmma's 64: two blocks along z, the second partial
    "dt_proj-2.8b": (64, 5120, 160),      # K of 2.5 boxes
}


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("shape", list(PROJ_SHAPES))
def test_proj_wg_matches_float64(shape, dtype):
    """proj_wg (the GEMM path's projections on wgmma, sm_90a) against float64, with every tile width and K
    split that serves the shape (not only the one proj_plan picks): outputs poisoned with NaN first, rows
    ldo apart with a sentinel between rows that must survive; bias and float32 outputs in alternate plans;
    x rows ldx > K apart. Within the output's rounding (fp16 / bf16) or 1e-5 (float32 outputs)."""
    from mamba_rt.plugins_cuda import decode_step

    k = _proj_kernels(dtype)
    B, N, K = PROJ_SHAPES[shape]
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator(device="cuda").manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    ldx, ldo = K + 8, N + 3
    xbuf = torch.randn(B, ldx, device="cuda", generator=g).to(tdt)
    x = xbuf[:, :K]
    W = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).to(tdt)
    bias = torch.randn(N, device="cuda", generator=g).to(tdt)
    plans = [(nt, s, k.proj_plan_for(B, N, K, nt, s)) for nt in decode_step.PJ_NTS for s in decode_step.PJ_SPLITS]
    plans = [p for p in plans if p[2] is not None]
    assert {p.split for _, _, p in plans} >= ({1, 2} if K >= 1024 else {1}), plans
    assert k.proj_plan(B, N, K) in [p for _, _, p in plans]
    stream = torch.cuda.current_stream().cuda_stream
    for i, (nt, split, plan) in enumerate(plans):
        use_bias, out_float = i % 2 == 1, i % 3 == 2
        ref = x.double() @ W.double().t() + (bias.double() if use_bias else 0)
        out = torch.full((B, ldo), float("nan"), dtype=torch.float32 if out_float else tdt, device="cuda")
        out[:, N:] = 7.0
        maps = torch.frombuffer(bytearray(k.proj_maps(plan, x=x.data_ptr(), ldx=ldx, W=W.data_ptr(), B=B, N=N, K=K)),
                                dtype=torch.uint8).cuda()
        k.launch(k.proj(plan, maps=maps.data_ptr(), bias=bias.data_ptr() if use_bias else 0, out=out.data_ptr(),
                        ldo=ldo, B=B, N=N, K=K, out_float=out_float), stream)
        torch.cuda.synchronize()
        got = out[:, :N].double()
        assert torch.all(out[:, N:] == 7.0), (nt, split, "wrote past N")
        assert not torch.isnan(got).any(), (nt, split, torch.isnan(got).sum().item())
        tol = 1e-4 if out_float else {"fp16": 2e-3, "bf16": 1.6e-2}[dtype]
        err = ((got - ref).abs() / (ref.abs() + 1)).max().item()
        assert err < tol, (nt, plan, out_float, err)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("shape", ["few-rows-odd-n", "partial-stage", "two-row-blocks"])
def test_proj_wg_residual_epilogue_and_row_scale(shape, dtype):
    """proj_wg's residual epilogue (out_proj: h += o rounded to T, out = T(h * norm_w), sums of h^2 per block column)
    and row scale (the next projection: rows scaled by rsqrt(sum of those sums / K + eps)) against float64, with
    every tile width and K split that serves the shape (the row scale's projection, K = N, taking each of its plans
    in turn): h in fp32 and rounded to T in alternate plans, a bias in alternate plans; outputs and sums poisoned with
    NaN first, a sentinel past N in every output row."""
    from mamba_rt.plugins_cuda import decode_step

    k = _proj_kernels(dtype)
    B, N, K = PROJ_SHAPES[shape]
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    ulp = {"fp16": 2.0 ** -10, "bf16": 2.0 ** -7}[dtype]
    g = torch.Generator(device="cuda").manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    x = torch.randn(B, K, device="cuda", generator=g).to(tdt)
    W = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).to(tdt)
    bias = torch.randn(N, device="cuda", generator=g).to(tdt)
    norm_w = (1 + 0.5 * torch.randn(N, device="cuda", generator=g)).to(tdt)
    eps = 1e-5
    plans = [p for p in (k.proj_plan_for(B, N, K, nt, s) for nt in decode_step.PJ_NTS for s in decode_step.PJ_SPLITS)
             if p is not None]
    assert {p.split for p in plans} >= {1, 2} or K < 1024, plans
    plans2 = [p for p in (k.proj_plan_for(B, N, N, nt, s) for nt in decode_step.PJ_NTS for s in decode_step.PJ_SPLITS)
              if p is not None]
    stream = torch.cuda.current_stream().cuda_stream
    maps = lambda plan: torch.frombuffer(bytearray(k.proj_maps(plan, x=x.data_ptr(), ldx=K, W=W.data_ptr(), B=B, N=N,
                                                               K=K)), dtype=torch.uint8).cuda()
    for i, plan in enumerate(plans):
        use_bias, res32 = i % 2 == 1, i % 3 != 2
        tiles = plan.grid[0]
        o = (x.double() @ W.double().t() + (bias.double() if use_bias else 0)).to(tdt).double()  # out_proj's output
        h0 = 4 * torch.randn(B, N, device="cuda", generator=g)
        if not res32:
            h0 = h0.to(tdt).float()
        h, ss = h0.clone(), torch.full((tiles + 1, B), float("nan"), device="cuda")
        out = torch.full((B, N + 3), float("nan"), dtype=tdt, device="cuda")
        out[:, N:] = 7.0
        m1 = maps(plan)
        ln = k.proj(plan, maps=m1.data_ptr(), bias=bias.data_ptr() if use_bias else 0, out=0, ldo=0, B=B, N=N, K=K)
        k.launch(k.with_residual(ln, h=h.data_ptr(), norm_w=norm_w.data_ptr(), out=out.data_ptr(), ldo=N + 3,
                                 ss=ss.data_ptr(), res_fp32=res32), stream)
        torch.cuda.synchronize()
        want_h = h0.double() + o
        # o rounded to T by the kernel from its fp32 sums: an ulp of T of the float64 rounding, plus the fp32 sums'
        # error (K units of 2^-24 of the sum of |terms|: o near 0 rounds differently); the fp32 add, or (res32 off)
        # half an ulp of T of h more
        acc = x.double().abs() @ W.double().abs().t() + (bias.double().abs() if use_bias else 0)
        tol = ulp * o.abs() + K * 2.0 ** -24 * acc + (ulp if not res32 else 2.0 ** -23) * want_h.abs()
        assert ((h.double() - want_h).abs() <= tol).all(), (plan, res32)
        if not res32:
            assert torch.equal(h, h.to(tdt).float()), (plan, "h not rounded to T")
        assert torch.all(out[:, N:] == 7.0), (plan, "wrote past N")
        hw = (h.double() * norm_w.double())
        assert ((out[:, :N].double() - hw).abs() <= ulp * hw.abs() + 1e-7).all(), (plan, "h * norm_w")
        assert torch.isnan(ss[tiles]).all(), (plan, "sums past the block columns")
        tile_sq = torch.stack([(h.double()[:, t * plan.nt:(t + 1) * plan.nt] ** 2).sum(1) for t in range(tiles)])
        assert torch.allclose(ss[:tiles].double(), tile_sq, rtol=2e-5, atol=0), (plan, "sums of squares")
        if N % 8:  # the next projection reads out with K = N: proj_wg takes K in multiples of 8
            continue
        # the next projection (K = N: x is out) with those sums as its row scale
        xs = out[:, :N].contiguous()
        W2 = (torch.randn(N, N, device="cuda", generator=g) / N ** 0.5).to(tdt)
        plan2 = plans2[i % len(plans2)]
        m2 = torch.frombuffer(bytearray(k.proj_maps(plan2, x=xs.data_ptr(), ldx=N, W=W2.data_ptr(), B=B, N=N, K=N)),
                              dtype=torch.uint8).cuda()
        y = torch.full((B, N), float("nan"), dtype=torch.float32, device="cuda")
        ln2 = k.proj(plan2, maps=m2.data_ptr(), bias=bias.data_ptr() if use_bias else 0, out=y.data_ptr(), ldo=N,
                     B=B, N=N, K=N, out_float=True)
        k.launch(k.with_row_scale(ln2, ss=ss.data_ptr(), tiles=tiles, eps=eps), stream)
        torch.cuda.synchronize()
        rs = 1 / torch.sqrt(ss[:tiles].double().sum(0) / N + eps)
        want = rs[:, None] * (xs.double() @ W2.double().t()) + (bias.double() if use_bias else 0)
        err = ((y.double() - want).abs() / (want.abs() + 1)).max().item()
        assert err < 1e-4, (plan, plan2, err)


@pytest.mark.parametrize("shape", [(64, 2560, 5120), (64, 2048, 4096), (4, 2048, 4096), (8, 10240, 2560), (16, 192, 5120)],
                         ids=["out_proj-2.8b-64", "out_proj-1.4b-64", "out_proj-1.4b-4", "in_proj-2.8b-8", "x_proj-2.8b-16"])
def test_proj_plan_keeps_clusters_in_one_wave_and_chains_short(shape):
    """proj_plan's choice: its clusters (a split's blocks) all resident at once where the GPU holds fewer than
    the grid asks (2.8b's out_proj at 64 rows: 32 clusters of 4 blocks, of which the H100 holds 30, took 21.5 us
    against 14.5 with 27 clusters), and no block running more than PJ_MAX_CHAIN stages where a split serves."""
    from mamba_rt.plugins_cuda import decode_step

    k = _proj_kernels("fp16")
    B, N, K = shape
    plan = k.proj_plan(B, N, K)
    assert plan is not None and plan.kchunk <= decode_step.PJ_MAX_CHAIN * decode_step.PJ_KT, plan
    if plan.split > 1:
        assert plan.grid[0] * plan.grid[2] <= k._proj_max_clusters(plan), (plan, k._proj_max_clusters(plan))
    # the planner did not simply avoid clusters: a split serves each shape
    assert any(p is not None and p.split > 1 for p in (k.proj_plan_for(B, N, K, nt, 2) for nt in decode_step.PJ_NTS))


@pytest.mark.parametrize("residual", [64, 0], ids=["norm-in-epilogues", "residual_norm"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_big_models_take_proj_wg_for_in_and_out_proj_to_64_rows(dtype, residual, monkeypatch):
    """decode_step.PROJ_WG_MANY_BIG: buckets of 33-64 rows of models whose in_proj has PROJ_WG_BIG_BYTES (0 here, so
    that the test model counts) run in_proj with K unsplit, x_proj, out_proj and the head on proj_wg (sm_90); the
    steps against the reference model (40 rows in the bucket of 64), with the residual add and norm in proj_wg's
    epilogues (decode_step.PROJ_RESIDUAL_ROWS) and in residual_norm."""
    from mamba_rt.plugins_cuda import decode_step

    _proj_kernels(dtype)
    monkeypatch.setattr(decode_step, "PROJ_WG_BIG_BYTES", 0)
    monkeypatch.setattr(decode_step, "PROJ_RESIDUAL_ROWS", residual)
    _check_steps("wide", dtype, 40, gemv=None, wg_all=True)


@pytest.mark.parametrize("combine", [0, 1], ids=["partials-read-by-all", "partials-combined"])
@pytest.mark.parametrize("head", [1, 0], ids=["head-inside", "head-after"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_layers_kernel_with_biases_and_residual_in_dtype(dtype, combine, head, monkeypatch, layers_any_size):
    """The persistent kernel of every layer (batch 1, copy-engine kind) on a shape the cases above do not
    give it: biases in every projection and the conv, the residual rounded to the model dtype, n 8 (two
    threads per channel in its state update), k 2; out_proj's 10 tiles over more blocks than tiles (most
    without one), its partial sums read by every block or combined by each row group's first block
    (decode_step.LY_COMBINE_MIN_DMODEL); the head inside it (decode_step.LY_HEAD: 700 rows, the last of its
    44 units of 16 rows partial, most blocks without one) or norm_gemv's after it."""
    from mamba_rt.plugins_cuda import decode_step

    monkeypatch.setattr(decode_step, "LY_COMBINE_MIN_DMODEL", 0 if combine else 1 << 20)
    monkeypatch.setattr(decode_step, "LY_HEAD", head)
    _check_steps(LAYERS_CASE, dtype, 1, gemv="bulk")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_layers_kernel_beside_the_load_fed_kind(dtype, layers_any_size):
    """The persistent kernel at batch 1 of a model whose GEMVs are the load-fed tensor-core kind (asked for;
    the head's norm_gemv, where the kernel does not take the head, then of that kind, reading the kernel's
    partial sums)."""
    _check_steps(LAYERS_CASE, dtype, 1, gemv="mma")


@pytest.mark.parametrize("order", [(1, 1, 0), (1, 0, 0), (0, 0, 0), (1, 1, 1 << 20)],
                         ids=["x-rows-first-late-arrival", "x-rows-first", "unit-by-unit", "partials-read-by-all"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_layers_kernel_in_proj_row_orders(dtype, order, monkeypatch):
    """The persistent kernel's orders of a block's in_proj rows (decode_step.LY_XFIRST), the place of
    its arrival at the grid barrier (LY_ARRIVE_LAG) and its two ways of exchanging out_proj's partial
    sums (LY_COMBINE_MIN_DMODEL: combined at 0) where a block has several units of 8 channels: d_inner
    5120 gives 4-5 units per block on 132 SMs (H100, H200), so with x rows first a block's x rows fill
    two or three groups of 16 rows, the last of them x and z rows mixed where it has 5, and its x_proj
    share runs before its last z rows, its arrival right after it or one group later. The vocabulary, 5000
    rows, gives the head inside the kernel (decode_step.LY_HEAD) 313 units of 16 rows: two or three per block,
    the last partial."""
    from mamba_rt.plugins_cuda import decode_step

    for name, v in zip(("LY_XFIRST", "LY_ARRIVE_LAG", "LY_COMBINE_MIN_DMODEL"), order):
        monkeypatch.setattr(decode_step, name, v)
    _check_steps(dict(d_model=2560, n_layer=2, vocab_size=5000, d_state=16, d_conv=4), dtype, 1, gemv="bulk")


@pytest.mark.parametrize("pw", [1, 2], ids=["one-slot-per-load", "two-slots-per-load"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_layers_kernel_partials_per_round_trip(dtype, pw, monkeypatch, layers_any_size):
    """The persistent kernel reading out_proj's partial sums at a layer's start one slot per round trip
    or two (decode_step.LY_PARTIALS_PER_LOAD), each block reading every slot: d_model 768 gives three
    slots per output on 114-132 SMs (H100, H200), so with two per round trip the second round has one."""
    from mamba_rt.plugins_cuda import decode_step

    monkeypatch.setattr(decode_step, "LY_PARTIALS_PER_LOAD", pw)
    monkeypatch.setattr(decode_step, "LY_COMBINE_MIN_DMODEL", 1 << 20)
    _check_steps(dict(d_model=768, n_layer=2, vocab_size=1000, d_state=16, d_conv=4), dtype, 1, gemv="bulk",
                 pw=pw)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_layers_kernel_tags_wrap(dtype, layers_any_size):
    """The persistent kernel's tagged exchanges (out_proj's partial sums: 32-bit tags; y: 16-bit tags)
    across the wrap of both tags: the step counter set so that the second step's tags end at 2^32 - 1
    (0xffff for y) and the third step's start again at 0, the tagged buffers holding the tag of the
    step before's last layer, as they would after that many steps."""
    _check_steps(LAYERS_CASE, dtype, 1, gemv="bulk", stepc=(2**32 - 2) // LAYERS_CASE["n_layer"] - 1)


@pytest.mark.parametrize("gemv", [None, "mma"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_steps_four_kernels_per_layer_at_batch_1(case, dtype, gemv, monkeypatch):
    """Batch 1 of 16-bit models with the four kernels per layer, which the persistent kernel of every
    layer (decode_step.LAYERS_KERNEL, tested above) replaces where it applies."""
    from mamba_rt.plugins_cuda import decode_step

    monkeypatch.setattr(decode_step, "LAYERS_KERNEL", 0)
    _check_steps(case, dtype, 1, gemv=gemv)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_steps_without_ssm_out(case, dtype, batch, monkeypatch):
    """16-bit models with ssm_step and gemv_residual where ssm_out would take both (decode_step.SSM_OUT off; fp32
    models always run them)."""
    from mamba_rt.plugins_cuda import decode_step

    monkeypatch.setattr(decode_step, "LAYERS_KERNEL", 0)
    monkeypatch.setattr(decode_step, "SSM_OUT", 0)
    _check_steps(case, dtype, batch, gemv=None)


def _expected_layers(cfg, dtype, gemv, bucket, arch):
    """Whether a bucket takes the persistent kernel of every layer: batch 1, a 16-bit dtype on sm_90+,
    a tensor-core kind, d_model from LY_MIN_DMODEL up (the small test models get it where a test lowers
    that), d_model and d_inner multiples of 16, LAYERS_KERNEL on, and ssm_out not serving the shape."""
    from mamba_rt.plugins_cuda import decode_step

    return bool(decode_step.LAYERS_KERNEL and bucket == 1 and dtype != "fp32" and arch >= 90 and gemv != "fma"
                and cfg.d_model >= decode_step.LY_MIN_DMODEL and cfg.d_model % 16 == 0 and cfg.d_inner % 16 == 0
                and not _ssm_out_serves(cfg, dtype, bucket))


def _ssm_out_serves(cfg, dtype, bucket):
    """Whether ssm_out (the state update and out_proj in one kernel) serves a GEMV-path bucket's shape: a 16-bit
    dtype, d_state 4, 8 or 16, d_model a multiple of 4 up to decode_step.SO_MAX_DMODEL, and decode_step.SSM_OUT on
    (tests turn it off to run the other kernels)."""
    from mamba_rt.plugins_cuda import decode_step

    return bool(dtype != "fp32" and bucket in (1, 2) and cfg.d_state in decode_step.SO_STATES
                and cfg.d_model % 4 == 0 and cfg.d_model <= decode_step.SO_MAX_DMODEL and decode_step.SSM_OUT)


def _expected_ssm_out(cfg, dtype, bucket, ly):
    """Whether a GEMV-path bucket's layers run ssm_out instead of ssm_step and gemv_residual: where it serves,
    unless the persistent kernel runs them."""
    return not ly and _ssm_out_serves(cfg, dtype, bucket)


def _expected_gemv(asked, dtype, k, arch):
    """The GEMV kind a matrix with rows of k elements gets: the one asked for (None: the fastest there is)
    with the fallbacks of DecodeKernels."""
    if dtype == "fp32" or k % 8 or asked == "fma":
        return "fma"
    if asked == "mma" or arch < 90 or k % 16:
        return "mma"
    return "bulk"


def _check_steps(case, dtype, batch, gemv, fold=None, stepc=None, pw=None, bucket=None, rows=False, wg_all=False,
                 dtr=False):
    from mamba_rt.runtime.backend import batch_bucket
    from mamba_rt.runtime.fused_decode import FusedDecoder

    seed = int(np.random.SeedSequence().entropy % 2**31)
    cfg = MambaConfig(**(CASES[case] if isinstance(case, str) else case))
    model, hi = _models(cfg, dtype, seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    n_slots = 2 * batch + 3
    shapes = cfg.state_shapes(n_slots)
    conv = (0.5 * torch.randn(shapes["conv_state"], generator=g, device="cuda")).to(model.dtype)
    ssm = 0.5 * torch.randn(shapes["ssm_state"], generator=g, device="cuda")
    dec = FusedDecoder(model, conv, ssm, dtype, gemv=gemv)
    bucket = bucket or batch_bucket(batch, 16)
    bk = dec.bucket(bucket)
    assert bk.gemv == (bucket <= 2), "buckets of 1 and 2 rows take the GEMV path, larger ones the GEMM path"
    if bk.gemv:  # which matrix-vector kernels run (by the kind asked for, dtype, row length and GPU)
        names = [ln.name for ln in bk.launches if not callable(ln)]
        arch = dec.k.arch
        ly = _expected_layers(cfg, dtype, gemv, bucket, arch)
        assert (bk.ly is not None) == ly and names.count("layers") == ly, (ly, names)
        from mamba_rt.plugins_cuda import decode_step

        head_gemv = not ly or not decode_step.LY_HEAD  # else the persistent kernel takes the head too
        so = _expected_ssm_out(cfg, dtype, bucket, ly)
        assert bk.so == so and names.count(f"ssm_out_{dec.k.tag}_n{cfg.d_state}_b{bucket}") == so * cfg.n_layer, \
            (so, names)
        assert names.count("ssm_step") == (not ly and not so) * cfg.n_layer, names
        for kind, k in (("norm_gemv", cfg.d_model), ("gemv_residual", cfg.d_inner)):
            if kind == "gemv_residual" and so:  # out_proj inside ssm_out
                assert not [n for n in names if n.startswith(kind)], names
                continue
            want = _expected_gemv(gemv, dtype, k, arch)
            got = {("bulk" if "_bulk_" in n else "mma" if "_mma_" in n else "fma") for n in names if n.startswith(kind)}
            if ly:  # the head's norm_gemv only, if that
                assert len([n for n in names if n.startswith(kind)]) == (kind == "norm_gemv" and head_gemv), \
                    (kind, names)
            assert got == ({want} if not ly or (kind == "norm_gemv" and head_gemv) else set()), (kind, names)
        assert (names[-1] == "layers") == (not head_gemv), names
    elif fold is not None:  # projections (cuBLAS or proj_wg): in_proj, (x_proj, (dt_proj,)) out_proj per layer, the head
        gemms = sum(callable(ln) or ln.name == "proj_wg" for ln in bk.launches)
        assert (bk.fold_dt, bk.fold_x) == fold
        assert gemms == cfg.n_layer * (2 + (not fold[0] and not bk.dtr) + (not fold[1])) + 1, (fold, gemms)
        xp = [ln.name for ln in bk.launches if not callable(ln) and ln.name.startswith("conv_")]
        assert xp == ["conv_xproj" if fold[1] else "conv_only"] * cfg.n_layer, xp
    if not bk.gemv:  # the head by proj_wg where it serves (16-bit rows of whole 16-byte pieces on sm_90)
        from mamba_rt.plugins_cuda import decode_step as ds

        big = dec.proj_big()
        assert callable(bk.launches[-1]) != (dec.k.proj_serves(ds.PROJ_HEAD, bk.B, big)
                                             and cfg.d_model % 8 == 0), bk.launches[-1]
        # the residual add and norm after each out_proj: in proj_wg's epilogues where it runs out_proj and the
        # projection after it in buckets of up to decode_step.PROJ_RESIDUAL_ROWS, else residual_norm
        wg = [ln for ln in bk.launches if not callable(ln) and ln.name == "proj_wg"]
        norm = [ln.args.e for ln in wg if isinstance(ln.args, ds.ProjNormArgs)]
        res, scaled = [e for e in norm if e.res_h], [e for e in norm if e.ss_in]
        norms = sum(not callable(ln) and ln.name == "residual_norm" for ln in bk.launches)
        assert len(res) == len(scaled) and len(res) + norms == cfg.n_layer, (len(res), len(scaled), norms)
        folds = (bk.B <= ds.PROJ_RESIDUAL_ROWS and cfg.d_model % 8 == 0 and cfg.d_inner % 8 == 0
                 and all(dec.k.proj_serves(w, bk.B, big) for w in (ds.PROJ_IN, ds.PROJ_OUT, ds.PROJ_HEAD)))
        assert norms == (0 if folds else cfg.n_layer), (folds, norms)
        # dt_proj: in ssm_step, dt_rows (after conv_xproj_rows, or after x_proj's proj_wg: DT_ROWS_MIN_ROWS) or a GEMM
        assert bk.dtr == (not (bk.rows or bk.fold_dt) and dec.dt_rows_path(bk.B)), bk.dtr
        names = [ln.name for ln in bk.launches if not callable(ln)]
        assert names.count("dt_rows") == cfg.n_layer * (bk.rows or bk.dtr), names
    if rows:  # x_proj and dt_proj in our tensor-core kernels: in_proj, out_proj and the head as projections
        assert bk.rows and not bk.gemv
        names = [ln.name for ln in bk.launches if not callable(ln)]
        gemms = sum(callable(ln) or ln.name == "proj_wg" for ln in bk.launches)
        assert (names.count("conv_xproj_rows"), names.count("dt_rows")) == (cfg.n_layer,) * 2, names
        assert gemms == cfg.n_layer * 2 + 1, gemms
    if dtr:  # x_proj on proj_wg (float32 sums), dt_rows, ssm_step_pre; no dt_proj GEMM
        assert bk.dtr and not bk.gemv
        names = [ln.name if not callable(ln) else "cuBLAS" for ln in bk.launches]
        xp = [ln for ln in bk.launches if not callable(ln) and ln.name == "proj_wg" and getattr(ln.args, "out_float", 0)
              and ln.args.N == cfg.dt_rank + 2 * cfg.d_state]  # (in_proj's and out_proj's: ProjNormArgs at <= 32 rows)
        assert len(xp) == cfg.n_layer and names.count("ssm_step") == cfg.n_layer, names
        assert {ln.grid[1] for ln in bk.launches if not callable(ln) and ln.name == "dt_rows"} == {2}, names
        gemms = sum(n in ("cuBLAS", "proj_wg") for n in names)  # in_proj, x_proj, out_proj per layer, the head
        assert gemms == 3 * cfg.n_layer + 1, names
    if wg_all:  # in_proj (K unsplit), x_proj, out_proj and the head on proj_wg (decode_step.PROJ_WG_MANY_BIG)
        wg = [ln for ln in bk.launches if not callable(ln) and ln.name == "proj_wg"]
        assert len(wg) == 3 * cfg.n_layer + 1, [getattr(ln, "name", "cuBLAS") for ln in bk.launches]
        assert all(ln.grid[1] == 1 for ln in wg[0:3 * cfg.n_layer:3]), [ln.grid for ln in wg]
    if pw is not None:  # the persistent kernel's out_proj partials: slots per output, read pw per round trip
        assert bk.ly and bk.ly.P == 3 and bk.ly.pw == pw, bk.ly
    if stepc is not None:  # the persistent kernel's step counter, its tagged buffers as after that many steps
        assert bk.ly, "the step counter belongs to the persistent kernel"
        last = (stepc * cfg.n_layer) % 2**32  # the tag of the last layer of the step before
        bk.stepc.fill_(stepc)
        bk.y_tagged.fill_(((last & 0xFFFF) << 16) - (2**32 if last & 0x8000 else 0))
        bk.part.fill_((last << 32) - (2**64 if last >= 2**31 else 0))
    # the greedy ids asked for with the step: taken by the head itself on the GEMV path with the
    # tensor-core kinds (decode_step.HEAD_ARGMAX) or in the persistent kernel (LY_HEAD), by the argmax
    # kernel after it otherwise
    head = bk.launches[-1]
    assert bk.head_argmax == (bk.gemv and (head.name == "layers" or "_mma_" in head.name or "_bulk_" in head.name)), \
        (bk.head_argmax, head.name)
    amax = torch.empty(bucket, dtype=torch.int64, device="cuda")
    slots = torch.randperm(n_slots, generator=g, device="cuda")[:bucket]
    conv0, ssm0 = conv.clone(), ssm.clone()
    h_conv = conv[:, slots].to(hi.dtype if dtype != "fp32" else torch.float64)
    h_ssm = ssm[:, slots].to(torch.float64 if dtype == "fp32" else torch.float32)
    for step in range(3):
        ids = torch.randint(0, cfg.vocab_size, (bucket,), generator=g, device="cuda")
        if step == 2:  # the largest and smallest ids
            ids[0], ids[-1] = cfg.vocab_size - 1, 0
        for buf in ((bk.logits, bk.h, bk.u, bk.y) + ((bk.hbuf, bk.ss_layers) if bk.ly else ())
                    + ((bk.hh,) if bk.gemv and bk.so else ())):
            buf.fill_(float("nan"))
        amax.fill_(-1)
        bk.ids.copy_(ids)
        bk.idx.copy_(slots)
        if step == 0:  # eagerly, then captured in a CUDA graph as the backend runs it
            dec.enqueue(bk, argmax=amax)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                dec.enqueue(bk, argmax=amax)
        else:
            graph.replay()
        assert torch.equal(amax, bk.logits.argmax(-1)), f"step {step}: greedy ids {amax} against the logits'"
        with torch.no_grad():
            ref, st = hi(ids[:, None], MambaState(h_conv, h_ssm), last_only=True)
        h_conv, h_ssm = st.conv, st.ssm
        got = bk.logits.double()
        assert torch.isfinite(got).all(), f"step {step}: non-finite logits"
        assert rel_err(got, ref.double()) < TOL[dtype], f"step {step}: logits"
    assert rel_err(ssm[:, slots].double(), h_ssm.double()) < TOL[dtype], "ssm state"
    assert rel_err(conv[:, slots].double(), h_conv.double()) < TOL[dtype], "conv state"
    other = torch.ones(n_slots, dtype=torch.bool, device="cuda")
    other[slots] = False
    assert torch.equal(conv[:, other], conv0[:, other]) and torch.equal(ssm[:, other], ssm0[:, other]), \
        "a slot outside the batch was written"


def test_backend_uses_fused_decode_and_gemm_bucket(tmp_path):
    """Through the Session: the torch backend decodes with the fused kernels by default, for the GEMV
    buckets and the GEMM one alike, and its fp32 greedy tokens equal the reference model's."""
    from mamba_rt.runtime import Session
    from tests.runtime.packages import weights_only_package

    seed = int(np.random.SeedSequence().entropy % 2**31)
    pkg, _ = weights_only_package(tmp_path / "pkg", seed=seed, dtype="fp32", d_conv=4, d_state=16)
    rng = np.random.default_rng(seed)
    with Session.open(pkg, backend="torch", device="cuda", max_batch=16) as fused, \
            Session.open(pkg, backend="torch", device="cuda", max_batch=16, fused=False) as plain:
        assert "fused decode" in fused.describe() and "fused decode" not in plain.describe()
        for n in (1, 12):  # bucket 1 (GEMV) and bucket 16 (GEMM)
            prompts = [rng.integers(0, fused.vocab, int(rng.integers(1, 9))).tolist() for _ in range(n)]
            a = [g.ids for g in fused.generate(prompts, max_new_tokens=24, stream=False)]
            b = [g.ids for g in plain.generate(prompts, max_new_tokens=24, stream=False)]
            assert a == b


@pytest.mark.parametrize("bucket, gemv, ly_head", [(1, None, 0), (2, None, 0), (1, "mma", 0), (2, "mma", 0),
                                                   (1, None, 1)])
def test_head_argmax_ties_and_nans(bucket, gemv, ly_head, monkeypatch):
    """The greedy ids the head takes itself (its blocks' best rows, reduced by the last block) against
    torch.argmax of the logits it wrote: the head's norm_gemv (decode_step.HEAD_ARGMAX) of both tensor-core
    kinds (fed by the copy engine: the default on sm_90+; by loads), and at batch 1 also the head inside the
    persistent kernel (decode_step.LY_HEAD; LY_MIN_DMODEL lowered and ssm_out off for this small model). The same step three times
    from a zero state: random weights; then the best row of row 0 copied to two other rows of the
    vocabulary (a three-way tie at the top: the first index wins); then two rows of NaN weights (NaN
    ranked highest: the first wins). Random logits rounded to fp16 tie at the top by themselves now and
    then (top two within one fp16 step in 2 of 30 draws on the CPU): such a row ties too, and ranks after
    row 0's first best, so the expected winner stays the same."""
    from mamba_rt.plugins_cuda import decode_step
    from mamba_rt.runtime.fused_decode import FusedDecoder

    monkeypatch.setattr(decode_step, "LY_HEAD", ly_head)
    monkeypatch.setattr(decode_step, "LY_MIN_DMODEL", 0 if ly_head else 1 << 20)
    if ly_head:  # which ssm_out would take otherwise
        monkeypatch.setattr(decode_step, "SSM_OUT", 0)
    cfg = MambaConfig(**CASES["wide"])
    model, _ = _models(cfg, "fp16", int(np.random.SeedSequence().entropy % 2**31))
    shapes = cfg.state_shapes(bucket + 1)
    conv = torch.zeros(shapes["conv_state"], dtype=model.dtype, device="cuda")
    ssm = torch.zeros(shapes["ssm_state"], device="cuda")
    dec = FusedDecoder(model, conv, ssm, "fp16", gemv=gemv)
    bk = dec.bucket(bucket)
    if ly_head and not bk.ly:
        pytest.skip(f"the persistent kernel does not serve this GPU (sm_{dec.k.arch})")
    assert bk.head_argmax and bk.launches[-1].name.startswith("layers" if ly_head else "norm_gemv"), \
        bk.launches[-1].name
    V, W = cfg.vocab_size, dec.lm_head
    ids = torch.randint(0, V, (bucket,))
    free = [int(v) for v in torch.randperm(V) if int(v) not in ids.tolist()]  # rows whose embedding is unused
    bk.ids.copy_(ids)
    bk.idx.copy_(torch.arange(bucket))
    out = torch.empty(bucket, dtype=torch.int64, device="cuda")
    want = None
    for trial in range(3):
        conv.zero_()
        ssm.zero_()
        out.fill_(-1)
        dec.enqueue(bk, argmax=out)
        x = bk.logits.clone()
        assert torch.equal(out, x.argmax(-1)), (trial, out, x.argmax(-1))
        if want is not None:
            assert int(out[0]) == want, (trial, int(out[0]), want)
        with torch.no_grad():
            if trial == 0:  # row 0's best copied to two other rows: the three tie at the top
                m = int(out[0])
                i, j = [v for v in free if v != m][:2]
                W[i], W[j] = W[m], W[m]
                want = min(i, j, m)
            elif trial == 1:
                assert (x[0] == x[0, m]).sum() >= 3 and x[0, i] == x[0, j] == x[0, m], "the rows do not tie"
                i, j = free[2:4]
                W[i], W[j] = float("nan"), float("nan")
                want = min(i, j)


@pytest.mark.parametrize("bucket", [1, 4])
def test_argmax_matches_torch(bucket):
    """The greedy token kernel against torch.argmax on poisoned-then-filled logits: random rows, a
    tie (the first index wins), NaNs (ranked highest, the first wins), a row of -inf, rows longer than
    the block."""
    from mamba_rt.runtime.fused_decode import FusedDecoder

    cfg = MambaConfig(**CASES["wide"])
    model, _ = _models(cfg, "fp16", int(np.random.SeedSequence().entropy % 2**31))
    shapes = cfg.state_shapes(bucket + 1)
    dec = FusedDecoder(model, torch.zeros(shapes["conv_state"], dtype=model.dtype, device="cuda"),
                       torch.zeros(shapes["ssm_state"], device="cuda"), "fp16")
    bk = dec.bucket(bucket)
    V = cfg.vocab_size
    for trial in range(4):
        x = torch.randn(bucket, V, device="cuda")
        r = trial % bucket
        if trial == 1:
            i, j = sorted(torch.randperm(V)[:2].tolist())
            x[r, i] = x[r, j] = x[r].max() + 1
        elif trial == 2:
            x[r, V - 3] = x[r, 7] = float("nan")
            x[r, 5] = float("inf")
        elif trial == 3:
            x[r] = float("-inf")
        bk.logits.copy_(x)
        out = torch.full((bucket,), -1, dtype=torch.int64, device="cuda")
        dec.enqueue_argmax(bk, out)
        torch.cuda.synchronize()
        assert torch.equal(out, torch.argmax(x, dim=-1)), (trial, out, torch.argmax(x, dim=-1))


def _seen_rows(dec, V):
    """The fused decoder's seen-token bitmap as a bool array [slots, V]."""
    words = dec.seen.cpu().numpy().astype("<i4").view(np.uint8)
    return np.unpackbits(words, axis=1, count=V, bitorder="little").astype(bool)


@pytest.mark.parametrize("vocab", [101, 50277])
def test_penalize_kernel_equals_the_numpy_reference(vocab):
    """The repetition penalty kernel against runtime/sampling.py's numpy rule, bit for bit: random seen
    bitmaps (dense, sparse, a full row, an empty one, the vocabulary's last token, whose word is partial),
    each row its own slot (two rows on one slot) and penalty (above and below 1, and 1: the row left as it
    is), logits with positive, negative, zero, infinite and NaN values, poisoned bitmap padding bits past
    the vocabulary that must not be read as tokens."""
    from mamba_rt.runtime.fused_decode import FusedDecoder

    cfg = MambaConfig(d_model=64, n_layer=1, vocab_size=vocab, d_state=16, d_conv=4, pad_vocab_size_multiple=1)
    model, _ = _models(cfg, "fp16", 0)
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**31))
    shapes = cfg.state_shapes(7)  # 7 slots
    dec = FusedDecoder(model, torch.zeros(shapes["conv_state"], dtype=model.dtype, device="cuda"),
                       torch.zeros(shapes["ssm_state"], device="cuda"), "fp16")
    bk = dec.bucket(8)
    slots, W = dec.seen.shape
    assert slots == 7 and W == -(-vocab // 32)
    for trial in range(3):
        seen = rng.random((slots, vocab)) < np.array([0.5, 0.02, 1.1, 0.0, 0.3, 0.1, 0.7])[:, None]
        seen[4, vocab - 1] = True
        packed = np.zeros((slots, 4 * W), np.uint8)
        packed[:, :(vocab + 7) // 8] = np.packbits(seen, axis=1, bitorder="little")
        bits = packed.view("<i4").copy()
        if vocab % 32:  # poison: bits past the vocabulary
            bits[:, -1] |= np.int32(-1) << np.int32(vocab % 32)
        dec.seen.copy_(torch.from_numpy(bits))
        assert np.array_equal(_seen_rows(dec, vocab), seen)
        idx = np.array([0, 1, 2, 3, 4, 5, 6, 2])
        r = np.array([1.2, 0.5, 3.0, 1.7, 1.0, 0.9, 1.1, 1.3], np.float32)
        x = rng.standard_normal((8, vocab)).astype(np.float32) * 4
        x[:, :3] = [0.0, -0.0, float("inf")]
        x[rng.random((8, vocab)) < 0.01] = float("nan")
        x[:, vocab - 1] = -1.5
        bk.logits.copy_(torch.from_numpy(x))
        bk.idx.copy_(torch.from_numpy(idx))
        dec.penalize(bk.logits, bk.idx, torch.from_numpy(r).cuda())
        got = bk.logits.cpu().numpy()
        with np.errstate(invalid="ignore"):
            want = np.where(seen[idx], np.where(x > 0, x / r[:, None], x * r[:, None]), x).astype(np.float32)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan), trial  # (a NaN's payload is the GPU's own)
        assert np.array_equal(got[~nan].view(np.int32), want[~nan].view(np.int32)), trial
        assert (got[~nan] != x[~nan]).sum() > vocab // 4, trial  # it did something


@pytest.mark.parametrize("bucket", [1, 3, 16])
def test_embed_marks_each_rows_token_in_its_slot(bucket):
    """Every fused step's embedding marks the row's token in its slot's row of the seen-token bitmap (the
    repetition penalty's), ORed into what is there, and nothing else (the GEMV path at 1 row, the GEMM
    path's embedding at 3 and 16)."""
    from mamba_rt.runtime.fused_decode import FusedDecoder

    cfg = MambaConfig(**CASES["mid"])
    model, _ = _models(cfg, "fp16", 0)
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**31))
    shapes = cfg.state_shapes(bucket + 2)
    dec = FusedDecoder(model, torch.zeros(shapes["conv_state"], dtype=model.dtype, device="cuda"),
                       torch.zeros(shapes["ssm_state"], device="cuda"), "fp16")
    bk = dec.bucket(bucket)
    V = cfg.vocab_size
    before = rng.integers(-2**31, 2**31, dec.seen.shape, dtype=np.int64).astype(np.int32)
    before &= rng.integers(-2**31, 2**31, dec.seen.shape, dtype=np.int64).astype(np.int32)  # a quarter set
    dec.seen.copy_(torch.from_numpy(before))
    want = _seen_rows(dec, V)
    ids = rng.integers(0, V, bucket)
    idx = rng.permutation(bucket + 2)[:bucket]
    bk.ids.copy_(torch.from_numpy(ids))
    bk.idx.copy_(torch.from_numpy(idx))
    dec.enqueue(bk)
    torch.cuda.synchronize()
    want[idx, ids] = True
    assert np.array_equal(_seen_rows(dec, V), want)


@pytest.mark.parametrize("vocab", [1000, 50277, 65536])
def test_draw_kernel_equals_the_numpy_sampler(vocab):
    """The draw kernel (one sampled token per row) against runtime/sampling.py's numpy reference on
    the same logits and uniform numbers: every row its own settings (temperature only, top-k, top-p,
    both, top-k 1, settings that keep every token), rows with ties at the k-th logit, rows with
    -inf logits, a nearly flat row (thousands of tokens per histogram bin: more passes over the
    cluster before the leader finishes alone), a row of whole numbers (thousands of equal keys:
    every bit decided by the cluster's passes); the output poisoned first."""
    from mamba_rt.runtime.backend_torch import sample_knobs
    from mamba_rt.runtime.fused_decode import FusedDecoder
    from mamba_rt.runtime.sampling import SamplingParams, sample_numpy

    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    cfg = MambaConfig(**{**CASES["mid"], "vocab_size": vocab})
    model, _ = _models(cfg, "fp16", seed)
    shapes = cfg.state_shapes(2)
    dec = FusedDecoder(model, torch.zeros(shapes["conv_state"], dtype=model.dtype, device="cuda"),
                       torch.zeros(shapes["ssm_state"], device="cuda"), "fp16")
    settings = [SamplingParams(temperature=0.8), SamplingParams(temperature=1.3, top_k=20),
                SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=0.7, top_k=50, top_p=0.95),
                SamplingParams(temperature=0.5, top_k=1), SamplingParams(temperature=2.0, top_p=0.02),
                SamplingParams(temperature=1.1, top_k=vocab, top_p=1.0), SamplingParams(temperature=0.3, top_p=0.999)]
    rows = 4 * len(settings)
    draw = dec.draw_fn(rows)
    mismatches, off_argmax = [], 0
    for trial in range(6):
        x = (rng.normal(size=(rows, vocab)) * rng.uniform(0.5, 4)).astype(np.float32)
        x[1, rng.integers(0, vocab, 5)] = -np.inf
        x[2] *= 0.01
        x[3] = np.round(x[3])
        top = np.sort(x[5])[::-1]
        x[5, rng.integers(0, vocab, 3)] = top[19]  # ties with the 20th largest (row 5: top-k 20)
        u = rng.random(rows)
        params = [settings[(i + trial) % len(settings)] for i in range(rows)]
        knobs = np.concatenate([sample_knobs(p, u[i:i + 1], vocab) for i, p in enumerate(params)])
        want = np.array([sample_numpy(x[i:i + 1], None, p, u[i:i + 1])[0] for i, p in enumerate(params)])
        out = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
        draw(torch.from_numpy(x).cuda(), torch.from_numpy(knobs).cuda(), out)
        got = out.cpu().numpy()
        mismatches += [(trial, i, params[i], int(got[i]), int(want[i])) for i in np.flatnonzero(got != want)]
        off_argmax += int((want != x.argmax(-1)).sum())
    assert not mismatches, (seed, mismatches[:5])
    assert off_argmax >= rows, "the draws all but matched the argmax: the comparison would not discriminate"


def test_draw_kernel_takes_rows_up_to_its_register_capacity():
    """The draw kernel holds a row in its cluster's registers: vocabularies up to DRAW_MAX_VOCAB take
    it, larger ones are declined (the backend then draws with torch ops), and a launch beyond is
    refused by name."""
    from mamba_rt.errors import InternalError
    from mamba_rt.plugins_cuda.decode_step import DRAW_MAX_VOCAB
    from mamba_rt.runtime.fused_decode import FusedDecoder

    for vocab, want in ((DRAW_MAX_VOCAB, True), (DRAW_MAX_VOCAB + 1, False)):
        cfg = MambaConfig(**{**CASES["tiny"], "vocab_size": vocab})
        model, _ = _models(cfg, "fp32", 0)
        shapes = cfg.state_shapes(1)
        dec = FusedDecoder(model, torch.zeros(shapes["conv_state"], dtype=model.dtype, device="cuda"),
                           torch.zeros(shapes["ssm_state"], device="cuda"), "fp32")
        assert dec.draws is (want and torch.cuda.get_device_capability()[0] >= 9), (vocab, dec.draws)
    with pytest.raises(InternalError, match=f"at most {DRAW_MAX_VOCAB} logits"):
        dec.k.draw(x=0, knobs=0, out=0, B=1, V=DRAW_MAX_VOCAB + 1)


@pytest.mark.parametrize("d_model", [768, 1024, 2048])
def test_default_gemv_by_model_size(d_model):
    """Every 16-bit model takes the copy-engine GEMVs by default on sm_90+ (the load-fed tensor-core kind
    below) in both GEMV buckets; a batch-1 step runs its layers in the persistent kernel
    (decode_step.LAYERS_KERNEL) on sm_90+ above d_model 1024 (mamba-790m's 1536 up), and ssm_out's three kernels
    per layer up to it (768 and 1024: 130m's and 370m's), as at batch 2; one step of each shape (one layer) and
    bucket against the reference, from a random state."""
    from mamba_rt.plugins_cuda import decode_step
    from mamba_rt.runtime.fused_decode import FusedDecoder

    assert decode_step.LY_MIN_DMODEL == 1024
    cfg = MambaConfig(d_model=d_model, n_layer=1, vocab_size=1000, d_state=16, d_conv=4)
    model, hi = _models(cfg, "fp16", int(np.random.SeedSequence().entropy % 2**31))
    shapes = cfg.state_shapes(2)
    conv = torch.randn(shapes["conv_state"], device="cuda").to(model.dtype)
    ssm = torch.randn(shapes["ssm_state"], device="cuda")
    dec = FusedDecoder(model, conv, ssm, "fp16")
    hopper = dec.k.arch >= 90
    assert dec.k.gemv == ("bulk" if hopper else "mma")
    for B in (1, 2):
        bk = dec.bucket(B)
        assert bk.gemv
        assert (bk.ly is not None) == (B == 1 and hopper and d_model > 1024 and bool(decode_step.LAYERS_KERNEL))
        assert bk.so == (d_model <= 1024), (d_model, B)
        names = [ln.name for ln in bk.launches]
        assert any(n.startswith(("norm_gemv_bulk_" if hopper else "norm_gemv_mma_", "layers")) for n in names), names
        h_conv, h_ssm = conv[:, :B].float().clone(), ssm[:, :B].clone()  # before the step updates them
        ids = torch.randint(0, cfg.vocab_size, (B,), device="cuda")
        bk.logits.fill_(float("nan"))
        bk.ids.copy_(ids)
        bk.idx.copy_(torch.arange(B, device="cuda"))
        dec.enqueue(bk)
        with torch.no_grad():
            ref, _ = hi(ids[:, None], MambaState(h_conv, h_ssm), last_only=True)
        assert rel_err(bk.logits.double(), ref.double()) < TOL["fp16"], B
