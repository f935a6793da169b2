"""What a 16-byte (or 8- or 4-byte) shared-memory load costs under different lane -> address patterns (a
development tool for issue 8; benchmarks/NOTES.md, items 83 and 88, where the rules it measured are written down).

    python benchmarks/probe_smem_wavefronts.py [--iters 1024] [--width 16|8|4]

Every thread of a full GPU (8 blocks of 256 threads per SM) runs four independent chains of loads (`LDS.128`,
or `LDS.64` / `LDS` with --width 8 / 4) from a pattern's address, each address depending on the previous load's
value (so nothing is hoisted), and the figure is ns per warp-wide load per SM: 16-byte loads that take two
wavefronts cost about 1.5 ns on the H100, four about 2.15. The wavefront counts themselves come from Nsight
Compute:

    ncu --clock-control none --metrics l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,\\
        smsp__inst_executed_op_shared_ld.sum python benchmarks/probe_smem_wavefronts.py --iters 64 --reps 1

Addresses are in words of the load's width (16 bytes unless --width says otherwise); lane l, quarter warp
q = l / 8, r = l % 8. A row of the scan's shared arrays is RS words (36 floats: 9 words of 16 bytes, 18 of 8,
36 of 4), so "RS q" puts quarter warps on different banks.
"""
from __future__ import annotations

import argparse

import torch

from mamba_rt.plugins_cuda import compiler, decode_step, launcher
from profile_decode import captured, dump_rows, replay_ms

# name -> (the address expression, what it stands for)
PATTERNS = {
    "r": ("r", "8 words per quarter warp, the same 8 in every quarter warp (Bm / Cm before item 83)"),
    "RSq": ("RS * q", "one word per quarter warp, 4 over the warp (dt before item 83)"),
    "0": ("0", "one word for the whole warp"),
    "l": ("l", "32 words"),
    "r%2": ("r % 2", "2 words per quarter warp, the same in every quarter warp"),
    "r%4": ("r % 4", "4 words per quarter warp, the same in every quarter warp"),
    "RS(q/2)": ("RS * (q / 2)", "one word per quarter warp, quarter-warp pairs alike"),
    "r+8(q%2)": ("r + 8 * (q % 2)", "8 words per quarter warp, 2 sets"),
    "r%2+RSq": ("r % 2 + RS * q", "2 words per quarter warp, each quarter warp its own (bank conflicts)"),
    "l/4": ("l / 4", "2 words per quarter warp, 8 over the warp (Bm / Cm with item 83's mapping)"),
    "l%4": ("l % 4", "4 words per quarter warp (dt with item 83's mapping, without its row stride)"),
    "RS(l%4)": ("RS * (l % 4)",
                "4 words per quarter warp, one a row, the same in every quarter warp (dt with item 83's mapping)"),
}
# --width -> (the CUDA type, its sum, words of a 36-float row)
WIDTHS = {16: ("float4", "v.x + v.y + v.z + v.w", 9), 8: ("float2", "v.x + v.y", 18), 4: ("float", "v", 36)}

SOURCE_HEAD = r"""
struct ProbeArgs { float* out; long long iters, mask; };
"""
KERNEL = r"""
extern "C" __global__ void probe_{i}(const ProbeArgs p) {{
  constexpr int NW = 16384 / sizeof({ty}), RS = {rs};
  __shared__ {ty} s[NW];
  for (int i = threadIdx.x; i < 4096; i += blockDim.x) reinterpret_cast<float*>(s)[i] = i;  // (16 KB)
  __syncthreads();
  const int l = threadIdx.x % 32, q = l / 8, r = l % 8;
  (void)q; (void)r; (void)RS;
  const int a = {expr};
  const int mask = (int)p.mask;  // 0 at run time: the address depends on the last load, nothing is hoisted
  float acc[4] = {{0.f, 0.f, 0.f, 0.f}};
  for (long long it = 0; it < p.iters; ++it) {{
#pragma unroll
    for (int k = 0; k < 4; ++k) {{
      const {ty} v = s[(a + 64 * k + (__float_as_int(acc[k]) & mask)) & (NW - 1)];
      acc[k] += {sum};
    }}
  }}
  p.out[blockIdx.x * blockDim.x + threadIdx.x] = acc[0] + acc[1] + acc[2] + acc[3];
}}
"""

ProbeArgs = decode_step._struct("ProbeArgs", [("out", decode_step._P), ("iters", decode_step._L),
                                              ("mask", decode_step._L)])
THREADS, BLOCKS_PER_SM = 256, 8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=1024, help="iterations of the four load chains per thread")
    ap.add_argument("--reps", type=int, default=5, help="graph replays per timing round (five rounds, the median)")
    ap.add_argument("--width", type=int, choices=sorted(WIDTHS), default=16, help="bytes per lane and load")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ty, total, rs = WIDTHS[args.width]
    if not torch.cuda.is_available():
        print("probe_smem_wavefronts: no CUDA GPU visible to torch", flush=True)
        return 2
    drv = launcher._driver()
    torch.cuda.init()
    dev = torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    source = SOURCE_HEAD + "".join(KERNEL.format(i=i, expr=e, ty=ty, sum=total, rs=rs)
                                   for i, (e, _) in enumerate(PATTERNS.values()))
    mod = launcher._cu(drv.cuModuleLoadData(compiler.compile_program(source, "probe.cu", launcher.current_arch(dev))),
                       "cuModuleLoadData")
    out = torch.zeros(sms * BLOCKS_PER_SM * THREADS, device="cuda")
    grid = sms * BLOCKS_PER_SM
    warp_loads_per_sm = BLOCKS_PER_SM * (THREADS // 32) * args.iters * 4
    rows = []
    for i, (name, (expr, what)) in enumerate(PATTERNS.items()):
        fn = launcher._cu(drv.cuModuleGetFunction(mod, f"probe_{i}".encode()), "cuModuleGetFunction")
        ln = decode_step.Launch(fn, (grid, 1), THREADS, 0, ProbeArgs(out.data_ptr(), args.iters, 0), name)
        ms = replay_ms(captured(lambda stream: decode_step.launch_kernel(ln, stream, False)), args.reps)
        row = {"pattern": name, "address": expr, "width": args.width, "what": what, "ms": ms,
               "ns_per_warp_load_per_sm": ms * 1e6 / warp_loads_per_sm}
        rows.append(row)
        print(f"{name:>9}  {row['ns_per_warp_load_per_sm']:.3f} ns  ({what})", flush=True)
    dump_rows(args.out, args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
