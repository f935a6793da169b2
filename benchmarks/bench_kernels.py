"""Microbenchmarks of the plugins_cuda kernels on the GPU (see benchmarks/NOTES.md, "Kernels").

    python benchmarks/bench_kernels.py [--out benchmarks/results/kernels-<device>.json] [--quick]
                                       [--only ceilings,decode,prefill,variants,host]
                                       [--mamba-ssm-ext DIR] [--dtypes float16,bfloat16]

Measures, in one run on one device:
  * ceilings: device-to-device copy bandwidth (bytes read + written) and MUFU ex2 throughput
    (a microkernel compiled with the same NVRTC path as the kernels);
  * decode step (L = 1) of selective_state_update and causal_conv1d_update at d = 1536 (mamba-130m)
    and d = 5120 (mamba-2.8b), n = 16, k = 4, batch 1 and 64: ours, the torch reference, and
    mamba_ssm's Triton selective_state_update when importable (reported "not available" otherwise).
    Timed as CUDA-graph replays of many launches that rotate over enough input sets to overflow L2
    (each layer's state comes from HBM in a real model), median of the replays;
  * prefill selective_scan at (B, L) = (1, 2048), (1, 16384), (8, 2048) (d = 5120, n = 16) against its
    two floors and, with --mamba-ssm-ext, against mamba_ssm's CUDA selective scan on the same inputs
    (outputs compared first), and causal_conv1d at B = 1; CUDA-graph replays of 3 calls, median;
  * variants: the prefill scan kernels ("seq" channel-parallel, "wide" its configuration for many
    rows, "tp" time-parallel) and compile-time variants of them (-D overrides of selective_scan.cu;
    ``NAME+MACRO=VALUE`` adds one) launched through their flat entry points, each checked against the
    shipped dispatch's output (torch_ops) before it is timed, with ptxas's registers, stack frame and
    spills of each variant's entry in its row (the kernel before the rewrite, "v3" in
    NOTES.md, is plugins_cuda/selective_scan.cu at commit e4b02c0; its rows in results/ were measured
    from a copy that is no longer kept, since it no longer compiles against today's common.cuh);
  * host: the host cost of one eager call through torch_ops (wall clock of back-to-back calls on
    tiny tensors, so the GPU never holds the host back).
The decode, prefill and variants sections run in each input type of --dtypes (fp16 and bf16 by default; issue 8's
targets are stated in fp16), each row naming its dtype. Absolute times are only meaningful from a GPU; this script
refuses to run without one. With --only, the results are written only where --out says.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mamba_rt._gc import collector_paused
from mamba_rt.bench import copy_bandwidth
from mamba_rt.exporters.ops_ref import causal_conv1d_update_ref, selective_state_update_ref
from mamba_rt.exporters.tensorrt_build import slug
from mamba_rt.plugins_cuda import compiler, launcher, torch_ops

# The input types measured (--dtypes; names as compiler.DTYPES): issue 8's targets are stated in fp16, and
# every run up to session 43 measured bf16 only.
BENCH_DTYPES = ("float16", "bfloat16")


def median_ms(fn, reps: int, inner: int = 1) -> float:
    """Median over ``reps`` of the event-timed duration of ``fn()``, divided by ``inner``."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def graph_per_call_us(calls, reps: int) -> float:
    """Capture ``calls`` (a list of thunks) into one CUDA graph; median replay time per call, in us."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls[:3]:
            c()  # warm-up: module load, compilation, allocator
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with collector_paused(), torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    return 1e3 * median_ms(g.replay, reps, inner=len(calls))


# ---------------------------------------------------------------------------------------------
# ceilings


_MUFU_SRC = r"""
extern "C" __global__ void mufu_ex2(float* out, int iters) {
  float a[8];
  #pragma unroll
  for (int j = 0; j < 8; ++j) a[j] = -1e-3f * (threadIdx.x + j);
  for (int i = 0; i < iters; ++i) {
    #pragma unroll
    for (int j = 0; j < 8; ++j) a[j] = mrt::fast_exp2(a[j] - 1.0f);
  }
  float s = 0.f;
  #pragma unroll
  for (int j = 0; j < 8; ++j) s += a[j];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
"""


def mufu_ex2_rate() -> float:
    """MUFU.EX2 results per second on this GPU (8 independent chains per thread, full occupancy)."""
    import ctypes

    drv = launcher._driver()
    launcher._context(torch.cuda.current_device())
    arch = launcher.current_arch()
    cubin = compiler.compile_program('#include "common.cuh"\n' + _MUFU_SRC, "mufu.cu", arch)
    mod = launcher._cu(drv.cuModuleLoadData(cubin), "cuModuleLoadData")
    fn = launcher._cu(drv.cuModuleGetFunction(mod, b"mufu_ex2"), "cuModuleGetFunction")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    blocks, threads, iters = sms * 8, 256, 4096
    out = torch.empty(blocks * threads, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream

    def run():
        launcher._launch(fn, (blocks, 1), threads, [ctypes.c_void_p(out.data_ptr()), ctypes.c_int(iters)],
                         stream, "mufu_ex2")

    run()
    ms = median_ms(run, 20)
    return blocks * threads * iters * 8 / (ms * 1e-3)


# ---------------------------------------------------------------------------------------------
# decode


def _mamba_ssm_ssu():
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception as e:  # ImportError, or a Triton/CUDA mismatch inside mamba_ssm
        return None, f"not available ({type(e).__name__}: {e})"
    return selective_state_update, "available"


def decode_sets(B, d, n, k, l2_bytes, dt):
    per_set = B * d * n * 4 * 2 + d * n * 4 + B * d * (k - 1) * 2 * 2
    nsets = max(2, min(256, -(-3 * l2_bytes // per_set)))
    g = torch.Generator(device="cuda")
    g.manual_seed(1234)
    r = lambda *s, dtype=dt: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    sets = []
    for _ in range(nsets):
        sets.append(dict(
            ssm_state=r(B, d, n, dtype=torch.float32), u=r(B, d), delta=r(B, d), A=-torch.exp(r(d, n, dtype=torch.float32)),
            Bm=r(B, n), Cm=r(B, n), D=r(d, dtype=torch.float32), z=r(B, d), delta_bias=r(d, dtype=torch.float32),
            conv_state=r(B, d, k - 1), x=r(B, d), weight=r(d, k), bias=r(d), y=torch.empty(B, d, dtype=dt, device="cuda"),
        ))
    return sets


def bench_decode(reps: int, l2_bytes: int, dt=torch.bfloat16) -> list[dict]:
    mamba_ssu, mamba_status = _mamba_ssm_ssu()
    rows = []
    for d in (1536, 5120):
        for B in (1, 64):
            n, k = 16, 4
            sets = decode_sets(B, d, n, k, l2_bytes, dt)
            scan_keys = ("u", "delta", "A", "Bm", "Cm", "D", "z", "delta_bias")

            def ours_ssu(s):
                return lambda: torch_ops.selective_state_update(s["ssm_state"], *(s[k_] for k_ in scan_keys), out=s["y"])

            def ref_ssu(s):
                return lambda: selective_state_update_ref(s["ssm_state"], *(s[k_] for k_ in scan_keys))

            def ours_conv(s):
                return lambda: torch_ops.causal_conv1d_update(s["x"], s["conv_state"], s["weight"], s["bias"], "silu", out=s["y"])

            def ref_conv(s):
                return lambda: causal_conv1d_update_ref(s["x"], s["conv_state"], s["weight"], s["bias"], "silu")

            row = dict(d=d, batch=B, dstate=n, width=k, dtype=str(dt), input_sets=len(sets))
            row["ssu_ours_us"] = graph_per_call_us([ours_ssu(s) for s in sets], reps)
            # eager: back-to-back calls without a graph, i.e. the host-side cost of the wrapper
            eager = [ours_ssu(s) for s in sets[:100]]
            row["ssu_ours_eager_us"] = 1e3 * median_ms(lambda: [c() for c in eager], 5, inner=len(eager))
            row["ssu_ref_us"] = graph_per_call_us([ref_ssu(s) for s in sets[:16]], reps)
            if mamba_ssu is not None:
                def mamba(s):
                    return lambda: mamba_ssu(s["ssm_state"], s["u"], s["delta"], s["A"], s["Bm"], s["Cm"], s["D"],
                                             z=s["z"], dt_bias=s["delta_bias"], dt_softplus=True)
                row["ssu_mamba_ssm_triton_us"] = graph_per_call_us([mamba(s) for s in sets], reps)
            else:
                row["ssu_mamba_ssm_triton_us"] = None
            row["conv_ours_us"] = graph_per_call_us([ours_conv(s) for s in sets], reps)
            row["conv_ref_us"] = graph_per_call_us([ref_conv(s) for s in sets[:16]], reps)
            # fewest bytes: fp32 state read + written, A, D, bias; u, delta, z, y and Bm, Cm in 16 bits
            row["ssu_bytes"] = B * d * n * 8 + d * n * 4 + 2 * d * 4 + B * d * 2 * 4 + B * n * 2 * 2
            row["conv_bytes"] = B * d * (k - 1) * 2 * 2 + d * (k + 1) * 2 + B * d * 2 * 2
            rows.append(row)
    return rows, mamba_status


# ---------------------------------------------------------------------------------------------
# prefill


def _prefill_inputs(B, d, n, L, k, seed, dt=torch.bfloat16):
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    r = lambda *s, dtype=dt: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    u, delta, z = r(B, d, L), r(B, d, L) * 0.5 - 0.5, r(B, d, L)
    Bm, Cm = r(B, n, L), r(B, n, L)
    A = -torch.exp(r(d, n, dtype=torch.float32))
    D, db = r(d, dtype=torch.float32), r(d, dtype=torch.float32)
    h0 = r(B, d, n, dtype=torch.float32)
    w, bias, cs = r(d, k), r(d), r(B, d, k - 1)
    return dict(u=u, delta=delta, z=z, Bm=Bm, Cm=Cm, A=A, D=D, db=db, h0=h0, w=w, bias=bias, cs=cs)


PREFILL_SCAN = ((1, 2048), (1, 16384), (8, 2048))
PREFILL_CONV = ((1, 2048), (1, 16384))


def _mamba_ssm_scan(ext_dir):
    """mamba_ssm's CUDA selective scan (``selective_scan_cuda.fwd``, built by build_mamba_ssm_ext.py into
    ``ext_dir``), or None and why not."""
    if ext_dir is None:
        return None, "not requested (--mamba-ssm-ext DIR)"
    from baselines import ext_dirs

    sys.path[:0] = ext_dirs(ext_dir)
    try:
        import selective_scan_cuda
    except Exception as e:  # ImportError, or an extension built for another torch / GPU
        return None, f"not available ({type(e).__name__}: {e})"
    return selective_scan_cuda.fwd, "available"


def bench_prefill(reps: int, bw: float, ex2: float, scan_shapes=PREFILL_SCAN, conv_shapes=PREFILL_CONV,
                  mamba_scan=None, dt=torch.bfloat16) -> list[dict]:
    """``mamba_scan``: mamba_ssm's ``selective_scan_cuda.fwd``, timed on the same inputs (its own initial
    state is zero and it also writes the chunk states its backward needs) after a check against ours."""
    rows = []
    d, n, k = 5120, 16, 4
    for B, L in sorted(set(scan_shapes) | set(conv_shapes)):
        t = _prefill_inputs(B, d, n, L, k, 4321, dt)
        y = torch.empty_like(t["u"])
        hs = torch.empty_like(t["h0"])
        cso = torch.empty_like(t["cs"])

        def scan():
            torch_ops.selective_scan_fn(t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], t["D"], t["z"], t["db"],
                                        t["h0"], True, out=y, ssm_state_out=hs)

        def conv():
            torch_ops.causal_conv1d_fn(t["u"], t["w"], t["bias"], t["cs"], "silu", out=y, conv_state_out=cso)

        def mamba():
            return mamba_scan(t["u"], t["delta"], t["A"], t["Bm"].unsqueeze(1), t["Cm"].unsqueeze(1), t["D"], t["z"],
                              t["db"], True)

        row = dict(L=L, d=d, dstate=n, batch=B, dtype=str(dt))
        # CUDA-graph replays: an eager call's host-side work (validation, argument packing) would
        # otherwise sit inside the events for the shorter kernels
        if (B, L) in scan_shapes:
            scan_ms = graph_per_call_us([scan] * 3, reps) / 1e3
            scan_bytes = 4 * B * d * L * 2 + 2 * B * n * L * 2 + d * n * 4 + 2 * B * d * n * 4
            exps = B * d * n * L  # one exp(dt*A) per state per step; softplus/silu add ~4 per (c, t)
            row.update(scan_ms=scan_ms, scan_bytes=scan_bytes, scan_bytes_floor_ms=scan_bytes / bw * 1e3,
                       scan_exps=exps, scan_exp_floor_ms=exps / ex2 * 1e3, scan_exps_per_s=exps / (scan_ms * 1e-3))
            if mamba_scan is not None:
                # same contract from a zero state: both outputs must agree before either is timed
                ours, h_ours = torch_ops.selective_scan_fn(t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], t["D"],
                                                           t["z"], t["db"], None, True)
                out, x, *rest = mamba()
                theirs = rest[0] if rest else out
                err = float(((theirs.float() - ours.float()).norm() / ours.float().norm()).item())
                herr = float(((x[:, :, -1, 1::2] - h_ours).norm() / h_ours.norm()).item())
                mamba_ms = graph_per_call_us([mamba] * 3, reps) / 1e3
                row.update(scan_mamba_ssm_ms=mamba_ms, scan_mamba_ssm_y_rel_err=err,
                           scan_mamba_ssm_state_rel_err=herr, scan_speedup_vs_mamba_ssm=mamba_ms / scan_ms)
                ours = h_ours = out = x = rest = theirs = None
        if (B, L) in conv_shapes:
            conv_ms = graph_per_call_us([conv] * 3, reps) / 1e3
            conv_bytes = 2 * B * d * L * 2
            row.update(conv_ms=conv_ms, conv_bytes=conv_bytes, conv_floor_ms=conv_bytes / bw * 1e3)
        rows.append(row)
        t = y = hs = cso = None
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# compile-time variants of the prefill scan, through the flat entry point

# name -> (kernel, -D options): "seq" is the channel-parallel scan_fwd (launcher.SCAN_CFG), "wide" its
# wide configuration (launcher.SCAN_WIDE_CFG), "tp" the time-parallel scan_fwd_tp with its TpCfg knobs
# (MRT_TP_WARPS / _G / _IPL / _MINB); "seq" also takes MRT_SCAN_SPT16 / _BC16 / _QU / _WARPS / _TCH
# (_WARPS: the block's warps, launched with that many) and the harness's MRT_BENCH_SMEM; "ws" is the
# warp-specialized scan_fwd_ws in blocks of launcher.ws_block_warps recurrence warps (MRT_BENCH_WS_R=r:
# the harness's override).
SCAN_VARIANTS = {
    "seq": ("seq", ()),
    "ws": ("ws", ()),
    "seq-bc16": ("seq", ("-DMRT_SCAN_BC16=1",)),
    "seq-spt4": ("seq", ("-DMRT_SCAN_SPT16=4",)),
    "wide": ("wide", ()),
    "tp": ("tp", ()),
    "tp-g16": ("tp", ("-DMRT_TP_G=16",)),
    "tp-ipl8": ("tp", ("-DMRT_TP_IPL=8",)),
    "tp-minb2": ("tp", ("-DMRT_TP_MINB=2",)),
    "tp-w8": ("tp", ("-DMRT_TP_WARPS=8", "-DMRT_TP_MINB=2")),
}
# A kernel from another source file (--baseline-source, e.g. an earlier selective_scan.cu taken from
# git): the sequence kernel launched with its own (channels per block, threads per block) (version 7 used
# (16, 128)), or with --baseline-kind ws the warp-specialized one in the launcher's geometry.
BASELINE = {"source": None, "geometry": (16, 128), "kind": "seq"}
_VARIANT_FN: dict = {}
_VARIANT_USAGE: dict = {}  # (name, dtype tag) -> compiler.EntryUsage of its entry (registers, stack frame, spills)
_VARIANT_BUILD: dict = {}  # (source, compile options) -> (cubin, usage): one compile per pair and process
_VARIANT_ENTRY = {"seq": "mrt_selective_scan_fwd", "wide": "mrt_selective_scan_wide_fwd",
                  "tp": "mrt_selective_scan_tp_fwd", "ws": "mrt_selective_scan_ws_fwd"}  # + _<tag>_n16


def scan_variant(name: str) -> tuple[str, tuple]:
    """(kernel, -D options) of a variant: a SCAN_VARIANTS name, optionally followed by +MACRO=VALUE
    overrides (e.g. ``seq+MRT_SCAN_WARPS=8+MRT_SCAN_QU=2``)."""
    base, *extra = name.split("+")
    if base not in SCAN_VARIANTS or any("=" not in x for x in extra):
        raise ValueError(f"unknown scan variant {name!r}; expected one of {sorted(SCAN_VARIANTS)}, "
                         "optionally followed by +MACRO=VALUE")
    kind, defines = SCAN_VARIANTS[base]
    return kind, tuple(defines) + tuple(f"-D{x}" for x in extra)


def _knob(defines, name: str, default: int) -> int:
    return next((int(o.split("=")[1]) for o in reversed(defines) if o.startswith(f"-D{name}=")), default)


def _variant_plan(name: str, B: int, d: int, L: int, n: int = 16, dt=torch.bfloat16):
    if name == "baseline":
        with open(BASELINE["source"]) as f:
            text = f.read()
        kind, defines = BASELINE["kind"], ()
    else:
        text = compiler._read("selective_scan.cu")
        kind, defines = scan_variant(name)
    grid = None  # else from the channels per block
    if name == "baseline" and kind == "seq":  # its own geometry
        (cpb, threads), smem = BASELINE["geometry"], 0
    elif kind in ("seq", "wide"):  # ScanCfg<16>: 16 / SPT lanes per channel
        warps, spt = _knob(defines, "MRT_SCAN_WARPS", 4), _knob(defines, "MRT_SCAN_SPT16", 2)
        spt = min(2 * spt, 4) if kind == "wide" else spt
        threads, cpb = 32 * warps, warps * 32 // (16 // spt)
        bc16 = kind == "wide" or _knob(defines, "MRT_SCAN_BC16", 0)
        smem = launcher._scan_smem(16, cpb // warps, warps, 2 if bc16 else 4, _knob(defines, "MRT_SCAN_TCH", 32))
        # MRT_BENCH_SMEM (the harness's, not the kernel's): more shared memory per block than the
        # kernel needs, which caps the blocks an SM takes and so spreads them
        smem = max(smem, _knob(defines, "MRT_BENCH_SMEM", 0))
    elif kind == "ws":
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        r = _knob(defines, "MRT_BENCH_WS_R", launcher.ws_block_warps(B, d, 16, itemsize=2, sms=sms))
        grid, threads, smem = launcher.ws_launch_config(B, d, 16, r)
        smem = max(smem, _knob(defines, "MRT_BENCH_SMEM", 0))
    else:
        threads = 32 * _knob(defines, "MRT_TP_WARPS", 4)
        cpb = threads // _knob(defines, "MRT_TP_G", 32)
        smem = 0
    dev = torch.cuda.current_device()
    ctx = launcher._current_context(dev)
    tag, ctype, _ = compiler.DTYPES[str(dt).removeprefix("torch.")]
    entry = f"{_VARIANT_ENTRY[kind]}_{tag}_n16"
    if (name, tag, ctx) not in _VARIANT_FN:  # one compile per variant, dtype and process
        text += f"\nMRT_SCAN_ENTRIES({tag}, {ctype}, 16)\n"
        drv = launcher._driver()
        opts = tuple(o for o in defines if "MRT_BENCH_" not in o)  # the harness's knobs stay out
        key = (text, opts)  # variants that differ only in the harness's knobs share a build
        if key not in _VARIANT_BUILD:
            _VARIANT_BUILD[key] = compiler.compile_with_usage(text, "selective_scan.cu",
                                                              launcher.current_arch(dev), extra_options=opts)
        cubin, usage = _VARIANT_BUILD[key]
        mod = launcher._cu(drv.cuModuleLoadData(cubin), "cuModuleLoadData")
        _VARIANT_FN[name, tag, ctx] = launcher._cu(drv.cuModuleGetFunction(mod, entry.encode()),
                                                   "cuModuleGetFunction")
        _VARIANT_USAGE[name, tag] = usage[entry]
    fn = _VARIANT_FN[name, tag, ctx]
    launcher.allow_smem(fn, smem)
    flat = [("p", x) for x in launcher._SCAN_PTRS[:9]] + [("i", v) for v in (B, d, L, n, 1)]
    flat += [("p", "y"), ("p", "ssm_state_out")]
    grid = grid or ((d + cpb - 1) // cpb, B)
    return launcher.LaunchPlan(fn, ctx, dev, grid, threads, name, flat=flat, smem=smem)


def bench_variants(reps: int, ex2: float, shapes=PREFILL_SCAN, names=tuple(SCAN_VARIANTS),
                   dims=(5120,), dt=torch.bfloat16) -> list[dict]:
    rows = []
    n = 16
    tag = compiler.DTYPES[str(dt).removeprefix("torch.")][0]
    for d, (B, L) in ((d, s) for d in dims for s in shapes):
        t = _prefill_inputs(B, d, n, L, 4, 1234, dt)
        ref_y, ref_h = torch_ops.selective_scan_fn(t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], t["D"], t["z"],
                                                   t["db"], t["h0"], True)
        y = torch.empty_like(t["u"])
        hs = torch.empty_like(t["h0"])
        ptrs = (t["u"].data_ptr(), t["delta"].data_ptr(), t["A"].data_ptr(), t["Bm"].data_ptr(), t["Cm"].data_ptr(),
                t["D"].data_ptr(), t["z"].data_ptr(), t["db"].data_ptr(), t["h0"].data_ptr(), y.data_ptr(),
                hs.data_ptr())
        for name in names:
            row = dict(variant=name, batch=B, L=L, d=d, dstate=n, dtype=str(dt))
            try:
                plan = _variant_plan(name, B, d, L, n, dt)
            except Exception as e:  # a variant that does not compile is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                continue
            y.fill_(float("nan"))
            hs.fill_(float("nan"))
            plan.launch(ptrs, torch.cuda.current_stream().cuda_stream)
            torch.cuda.synchronize()
            yerr = float(((y.float() - ref_y.float()).norm() / ref_y.float().norm()).item())
            herr = float(((hs - ref_h).norm() / ref_h.norm()).item())
            row.update(y_rel_err_vs_shipped=yerr, state_rel_err_vs_shipped=herr)
            row.update(dataclasses.asdict(_VARIANT_USAGE[name, tag]))  # registers, stack_frame, spill_*
            stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
            row["ms"] = graph_per_call_us([lambda: plan.launch(ptrs, stream())] * 3, reps) / 1e3
            row["exps_per_s"] = B * d * n * L / (row["ms"] * 1e-3)
            row["exp_floor_ms"] = B * d * n * L / ex2 * 1e3
            rows.append(row)
        t = ref_y = ref_h = y = hs = None
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# host overhead of eager calls


def bench_host(calls: int = 2000) -> list[dict]:
    """Wall-clock microseconds per eager torch_ops call, tiny tensors, the signature already cached."""
    B, d, L, n, k = 1, 64, 16, 16, 4
    t = _prefill_inputs(B, d, n, L, k, 99)
    y, hs, cso = torch.empty_like(t["u"]), torch.empty_like(t["h0"]), torch.empty_like(t["cs"])
    u1, z1 = t["u"][..., 0].contiguous(), t["z"][..., 0].contiguous()
    B1, C1 = t["Bm"][..., 0].contiguous(), t["Cm"][..., 0].contiguous()
    y1 = torch.empty_like(u1)
    h = t["h0"].clone()
    cs = t["cs"].clone()
    cases = {
        "selective_scan_fn (out given)": lambda: torch_ops.selective_scan_fn(
            t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], t["D"], t["z"], t["db"], t["h0"], True, out=y,
            ssm_state_out=hs),
        "selective_scan_fn (outputs allocated)": lambda: torch_ops.selective_scan_fn(
            t["u"], t["delta"], t["A"], t["Bm"], t["Cm"], t["D"], t["z"], t["db"], t["h0"], True),
        "causal_conv1d_fn (out given)": lambda: torch_ops.causal_conv1d_fn(
            t["u"], t["w"], t["bias"], t["cs"], "silu", out=y, conv_state_out=cso),
        "selective_state_update": lambda: torch_ops.selective_state_update(
            h, u1, u1, t["A"], B1, C1, t["D"], z1, t["db"], True, out=y1),
        "causal_conv1d_update": lambda: torch_ops.causal_conv1d_update(u1, cs, t["w"], t["bias"], "silu", out=y1),
    }
    rows = []
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        per = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per.append((time.perf_counter() - t0) / calls * 1e6)
            torch.cuda.synchronize()
        rows.append(dict(call=name, host_us=statistics.median(per)))
    return rows


SECTIONS = ("ceilings", "decode", "prefill", "variants", "host")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections among {','.join(SECTIONS)} (ceilings are measured "
                         "whenever prefill or variants need them)")
    ap.add_argument("--variant-shapes", default=",".join(f"{b}x{l}" for b, l in PREFILL_SCAN),
                    help="BxL list for the variants section")
    ap.add_argument("--variants", default=",".join(SCAN_VARIANTS), help="variant names for the variants section")
    ap.add_argument("--variant-dims", default="5120", help="d_inner list for the variants section")
    ap.add_argument("--mamba-ssm-ext", default=None, metavar="DIR",
                    help="build_mamba_ssm_ext.py's --build-dir: time mamba_ssm's CUDA selective scan beside ours")
    ap.add_argument("--baseline-source", default=None,
                    help="a selective_scan.cu to time beside the variants as 'baseline' (e.g. from git show)")
    ap.add_argument("--baseline-geometry", default="16x128",
                    help="channels per block x threads per block of the baseline's launch (kind seq)")
    ap.add_argument("--dtypes", default=",".join(BENCH_DTYPES),
                    help="input types of the decode, prefill and variants sections, among float16,bfloat16 "
                         "(issue 8's targets are stated in float16)")
    ap.add_argument("--baseline-kind", choices=("seq", "ws"), default="seq",
                    help="the baseline's kernel: seq (its own geometry) or ws (the launcher's geometry)")
    args = ap.parse_args(argv)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    if only - set(SECTIONS):
        ap.error(f"unknown sections {sorted(only - set(SECTIONS))}; expected among {SECTIONS}")
    dtypes = [x.strip() for x in args.dtypes.split(",") if x.strip()]
    if not dtypes or set(dtypes) - set(BENCH_DTYPES):
        ap.error(f"--dtypes {args.dtypes!r}: expected a comma-separated list among {','.join(BENCH_DTYPES)}")
    dts = [getattr(torch, x) for x in dtypes]
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU visible to torch; absolute times need one", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    name = props.name
    full_run = only == set(SECTIONS)
    out = args.out or (Path(__file__).parent / "results" / f"kernels-{slug(name)}.json" if full_run else None)
    reps = 10 if args.quick else 50
    l2 = getattr(props, "L2_cache_size", 50 << 20)

    result = dict(device=name, sms=props.multi_processor_count, l2_bytes=l2, torch=torch.__version__,
                  nvrtc=".".join(map(str, compiler.nvrtc_version())), python=platform.python_version(),
                  sections=sorted(only), dtypes=dtypes)
    bw = ex2 = None
    if only & {"ceilings", "prefill", "variants"}:
        bw, ex2 = copy_bandwidth("cuda")[0], mufu_ex2_rate()
        result.update(copy_bytes_per_s=bw, mufu_ex2_per_s=ex2)
        print(f"{name}: copy {bw / 1e12:.2f} TB/s, MUFU ex2 {ex2 / 1e12:.2f} T/s", flush=True)
    if "decode" in only:
        decode = []
        for dt in dts:
            rows, mamba_status = bench_decode(reps, l2, dt)
            decode += rows
        result.update(mamba_ssm_triton=mamba_status, decode=decode)
        print(f"mamba_ssm: {mamba_status}")
        print(f"{'dtype':>14} {'d':>5} {'B':>3} | {'ssu us':>7} {'mamba_ssm':>9} {'eager':>6} {'ref':>7} {'floor':>6} | "
              f"{'conv us':>7} {'ref':>7} {'floor':>6}")
        for r in decode:
            ms = r.get("ssu_mamba_ssm_triton_us")
            print(f"{r['dtype']:>14} {r['d']:>5} {r['batch']:>3} | {r['ssu_ours_us']:7.2f} {'n/a' if ms is None else f'{ms:.2f}':>9} "
                  f"{r['ssu_ours_eager_us']:6.1f} {r['ssu_ref_us']:7.1f} "
                  f"{r['ssu_bytes'] / (bw or 3e12) * 1e6:6.2f} | {r['conv_ours_us']:7.2f} {r['conv_ref_us']:7.1f} "
                  f"{r['conv_bytes'] / (bw or 3e12) * 1e6:6.2f}", flush=True)
    if "prefill" in only:
        mamba_scan, scan_status = _mamba_ssm_scan(args.mamba_ssm_ext)
        prefill = [r for dt in dts for r in bench_prefill(reps, bw, ex2, mamba_scan=mamba_scan, dt=dt)]
        result.update(mamba_ssm_scan_cuda=scan_status, prefill=prefill)
        print(f"mamba_ssm selective_scan_cuda: {scan_status}")
        for r in prefill:
            line = f"prefill {r['dtype']} B={r['batch']} L={r['L']}:"
            if "scan_ms" in r:
                line += (f" scan {r['scan_ms']:.4f} ms (bytes floor {r['scan_bytes_floor_ms']:.3f}, exp floor "
                         f"{r['scan_exp_floor_ms']:.3f}; {r['scan_exps_per_s'] / 1e12:.2f}e12 exp/s)")
                if "scan_mamba_ssm_ms" in r:
                    line += (f" mamba_ssm {r['scan_mamba_ssm_ms']:.4f} ms ({r['scan_speedup_vs_mamba_ssm']:.2f}x; "
                             f"y err {r['scan_mamba_ssm_y_rel_err']:.1e}, state {r['scan_mamba_ssm_state_rel_err']:.1e})")
            if "conv_ms" in r:
                line += f" conv {r['conv_ms']:.4f} ms (floor {r['conv_floor_ms']:.3f})"
            print(line, flush=True)
    if "variants" in only:
        names = [x for x in args.variants.split(",") if x]
        if args.baseline_source:
            BASELINE["source"] = args.baseline_source
            BASELINE["geometry"] = tuple(int(v) for v in args.baseline_geometry.split("x"))
            BASELINE["kind"] = args.baseline_kind
            names.append("baseline")
        vshapes = tuple(tuple(int(v) for v in x.split("x")) for x in args.variant_shapes.split(","))
        vdims = tuple(int(x) for x in args.variant_dims.split(","))
        variants = [r for dt in dts for r in bench_variants(reps, ex2, vshapes, tuple(names), vdims, dt)]
        result["scan_variants"] = variants
        for r in variants:
            if "error" in r:
                print(f"variant {r['variant']:12s} {r['dtype']} d={r['d']} B={r['batch']} L={r['L']:>5}: {r['error']}")
            else:
                print(f"variant {r['variant']:12s} {r['dtype']} d={r['d']} B={r['batch']} L={r['L']:>5}: {r['ms']:.4f} ms "
                      f"({r['exps_per_s'] / 1e12:.2f}e12 exp/s; y err vs shipped {r['y_rel_err_vs_shipped']:.1e}, "
                      f"state {r['state_rel_err_vs_shipped']:.1e}; {r['registers']} registers, "
                      f"{r['stack_frame']} B frame, {r['spill_stores']} B spilled)", flush=True)
    if "host" in only:
        host = bench_host()
        result["host"] = host
        for r in host:
            print(f"host {r['call']:40s} {r['host_us']:6.1f} us/call", flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
