"""The fused decode kernels (plugins_cuda/decode_step.cu) compile with NVRTC on a machine without a GPU
(the GPU numerics are tests/runtime/test_fused_decode.py), keep to the register and local-memory budgets
their measured speed rests on, and the shape limits are reported clearly."""
import re

import pytest

from mamba_rt.plugins_cuda import compiler, decode_step
from mamba_rt.plugins_cuda.compiler import DTYPES


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_entry_point_compiles(dtype, arch):
    """Every entry point is there. On sm_90 (the H100, where the kernels were measured) none that the
    runtime launches by default has a stack frame or spills: each runs once per layer and step on the
    critical path, where local memory is a round trip (the conv window indexed by d_conv at run time
    once put one in conv_xproj and the persistent kernel). Left out: conv_xproj's buckets above
    XPROJ_FOLD_MAX_ROWS, there for experiments only (fp32 at 16 rows spills at its 128-register
    bound). ssm_step_pre stays within 32 registers: 16 blocks of 128 threads per SM, which made it run
    at copy bandwidth at batch 64 (benchmarks/NOTES.md, item 22)."""
    pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC comes with cuda-python")
    cubin, usage = compiler.compile_with_usage(decode_step.program_source(dtype), decode_step.SOURCE, arch)
    assert cubin[:4] == b"\x7fELF"
    tag = DTYPES[dtype][0]
    names = [f"mrt_norm_gemv_{tag}_b1", f"mrt_gemv_residual_{tag}_b2", f"mrt_conv_xproj_{tag}_b1",
             f"mrt_conv_only_{tag}", f"mrt_embed_{tag}", f"mrt_residual_norm_{tag}"]
    names += [f"mrt_ssm_step_{tag}_n{n}" for n in decode_step.STATE_SIZES]
    names += [f"mrt_draw_{tag}"] if arch >= 90 else []  # thread block clusters
    if DTYPES[dtype][2] == 2:  # the persistent kernel, the GEMM path's tensor-core x_proj / dt_proj (16-bit)
        names += [f"mrt_layers_{tag}", f"mrt_conv_xproj_rows_{tag}", f"mrt_dt_rows_{tag}"]
    for name in names:
        assert name.encode() in cubin, name
        assert name in usage, name
    if arch < 90:
        return
    for name, u in usage.items():
        m = re.fullmatch(rf"mrt_conv_xproj_{tag}_b(\d+)", name)
        if m and int(m.group(1)) > decode_step.XPROJ_FOLD_MAX_ROWS:
            continue
        assert (u.stack_frame, u.spill_stores, u.spill_loads) == (0, 0, 0), f"{name}: {u}"
    for n in decode_step.STATE_SIZES:
        assert usage[f"mrt_ssm_step_pre_{tag}_n{n}"].registers <= 32, usage[f"mrt_ssm_step_pre_{tag}_n{n}"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_proj_wg_compiles_for_sm90a(dtype):
    """The GEMM path's wgmma projections (a program of their own, for the architecture-specific sm_90a target):
    three entries per tile width of PJ_NTS (plain, with the residual epilogue, with the row scale), none with a
    stack frame or spills (their accumulators stay in registers: at most 96 floats per thread at NT 192)."""
    pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC comes with cuda-python")
    cubin, usage = compiler.compile_with_usage(decode_step.proj_program_source(dtype), decode_step.SOURCE,
                                               decode_step.PJ_ARCH)
    assert cubin[:4] == b"\x7fELF"
    tag = DTYPES[dtype][0]
    assert sorted(usage) == sorted(f"mrt_proj_wg_{e}{tag}_{nt}" for nt in decode_step.PJ_NTS for e in ("", "res_", "rs_")), \
        sorted(usage)
    for name, u in usage.items():
        assert (u.stack_frame, u.spill_stores, u.spill_loads) == (0, 0, 0), f"{name}: {u}"


def test_shape_limits_are_named():
    assert decode_step.why_unsupported(16, 4, 160, "float16") is None
    assert "d_state 12" in decode_step.why_unsupported(12, 4, 8, "float16")
    assert "d_conv 9" in decode_step.why_unsupported(16, 9, 8, "float16")
    assert "exceeds" in decode_step.why_unsupported(16, 4, 1000, "float16")
    assert "float64" in decode_step.why_unsupported(16, 4, 8, "float64")


# out_proj's tiles in the persistent kernel (decode_step.cu, `layers`): model shapes and grids (SM counts)
LAYERS_SHAPES = pytest.mark.parametrize("dm,d", [(160, 320), (544, 1088), (768, 1536), (1024, 2048), (1536, 3072),
                                                 (2048, 4096), (2560, 5120), (4096, 8192)])
LAYERS_GRIDS = pytest.mark.parametrize("grid", [132, 114, 78, 7])


def _layers_tiles(dm, d, grid):
    """(tiles per row group, tiles, P slots: layers_partials, each block's first tile (grid + 1 bounds),
    owner: the block of a tile, .cu LyWork::owner's formula checked against the bounds)."""
    nc = -(-d // decode_step.BULK_KS)
    nt = dm // 16 * nc
    bounds = [b * nt // grid for b in range(grid + 1)]  # .cu LyWork: t0 (b) = b NT / G

    def owner(t):
        b = ((t + 1) * grid + nt - 1) // nt - 1
        assert bounds[b] <= t < bounds[b + 1], (t, b)
        return b

    return nc, nt, decode_step.layers_partials(dm, d, grid), bounds, owner


@LAYERS_SHAPES
@LAYERS_GRIDS
def test_layers_partial_slots_are_each_written_once(dm, d, grid):
    """The persistent kernel's out_proj exchange (decode_step.cu, `layers`): every block writes the
    partial sums of its run of tiles in a row group into slot (block - the block of the row group's first
    tile); the block with the row group's last tile fills the slots after its own with zeros; a block
    without tiles writes a zero into its slot of the row group its (empty) range starts in. Readers wait
    for every one of the P slots (layers_partials) of every output, so each must be written exactly once
    per layer, for any grid (else the kernel would wait forever or add a stale value)."""
    nc, nt, P, bounds, first_block = _layers_tiles(dm, d, grid)

    writes = {}
    for b in range(grid):
        t0, t1 = bounds[b], bounds[b + 1]
        for t in range(t0, t1):
            rg = t // nc
            if t + 1 == t1 or (t + 1) // nc != rg:  # the end of the block's run in row group rg
                kp = b - first_block(rg * nc)
                writes[kp, rg] = writes.get((kp, rg), 0) + 1
                if (t + 1) % nc == 0:
                    for z in range(kp + 1, P):
                        writes[z, rg] = writes.get((z, rg), 0) + 1
        if t0 == t1 and t0 < nt:
            rg = t0 // nc
            kp = b - first_block(rg * nc)
            if kp >= 0:
                writes[kp, rg] = writes.get((kp, rg), 0) + 1
    assert all(0 <= kp < P for kp, _ in writes), (P, sorted(writes)[-3:])
    missing = [(kp, rg) for kp in range(P) for rg in range(dm // 16) if writes.get((kp, rg), 0) != 1]
    assert not missing, (P, missing[:5])
    assert P == max(first_block(rg * nc + nc - 1) - first_block(rg * nc) + 1 for rg in range(dm // 16))


@LAYERS_SHAPES
@LAYERS_GRIDS
def test_layers_combined_partials_are_each_written_once(dm, d, grid):
    """The persistent kernel's out_proj exchange with the partials combined (from
    decode_step.LY_COMBINE_MIN_DMODEL up): a block whose run of tiles in a row group is not the row
    group's first writes it into slot (block - the block of the row group's first tile), and that run
    is the block's first (so it depends on no other block's out_proj); the first block adds the slots
    of the row group's other blocks that have tiles and writes slot 0, the one every block reads. So
    every slot read is written exactly once per layer, within the P slots (layers_partials), for any
    grid: else the kernel would wait forever or add a stale value."""
    nc, nt, P, bounds, owner = _layers_tiles(dm, d, grid)

    writes, reads = {}, set()
    for b in range(grid):
        t0, t1 = bounds[b], bounds[b + 1]
        for t in range(t0, t1):
            rg = t // nc
            if t + 1 == t1 or (t + 1) // nc != rg:  # the end of the block's run in row group rg
                b0, b1 = owner(rg * nc), owner(rg * nc + nc - 1)
                kp = b - b0
                assert 0 <= kp < P, (b, rg, kp, P)
                writes[kp, rg] = writes.get((kp, rg), 0) + 1
                if kp > 0:
                    assert max(t0, rg * nc) == t0, (b, rg)  # the block's first run
                else:
                    reads |= {(z, rg) for z in range(1, b1 - b0 + 1) if bounds[b0 + z] < bounds[b0 + z + 1]}
    assert all(writes.get((0, rg)) == 1 for rg in range(dm // 16)), "slot 0 of every row group, once"
    assert all(n == 1 for n in writes.values()), sorted(k for k, n in writes.items() if n != 1)[:5]
    assert reads == {k for k in writes if k[0] > 0}, "the first block reads exactly the partials written"


def test_head_argmax_is_taken_by_the_kernel_that_takes_the_head(monkeypatch):
    """Which launch takes a step's greedy argmax (DecodeKernels.takes_argmax / with_argmax, no GPU): the
    persistent kernel exactly when it takes the head (its hw pointer set: decode_step.LY_HEAD), whatever
    HEAD_ARGMAX says; a tensor-core norm_gemv only with HEAD_ARGMAX. with_argmax sets the three argmax
    fields of a copy (the launch it was given untouched) and refuses what the kernels cannot take: the
    persistent kernel at more than one row or with a scratch its 64-bit key cannot sit in (8-byte
    aligned), a launch that takes no argmax."""
    from mamba_rt.errors import InternalError

    k = object.__new__(decode_step.DecodeKernels)  # with_argmax reads nothing of the instance
    grid, scratch, out, host = (132, 1), 0x7F0000001000, 0x7F0000002000, 0x7F0000003000

    def layers(hw):
        a = decode_step.LayersArgs()
        a.hw, a.logits, a.hN = hw, 0x7F0000004000 if hw else 0, 700 if hw else 0
        return decode_step.Launch(None, grid, decode_step.LY_THREADS, 0, a, "layers", coop=True)

    gemv = decode_step.Launch(None, grid, 288, 0, decode_step.NormGemvArgs(), "norm_gemv_bulk_f16_b1")
    for head_argmax in (0, 1):
        monkeypatch.setattr(decode_step, "HEAD_ARGMAX", head_argmax)
        assert decode_step.DecodeKernels.takes_argmax(layers(0x7F0000005000))
        assert not decode_step.DecodeKernels.takes_argmax(layers(0))
        assert decode_step.DecodeKernels.takes_argmax(gemv) == bool(head_argmax)
    ln = layers(0x7F0000005000)
    got = k.with_argmax(ln, 1, out=out, scratch=scratch, out_host=host)
    assert (got.args.amax, got.args.ascr, got.args.amax_host) == (out, scratch, host)
    assert (got.args.hw, got.args.hN, got.grid, got.coop, got.name) == (ln.args.hw, 700, grid, True, "layers")
    assert (ln.args.amax, ln.args.ascr, ln.args.amax_host) == (None, None, None), "the launch given was changed"
    with pytest.raises(InternalError, match="1 row"):
        k.with_argmax(ln, 2, out=out, scratch=scratch)
    with pytest.raises(InternalError, match="8-byte aligned"):
        k.with_argmax(ln, 1, out=out, scratch=scratch + 4)
    with pytest.raises(InternalError, match="persistent kernel with the head"):
        k.with_argmax(layers(0), 1, out=out, scratch=scratch)
