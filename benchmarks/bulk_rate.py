"""How fast one SM's copy engine streams weights into shared memory (a development tool for issue 8):
the read rate over the whole GPU of a ring of cp.async.bulk stages per block, no consumers, by the
shape of the copies. The persistent decode kernel (decode_step.cu, `layers`) streams its weights as
stages of 16 rows x 512 columns, one 1 KB copy per row, through a ring of ~11 stages per SM.

    python benchmarks/bulk_rate.py [--mb 1024] [--out rate.json]

Each case: a matrix of --mb MB, fp16, row-major with rows of K columns; units of 16 rows dealt to the
blocks in turn; a unit's stages of 16 rows x KS columns in column order; each stage as `pieces` copies
(16: a copy per row, lane i copying row i as `layers` does; with `tiled` the stage is contiguous in
memory, i.e. a tile-major copy of the matrix, and 16, 4 or 1 copies); the stages issued by one warp or
by several in turn, and one stage per bulk-copy instruction (lanes 0-15) or two (lanes 16-31 the
next). Rates are bytes read / GPU time (CUDA events, median of 5), against a plain vectorised load
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
                                           int pieces, int S, int tiled, int evict_first, int pair,
                                           unsigned long long* sink) {
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
  // warp w of nw issues the stages t with (t / pair) % nw == w; pair 2: lanes 16..31 the second stage
  // of each pair in the same instruction (16 pieces a stage). S is a multiple of nw * pair (the host), so
  // a slot's stages all come from one warp. The loop keeps its slot, round, unit and segment as running
  // counts (no division per stage: a 64-bit one costs more than the copies' issue, see NOTES item 49).
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5, step = nw * pair;
  const unsigned long long pol = evict_first ? l2_policy<true>() : l2_policy<false>();
  const unsigned mine = blockIdx.x < units ? (unsigned)((units - 1 - blockIdx.x) / gridDim.x + 1) : 0u;
  const unsigned T = mine * (unsigned)nseg;  // this block's stages
  unsigned t0 = warp * pair, slot = t0 % S, round = t0 / S, g = t0 % nseg, uu = t0 / nseg;
  const int pb = stage / pieces;
  for (; t0 < T; t0 += step) {
    for (unsigned j = 0; j < (unsigned)pair && t0 + j < T; ++j) {
      if (round) mbar_wait(full + slot + j, (round - 1) & 1);  // its previous stage landed
      if (lane == 0) mbar_expect_tx(full + slot + j, stage);
    }
    __syncwarp();
    const unsigned j = pair == 2 ? lane >> 4 : 0u, p0 = pair == 2 ? lane & 15 : lane;
    if (t0 + j < T) {
      unsigned gj = g + j, uj = uu;
      if (gj >= (unsigned)nseg) { gj -= nseg; ++uj; }
      const long long u = blockIdx.x + (long long)uj * gridDim.x;
      for (int p = p0; p < pieces; p += (pair == 2 ? 16 : 32)) {
        const char* s;
        if (tiled) s = src + (u * nseg + gj) * (long long)stage + (long long)p * pb;
        else s = src + (u * 16 + p) * (long long)rowb + (long long)gj * kb;  // a copy per row (pieces 16)
        bulk_copy(ring + (slot + j) * stage + p * pb, s, pb, full + slot + j, pol);
      }
    }
    slot += step;
    if (slot >= (unsigned)S) { slot -= S; ++round; }
    for (g += step; g >= (unsigned)nseg; g -= nseg) ++uu;
  }
  for (unsigned e = T > (unsigned)S ? T - S : 0u; e < T; ++e)  // drain: every warp waits for the last S stages
    mbar_wait(full + e % S, (e / S) & 1);
  if (blockIdx.x == 0 && threadIdx.x == 0) sink[0] = ring[0];
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

    def case(K, KS, pieces, ring_kb, per_sm=1, tiled=0, ef=1, warps=1, pair=1):
        rowb, kb = 2 * K, 2 * KS
        S = max(2, ring_kb * 1024 // (16 * kb))
        S = max(warps * pair, S - S % (warps * pair))  # a slot's stages all from one warp (its waits' parity)
        units = nbytes // (16 * rowb)
        smem = 1024 + S * 16 * kb
        ms = timed(lambda: bulk((sms * per_sm,), (32 * warps,), (buf, np.int64(units), np.int32(rowb), np.int32(kb),
                                                                  np.int32(pieces), np.int32(S), np.int32(tiled),
                                                                  np.int32(ef), np.int32(pair), sink), shared_mem=smem))
        tb = units * 16 * rowb / ms / 1e9
        r = dict(K=K, KS=KS, copy_bytes=16 * kb // pieces, stages=S, stage_kb=16 * kb // 1024, blocks_per_sm=per_sm,
                 issuing_warps=warps, stages_per_instruction=pair, tiled=tiled, evict_first=ef,
                 tb_s=round(tb, 3), of_loads=round(tb / ref, 3))
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
    for warps, pair in ((2, 1), (4, 1), (1, 2), (2, 2)):  # the `layers` shape issued by more warps / lanes
        case(2048, 512, 16, 160, warps=warps, pair=pair)
    if args.out:
        with open(args.out, "w") as f:
            name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
            json.dump(dict(device=name, sms=sms, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
