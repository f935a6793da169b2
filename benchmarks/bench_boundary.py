"""What a kernel boundary costs in a decode step's CUDA graph: chains of dependent kernels that do almost
nothing, so that the time per kernel is the boundary itself (a development tool for issue 8; see
benchmarks/NOTES.md, item 79).

    python benchmarks/bench_boundary.py [--kernels 96] [--grids 1,48,132,264] [--reps 50]

Each kernel of a chain waits for the one before it (launched as the fused decode kernels are, by
decode_step.launch_kernel: with programmatic dependent launch and `griddepcontrol.wait`, and again in plain
stream order),
then every block reads the whole vector of N floats the previous kernel wrote (every block wrote a slice
of it: an all-to-all dependency like a GEMV's input) and writes its own slice of the next vector. One
graph per setting, replayed ``--reps`` times between CUDA events, five times (profile_decode.replay_ms, the
median); the figure is GPU µs per kernel.
"""
from __future__ import annotations

import argparse

import torch

from mamba_rt.plugins_cuda import compiler, decode_step, launcher
from profile_decode import captured, dump_rows, replay_ms

SOURCE = r"""
struct ChainArgs { const float* x; float* y; long long n, pdl; };
extern "C" __global__ void chain(const ChainArgs a) {
  const float* __restrict__ x = a.x;
  float* __restrict__ y = a.y;
  const int n = (int)a.n;
  if (a.pdl) asm volatile("griddepcontrol.launch_dependents;" :::);
  if (a.pdl) asm volatile("griddepcontrol.wait;" ::: "memory");
  __shared__ float red[32];
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += red[w];
    red[0] = t;
  }
  __syncthreads();
  const int per = (n + gridDim.x - 1) / gridDim.x;
  for (int i = blockIdx.x * per + threadIdx.x; i < min(n, (blockIdx.x + 1) * per); i += blockDim.x)
    y[i] = red[0] * 1e-3f + (float)i;
}
"""


ChainArgs = decode_step._struct("ChainArgs", [("x", decode_step._P), ("y", decode_step._P), ("n", decode_step._L),
                                              ("pdl", decode_step._L)])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", type=int, default=96, help="kernels per chain (per graph)")
    ap.add_argument("--grids", default="1,48,132,264", help="blocks per kernel")
    ap.add_argument("--threads", type=int, default=288)
    ap.add_argument("--n", type=int, default=768, help="floats each kernel reads whole and writes a slice of")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    drv = launcher._driver()
    torch.cuda.init()
    dev = torch.cuda.current_device()
    cubin = compiler.compile_program(SOURCE, "chain.cu", launcher.current_arch(dev))
    mod = launcher._cu(drv.cuModuleLoadData(cubin), "cuModuleLoadData")
    fn = launcher._cu(drv.cuModuleGetFunction(mod, b"chain"), "cuModuleGetFunction")
    bufs = [torch.zeros(args.n, device="cuda") for _ in range(2)]
    keep = []

    def launch(grid: int, pdl: bool, src, dst, stream: int) -> None:
        ln = decode_step.Launch(fn, (grid, 1), args.threads, 0, ChainArgs(src.data_ptr(), dst.data_ptr(), args.n,
                                                                          int(pdl)), "chain")
        keep.append(ln)
        decode_step.launch_kernel(ln, stream, pdl)

    rows = []
    print(f"{torch.cuda.get_device_name()}: chains of {args.kernels} kernels, {args.threads} threads, "
          f"{args.n} floats in and a slice out", flush=True)
    for grid in (int(g) for g in args.grids.split(",")):
        for pdl in (True, False):
            def chain(stream: int, grid=grid, pdl=pdl) -> None:
                for k in range(args.kernels):
                    launch(grid, pdl, bufs[k % 2], bufs[(k + 1) % 2], stream)

            graph = captured(chain)
            row = {"grid": grid, "pdl": pdl, "us_per_kernel": replay_ms(graph, args.reps) * 1e3 / args.kernels}
            rows.append(row)
            print(f"grid {grid:4d} {'PDL   ' if pdl else 'stream'}: {row['us_per_kernel']:.3f} µs per kernel", flush=True)
    dump_rows(args.out, args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
