"""Torch-free launcher of the fused decode-step kernels (decode_step.cu): pointers (ints) in, kernels
enqueued on a stream. The torch backend (mamba_rt.runtime.fused_decode) drives it.

One NVRTC program per activation dtype and architecture holds every entry point; it is compiled on
first use and cached on disk like the op kernels (compiler.py), under a key of the source hash, the
architecture and the NVRTC version. On sm_90 and newer the kernels are launched with programmatic
dependent launch (``cuLaunchKernelEx`` with programmatic stream serialization): a kernel starts while
the previous one drains and loads its first weights (the tensor-core GEMVs into registers, the FMA
ones also into L2), then waits (``griddepcontrol.wait``) for the previous kernel's results. Stream capture keeps that dependency in a CUDA graph.
"""
from __future__ import annotations

import ctypes
import functools
import struct
import threading
from typing import NamedTuple

from mamba_rt.errors import InternalError, UnsupportedError

from . import compiler, launcher
from .compiler import DTYPES

SOURCE = "decode_step.cu"
GEMV_THREADS, XP_THREADS, XP_CH, SSM_THREADS, ROW_THREADS, CONV_THREADS = 512, 256, 64, 128, 512, 256  # .cu
ARGMAX_THREADS = 1024
PENALIZE_THREADS = 256  # .cu
ARGMAX_CHUNK = 8 * ARGMAX_THREADS  # logits per argmax block
DRAW_CLUSTER, DRAW_THREADS, DRAW_ITEMS = 8, 512, 16  # .cu: a cluster of blocks per row, tokens per thread
DRAW_MAX_VOCAB = DRAW_CLUSTER * DRAW_THREADS * DRAW_ITEMS  # the row in the cluster's registers
MAX_CONV = 8
RN_ITEMS = 8              # .cu: columns per thread residual_norm holds in registers
MAX_XDBL = 1024           # r + 2n held in shared memory by ssm_step and ssm_out
GEMV_BUCKETS = (1, 2)   # beyond 2 rows the shared-memory reads of x bound the GEMV kernels
# GEMM path: buckets of at most this many rows x d_inner compute dt_proj inside ssm_step (each block
# reads its channels' dt_proj rows from L2, once per batch row) instead of a cuBLAS GEMM feeding
# ssm_step_pre. H100 fp16, GPU ms per step, GEMM / inside: 130m batch 4 0.651 / 0.607, 8 0.656 / 0.611,
# 16 0.677 / 0.639, 64 0.803 / 0.820; 2.8b batch 4 3.385 / 3.257, 8 3.753 / 3.724, 16 3.966 / 4.092,
# 64 5.07 / 6.28 (benchmarks/NOTES.md, item 25): inside wins up to ~40k rows x channels.
DT_FOLD_MAX_ROW_CHANNELS = 49152
# conv_xproj entry points (.cu MRT_DECODE_XP): conv update + SiLU + x_proj share for these many rows
XP_BUCKETS = (1, 2, 4, 8, 16)
# GEMM path: buckets of at most this many rows that also compute dt_proj inside ssm_step take x_proj
# in conv_xproj (its share of the sums added into a float32 accumulator, zeroed once per step) instead
# of a cuBLAS GEMM (split-K, ~7 us on the H100 whatever the rows: benchmarks/NOTES.md, item 32)
XPROJ_FOLD_MAX_ROWS = 8
# GEMM path, 16-bit dtypes: buckets of ROWS_MIN_ROWS..ROWS_MAX_ROWS rows of models with d_inner of at least
# ROWS_MIN_DINNER run conv_xproj_rows (conv + x_proj's share on the tensor cores, added into a float32
# accumulator) and dt_rows (dt_proj on the tensor cores) before ssm_step_pre, instead of conv_only and the
# x_proj and dt_proj GEMMs (0: never). H100 fp16, GPU ms per step, GEMMs / ours, same process
# (benchmarks/NOTES.md, item 56): batch 16: 130m 0.651 / 0.654, 1.4b 2.424 / 2.253, 2.8b 3.973 / 3.837;
# batch 64: 130m 0.806 / 0.823, 1.4b 3.060 / 3.037, 2.8b 5.068 / 5.148
ROWS_MIN_ROWS, ROWS_MAX_ROWS, ROWS_MIN_DINNER = XPROJ_FOLD_MAX_ROWS + 1, 16, 4096
# GEMM path, 16-bit dtypes: buckets of DT_ROWS_MIN_ROWS..DT_ROWS_MAX_ROWS rows (DT_ROWS_MAX_ROWS_BIG for the models
# whose in_proj has PROJ_WG_BIG_BYTES) where proj_wg takes x_proj (and neither rows_path nor the dt_proj fold applies)
# write x_proj's sums in float32 and run dt_proj in dt_rows (which rounds them to T, as the reference's x_proj
# output), in row blocks of at most DT_ROWS_BLOCK_ROWS rows and at least two, instead of a cuBLAS GEMM, whose launch
# also ends the programmatic launch chain (DT_ROWS_MIN_ROWS 0: never). H100 fp16, GPU ms per step, GEMM / this, same
# process (benchmarks/NOTES.md, item 90): 130m 0.571 / 0.571 at 24 rows, 0.630 / 0.616 at 32, 0.779 / 0.725 at 64,
# 0.893 / 0.851 at 96, 0.962 / 0.927 at 128; 790m 1.768 / 1.674, 1.868 / 1.744, 2.257 / 2.150, 2.680 / 2.574, 2.944
# / 2.842; 370m 1.996 / 1.917 at 96, 2.158 / 2.123 at 128; 1.4b 2.227 / 2.162 at 24, 2.299 / 2.260 at 32; 2.8b
# 3.782 / 3.716, 3.883 / 3.821. Past 32 rows the big models gain nothing or lose (1.4b 2.830 / 2.829 at 64, 3.790 /
# 3.858 at 128; 2.8b 4.739 / 4.768 at 64, 6.362 / 6.485 at 128; the cuBLAS dt_proj kernel of 2.8b's 64 rows takes
# 3.3 us)
DT_ROWS_MIN_ROWS, DT_ROWS_MAX_ROWS, DT_ROWS_MAX_ROWS_BIG, DT_ROWS_BLOCK_ROWS = 17, 128, 32, 32
XR_CH, XR_ROWS, XR_THREADS = 128, 32, 512  # .cu conv_xproj_rows: channels (the mma's K) and rows per block
DR_CH, DR_ROWS, DR_THREADS = 32, 64, 256  # .cu dt_rows: channels and (at most) rows per block
ROWS_MAX_R = 512                          # .cu: r + 2n (and so r) limit of the two kernels
# GEMM path, 16-bit dtypes on sm_90 (Hopper): which projections our wgmma kernel proj_wg computes instead of cuBLAS,
# a mask of PROJ_IN, PROJ_X, PROJ_DT, PROJ_OUT, PROJ_HEAD (0: cuBLAS for all). .cu: a block of PJ_THREADS owns NT (one
# of PJ_NTS) rows of W for PJ_M batch rows, over stages of PJ_ATOMS boxes of PJ_ATOM columns; K split over up to
# max(PJ_SPLITS) blocks (a cluster; the plan tries each of PJ_SPLITS)
PROJ_IN, PROJ_X, PROJ_DT, PROJ_OUT, PROJ_HEAD = 1, 2, 4, 8, 16
# PROJ_WG for buckets of up to PROJ_WG_ROWS rows, PROJ_WG_MANY up to PJ_M, PROJ_WG_WIDE above (two or more row blocks,
# each reading all of W). H100 fp16, GPU ms per step in the same process (benchmarks/NOTES.md, item 58), against x_proj
# and the head alone (18): in_proj and out_proj too (27) at 4-32 rows 1-8 % faster on 130m, 790m, 1.4b and 2.8b; at 64
# rows within +-2 % either way, at 128 slower; dt_proj (4) slower everywhere. At 96 and 128 rows x_proj alone (2) is
# 1-3 % faster than with the head
PROJ_WG = PROJ_IN | PROJ_X | PROJ_OUT | PROJ_HEAD
PROJ_WG_MANY, PROJ_WG_ROWS, PROJ_WG_WIDE = PROJ_X | PROJ_HEAD, 32, PROJ_X
# ... except that models whose in_proj has at least PROJ_WG_BIG_BYTES take PROJ_WG_MANY_BIG up to PJ_M rows, in_proj
# then planned with K unsplit where that keeps within PJ_MAX_CHAIN. Same process, 64 rows, 18 / this: 1.4b 2.924 /
# 2.824, 2.8b 4.931 / 4.852; 130m 0.789 / 0.819 and 790m 2.272 / 2.328 were slower with it (so not theirs)
PROJ_WG_MANY_BIG, PROJ_WG_BIG_BYTES = PROJ_IN | PROJ_X | PROJ_OUT | PROJ_HEAD, 32 << 20
PJ_THREADS, PJ_M, PJ_ATOM, PJ_ATOMS = 128, 64, 64, 4  # .cu: a stage is PJ_ATOMS boxes of PJ_ATOM columns
PJ_KT = PJ_ATOM * PJ_ATOMS
PJ_NTS = (16, 24, 32, 40, 48, 64, 80, 96, 128, 192)
PJ_MAX_STAGES, PJ_SPLITS = 16, (1, 2, 4, 8)
# proj_plan prefers plans whose blocks each run at most this many stages (1.4b's out_proj at 4-8 rows on one block
# per 16 rows over all 16 stages of K was 2 us per layer slower than cuBLAS: a chain of dependent stages)
PJ_MAX_CHAIN = 12
# proj_plan's fixed cost of a block, and the extra of a split's cluster reduction, in bytes of its busiest SM's stream
PJ_FIXED, PJ_CLUSTER = 23_000, 23_000
PJ_ARCH = "90a"  # wgmma: the architecture-specific target of sm_90
# the residual add and RMSNorm between out_proj and the next projection in their epilogues (DecodeKernels.with_residual
# / with_row_scale) instead of residual_norm, where proj_wg runs both, in buckets of up to this many rows (0: never).
# H100 fp16, GPU ms per step, residual_norm / epilogues in one process, 8 / 16 / 32 / 64 rows: 2.8b 3.398 / 3.332,
# 3.677 / 3.637, 3.945 / 3.897, 4.874 / 4.905 (slower); 1.4b 1.847 / 1.823, 2.083 / 2.058, 2.362 / 2.306, 2.858 / 2.841;
# 130m 0.516 / 0.494, 0.551 / 0.546, 0.642 / 0.631 (benchmarks/NOTES.md, item 89)
PROJ_RESIDUAL_ROWS = 32
STATE_SIZES = (4, 8, 16, 32, 64)
SMEM_DEFAULT = 48 * 1024
PREFETCH_BYTES = 24 << 20  # per GEMV launch, prefetched into L2 before waiting on the previous kernel
MMA_WARPS, MMA_THREADS = 8, 256  # .cu: the tensor-core GEMV kernels (16-bit dtypes)
MMA_BUCKETS = (1, 2)  # batch rows the tensor-core GEMVs take (the kernels allow 8; 4 and 8 lost to cuBLAS)
MMA_BLOCKS_PER_SM = 0  # cap on resident tensor-core GEMV blocks per SM (0: as many as fit); 1 measured slower
# .cu: the copy-engine GEMV kernels (16-bit dtypes, sm_90+): consumer warps + one producer warp, stages of
# 16 rows x BULK_KS columns (rows padded by 16 bytes), ring of BULK_STAGES[0]..[1] stages, two blocks per
# SM where that many stages fit (one otherwise)
BULK_WARPS, BULK_THREADS, BULK_KS = 8, 288, 512
BULK_STAGE_BYTES = 16 * (BULK_KS * 2 + 16)
BULK_STAGES = (4, 6)
BULK_BLOCKS_PER_SM = 2  # preferred resident blocks (1 where fewer than BULK_STAGES[0] stages fit two)
# .cu `layers`: every layer of a batch-1 step in one persistent kernel (16-bit dtypes, sm_90+), one block
# of LY_THREADS per SM, in_proj in units of LY_CH channels, a ring of LY_STAGES[0]..[1] stages
LAYERS_KERNEL = 1  # 0: the four kernels per layer even where the persistent one applies
# The persistent kernel from this d_model up (0: every size), where ssm_out does not serve the shape (up to d_model
# 1024 it does: three kernels per layer). H100 fp16, GPU ms per step, four kernels / persistent, same process: of
# the load-fed tensor-core kind (benchmarks/NOTES.md, item 42) 130m (768) 0.321 / 0.325, 370m (1024) 0.752 / 0.684,
# 790m (1536) 1.162 / 1.010; of the copy-engine kind (item 76) 130m 0.288 / 0.306, 370m 0.693 / 0.625, 790m
# 1.060 / 0.845, 1.4b 1.491 / 1.094, 2.8b 2.662 / 2.123; ssm_out's three kernels / persistent (item 82) 370m
# 0.570 and 0.594 / 0.628 (bf16 0.576 / 0.617)
LY_MIN_DMODEL = 1024
LY_WARPS, LY_THREADS, LY_CH = BULK_WARPS, BULK_THREADS, 8
LY_MAX_DMODEL = 16 * LY_WARPS * 32  # .cu LY_HV values of h per consumer thread
LY_MAX_DINNER = 4 * 8 * LY_WARPS * 32  # .cu LY_YV loads of four y words per consumer thread
LY_STAGES = (4, 16)
# in_proj's rows of a block in the order x then z (1): x_proj's share and its grid barrier's arrival come
# after the x rows, and streaming the z rows covers the barrier; 0: unit by unit, x_proj after them all
LY_XFIRST = 1
# groups of in_proj rows between x_proj's share (its atomics) and the barrier's arrival, whose fence waits
# for those atomics to be performed: later, it finds them done (at most the block's last group)
LY_ARRIVE_LAG = 1
# From this d_model up, out_proj's partial sums of a row group are added up by the row group's first block,
# which runs its share last, into the one slot every block then reads; below, every block reads all of
# them. H100 fp16, GPU ms per step, every block / combined, same process (benchmarks/NOTES.md, item 45):
# 370m 0.678 / 0.791, 790m 1.011 / 1.087, 1.4b 1.270 / 1.278, 2.8b (d_model 2560) 2.316 / 2.272.
LY_COMBINE_MIN_DMODEL = 2560
# out_proj's partial sums of every output read at most this many slots per round trip (1 or 2) at a layer's
# start: 2 where two slots' words fit the registers that hold one (d_model <= LY_MAX_DMODEL / 2) and the
# partials are not combined. H100 fp16, GPU ms per step, 1 / 2, same process (benchmarks/NOTES.md, item 46):
# 1.4b 1.218 / 1.180 (2.8b, combined, 2.147 / 2.142: unchanged)
LY_PARTIALS_PER_LOAD = 2
# The GEMV path's head (norm_gemv over the vocabulary, tensor-core kinds) also takes the greedy argmax of its
# outputs (1), instead of the argmax kernel after it (0). H100 fp16, GPU ms per step, 0 / 1, same process
# (benchmarks/NOTES.md, item 51): 130m 0.3234 / 0.3209, 1.4b 1.2023 / 1.1947, 2.8b 2.2044 / 2.2020
HEAD_ARGMAX = 1
# bytes of the head's weights (its first rows: the first units of its blocks) the persistent kernel prefetches
# into L2 once its last layer's weights are issued, while its last exchanges run and the head starts (0: none).
# H100 fp16, GPU ms per step, same process (benchmarks/NOTES.md, item 51): 0 / 16 / 32 MB 1.4b 1.195 / 1.200 /
# 1.201, 2.8b 2.203 / 2.184 / 2.194; on another instance 0 / 8 / 16 MB 1.4b 1.200 / 1.200 / 1.200, 2.8b 2.203 /
# 2.190 / 2.198
LY_HEAD_PREFETCH = 8 << 20
# The persistent kernel also takes the head (1: the final norm, the logits and the greedy argmax, its weights
# streamed by each block's producer straight after the last layer's), instead of norm_gemv after it (0; where
# the head's weights are not 16-byte aligned, too). Measured: benchmarks/NOTES.md, item 69
LY_HEAD = 1
# The kernels that take a step's tokens (the head's argmax, the argmax kernel, the draw kernel) also store them
# in the graph's mapped pinned host buffer (1), instead of a device-to-host copy node after them (0); where the
# buffer is not mapped (launcher.mapped_host_address) the copy stays. H100 fp16, GPU µs per batch-1 step, same
# process (benchmarks/NOTES.md, item 68): the copy node cost 8.1 (130m) and 9.9 (1.4b)
IDS_TO_HOST = 1
# A step queued ahead (its ids those the step before left on the device) has its embedding read them where
# they are (1), instead of a device-to-device copy node into the step's input first (0). H100 fp16, GPU µs
# per batch-1 step, same process (benchmarks/NOTES.md, item 68)
NEXT_IDS_IN_PLACE = 1
# The persistent kernel's step has its x_proj accumulators, grid barrier and head counter zeroed by the
# embedding kernel before it (1: `layers` and the head touch them only after griddepcontrol.wait), instead
# of by a memset node first (0). H100 fp16, GPU µs per batch-1 step, same process (benchmarks/NOTES.md,
# item 68)
EMBED_ZEROES = 1
LY_PTRS = 14  # .cu LayerPtrs: pointers per layer
# .cu ssm_out: the state update and out_proj in one kernel (1) on the GEMV path's layers where the persistent kernel
# does not run them (16-bit dtypes, d_state in SO_STATES, d_model up to SO_MAX_DMODEL), instead of ssm_step and
# gemv_residual (0). H100, GPU ms per step queued ahead, 0 / 1, same process (benchmarks/NOTES.md, item 80): fp16
# 130m batch 1 0.296 / 0.257, batch 2 0.362 / 0.316 (32 channels a block; 16 since, item 81: 0.242 / 0.288)
SSM_OUT = 1
ACC_KV = 4  # .cu: residual values per row and thread of norm_gemv with an out_proj accumulator (ssm_out)
SO_CH, SO_THREADS, SO_STATES, SO_ITERS = 16, 256, (4, 8, 16), 8
SO_MAX_DMODEL = SO_ITERS * (SO_THREADS // 32) * (32 // (SO_CH // 8))  # out_proj's rows in a block's registers
GEMV_KINDS = ("fma", "mma", "bulk")  # FMA loop, tensor cores fed by loads, tensor cores fed by the copy engine


def _up16(v: int) -> int:
    return -(-v // 16) * 16


class LayersLaunch(NamedTuple):
    """The persistent `layers` kernel's launch for one shape (DecodeKernels.layers_launch)."""
    grid: int     # blocks: one per SM
    smem: int     # dynamic shared bytes
    stages: int   # the ring's stages
    P: int        # out_proj's partial-sum slots per output (layers_partials)
    xfirst: int   # LY_XFIRST
    lag: int      # LY_ARRIVE_LAG
    combine: int  # out_proj's partials added up by each row group's first block (LY_COMBINE_MIN_DMODEL)
    pw: int       # partial-sum slots read per round trip (LY_PARTIALS_PER_LOAD)


def layers_smem(dm: int, d: int, n: int, r: int, k: int, stages: int, grid: int) -> tuple[int, int]:
    """(bytes of the ring's stages, bytes of everything else) of `layers`' shared memory: .cu LyLayout."""
    ch = LY_CH * -(-(d // LY_CH) // grid)
    R = r + 2 * n
    head = (_up16(8 * (2 * stages + 2)) + 2 * LY_WARPS * 16 * 4 + _up16(LY_WARPS * 4) + _up16(max(dm, d) * 2)
            + _up16(2 * ch * 4) + _up16(R * 4))
    side = (_up16(ch * (k - 1) * 2) + _up16(ch * k * 2) + _up16(ch * 2) + _up16(ch * R * 2)
            + _up16(ch * r * 2) + _up16(ch * 4) + _up16(ch * n * 4) + _up16(ch * 4) + _up16(ch * n * 4))
    return stages * BULK_STAGE_BYTES, head + side


def layers_partials(dm: int, d: int, grid: int) -> int:
    """Partial sums per out_proj output of `layers` (.cu: the most blocks whose out_proj tiles share a
    row group; tile t of (dm / 16) x ceil(d / BULK_KS), row-group major, in the block b with
    b NT / G <= t < (b + 1) NT / G)."""
    nc = -(-d // BULK_KS)
    nt = dm // 16 * nc

    def owner(t):
        return ((t + 1) * grid + nt - 1) // nt - 1

    return max(owner(rg * nc + nc - 1) - owner(rg * nc) + 1 for rg in range(dm // 16))


def residual_norm_threads(K: int) -> int:
    """Threads per row of residual_norm: enough warps to hold the row in registers (RN_ITEMS columns
    each), at least 4 and at most ROW_THREADS (wider rows loop over the rest). Fewer threads for narrow
    rows leave room for more rows per SM (prompts: a block per token): 4 warps for mamba-130m's 768."""
    per = -(-K // RN_ITEMS)
    return min(ROW_THREADS, max(128, -(-per // 32) * 32))


def why_unsupported(d_state: int, d_conv: int, dt_rank: int, dtype: str) -> str | None:
    """None when the fused decode kernels serve this model shape, else why not."""
    if dtype not in DTYPES:
        return f"fused decode: dtype {dtype!r} is not one of {tuple(DTYPES)}"
    if d_state not in STATE_SIZES:
        return f"fused decode: d_state {d_state} is not one of {STATE_SIZES}"
    if not 2 <= d_conv <= MAX_CONV:
        return f"fused decode: d_conv {d_conv} is outside 2..{MAX_CONV}"
    if dt_rank + 2 * d_state > MAX_XDBL:
        return f"fused decode: dt_rank + 2 * d_state = {dt_rank + 2 * d_state} exceeds {MAX_XDBL}"
    return None


# ---------------------------------------------------------------------------------------------------
# compilation


DEFINES: dict[str, int] = {}  # tuning macros of decode_step.cu (MRT_MMA_U1, ...): for experiments


def program_source(dtype: str, entries: str | None = None) -> str:
    """decode_step.cu with the tuning macros (DEFINES) and one entry-point macro instantiated for ``dtype``: by
    default every decode entry; "MRT_DECODE_PROJ" for the wgmma projections (a program of their own, sm_90a)."""
    tag, ctype, _ = DTYPES[dtype]
    head = "".join(f"#define {k} {v}\n" for k, v in sorted(DEFINES.items()))
    if entries is None:
        entries = "MRT_DECODE_ENTRIES_16" if DTYPES[dtype][2] == 2 else "MRT_DECODE_ENTRIES"
    return head + compiler._read(SOURCE) + f"\n{entries}({tag}, {ctype})\n"


def proj_program_source(dtype: str) -> str:
    return program_source(dtype, "MRT_DECODE_PROJ")


def cache_key(dtype: str, arch: int | str, source: str | None = None, name: str = "decode_step") -> str:
    major, minor = compiler.nvrtc_version()
    digest = compiler.source_digest(program_source(dtype) if source is None else source, compiler.OPTIONS)
    return f"{name}-{dtype}-sm{arch}-src{digest}-nvrtc{major}.{minor}"


def compile_cubin(dtype: str, arch: int) -> bytes:
    """NVRTC-compile every decode entry point of ``dtype`` for sm_<arch> (no cache)."""
    if dtype not in DTYPES:
        raise UnsupportedError(f"fused decode: dtype {dtype!r} is not one of {tuple(DTYPES)}")
    return compiler.compile_program(program_source(dtype), SOURCE, arch)


def get_cubin(dtype: str, arch: int) -> bytes:
    """The cubin from this process's memory or the disk cache, else compiled and cached (compiler.py)."""
    return compiler.cached_cubin(cache_key(dtype, arch), lambda: compile_cubin(dtype, arch))


def get_proj_cubin(dtype: str) -> bytes:
    """The wgmma projections' cubin (sm_90a), cached like get_cubin's."""
    src = proj_program_source(dtype)
    return compiler.cached_cubin(cache_key(dtype, PJ_ARCH, src, "decode_proj"),
                                 lambda: compiler.compile_program(src, SOURCE, PJ_ARCH))


# ---------------------------------------------------------------------------------------------------
# argument structs (field for field as in decode_step.cu)

_P, _L, _F = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_float


def _struct(name, fields):
    return type(name, (ctypes.Structure,), {"_fields_": fields})


NormGemvArgs = _struct("NormGemvArgs", [("h", _P), ("ss", _P), ("norm_w", _P), ("W", _P), ("bias", _P),
                                        ("out", _P), ("ctr", _P), ("G", _L), ("N", _L), ("K", _L), ("out_float", _L),
                                        ("param", _L), ("eps", _F), ("amax", _P), ("ascr", _P),
                                        ("amax_host", _P)])
GemvResidualArgs = _struct("GemvResidualArgs", [("y", _P), ("W", _P), ("bias", _P), ("h", _P), ("ss_out", _P),
                                                ("ctr", _P), ("N", _L), ("K", _L), ("res_fp32", _L), ("param", _L)])
EmbedArgs = _struct("EmbedArgs", [("ids", _P), ("emb", _P), ("h", _P), ("ss_out", _P), ("norm_w", _P),
                                  ("xn", _P), ("B", _L), ("V", _L), ("K", _L), ("eps", _F), ("zero", _P),
                                  ("nzero", _L), ("seen", _P), ("idx", _P), ("seen_w", _L), ("slots", _L)])
PenalizeArgs = _struct("PenalizeArgs", [("x", _P), ("idx", _P), ("seen", _P), ("r", _P), ("V", _L), ("W", _L),
                                        ("slots", _L)])
ArgmaxArgs = _struct("ArgmaxArgs", [("x", _P), ("out", _P), ("pv", _P), ("pi", _P), ("tk", _P), ("V", _L),
                                    ("out_host", _P)])
DrawArgs = _struct("DrawArgs", [("x", _P), ("knobs", _P), ("out", _P), ("V", _L), ("out_host", _P)])
ResidualNormArgs = _struct("ResidualNormArgs", [("h", _P), ("o", _P), ("norm_w", _P), ("xn", _P), ("K", _L),
                                                ("res_fp32", _L), ("eps", _F)])
ConvXprojArgs = _struct("ConvXprojArgs", [("xz", _P), ("conv_state", _P), ("idx", _P), ("conv_w", _P),
                                          ("conv_b", _P), ("Wx", _P), ("u", _P), ("xdbl", _P),
                                          ("d", _L), ("k", _L), ("R", _L), ("B", _L)])
LayersArgs = _struct("LayersArgs", [("L", _P), ("idx", _P), ("h", _P), ("ss", _P), ("hbuf", _P), ("xacc", _P),
                                    ("part", _P), ("y", _P), ("stepc", _P), ("bar", _P), ("n_layer", _L), ("dm", _L),
                                    ("d", _L), ("n", _L), ("r", _L), ("k", _L), ("res_fp32", _L), ("stages", _L),
                                    ("P", _L), ("xfirst", _L), ("lag", _L), ("combine", _L), ("pw", _L),
                                    ("eps", _F), ("pf", _P), ("pf_bytes", _L), ("hw", _P), ("hnorm", _P),
                                    ("logits", _P), ("hN", _L), ("amax", _P), ("ascr", _P), ("amax_host", _P)])
SsmStepArgs = _struct("SsmStepArgs", [("xdbl_acc", _P), ("xdbl_t", _P), ("delta", _P), ("Wdt", _P),
                                      ("dt_bias", _P), ("A", _P), ("D", _P), ("u", _P), ("xz", _P),
                                      ("ssm_state", _P), ("idx", _P), ("y", _P), ("d", _L), ("r", _L), ("R", _L),
                                      ("B", _L)])
SsmOutArgs = _struct("SsmOutArgs", [("s", SsmStepArgs), ("Wo", _P), ("bias", _P), ("acc", _P), ("dm", _L)])


ProjArgs = _struct("ProjArgs", [("tmx", _P), ("tmw", _P), ("bias", _P), ("out", _P), ("ldo", _L), ("B", _L),
                                ("N", _L), ("K", _L), ("kchunk", _L), ("out_float", _L), ("stages", _L),
                                ("xbox", _L)])
ProjNorm = _struct("ProjNorm", [("res_h", _P), ("res_w", _P), ("ss_out", _P), ("ss_in", _P), ("ss_tiles", _L),
                                ("res_fp32", _L), ("eps", _F)])
ProjNormArgs = _struct("ProjNormArgs", [("p", ProjArgs), ("e", ProjNorm)])
TMAP_BYTES = 128  # a TMA tensor map (CUtensorMap)


class ProjPlan(NamedTuple):
    """proj_wg's launch for one shape (DecodeKernels.proj_plan)."""
    nt: int       # W rows per block (the entry point's tile width)
    split: int    # blocks over K (a cluster along y), each kchunk columns
    kchunk: int
    stages: int
    grid: tuple[int, int, int]
    smem: int


class Launch:
    """One prepared kernel launch: function, grid, block, dynamic shared memory, argument struct, and a
    name for messages (the entry point's stem for the GEMVs)."""

    __slots__ = ("fn", "grid", "block", "smem", "args", "name", "coop", "cluster_y", "tile")

    def __init__(self, fn, grid, block, smem, args, name, coop=False, cluster_y=1, tile=0):
        self.fn, self.grid, self.block, self.smem, self.args, self.name = fn, grid, block, smem, args, name
        self.coop = coop  # cooperative launch: every block resident at once (the persistent kernel)
        self.cluster_y = cluster_y  # blocks per cluster along y (1: no cluster)
        self.tile = tile  # proj_wg: its plan's NT

    def with_fields(self, **fields) -> "Launch":
        """This launch (everything kept) with a copy of its argument struct whose ``fields`` are set."""
        a = type(self.args).from_buffer_copy(self.args)
        for k, v in fields.items():
            setattr(a, k, v)
        return Launch(self.fn, self.grid, self.block, self.smem, a, self.name, self.coop, self.cluster_y, self.tile)


class DecodeKernels:
    """The decode kernels of one dtype, loaded in the current CUDA context (torch's, in the backend)."""

    def __init__(self, dtype: str, pdl: bool | None = None, gemv: str | None = None):
        if dtype not in DTYPES:
            raise UnsupportedError(f"fused decode: dtype {dtype!r} is not one of {tuple(DTYPES)}")
        drv = launcher._driver()
        self.tag, self.itemsize = DTYPES[dtype][0], DTYPES[dtype][2]
        self.arch = launcher.current_arch()
        if self.arch < compiler.MIN_ARCH:
            raise UnsupportedError(f"fused decode needs compute capability 8.0 or newer, this GPU is "
                                   f"{self.arch // 10}.{self.arch % 10}")
        dev = launcher._cu(drv.cuCtxGetDevice(), "cuCtxGetDevice")
        attr = drv.CUdevice_attribute
        self.sm_count = launcher._cu(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev),
                                     "sm count")
        self.smem_optin = launcher._cu(drv.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev), "smem opt-in")
        self.smem_sm = launcher._cu(drv.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR, dev), "smem per SM")
        self.pdl = (self.arch >= 90) if pdl is None else bool(pdl and self.arch >= 90)
        # The GEMVs' kind: the fastest this dtype and GPU allow (16-bit: tensor cores, fed by the copy
        # engine on sm_90+), or the one asked for where it applies (matrices it cannot take fall back
        # to the next kind: bulk -> mma -> fma). Until session 35 models with an in_proj under 8 MiB
        # (mamba-130m) kept the load-fed kind, faster for them in session 5; GemvBulk has since become
        # 5 % faster there at batch 1 and 7 % at batch 2 (benchmarks/NOTES.md, items 75-76).
        if gemv is not None and gemv not in GEMV_KINDS:
            raise UnsupportedError(f"fused decode: GEMV kind {gemv!r} is not one of {GEMV_KINDS}")
        best = "fma" if self.itemsize != 2 else ("bulk" if self.arch >= 90 else "mma")
        self.gemv = best if gemv is None or GEMV_KINDS.index(gemv) > GEMV_KINDS.index(best) else gemv
        self.module = launcher._cu(drv.cuModuleLoadData(get_cubin(dtype, self.arch)), "cuModuleLoadData(decode_step)")
        self.dtype = dtype
        self._proj_module = None  # the wgmma projections' program, loaded at first use (proj_plan)
        self._proj_clusters: dict[tuple[int, int, int], int] = {}  # (nt, split, smem) -> clusters resident at once
        self._fns: dict[str, object] = {}
        self._lock = threading.Lock()

    def _fn(self, stem: str, module=None):
        name = f"mrt_{stem}"
        with self._lock:
            fn = self._fns.get(name)
            if fn is None:
                drv = launcher._driver()
                fn = launcher._cu(drv.cuModuleGetFunction(self.module if module is None else module, name.encode()),
                                  f"cuModuleGetFunction({name})")
                fa = drv.CUfunction_attribute
                static = launcher._cu(drv.cuFuncGetAttribute(fa.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn), name)
                if static + SMEM_DEFAULT < self.smem_optin:  # let the GEMV kernels hold long rows
                    launcher._cu(drv.cuFuncSetAttribute(fn, fa.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                        self.smem_optin - static), f"cuFuncSetAttribute({name})")
                self._fns[name] = fn
        return fn

    def _xs_red_bytes(self, bm: int, k: int, warps: int) -> int:
        """Shared bytes of a tensor-core GEMV's x (bm rows of k, 16-byte rounded) and its cross-warp
        reduction (two buffers of warps x 16 x bm floats)."""
        return -(-bm * k * self.itemsize // 16) * 16 + 2 * warps * 16 * bm * 4

    def gemv_fits(self, bm: int, *ks: int, aligned: bool = True) -> bool:
        """Whether the GEMV kernels serve bm rows for matrices with rows of every length in ks (model
        dtype) whose weights are 16-byte ``aligned``: bm in MMA_BUCKETS (tensor cores) or GEMV_BUCKETS
        (FMA), as far as x fits their shared memory."""
        k = max(ks)
        if all(self._use_mma(bm, x, aligned) for x in ks):
            return self._xs_red_bytes(bm, k, MMA_WARPS) <= self.smem_optin - 4096
        return bm in GEMV_BUCKETS and bm * k * 4 <= self.smem_optin - 4096

    def _resident(self, stem: str, threads: int, smem: int) -> int:
        """Blocks of ``stem`` that fit on one multiprocessor at once (registers, threads, shared memory)."""
        drv = launcher._driver()
        n = launcher._cu(drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(self._fn(stem), threads, smem),
                         f"occupancy({stem})")
        if n < 1:
            raise InternalError(f"fused decode: {stem} does not fit on a multiprocessor ({threads} threads, "
                                f"{smem} bytes of shared memory)")
        return n

    def _gemv_grid(self, stem: str, n: int, smem: int) -> int:
        """One wave: as many blocks as are resident at once (never more than the rows need)."""
        return max(1, min(-(-n // (GEMV_THREADS // 32)), self.sm_count * self._resident(stem, GEMV_THREADS, smem)))

    def _use_mma(self, bm: int, k: int, aligned: bool) -> bool:
        """Whether the tensor-core GEMV takes W [*, k] for bm rows: 16-bit dtype (kind not "fma"), whole
        16-byte vectors per row, W 16-byte ``aligned``."""
        return self.gemv != "fma" and bm in MMA_BUCKETS and k % 8 == 0 and aligned

    def _bulk_launch(self, stem: str, bm: int, n: int, k: int, w: int) -> tuple[int, int, int] | None:
        """(grid, shared bytes, stages) of the copy-engine GEMV for W [n, k] at address w, or None where
        it does not apply (kind, whole 16-wide steps per row, alignment) or too few stages fit: as many
        stages (up to BULK_STAGES[1]) as fit two blocks per SM, else one block with more; one wave of
        blocks, which take units of 16 rows (their own, then from a counter)."""
        if self.gemv != "bulk" or not self._use_mma(bm, k, w % 16 == 0) or k % 16:
            return None
        head = self._xs_red_bytes(bm, k, BULK_WARPS)
        tries = ((2, BULK_STAGES[1]), (1, 2 * BULK_STAGES[1]))
        for per_sm, most in tries[2 - BULK_BLOCKS_PER_SM:]:
            room = min(self.smem_sm // per_sm - 1024 - 1024, self.smem_optin - 1024) - head  # static + reserve
            stages = min(most, (room - 16) // (BULK_STAGE_BYTES + 20))
            if stages >= BULK_STAGES[0]:
                smem = head + -(-20 * stages // 16) * 16 + stages * BULK_STAGE_BYTES
                per_sm = min(per_sm, self._resident(stem, BULK_THREADS, smem))
                return min(-(-n // 16), self.sm_count * per_sm), smem, stages
        return None

    def _mma_launch(self, stem: str, bm: int, n: int, k: int) -> tuple[int, int]:
        """(grid, shared bytes) of a tensor-core GEMV: one wave of blocks, each a contiguous run of rows."""
        smem = self._xs_red_bytes(bm, k, MMA_WARPS)
        per_sm = self._resident(stem, MMA_THREADS, smem)
        if MMA_BLOCKS_PER_SM:
            per_sm = min(per_sm, MMA_BLOCKS_PER_SM)
        rpb = -(-n // (self.sm_count * per_sm))
        return -(-n // rpb), smem

    # -- prepared launches ---------------------------------------------------------------------------
    def _pf_rows(self, grid: int, K: int) -> int:
        """Rows per warp to prefetch into L2 before the wait: at most PREFETCH_BYTES per launch."""
        warps = grid * (GEMV_THREADS // 32)
        return max(1, PREFETCH_BYTES // (warps * K * self.itemsize))

    def _gemv(self, kind: str, bm: int, N: int, K: int, W: int) -> tuple[str, int, int, int, int]:
        """(stem, grid, threads, shared bytes, param) of GEMV ``kind`` (norm_gemv / gemv_residual) for
        W [N, K] at address W: the copy-engine kernel where it applies, else the tensor-core one, else the
        FMA one. param: the ring's stages (bulk) or the rows to prefetch into L2 (FMA)."""
        stem = f"{kind}_bulk_{self.tag}_b{bm}"
        bulk = self._bulk_launch(stem, bm, N, K, W)
        if bulk:
            grid, smem, stages = bulk
            return stem, grid, BULK_THREADS, smem, stages
        if self._use_mma(bm, K, W % 16 == 0):
            stem = f"{kind}_mma_{self.tag}_b{bm}"
            grid, smem = self._mma_launch(stem, bm, N, K)
            return stem, grid, MMA_THREADS, smem, 0
        stem, smem = f"{kind}_{self.tag}_b{bm}", bm * K * 4
        grid = self._gemv_grid(stem, N, smem)
        return stem, grid, GEMV_THREADS, smem, self._pf_rows(grid, K)

    def norm_gemv(self, bm, *, h, ss, G, norm_w, W, bias, out, N, K, out_float, eps, ctr, acc=0,
                  res_fp32=True) -> Launch:
        """ctr: a 32-bit counter for this launch alone, zero when it runs (the copy-engine kernel hands
        out its rows through it). acc: the previous layer's out_proj sums (ssm_out; then ss and G are unused):
        the residual is h + acc, rounded as gemv_residual adds them, which the kernel also writes to the
        bm x K floats after h (.cu NormGemvArgs: passed as ss with G = 0)."""
        stem, grid, threads, smem, pf = self._gemv("norm_gemv", bm, N, K, W)
        if acc:
            if self.itemsize != 2:
                raise InternalError(f"fused decode: norm_gemv takes out_proj's sums for 16-bit models only ({self.dtype})")
            ss, G, out_float = acc, 0, int(out_float) | 2 * bool(res_fp32)
        a = NormGemvArgs(h, ss, norm_w, W, bias or 0, out, ctr, G, N, K, int(out_float), pf, eps, 0, 0, 0)
        return Launch(self._fn(stem), (grid, 1), threads, smem, a, stem)

    @staticmethod
    def takes_argmax(ln: Launch) -> bool:
        """Whether launch ``ln`` takes its outputs' argmax too (with_argmax): the persistent kernel where it
        takes the head (LY_HEAD), or, with HEAD_ARGMAX on (read at each call: the tests and benchmarks switch
        it), a norm_gemv of the tensor-core kinds (the FMA one's tracking took local memory)."""
        if ln.name == "layers":
            return bool(ln.args.hw)
        return bool(HEAD_ARGMAX) and ln.name.startswith(("norm_gemv_mma_", "norm_gemv_bulk_"))

    @staticmethod
    def gemv_argmax_words(ln: Launch, bm: int) -> int:
        """32-bit words of scratch that norm_gemv launch ``ln`` of bm rows needs to take its argmax as
        well (with_argmax): a value and an index per block and row, and a ticket (zero at first, and
        zero again after every launch). The persistent kernel uses the first three (its best key so far,
        64 bits, and a ticket; the same rule)."""
        return 2 * ln.grid[0] * bm + 1

    def with_argmax(self, ln: Launch, bm: int, *, out, scratch, out_host=0) -> Launch:
        """norm_gemv launch ``ln`` (of bm rows), or the persistent kernel's that takes the head (bm 1), that
        also writes out[b] (int64) = the index of the first largest output of row b, NaN ranked highest (as
        argmax ranks the float32 logits it writes). scratch: gemv_argmax_words 32-bit words, zero (the
        kernels leave them so). out_host: where nonzero, the device address of mapped pinned host memory
        (bm int64) that gets the same ids (``.cu put_token``)."""
        if not self.takes_argmax(ln):
            raise InternalError(f"fused decode: an argmax only with a tensor-core norm_gemv launch (and "
                                f"HEAD_ARGMAX on) or the persistent kernel with the head, not {ln.name}")
        if ln.name == "layers" and (bm != 1 or scratch % 8):
            raise InternalError(f"fused decode: the persistent kernel's argmax takes 1 row and an 8-byte aligned "
                                f"scratch (its 64-bit best key), got {bm} rows, scratch at {scratch:#x}")
        return ln.with_fields(amax=out, ascr=scratch, amax_host=out_host)

    @staticmethod
    def with_ids(ln: Launch, ids: int) -> Launch:
        """embed launch ``ln`` reading its token ids (int64, one per row) at device address ``ids``."""
        if ln.name != "embed":
            raise InternalError(f"fused decode: token ids are an embed launch's, not {ln.name}'s")
        return ln.with_fields(ids=ids)

    def gemv_residual(self, bm, *, y, W, bias, h, ss_out, N, K, res_fp32, ctr) -> Launch:
        """ctr as in norm_gemv."""
        stem, grid, threads, smem, pf = self._gemv("gemv_residual", bm, N, K, W)
        a = GemvResidualArgs(y, W, bias or 0, h, ss_out, ctr, N, K, int(res_fp32), pf)
        return Launch(self._fn(stem), (grid, 1), threads, smem, a, stem)

    def gemv_grid_residual(self, bm: int, n: int, k: int, w: int) -> int:
        """Blocks of gemv_residual for W [n, k] at address w (= the partial sums of squares it writes per
        row)."""
        return self._gemv("gemv_residual", bm, n, k, w)[1]

    def embed_grid(self, k: int) -> int:
        return max(1, min(-(-k // ROW_THREADS), self.sm_count))

    def embed(self, *, ids, emb, h, ss_out, B, V, K, eps, norm_w=0, xn=0, zero=0, nzero=0, seen=0, idx=0,
              slots=0, seen_w=0) -> Launch:
        """zero: nzero 32-bit words the kernel zeroes before the step's other kernels touch them (they
        must do so only after griddepcontrol.wait), or 0. seen: the bitmap of the tokens seen per state slot
        ([slots, seen_w] 32-bit words: seen_words of the logits' vocabulary), in which the kernel marks each
        row's token in the row's slot (idx: int64 [B]), or 0."""
        a = EmbedArgs(ids, emb, h, ss_out or 0, norm_w or 0, xn or 0, B, V, K, eps, zero or 0, nzero if zero else 0,
                      seen or 0, idx if seen else 0, seen_w if seen else 0, slots if seen else 0)
        grid = B if norm_w else self.embed_grid(K)
        return Launch(self._fn(f"embed_{self.tag}"), (grid, 1), ROW_THREADS, 0, a, "embed")

    def residual_norm(self, *, h, o, norm_w, xn, B, K, res_fp32, eps) -> Launch:
        a = ResidualNormArgs(h, o, norm_w, xn, K, int(res_fp32), eps)
        return Launch(self._fn(f"residual_norm_{self.tag}"), (B, 1), residual_norm_threads(K), 0, a,
                      "residual_norm")

    @staticmethod
    def seen_words(V: int) -> int:
        """32-bit words of one slot's row of the seen-token bitmap (embed, penalize)."""
        return -(-V // 32)

    def penalize(self, *, x, idx, seen, r, B, V, W, slots) -> Launch:
        """The repetition penalty in place on x [B, V] (float32 logits): row b's logits of the tokens seen in
        slot idx[b] (int64; the bitmap seen [slots, W >= seen_words(V)], as embed marks it) divided by r[b]
        (float32 [B]; 1 leaves the row) where positive, else multiplied by it (runtime/sampling.py, step 1)."""
        a = PenalizeArgs(x, idx, seen, r, V, W, slots)
        return Launch(self._fn(f"penalize_{self.tag}"), (B, 1), PENALIZE_THREADS, 0, a, "penalize")

    @staticmethod
    def argmax_scratch_words(B: int, V: int) -> int:
        """32-bit words of scratch argmax needs: partial values and indices per block, a ticket per row
        (zero at first, and zero again after every launch)."""
        return B * (2 * -(-V // ARGMAX_CHUNK) + 1)

    def argmax(self, *, x, out, scratch, B, V, out_host=0) -> Launch:
        """out[b] (int64) = the index of the first largest of x[b, :V] (float32), NaN ranked highest.
        scratch: argmax_scratch_words(B, V) 32-bit words, the last B of them zero. out_host: as in
        with_argmax."""
        C = -(-V // ARGMAX_CHUNK)
        a = ArgmaxArgs(x, out, scratch, scratch + 4 * B * C, scratch + 8 * B * C, V, out_host)
        return Launch(self._fn(f"argmax_{self.tag}"), (C, B), ARGMAX_THREADS, 0, a, "argmax")

    def draws(self, V: int) -> bool:
        """Whether the draw kernel serves rows of V logits: thread block clusters (sm_90+), V at most
        DRAW_MAX_VOCAB."""
        return self.arch >= 90 and 1 <= V <= DRAW_MAX_VOCAB

    def draw(self, *, x, knobs, out, B, V, out_host=0) -> Launch:
        """out[b] (int64) = the token drawn from x[b, :V] (float32 logits) with knobs[b] (4 float64:
        temperature, the sorted position of the k-th largest logit or V - 1, top_p, u), as
        runtime/sampling.py's reference draws it. Where ``draws(V)``. out_host: as in with_argmax."""
        if not self.draws(V):
            raise InternalError(f"fused decode draw: needs sm_90+ and at most {DRAW_MAX_VOCAB} logits a row; "
                                f"got sm_{self.arch}, {V}")
        return Launch(self._fn(f"draw_{self.tag}"), (DRAW_CLUSTER, B), DRAW_THREADS, 0,
                      DrawArgs(x, knobs, out, V, out_host), "draw")

    def conv_xproj(self, bm, *, xz, conv_state, idx, conv_w, conv_b, Wx, u, xdbl, B, d, k, R) -> Launch:
        """bm in XP_BUCKETS: conv + x_proj share (B == bm); bm = 0: conv only (any B; Wx must be 0)."""
        a = ConvXprojArgs(xz, conv_state, idx, conv_w, conv_b or 0, Wx or 0, u, xdbl or 0, d, k, R, B)
        if bm and (bm not in XP_BUCKETS or B != bm):
            raise InternalError(f"fused decode conv_xproj: {B} rows in a launch for {bm}; expected {XP_BUCKETS}")
        if not bm and Wx:
            raise InternalError("fused decode conv_only: no x_proj share (Wx must be 0)")
        if bm:
            return Launch(self._fn(f"conv_xproj_{self.tag}_b{bm}"), (-(-d // XP_CH), 1), XP_THREADS, 0, a, "conv_xproj")
        return Launch(self._fn(f"conv_only_{self.tag}"), (-(-d // CONV_THREADS), B), CONV_THREADS, 0, a, "conv_only")

    def layers_launch(self, *, dm: int, d: int, n: int, r: int, k: int) -> LayersLaunch | None:
        """The LayersLaunch (grid, shared bytes, stages, partial sums per out_proj output: layers_partials,
        LY_XFIRST, LY_ARRIVE_LAG, whether out_proj's partials are combined: dm >= LY_COMBINE_MIN_DMODEL,
        their slots read per round trip: 2 where LY_PARTIALS_PER_LOAD allows and dm <= LY_MAX_DMODEL / 2,
        else 1) of the persistent `layers` kernel for this shape, or None where it does not apply: a tensor-core
        GEMV kind (16-bit dtypes) on sm_90+, dm from LY_MIN_DMODEL up, dm and d multiples of 16 (whole 16-wide
        mma steps), dm at most LY_MAX_DMODEL, d at most LY_MAX_DINNER, LAYERS_KERNEL on, ssm_out not serving the
        shape (its three kernels per layer measured faster: LY_MIN_DMODEL), and at least LY_STAGES[0] stages
        fitting one block per SM beside the rest of its shared memory. (Every pointer must also be 16-byte
        aligned: the caller checks.)"""
        kind = self.gemv != "fma" and self.arch >= 90
        if not (LAYERS_KERNEL and kind and dm >= LY_MIN_DMODEL and dm % 16 == 0 and d % 16 == 0
                and dm <= LY_MAX_DMODEL and d <= LY_MAX_DINNER) or self.ssm_out_fits(1, n=n, dm=dm):
            return None
        grid = self.sm_count
        ring, rest = layers_smem(dm, d, n, r, k, 1, grid)
        stages = min(LY_STAGES[1], (self.smem_optin - 1024 - rest) // (ring + 32))
        if stages < LY_STAGES[0]:
            return None
        ring, rest = layers_smem(dm, d, n, r, k, stages, grid)
        smem = ring + rest
        if self._resident(f"layers_{self.tag}", LY_THREADS, smem) < 1:
            return None
        P, combine = layers_partials(dm, d, grid), int(dm >= LY_COMBINE_MIN_DMODEL)
        pw = 2 if LY_PARTIALS_PER_LOAD >= 2 and not combine and P >= 2 and dm <= LY_MAX_DMODEL // 2 else 1
        return LayersLaunch(grid, smem, stages, P, LY_XFIRST, LY_ARRIVE_LAG, combine, pw)

    def layers(self, cfg: LayersLaunch, *, table, idx, h, ss, hbuf, xacc, part, y, stepc, bar, n_layer, dm, d, n, r, k,
               res_fp32, eps, head=0, head_bytes=0, head_norm=0, logits=0, vocab=0) -> Launch:
        """Every layer of a batch-1 step in one launch (`layers` in decode_step.cu), with cfg what
        layers_launch gave for this shape. table: n_layer x LY_PTRS pointers (.cu LayerPtrs); ss: the
        grid's partial sums of squares of the final h (the head's norm_gemv reads grid of them); xacc and
        bar zero before every step; part (2 x P x dm 64-bit words), y (d 32-bit words) and stepc (one
        32-bit word) zero once, then left to the kernel (tagged values: a step never reads the words of
        one before). head: the head's weights (head_bytes of them; vocab rows of dm), taken by the kernel
        where LY_HEAD asks and they are 16-byte aligned, as the bulk copy wants (then with head_norm, the final
        norm's weight, into logits: vocab float32; h and ss are not written), else their first LY_HEAD_PREFETCH
        bytes prefetched into L2 after the last layer's weights are issued (for norm_gemv after it)."""
        fused = bool(LY_HEAD and head and head % 16 == 0 and head_norm and logits and vocab)
        pf = (min(LY_HEAD_PREFETCH, head_bytes) // (16 * cfg.grid) * 16 * cfg.grid
              if head and head % 16 == 0 and not fused else 0)
        a = LayersArgs(table, idx, h, ss, hbuf, xacc, part, y, stepc, bar, n_layer, dm, d, n, r, k, int(res_fp32),
                       cfg.stages, cfg.P, int(cfg.xfirst), int(cfg.lag), int(cfg.combine), int(cfg.pw), eps,
                       head if pf else 0, pf, head if fused else 0, head_norm if fused else 0,
                       logits if fused else 0, vocab if fused else 0, 0, 0, 0)
        return Launch(self._fn(f"layers_{self.tag}"), (cfg.grid, 1), LY_THREADS, cfg.smem, a, "layers", coop=True)

    def ssm_step(self, *, n, B, xdbl_acc, xdbl_t, delta, Wdt, dt_bias, A, D, u, xz, ssm_state, idx, y,
                 d, r) -> Launch:
        if n not in STATE_SIZES:
            raise UnsupportedError(f"fused decode: d_state {n} is not one of {STATE_SIZES}")
        # two kernels: dt_proj computed here from x_proj's output (the GEMV path's fp32 accumulator, or
        # the GEMM path's T row), or delta precomputed by a GEMM (ssm_step_pre)
        pre = bool(delta)
        if bool(xdbl_acc) == bool(xdbl_t) or (pre and not xdbl_t):
            raise InternalError("fused decode ssm_step: give xdbl_acc or xdbl_t, and delta only with xdbl_t")
        a = SsmStepArgs(xdbl_acc or 0, xdbl_t or 0, delta or 0, Wdt, dt_bias, A, D or 0, u, xz, ssm_state, idx,
                        y, d, r, r + 2 * n, B)
        cpb = SSM_THREADS // (n // 4)
        stem = "ssm_step_pre" if pre else "ssm_step"
        return Launch(self._fn(f"{stem}_{self.tag}_n{n}"), (-(-d // cpb), B), SSM_THREADS, 0, a, "ssm_step")

    def ssm_out_fits(self, bm: int, *, n: int, dm: int) -> bool:
        """Whether ssm_out serves bm rows of this shape (with SSM_OUT on, read at each call): 16-bit dtype,
        bm 1 or 2, n in SO_STATES, d_model a multiple of 4 (16-byte reductions) up to SO_MAX_DMODEL (out_proj's
        slice of a block, d_model x SO_CH, in its registers; the next norm_gemv holds the residual row in ACC_KV
        registers of each of at least MMA_THREADS threads)."""
        return bool(SSM_OUT and self.itemsize == 2 and bm in (1, 2) and n in SO_STATES and dm % 4 == 0
                    and dm <= min(SO_MAX_DMODEL, ACC_KV * MMA_THREADS))

    def ssm_out(self, bm, *, n, xdbl_acc, Wdt, dt_bias, A, D, u, xz, ssm_state, idx, d, r, Wo, bias, acc,
                dm) -> Launch:
        """ssm_step and out_proj in one kernel: out_proj's sums of bm rows added into acc [bm, dm] (zero before
        it; the next norm_gemv takes them as its acc)."""
        if not self.ssm_out_fits(bm, n=n, dm=dm) or acc % 16:
            raise InternalError(f"fused decode: ssm_out does not take {bm} rows, d_state {n}, d_model {dm} "
                                f"(accumulator at {acc:#x})")
        s = SsmStepArgs(xdbl_acc, 0, 0, Wdt, dt_bias, A, D or 0, u, xz, ssm_state, idx, 0, d, r, r + 2 * n, bm)
        stem = f"ssm_out_{self.tag}_n{n}_b{bm}"
        return Launch(self._fn(stem), (-(-d // SO_CH), 1), SO_THREADS, 0, SsmOutArgs(s, Wo, bias or 0, acc, dm), stem)

    # -- the GEMM path's x_proj and dt_proj on the tensor cores (conv_xproj_rows, dt_rows) ---------------
    def rows_fits(self, *, n: int, r: int) -> bool:
        """Whether conv_xproj_rows / dt_rows serve this shape: 16-bit dtype, r + 2n at most ROWS_MAX_R, and
        their shared memory within the GPU's limit. (Weights whose rows are not 16-byte aligned are read
        element by element.)"""
        R = r + 2 * n
        return self.itemsize == 2 and R <= ROWS_MAX_R and max(self._xr_smem(R), self._dr_smem(r)) <= self.smem_optin

    @staticmethod
    def rows_stride(R: int) -> int:
        """Row stride of the accumulator conv_xproj_rows adds x_proj's output into (R rounded up to 8)."""
        return -(-R // 8) * 8

    def _xr_smem(self, R: int) -> int:
        return (self.rows_stride(R) * XR_CH + XR_CH * XR_ROWS) * self.itemsize

    def _dr_smem(self, r: int) -> int:
        return -(-r // 32) * 32 * (DR_CH + DR_ROWS) * self.itemsize

    def conv_xproj_rows(self, *, xz, conv_state, idx, conv_w, conv_b, Wx, u, acc, B, d, k, n, r) -> Launch:
        """The conv update of B rows and x_proj's output added into acc [B, rows_stride(r + 2n)] float32
        (zero before: the sums of every block are added)."""
        R = r + 2 * n
        a = ConvXprojArgs(xz, conv_state, idx, conv_w, conv_b or 0, Wx, u, acc, d, k, R, B)
        return Launch(self._fn(f"conv_xproj_rows_{self.tag}"), (-(-d // XR_CH), -(-B // XR_ROWS)), XR_THREADS,
                      self._xr_smem(R), a, "conv_xproj_rows")

    def dt_rows(self, *, acc, xdbl, delta, Wdt, B, d, n, r, row_blocks: int = 0) -> Launch:
        """From acc [B, rows_stride(r + 2n)] float32 (as conv_xproj_rows or proj_wg left it): delta [B, d] T = dt_proj
        of its first r columns rounded to T (softplus and the bias: ssm_step_pre), and xdbl [B, r + 2n] T = acc
        rounded (ssm_step_pre's B, C). The rows in row_blocks blocks (0: as few as DR_ROWS allows)."""
        rb = row_blocks or -(-B // DR_ROWS)
        if -(-B // rb) > DR_ROWS:
            raise InternalError(f"dt_rows: {B} rows in {rb} row blocks; a block takes at most {DR_ROWS}")
        a = SsmStepArgs(acc, xdbl, delta, Wdt, 0, 0, 0, 0, 0, 0, 0, 0, d, r, r + 2 * n, B)
        return Launch(self._fn(f"dt_rows_{self.tag}"), (-(-d // DR_CH), rb), DR_THREADS, self._dr_smem(r), a,
                      "dt_rows")

    # -- the GEMM path's projections on wgmma (proj_wg, sm_90a) ------------------------------------------
    def proj_serves(self, which: int | None = None, rows: int = 1, big: bool = False) -> bool:
        """Whether proj_wg runs here: 16-bit dtype on an sm_90 GPU (wgmma); with ``which`` (a PROJ_* bit), also
        whether the mask for ``rows`` (PROJ_WG up to PROJ_WG_ROWS, PROJ_WG_MANY up to PJ_M, or PROJ_WG_MANY_BIG for a
        ``big`` model's: in_proj of PROJ_WG_BIG_BYTES; PROJ_WG_WIDE above) asks for it for that projection."""
        mask = (PROJ_WG if rows <= PROJ_WG_ROWS else (PROJ_WG_MANY_BIG if big else PROJ_WG_MANY) if rows <= PJ_M
                else PROJ_WG_WIDE)
        return self.itemsize == 2 and self.arch == 90 and (which is None or bool(mask & which))

    def _proj_fn(self, nt: int, epilogue: str = ""):
        """proj_wg's entry point of tile width nt; epilogue "res_" (with_residual) or "rs_" (with_row_scale)."""
        if self._proj_module is None:
            drv = launcher._driver()
            self._proj_module = launcher._cu(drv.cuModuleLoadData(get_proj_cubin(self.dtype)),
                                             "cuModuleLoadData(decode_proj)")
        return self._fn(f"proj_wg_{epilogue}{self.tag}_{nt}", self._proj_module)

    def proj_plan(self, B: int, N: int, K: int, unsplit: bool = False) -> ProjPlan | None:
        """proj_wg's tile width, K split, stages and grid for out [B, N] = x [B, K] W[N, K]^T, or None where it
        does not serve (proj_serves, K a multiple of 8). Chosen by a model of the busiest multiprocessor's
        bytes: W from HBM, x (re-read by every block) from L2 at half weight, ~1 us of fixed cost per block
        (PJ_FIXED; PJ_CLUSTER more with a split's cluster reduction), blocks beyond one per SM queued behind the
        first, and clusters beyond those the GPU holds at once (a cluster's blocks share a GPC) a wave later; plans
        whose blocks run more than PJ_MAX_CHAIN stages each only where no other serves, and with ``unsplit`` plans
        that split K only where those do."""
        best = None
        for nt in PJ_NTS:
            for split in PJ_SPLITS:
                plan = self.proj_plan_for(B, N, K, nt, split)
                if plan is None:
                    continue
                ctas = plan.grid[0] * plan.grid[1] * plan.grid[2]
                per_block = 2 * nt * plan.kchunk + min(B, PJ_M) * plan.kchunk + PJ_FIXED + PJ_CLUSTER * (plan.split > 1)
                waves = -(-ctas // self.sm_count)
                if plan.split > 1:
                    waves = max(waves, -(-(ctas // plan.split) // self._proj_max_clusters(plan)))
                key = (plan.kchunk > PJ_MAX_CHAIN * PJ_KT, unsplit and plan.split > 1, waves * per_block, ctas)
                if best is None or key < best[0]:
                    best = (key, plan)
        return None if best is None else best[1]

    def _proj_max_clusters(self, plan: ProjPlan) -> int:
        """How many of plan's clusters (plan.split blocks each) the GPU runs at once (cuOccupancyMaxActiveClusters: a
        cluster's blocks share a GPC; on the H100 at one block per SM 66 clusters of 2, 30 of 4, not 33)."""
        key = (plan.nt, plan.split, plan.smem)
        got = self._proj_clusters.get(key)
        if got is None:
            drv = launcher._driver()
            cfg = drv.CUlaunchConfig()
            cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = 1, plan.split, 1
            cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = PJ_THREADS, 1, 1
            cfg.sharedMemBytes = plan.smem
            cfg.attrs, cfg.numAttrs = [_cluster_attr(plan.split)], 1
            got = launcher._cu(drv.cuOccupancyMaxActiveClusters(self._proj_fn(plan.nt), cfg),
                               f"cuOccupancyMaxActiveClusters(proj_wg {plan.nt} x {plan.split})")
            got = self._proj_clusters[key] = max(1, int(got))
        return got

    def proj_plan_for(self, B: int, N: int, K: int, nt: int, split: int) -> ProjPlan | None:
        """proj_wg's plan with NT = nt and K split over at most `split` blocks (stage-sized chunks), or None where
        that does not serve."""
        if not self.proj_serves() or K % 8 or N < 1 or B < 1 or nt not in PJ_NTS or split not in PJ_SPLITS:
            return None
        kchunk = -(-K // split // PJ_KT) * PJ_KT
        split = -(-K // kchunk)
        tiles, rb, sb = -(-N // nt), -(-B // PJ_M), PJ_ATOMS * (PJ_M + nt) * 128
        ctas = tiles * split * rb
        nk = kchunk // PJ_KT
        # two blocks per SM where the grid is more than one wave and two rings of 2 stages fit
        per_sm = 2 if ctas > self.sm_count and 2 * (2 * sb + 2048) <= self.smem_sm else 1
        budget = (self.smem_optin if per_sm == 1 else self.smem_sm // 2) - 2048
        stages = min(PJ_MAX_STAGES, nk, (budget - 8 * PJ_MAX_STAGES) // sb)
        # a split's tile (rows of nt + 4 floats) and the residual epilogue's partial sums (nt / 4 a row) in the ring
        if stages < min(2, nk) or (split > 1 and (nt + 4 + nt // 4) * PJ_M * 4 > stages * sb):
            return None
        # the ring, a barrier per stage, the row scale (PJ_M floats, 16-byte aligned), the ring's 1024-byte alignment
        return ProjPlan(nt, split, kchunk, stages, (tiles, split, rb), stages * (sb + 8) + 16 + 4 * PJ_M + 1024)

    def proj_maps(self, plan: ProjPlan, *, x: int, ldx: int, W: int, B: int, N: int, K: int) -> bytes:
        """The two TMA tensor maps proj_wg reads (x [B, K] with rows ldx apart, then W [N, K]), 2 x TMAP_BYTES
        to be copied into device memory (64-byte aligned) whose address goes to proj(maps=...). x and W
        16-byte aligned, ldx a multiple of 8."""
        if x % 16 or W % 16 or ldx % 8 or K % 8:
            raise InternalError(f"proj_wg: x ({x:#x}) and W ({W:#x}) must be 16-byte aligned and ldx ({ldx}), K ({K}) "
                                f"multiples of 8")
        return self._tmap(x, B, K, ldx, self._xbox(B)) + self._tmap(W, N, K, K, plan.nt)

    @staticmethod
    def _xbox(B: int) -> int:
        """Rows of proj_wg's boxes of x: B rounded up to 8, at most PJ_M (the tensor memory accelerator fills rows
        outside the tensor slowly; rows of shared memory past the box only meet outputs that are not stored)."""
        return min(PJ_M, -(-B // 8) * 8)

    def _tmap(self, ptr: int, rows: int, cols: int, ld: int, box_rows: int) -> bytes:
        """A tensor map of a row-major [rows, cols] matrix of T (rows ld apart): boxes of PJ_ATOM columns x box_rows
        rows, swizzled by 128 bytes (wgmma's layout), zeros outside the matrix."""
        drv = launcher._driver()
        dt = drv.CUtensorMapDataType
        tm = launcher._cu(drv.cuTensorMapEncodeTiled(
            dt.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 if self.tag == "bf16" else dt.CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, ptr,
            [drv.cuuint64_t(cols), drv.cuuint64_t(rows)], [drv.cuuint64_t(ld * self.itemsize)],
            [drv.cuuint32_t(PJ_ATOM), drv.cuuint32_t(box_rows)], [drv.cuuint32_t(1), drv.cuuint32_t(1)],
            drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, drv.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
            drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE), "cuTensorMapEncodeTiled")
        return struct.pack("<16Q", *[int(v) for v in tm.opaque])

    def proj(self, plan: ProjPlan, *, maps: int, bias, out, ldo, B, N, K, out_float=False) -> Launch:
        """out [B, N] (rows ldo apart; float32 where out_float, else T) = x [B, K] . W [N, K]^T (+ bias [N]), by
        the plan proj_plan gave for (B, N, K); maps: the device address of proj_maps' bytes. The residual add and
        RMSNorm between two projections go into them by with_residual and with_row_scale."""
        a = ProjArgs(maps, maps + TMAP_BYTES, bias or 0, out, ldo, B, N, K, plan.kchunk, int(out_float), plan.stages,
                     self._xbox(B))
        return Launch(self._proj_fn(plan.nt), plan.grid, PJ_THREADS, plan.smem, a, "proj_wg", cluster_y=plan.split,
                      tile=plan.nt)

    def with_residual(self, ln: Launch, *, h: int, norm_w: int, out: int, ldo: int, ss: int, res_fp32: bool) -> Launch:
        """proj_wg launch ``ln`` (T outputs [B, N], N = d_model: out_proj) with the residual epilogue: h [B, N] fp32
        += its output rounded to T (h rounded to T unless res_fp32); out [B, N] (rows ldo apart) gets h * norm_w (the
        next RMSNorm's weight) in T, and ss [ln.grid[0], B] float32 the sums of h^2 over each block column (the next
        projection's row scale, with_row_scale). In place of residual_norm after out_proj."""
        if ln.name != "proj_wg" or not isinstance(ln.args, ProjArgs) or ln.args.out_float:
            raise InternalError(f"proj_wg residual epilogue: not on {ln.name} ({type(ln.args).__name__})")
        a = ProjArgs.from_buffer_copy(ln.args)
        a.out, a.ldo = out, ldo
        return self._with_norm(ln, "res_", ProjNormArgs(a, ProjNorm(h, norm_w, ss, 0, 0, int(res_fp32), 0.0)))

    def with_row_scale(self, ln: Launch, *, ss: int, tiles: int, eps: float) -> Launch:
        """proj_wg launch ``ln`` whose x is the residual epilogue's output (h * norm_w) with each row's outputs
        scaled by rsqrt(sum of ss [tiles, B] over tiles / K + eps): the RMSNorm's scale, after the sums."""
        if ln.name != "proj_wg" or not isinstance(ln.args, ProjArgs) or tiles < 1:
            raise InternalError(f"proj_wg row scale: not on {ln.name} ({type(ln.args).__name__}, {tiles} tiles)")
        return self._with_norm(ln, "rs_", ProjNormArgs(ProjArgs.from_buffer_copy(ln.args),
                                                       ProjNorm(0, 0, 0, ss, tiles, 0, eps)))

    def _with_norm(self, ln: Launch, epilogue: str, args) -> Launch:
        return Launch(self._proj_fn(ln.tile, epilogue), ln.grid, ln.block, ln.smem, args, ln.name, ln.coop, ln.cluster_y,
                      ln.tile)

    # -- launching -----------------------------------------------------------------------------------
    def launch(self, ln: Launch, stream: int) -> None:
        launch_kernel(ln, stream, self.pdl)


def launch_kernel(ln: Launch, stream: int, pdl: bool) -> None:
    """Launch ``ln`` on ``stream`` (a raw CUstream handle), with programmatic dependent launch where ``pdl``
    (the kernel must then call griddepcontrol.wait before it reads what earlier kernels wrote)."""
    drv = launcher._driver()
    cfg = drv.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY = ln.grid[0], ln.grid[1]
    cfg.gridDimZ = ln.grid[2] if len(ln.grid) > 2 else 1
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = ln.block, 1, 1
    cfg.sharedMemBytes = ln.smem
    cfg.hStream = drv.CUstream(stream)
    attrs = []
    if pdl:
        at = drv.CUlaunchAttribute()
        at.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        at.value.programmaticStreamSerializationAllowed = 1
        attrs.append(at)
    if ln.cluster_y > 1:
        attrs.append(_cluster_attr(ln.cluster_y))
    if ln.coop:
        at = drv.CUlaunchAttribute()
        at.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
        at.value.cooperative = 1
        attrs.append(at)
    if attrs:
        cfg.attrs = attrs
    cfg.numAttrs = len(attrs)
    ptrs = (ctypes.c_void_p * 1)(ctypes.addressof(ln.args))
    launcher._cu(drv.cuLaunchKernelEx(cfg, ln.fn, ctypes.addressof(ptrs), 0), f"cuLaunchKernelEx({ln.name})")


def _cluster_attr(y: int):
    """The launch attribute of thread block clusters of y blocks along the grid's y."""
    drv = launcher._driver()
    at = drv.CUlaunchAttribute()
    at.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    at.value.clusterDim.x, at.value.clusterDim.y, at.value.clusterDim.z = 1, y, 1
    return at


@functools.lru_cache(maxsize=None)
def kernels(dtype: str, ctx_handle: int, pdl: bool | None = None, gemv: str | None = None) -> DecodeKernels:
    """One DecodeKernels per (dtype, context, options); ctx_handle is the current context's handle."""
    del ctx_handle  # part of the cache key only
    return DecodeKernels(dtype, pdl=pdl, gemv=gemv)
