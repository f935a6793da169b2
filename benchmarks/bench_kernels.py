"""Microbenchmarks of the plugins_cuda kernels on the GPU (see benchmarks/NOTES.md, "Kernels").

    python benchmarks/bench_kernels.py [--out benchmarks/results/kernels-<device>.json] [--quick]

Measures, in one run on one device:
  * ceilings: device-to-device copy bandwidth (bytes read + written) and MUFU ex2 throughput
    (a microkernel compiled with the same NVRTC path as the kernels);
  * decode step (L = 1) of selective_state_update and causal_conv1d_update at d = 1536 (mamba-130m)
    and d = 5120 (mamba-2.8b), n = 16, k = 4, batch 1 and 64, bf16: ours, the torch reference, and
    mamba_ssm's Triton selective_state_update when importable (reported "not available" otherwise).
    Timed as CUDA-graph replays of many launches that rotate over enough input sets to overflow L2
    (each layer's state comes from HBM in a real model), median of the replays;
  * prefill selective_scan at L = 2048 and 16384 (d = 5120, n = 16, B = 1) against its two floors,
    and causal_conv1d at the same sizes; CUDA events, median.
Absolute times are only meaningful from a GPU; this script refuses to run without one.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
from pathlib import Path

import torch

from mamba_rt.exporters.ops_ref import causal_conv1d_update_ref, selective_state_update_ref
from mamba_rt.plugins_cuda import compiler, launcher, torch_ops

DT = torch.bfloat16


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
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    return 1e3 * median_ms(g.replay, reps, inner=len(calls))


# ---------------------------------------------------------------------------------------------
# ceilings


def copy_bandwidth() -> float:
    """Bytes read + written per second for a 1 GiB device-to-device copy."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    b.copy_(a)
    ms = median_ms(lambda: b.copy_(a), 20)
    return 2 * n / (ms * 1e-3)


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


def decode_sets(B, d, n, k, l2_bytes):
    per_set = B * d * n * 4 * 2 + d * n * 4 + B * d * (k - 1) * 2 * 2
    nsets = max(2, min(256, -(-3 * l2_bytes // per_set)))
    g = torch.Generator(device="cuda")
    g.manual_seed(1234)
    r = lambda *s, dtype=DT: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    sets = []
    for _ in range(nsets):
        sets.append(dict(
            ssm_state=r(B, d, n, dtype=torch.float32), u=r(B, d), delta=r(B, d), A=-torch.exp(r(d, n, dtype=torch.float32)),
            Bm=r(B, n), Cm=r(B, n), D=r(d, dtype=torch.float32), z=r(B, d), delta_bias=r(d, dtype=torch.float32),
            conv_state=r(B, d, k - 1), x=r(B, d), weight=r(d, k), bias=r(d), y=torch.empty(B, d, dtype=DT, device="cuda"),
        ))
    return sets


def bench_decode(reps: int, l2_bytes: int) -> list[dict]:
    mamba_ssu, mamba_status = _mamba_ssm_ssu()
    rows = []
    for d in (1536, 5120):
        for B in (1, 64):
            n, k = 16, 4
            sets = decode_sets(B, d, n, k, l2_bytes)
            scan_keys = ("u", "delta", "A", "Bm", "Cm", "D", "z", "delta_bias")

            def ours_ssu(s):
                return lambda: torch_ops.selective_state_update(s["ssm_state"], *(s[k_] for k_ in scan_keys), out=s["y"])

            def ref_ssu(s):
                return lambda: selective_state_update_ref(s["ssm_state"], *(s[k_] for k_ in scan_keys))

            def ours_conv(s):
                return lambda: torch_ops.causal_conv1d_update(s["x"], s["conv_state"], s["weight"], s["bias"], "silu", out=s["y"])

            def ref_conv(s):
                return lambda: causal_conv1d_update_ref(s["x"], s["conv_state"], s["weight"], s["bias"], "silu")

            row = dict(d=d, batch=B, dstate=n, width=k, dtype=str(DT), input_sets=len(sets))
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
            # fewest bytes: fp32 state read + written, A, D, bias; u, delta, z, y and Bm, Cm in bf16
            row["ssu_bytes"] = B * d * n * 8 + d * n * 4 + 2 * d * 4 + B * d * 2 * 4 + B * n * 2 * 2
            row["conv_bytes"] = B * d * (k - 1) * 2 * 2 + d * (k + 1) * 2 + B * d * 2 * 2
            rows.append(row)
    return rows, mamba_status


# ---------------------------------------------------------------------------------------------
# prefill


def bench_prefill(reps: int, bw: float, ex2: float, lengths) -> list[dict]:
    rows = []
    B, d, n, k = 1, 5120, 16, 4
    g = torch.Generator(device="cuda")
    g.manual_seed(4321)
    for L in lengths:
        r = lambda *s, dtype=DT: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
        u, delta, z = r(B, d, L), r(B, d, L) * 0.5 - 0.5, r(B, d, L)
        Bm, Cm = r(B, n, L), r(B, n, L)
        A = -torch.exp(r(d, n, dtype=torch.float32))
        D, db = r(d, dtype=torch.float32), r(d, dtype=torch.float32)
        h0 = r(B, d, n, dtype=torch.float32)
        y = torch.empty_like(u)
        hs = torch.empty_like(h0)
        w, bias, cs = r(d, k), r(d), r(B, d, k - 1)
        cso = torch.empty_like(cs)

        def scan():
            torch_ops.selective_scan_fn(u, delta, A, Bm, Cm, D, z, db, h0, True, out=y, ssm_state_out=hs)

        def conv():
            torch_ops.causal_conv1d_fn(u, w, bias, cs, "silu", out=y, conv_state_out=cso)

        # CUDA-graph replays: an eager call's host-side work (validation, argument packing) would
        # otherwise sit inside the events for the shorter kernels
        scan_ms = graph_per_call_us([scan] * 3, reps) / 1e3
        conv_ms = graph_per_call_us([conv] * 3, reps) / 1e3
        scan_bytes = 4 * B * d * L * 2 + 2 * B * n * L * 2 + d * n * 4 + 2 * B * d * n * 4
        exps = B * d * n * L  # one exp(dt*A) per state per step; softplus/silu add ~3 per (c, t)
        conv_bytes = 2 * B * d * L * 2
        rows.append(dict(
            L=L, d=d, dstate=n, batch=B, dtype=str(DT),
            scan_ms=scan_ms, scan_bytes=scan_bytes, scan_bytes_floor_ms=scan_bytes / bw * 1e3,
            scan_exps=exps, scan_exp_floor_ms=exps / ex2 * 1e3,
            scan_exps_per_s=exps / (scan_ms * 1e-3),
            conv_ms=conv_ms, conv_bytes=conv_bytes, conv_floor_ms=conv_bytes / bw * 1e3,
        ))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU visible to torch; absolute times need one", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    name = props.name
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = args.out or Path(__file__).parent / "results" / f"kernels-{slug}.json"
    reps = 10 if args.quick else 50
    l2 = getattr(props, "L2_cache_size", 50 << 20)

    bw = copy_bandwidth()
    ex2 = mufu_ex2_rate()
    decode, mamba_status = bench_decode(reps, l2)
    prefill = bench_prefill(reps, bw, ex2, (2048, 16384))
    result = dict(
        device=name, sms=props.multi_processor_count, l2_bytes=l2, torch=torch.__version__,
        nvrtc=".".join(map(str, compiler.nvrtc_version())), python=platform.python_version(),
        copy_bytes_per_s=bw, mufu_ex2_per_s=ex2, mamba_ssm_triton=mamba_status,
        decode=decode, prefill=prefill,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"{name}: copy {bw / 1e12:.2f} TB/s, MUFU ex2 {ex2 / 1e12:.2f} T/s; mamba_ssm: {mamba_status}")
    print(f"{'d':>5} {'B':>3} | {'ssu us':>7} {'mamba_ssm':>9} {'eager':>6} {'ref':>7} {'floor':>6} | {'conv us':>7} "
          f"{'ref':>7} {'floor':>6}")
    for r in decode:
        ms = r.get("ssu_mamba_ssm_triton_us")
        print(f"{r['d']:>5} {r['batch']:>3} | {r['ssu_ours_us']:7.2f} {'n/a' if ms is None else f'{ms:.2f}':>9} "
              f"{r['ssu_ours_eager_us']:6.1f} {r['ssu_ref_us']:7.1f} "
              f"{r['ssu_bytes'] / bw * 1e6:6.2f} | {r['conv_ours_us']:7.2f} {r['conv_ref_us']:7.1f} "
              f"{r['conv_bytes'] / bw * 1e6:6.2f}")
    for r in prefill:
        print(f"scan L={r['L']}: {r['scan_ms']:.3f} ms (bytes floor {r['scan_bytes_floor_ms']:.3f}, exp floor "
              f"{r['scan_exp_floor_ms']:.3f}; {r['scan_exps_per_s'] / 1e12:.2f}e12 exp/s); conv {r['conv_ms']:.3f} ms "
              f"(floor {r['conv_floor_ms']:.3f})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
