"""How fast one SM's copy engine streams weights into shared memory (a development tool for issue 8):
the read rate over the whole GPU of a ring of cp.async.bulk stages per block, no consumers, by the
shape of the copies. The persistent decode kernel (decode_step.cu, `layers`) streams its weights as
stages of 16 rows x 512 columns, one 1 KB copy per row, through a ring of ~11 stages per SM.

    python benchmarks/bulk_rate.py [--mb 1024] [--out rate.json]

Each case: a matrix of --mb MB, fp16, row-major with rows of K columns; units of 16 rows dealt to the
blocks in turn; a unit's stages of 16 rows x KS columns in column order; each stage as `pieces` copies
(16: a copy per row, lane i copying row i as `layers` does; with `tiled` the stage is contiguous in
memory, i.e. a tile-major copy of the matrix, and 16, 4 or 1 copies). Rates are bytes read / GPU time (CUDA events, median of 5), against a plain vectorised load
kernel (all threads, 16-byte loads) in the same run. Needs cupy and an sm_90 GPU.
"""
from __future__ import annotations

import argparse
import json

import cupy as cp
import numpy as np

SRC = r"""
extern "C" __global__ void bulk_stream(const char* __restrict__ src, long long units, int rowb, int kb,
                                       int pieces, int S, int tiled, int evict_first, unsigned long long* sink) {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem);
  unsigned char* ring = smem + 1024;
  const int stage = 16 * kb;                  // bytes per stage
  const int nseg = rowb / kb;                  // stages per unit
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"((unsigned)__cvta_generic_to_shared(full + s)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int lane = threadIdx.x;  // one warp: lane p < pieces issues piece p of each stage (as `layers`)
  unsigned long long pol;
  if (evict_first) asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  else asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(pol));
  long long t = 0;
  for (long long u = blockIdx.x; u < units; u += gridDim.x) {
    for (int g = 0; g < nseg; ++g, ++t) {
      const int slot = (int)(t % S);
      const unsigned bar = (unsigned)__cvta_generic_to_shared(full + slot);
      if (t >= S) {  // the slot's previous stage has landed
        const unsigned par = (unsigned)(((t / S) - 1) & 1);
        asm volatile("{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}\n"
                     ::"r"(bar), "r"(par) : "memory");
      }
      if (lane == 0)
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(stage) : "memory");
      __syncwarp();
      const int pb = stage / pieces;
      for (int p = lane; p < pieces; p += 32) {
        const char* s;
        if (tiled) s = src + (u * nseg + g) * (long long)stage + (long long)p * pb;
        else s = src + (u * 16 + p) * (long long)rowb + (long long)g * kb;  // a copy per row (pieces 16)
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
                     ::"r"((unsigned)__cvta_generic_to_shared(ring + slot * stage + p * pb)), "l"(s), "r"(pb), "r"(bar), "l"(pol)
                     : "memory");
      }
    }
  }
  for (long long e = t - S; e < t; ++e) {  // drain
    if (e < 0) continue;
    const unsigned bar = (unsigned)__cvta_generic_to_shared(full + (int)(e % S));
    const unsigned par = (unsigned)((e / S) & 1);
    asm volatile("{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}\n"
                 ::"r"(bar), "r"(par) : "memory");
  }
  if (blockIdx.x == 0 && lane == 0) sink[0] = ring[0];
}

extern "C" __global__ void load_stream(const uint4* __restrict__ src, long long n, unsigned long long* sink) {
  unsigned acc = 0u;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const uint4 v = src[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) sink[0] = acc;
}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    mod = cp.RawModule(code=SRC, options=("-std=c++17",))
    bulk, load = mod.get_function("bulk_stream"), mod.get_function("load_stream")
    dev = cp.cuda.Device()
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
