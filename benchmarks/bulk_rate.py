"""How fast one SM's copy engine streams weights into shared memory (a development tool for issue 8):
the read rate over the whole GPU of a ring of cp.async.bulk stages per block, no consumers, by the
shape of the copies. The persistent decode kernel (decode_step.cu, `layers`) streams its weights as
stages of 16 rows x 512 columns, one 1 KB copy per row, through a ring of ~11 stages per SM.

    python benchmarks/bulk_rate.py [--mb 1024] [--out rate.json]

Each case: a matrix of --mb MB, fp16, row-major with rows of K columns; units of 16 rows dealt to the
blocks in turn; a unit's stages of 16 rows x KS columns in column order; each stage as `pieces` copies
(16: a copy per row, lane i copying row i as `layers` does; with `tiled` the stage is contiguous in
memory, i.e. a tile-major copy of the matrix, and 16, 4 or 1 copies). Rates are bytes read / GPU time (CUDA events, median of 5), against a plain vectorised load
kernel (all threads, 16-byte loads) in the same run. The ring uses decode_step.cu's own mbarrier and
bulk-copy helpers (its source with this tool's kernels appended). Needs cupy and an sm_90 GPU; run from
the repository root (PYTHONPATH=$PWD).
"""
from __future__ import annotations

import argparse
import json
import tempfile

import cupy as cp
import numpy as np

# The ring on decode_step.cu's own helpers (mbarriers, bulk copies, L2 policies), appended to its source.
SRC = r"""
extern "C" __global__ void mrt_bulk_stream(const char* __restrict__ src, long long units, int rowb, int kb,
                                           int pieces, int S, int tiled, int evict_first, unsigned long long* sink) {
  using namespace mrt;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem);
  unsigned char* ring = smem + 1024;
  const int stage = 16 * kb;                  // bytes per stage
  const int nseg = rowb / kb;                  // stages per unit
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) mbar_init(full + s, 1);
    mbar_init_fence();
  }
  __syncthreads();
  const int lane = threadIdx.x;  // one warp: lane p < pieces issues piece p of each stage (as `layers`)
  const unsigned long long pol = evict_first ? l2_policy<true>() : l2_policy<false>();
  long long t = 0;
  for (long long u = blockIdx.x; u < units; u += gridDim.x) {
    for (int g = 0; g < nseg; ++g, ++t) {
      const int slot = (int)(t % S);
      if (t >= S) mbar_wait(full + slot, (unsigned)(((t / S) - 1) & 1));  // its previous stage landed
      if (lane == 0) mbar_expect_tx(full + slot, stage);
      __syncwarp();
      const int pb = stage / pieces;
      for (int p = lane; p < pieces; p += 32) {
        const char* s;
        if (tiled) s = src + (u * nseg + g) * (long long)stage + (long long)p * pb;
        else s = src + (u * 16 + p) * (long long)rowb + (long long)g * kb;  // a copy per row (pieces 16)
        bulk_copy(ring + slot * stage + p * pb, s, pb, full + slot, pol);
      }
    }
  }
  for (long long e = t - S; e < t; ++e)  // drain
    if (e >= 0) mbar_wait(full + (int)(e % S), (unsigned)((e / S) & 1));
  if (blockIdx.x == 0 && lane == 0) sink[0] = ring[0];
}

extern "C" __global__ void mrt_load_stream(const uint4* __restrict__ src, long long n, unsigned long long* sink) {
  unsigned acc = 0u;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const uint4 v = src[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) sink[0] = acc;
}
"""


def build(arch: int) -> bytes:
    """A cubin of decode_step.cu (fp16) with the two kernels above appended."""
    from mamba_rt.plugins_cuda import compiler, decode_step

    return compiler.compile_program(decode_step.program_source("float16") + SRC, decode_step.SOURCE, arch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = cp.cuda.Device()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(build(int(dev.compute_capability)))
        f.flush()
        mod = cp.RawModule(path=f.name)
        bulk, load = mod.get_function("mrt_bulk_stream"), mod.get_function("mrt_load_stream")
    sms = dev.attributes["MultiProcessorCount"]
    nbytes = args.mb << 20
    buf = cp.zeros(nbytes // 2, dtype=cp.float16)
    sink = cp.zeros(4, dtype=cp.uint64)
    bulk.max_dynamic_shared_size_bytes = 227 * 1024

    def timed(fn):
        fn()
        ts = []
        for _ in range(5):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(cp.cuda.get_elapsed_time(a, b))
        return float(np.median(ts))

    rows = []
    ms = timed(lambda: load((sms * 8,), (512,), (buf, np.int64(nbytes // 16), sink)))
    ref = nbytes / ms / 1e9
    rows.append(dict(case="plain 16-byte loads, 8 blocks x 512 threads per SM", tb_s=round(ref, 3)))
    print(rows[-1], flush=True)

    def case(K, KS, pieces, ring_kb, per_sm=1, tiled=0, ef=1):
        rowb, kb = 2 * K, 2 * KS
        S = max(2, ring_kb * 1024 // (16 * kb))
        units = nbytes // (16 * rowb)
        smem = 1024 + S * 16 * kb
        ms = timed(lambda: bulk((sms * per_sm,), (32,), (buf, np.int64(units), np.int32(rowb), np.int32(kb),
                                                          np.int32(pieces), np.int32(S), np.int32(tiled),
                                                          np.int32(ef), sink), shared_mem=smem))
        tb = units * 16 * rowb / ms / 1e9
        r = dict(K=K, KS=KS, copy_bytes=16 * kb // pieces, stages=S, stage_kb=16 * kb // 1024, blocks_per_sm=per_sm,
                 tiled=tiled, evict_first=ef, tb_s=round(tb, 3), of_loads=round(tb / ref, 3))
        rows.append(r)
        print(r, flush=True)

    for ring in (48, 96, 160, 200):           # the layers kernel today: 16 lanes, a 1 KB copy per row each
        case(2048, 512, 16, ring)
    for K in (4096, 5120):
        case(K, 512, 16, 160)
    for KS in (256, 1024, 2048):
        case(2048, KS, 16, 160)
    for pieces in (16, 4, 1):                 # tiled: the stage contiguous, in 16, 4 or 1 copies
        case(2048, 512, pieces, 160, tiled=1)
    case(2048, 512, 16, 80, per_sm=2)
    case(2048, 512, 16, 160, ef=0)
    if args.out:
        with open(args.out, "w") as f:
            name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
            json.dump(dict(device=name, sms=sms, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
