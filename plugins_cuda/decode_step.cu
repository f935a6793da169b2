// The fused decode step: one token of every layer of a Mamba-1 model in a handful of kernels.
//
// The two ops of DESIGN.md (CausalConv1d, SelectiveScan) cost one kernel each per layer, and the
// reference model adds ~20 more around them (RMSNorm in pieces, projections, layout copies). At one
// token per sequence every one of them is a few microseconds of launch latency for almost no bytes,
// so a 64-layer model spends more time between kernels than reading its weights (benchmarks/NOTES.md,
// "Decode"). Here a layer is four kernels, each streaming one weight matrix once:
//
//   norm_gemv     RMSNorm of the residual stream, then in_proj (xz = W_in . norm(h)). Every block
//                 normalises the whole (small) residual row into shared memory itself, from per-block
//                 partial sums of squares the previous kernel left, so no separate norm kernel runs.
//                 Also the final norm_f + lm_head (float logits).
//   conv_xproj    conv1d update + SiLU for a chunk of channels (state updated in place, in its slot),
//                 then that chunk's share of x_proj, added into an fp32 accumulator with atomics.
//   ssm_step      dt_proj + softplus, the selective state update (in place), D skip and the z gate.
//   gemv_residual out_proj, added to the fp32 residual stream, with per-block sums of squares of the
//                 new residual for the next norm_gemv.
//
// For 16-bit models up to d_model 1024 (mamba-130m and -370m) ssm_out replaces the last two: each block
// updates the state of 16 channels and adds their share of out_proj (its slice of the weights in registers)
// into an fp32 accumulator, which the next norm_gemv adds to the residual (every block from the whole row,
// one round trip): three kernels per layer.
//
// At batch 1 with the copy-engine GEMVs (GemvBulk), where ssm_out does not serve the model (from mamba-790m
// up), one persistent kernel, `layers`, runs every layer instead (the same phases in one launch, its weight
// stream never stopping at a phase boundary).
//
// For larger batches (> 2 rows) the projections are cuBLAS GEMMs and these kernels do the
// rest: embed_norm / residual_norm (one block per row: residual add + RMSNorm), conv_xproj without its
// x_proj share, ssm_step computing dt_proj from x_proj's output row (small buckets) or ssm_step_pre
// reading a delta precomputed by a dt_proj GEMM (large ones); or, for buckets of 9-16 rows of the larger
// models, x_proj and dt_proj on the tensor cores in conv_xproj_rows and dt_rows before ssm_step_pre. On
// sm_90 x_proj (where those do not take it) runs on wgmma in proj_wg instead of cuBLAS, and so do the head up to
// 64 rows and in_proj and out_proj up to 32 (64 from mamba-1.4b up; decode_step.PROJ_WG and the masks after it).
// Up to 32 rows (decode_step.PROJ_RESIDUAL_ROWS) the residual add and RMSNorm after out_proj go into proj_wg's
// epilogues (out_proj's and the next projection's) instead of residual_norm.
//
// The greedy ids: taken by the head's norm_gemv itself (NormGemvArgs.amax; the tensor-core kinds), or by
// argmax_rows after the head. Or draw_rows after it (a sampled token per row: temperature, top-k,
// top-p, as runtime/sampling.py's reference; thread block clusters, sm_90+). With a repetition penalty,
// penalize_rows first, over the tokens each slot was fed, which the embedding kernel marks in a bitmap.
//
// Rounding follows the reference model (exporters/model.py) step by step: every tensor the reference
// holds in the model dtype T (normalised input, xz, conv output u, x_proj output, dt_proj output, y,
// out_proj output, lm_head output) is rounded to T here too; sums are fp32; the residual stream is fp32
// (or rounded to T after each add when residual_in_fp32 is off); the SSM state is fp32. One exception: where the
// RMSNorm is in proj_wg's epilogues, the normalised input is rounded to T before the row's scale, T(h w), and the
// scale multiplies the projection's fp32 sums (the reference rounds T(h scale w)).
//
// State is addressed by slot (idx[b]) in the stacked [n_layer, slots, d, *] buffers and updated in
// place: no gather or scatter. Each state element is read and written by exactly one thread.
//
// Batch rows per launch are a compile-time BM (the backend's buckets 1 and 2 for the GEMV kernels). The
// matrix-vector products run on the tensor cores for 16-bit models (GemvMma) and as FMA loops otherwise
// (GemvWarp). Kernels call griddepcontrol (programmatic dependent launch, sm_90+): weights are loaded
// before waiting for the previous kernel, which the launcher lets start early.
#include "common.cuh"

namespace mrt {

constexpr int GEMV_THREADS = 512;  // 16 warps
constexpr int XP_THREADS = 256;    // conv_xproj
constexpr int XP_CH = 64;          // channels per conv_xproj block
constexpr int SSM_THREADS = 128;   // ssm_step
constexpr int ROW_THREADS = 512;   // embed, residual_norm
constexpr int CONV_THREADS = 256;  // conv_only
constexpr int ARGMAX_THREADS = 1024;
constexpr int PENALIZE_THREADS = 256;  // penalize
constexpr int MAX_CONV = 8;        // d_conv limit (registers)
constexpr int MAX_XDBL = 1024;     // r + 2n limit (ssm_step's shared row)

__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}
// bytes (a multiple of 16) from p (16-byte aligned) into L2 by the copy engine (sm_90+)
__device__ __forceinline__ void bulk_prefetch_l2(const void* p, unsigned bytes) {
#if __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// 16-byte weight load that bypasses L1 (weights are read once per step), asks L2 to fetch the whole
// 256-byte block around it (the neighbouring vectors are other lanes' or warps' next loads) and, with
// MRT_LD_EVICT_FIRST (else the normal policy), to evict those lines first (read once per step; the
// default: 1-4 % faster steps at 130m-790m, benchmarks/NOTES.md session 6).
#ifndef MRT_LD_EVICT_FIRST
#define MRT_LD_EVICT_FIRST 1
#endif

// The L2 cache policy of a weight stream: evict first (read once per step), or normal.
template <bool FIRST>
__device__ __forceinline__ unsigned long long l2_policy() {
  unsigned long long pol;
  if (FIRST) asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  else asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}

__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "l"(l2_policy<MRT_LD_EVICT_FIRST>()));
  return v;
}

template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };

__device__ __forceinline__ float lo16(unsigned int w, half_t) { return to_float(half_t{(unsigned short)(w & 0xffffu)}); }
__device__ __forceinline__ float hi16(unsigned int w, half_t) { return to_float(half_t{(unsigned short)(w >> 16)}); }
__device__ __forceinline__ float lo16(unsigned int w, bf16_t) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi16(unsigned int w, bf16_t) { return __uint_as_float(w & 0xffff0000u); }

// The Vec<T>::N elements of a 16-byte vector as floats.
template <typename T>
__device__ __forceinline__ void unpack(const uint4& v, float* f) {
  const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = lo16(w[i], T{});
    f[2 * i + 1] = hi16(w[i], T{});
  }
}
template <>
__device__ __forceinline__ void unpack<float>(const uint4& v, float* f) {
  f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
  f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
}

// Weight elements as floats. fp16 goes through integer ops and one multiply rather than the conversion
// unit, whose rate would otherwise bound the matrix-vector kernels: exact for every finite fp16 value,
// subnormals included (weights are checked finite when a package is exported).
template <typename T>
__device__ __forceinline__ void unpack_w(const uint4& v, float* f) { unpack<T>(v, f); }
__device__ __forceinline__ float h2f_finite(unsigned int h) {
  const float mag = __uint_as_float((h & 0x7fffu) << 13) * 5.192296858534828e+33f;  // * 2^112
  return __uint_as_float(__float_as_uint(mag) | ((h & 0x8000u) << 16));
}
template <>
__device__ __forceinline__ void unpack_w<half_t>(const uint4& v, float* f) {
  const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = h2f_finite(w[i] & 0xffffu);
    f[2 * i + 1] = h2f_finite(w[i] >> 16);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Round through the model dtype, as the reference does when it stores a tensor in T.
template <typename T>
__device__ __forceinline__ float round_t(float v) { return to_float(from_float<T>(v)); }

// ------------------------------------------------------------------------------------------------
// One warp's share of a matrix-vector product: rows first, first + stride, ... of W [N, K] (model dtype)
// dotted with BM vectors xs[b][0:K] held in shared memory as floats (values of T). Each lane keeps U 16-byte weight
// vectors in flight, so a row of up to 32 * U vectors (K = 2560 in fp16 at U = 10) is one round trip to
// memory. The first round of the first row is loaded by start(), which the kernels call *before*
// waiting on the previous kernel (programmatic dependent launch: the weights do not depend on it), and
// the next row's first round is loaded before the current row is reduced, so a warp's loads never stop
// while it does arithmetic. vec: K % Vec<T>::N == 0 and W 16-byte aligned; else a scalar loop.
template <typename T, int BM, int U>
struct GemvWarp {
  static constexpr int V = Vec<T>::N;
  const T* W;
  long long N, first, n;
  int K, nv, lane;
  bool vec;
  uint4 wv[U];

  __device__ __forceinline__ void load(long long row, int base) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * 32 + lane;
      wv[u] = i < nv ? ld_stream(W + row * K + (long long)i * V) : uint4{0u, 0u, 0u, 0u};
    }
  }

  // Before the wait: the first round of the first row into registers, and the rest of this warp's
  // first pf_rows rows into L2 (the small kernels before this one leave the memory system idle).
  __device__ __forceinline__ void start(const T* W_, long long N_, int K_, long long first_, long long stride,
                                        long long pf_rows) {
    W = W_; N = N_; K = K_; first = first_; lane = threadIdx.x & 31;
    nv = K / V;
    vec = (K % V) == 0 && aligned16(W);
    if (vec && first < N) load(first, 0);
    const long long row_bytes = (long long)K * sizeof(T);
    const long long skip = vec ? (long long)U * 32 * 16 : 0;
    long long row = first;
    for (long long q = 0; q < pf_rows && row < N; ++q, row += stride) {
      const char* base = reinterpret_cast<const char*>(W + row * K);
      for (long long off = (q == 0 ? skip : 0) + (long long)lane * 128; off < row_bytes; off += 32 * 128)
        prefetch_l2(base + off);
    }
  }

  // epi(n, acc) runs on every lane with the full sums of row n.
  template <typename Epi>
  __device__ __forceinline__ void run(const float* xs, long long stride, Epi epi) {
    for (n = first; n < N; n += stride) {
      float acc[BM];
#pragma unroll
      for (int b = 0; b < BM; ++b) acc[b] = 0.f;
      if (vec) {
        for (int base = 0; base < nv; base += U * 32) {
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int i = base + u * 32 + lane;
            if (i < nv) {
              float wf[V];
              unpack_w<T>(wv[u], wf);
#pragma unroll
              for (int b = 0; b < BM; ++b) {
                const float4* xp = reinterpret_cast<const float4*>(xs + (long long)b * K + (long long)i * V);
#pragma unroll
                for (int q = 0; q < V / 4; ++q) {
                  const float4 x4 = xp[q];
                  acc[b] = fmaf(wf[4 * q], x4.x, acc[b]);
                  acc[b] = fmaf(wf[4 * q + 1], x4.y, acc[b]);
                  acc[b] = fmaf(wf[4 * q + 2], x4.z, acc[b]);
                  acc[b] = fmaf(wf[4 * q + 3], x4.w, acc[b]);
                }
              }
            }
          }
          if (base + U * 32 < nv) load(n, base + U * 32);
          else if (n + stride < N) load(n + stride, 0);
        }
      } else {
        for (int k = lane; k < K; k += 32) {
          const float wk = to_float(W[n * K + k]);
#pragma unroll
          for (int b = 0; b < BM; ++b) acc[b] = fmaf(wk, xs[b * K + k], acc[b]);
        }
      }
#pragma unroll
      for (int b = 0; b < BM; ++b) acc[b] = warp_sum(acc[b]);
      epi(n, acc);
    }
  }
};

constexpr int GEMV_U = 10;

// ------------------------------------------------------------------------------------------------
// The same product for 16-bit T on the tensor cores (mma.sync m16n8k16, fp32 accumulation: every
// product exact, as cuBLAS computes the reference's projections). The FMA loop above spends ~45
// instructions on a 16-byte weight vector (widening, x reads, 8 FMAs); here one costs half an mma and
// one shared-memory read, and the mma's 8 columns could carry up to 8 batch rows. Measured
// (benchmarks/NOTES.md, "Tensor-core GEMV"): 3-6 % faster whole decode steps than the FMA loop at
// 1-2 rows; standalone, both stream a 52 MB matrix at ~1.7-1.9 TB/s, under cuBLAS's ~2.3 TB/s.
//
// Layout: a block owns the contiguous rows [r0, r1) (rows per block = ceil(N / grid), so every block
// reads the same number of bytes) and walks them in groups of 16; its MMA_WARPS warps split K into
// 32-wide chunks (chunk c to warp c % MMA_WARPS). In a chunk, lane l (g = l / 4, q = l % 4) loads the
// 16-byte vectors W[row0 + g][32 c + 8 q ..] and W[row0 + g + 8][same k] and x_g[same k] (x row g, for
// g < BM; zero otherwise), and the two 16-byte vectors feed two mmas: mma k-slots (2q, 2q+1, 2q+8,
// 2q+9) hold k = 32c + 8q + (0, 1, 2, 3) in the first and + (4, 5, 6, 7) in the second. A and B use
// the same slot-to-k map, so the sum over the slots is the sum over k. D (16 rows x 8 columns = batch
// rows) is reduced across warps in shared memory and thread t < 16 runs the epilogue for row t.
// Loads for the next group (or round of chunks) are issued before the reduction; the first round is
// issued before griddepcontrol.wait. Rows past r1 (or N) and k past K are not loaded (zeros).
constexpr int MMA_WARPS = 8;
constexpr int MMA_THREADS = MMA_WARPS * 32;
// Chunks in flight per warp (2 x 16 B per lane each), by batch rows: fewer registers for more rows so
// that two or more blocks stay resident (the loads in flight per SM set the bandwidth).
#ifndef MRT_MMA_U1
#define MRT_MMA_U1 6
#endif
#ifndef MRT_MMA_UN
#define MRT_MMA_UN 4
#endif
template <int BM> struct MmaU { static constexpr int value = BM == 1 ? MRT_MMA_U1 : MRT_MMA_UN; };

// d += A . B for one m16n8k16 tile: A rows (g, g + 8) from the 16-byte vectors a0 / a1 (their first or
// second half: hi), B column g from b0 / b1.
#define MRT_MMA_16816(TYPE)                                                                            \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0, %1, %2, %3}, "          \
               "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"                                          \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                         \
               : "r"(hi ? a0.z : a0.x), "r"(hi ? a1.z : a1.x), "r"(hi ? a0.w : a0.y), "r"(hi ? a1.w : a1.y), \
                 "r"(b0), "r"(b1))
template <typename T>
__device__ __forceinline__ void mma_16816(float* d, const uint4& a0, const uint4& a1, unsigned b0, unsigned b1,
                                          bool hi) {
#if __CUDA_ARCH__ >= 800
  if (IsBf16<T>::value) MRT_MMA_16816("bf16");
  else MRT_MMA_16816("f16");
#endif
}

// D of one m16n8k16 tile (lane (g, q) holds rows g and g + 8, columns 2q and 2q + 1) into a warp's
// 16 x BM slice rd of the cross-warp reduction buffer (batch columns only).
template <int BM>
__device__ __forceinline__ void mma_d_put(float* rd, int g, int q, const float* d) {
  if (2 * q < BM) { rd[g * BM + 2 * q] = d[0]; rd[(g + 8) * BM + 2 * q] = d[2]; }
  if (2 * q + 1 < BM) { rd[g * BM + 2 * q + 1] = d[1]; rd[(g + 8) * BM + 2 * q + 1] = d[3]; }
}

// Row t's BM sums over the WARPS warps' slices of red (16 x BM floats each).
template <int BM, int WARPS>
__device__ __forceinline__ void mma_d_sum(const float* red, int t, float* acc) {
#pragma unroll
  for (int b = 0; b < BM; ++b) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) s += red[w * 16 * BM + t * BM + b];
    acc[b] = s;
  }
}

template <typename T, int BM>
struct GemvMma {
  static_assert(sizeof(T) == 2 && BM >= 1 && BM <= 8, "16-bit T, at most 8 batch rows");
  static constexpr int MMA_U = MmaU<BM>::value;
  const T* W;
  long long N, r0, r1;
  int K, nch, jmax, warp, g, q;
  uint4 wa[MMA_U], wb[MMA_U];

  __device__ __forceinline__ void load(long long row0, int j0) {
#pragma unroll
    for (int u = 0; u < MMA_U; ++u) {
      const int c = warp + MMA_WARPS * (j0 + u), k = 32 * c + 8 * q;
      const bool kin = j0 + u < jmax && k < K;
      const long long ra = row0 + g, rb = row0 + g + 8;
      wa[u] = kin && ra < r1 ? ld_stream(W + ra * K + k) : uint4{0u, 0u, 0u, 0u};
      wb[u] = kin && rb < r1 ? ld_stream(W + rb * K + k) : uint4{0u, 0u, 0u, 0u};
    }
  }

  __device__ __forceinline__ void start(const T* W_, long long N_, int K_) {
    W = W_; N = N_; K = K_;
    warp = threadIdx.x >> 5; g = (threadIdx.x & 31) >> 2; q = threadIdx.x & 3;
    const long long rpb = (N + gridDim.x - 1) / gridDim.x;
    r0 = (long long)blockIdx.x * rpb;
    r1 = r0 + rpb < N ? r0 + rpb : N;
    nch = (K + 31) / 32;
    jmax = (nch + MMA_WARPS - 1) / MMA_WARPS;
    if (r0 < r1) load(r0, 0);
  }

  // xs: BM rows of K values of T in shared memory. red: 2 x MMA_WARPS x 16 x BM floats of shared memory.
  // epi(n, acc) runs on the one thread that owns row n, with the full sums of its BM columns.
  template <typename Epi>
  __device__ __forceinline__ void run(const T* xs, float* red, Epi epi) {
    int par = 0;
    for (long long row0 = r0; row0 < r1; row0 += 16, par ^= 1) {
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      for (int j0 = 0; j0 < jmax; j0 += MMA_U) {
#pragma unroll
        for (int u = 0; u < MMA_U; ++u) {
          if (j0 + u < jmax) {
            const int c = warp + MMA_WARPS * (j0 + u), k = 32 * c + 8 * q;
            if (c < nch) {  // warp-uniform
              const uint4 xv = g < BM && k < K ? *reinterpret_cast<const uint4*>(xs + g * K + k)
                                               : uint4{0u, 0u, 0u, 0u};
              mma_16816<T>(d, wa[u], wb[u], xv.x, xv.y, false);
              mma_16816<T>(d, wa[u], wb[u], xv.z, xv.w, true);
            }
          }
        }
        if (j0 + MMA_U < jmax) load(row0, j0 + MMA_U);
        else if (row0 + 16 < r1) load(row0 + 16, 0);
      }
      mma_d_put<BM>(red + par * (MMA_WARPS * 16 * BM) + warp * 16 * BM, g, q, d);
      __syncthreads();
      if (threadIdx.x < 16 && row0 + threadIdx.x < r1) {
        float acc[BM];
        mma_d_sum<BM, MMA_WARPS>(red + par * (MMA_WARPS * 16 * BM), threadIdx.x, acc);
        epi(row0 + threadIdx.x, acc);
      }
    }
  }
};

// rstd[b] = 1 / sqrt(mean(h[b]^2) + eps) from G per-block partial sums ss[g * BM + b]; into shared.
template <int BM>
__device__ __forceinline__ void rstd_from_partials(const float* __restrict__ ss, int G, int K, float eps,
                                                   float* rstd_s) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int b = warp; b < BM; b += blockDim.x >> 5) {
    float s = 0.f;
    for (int g = lane; g < G; g += 32) s += ss[g * BM + b];
    s = warp_sum(s);
    if (lane == 0) rstd_s[b] = rsqrtf(s / (float)K + eps);
  }
}

// (v, i) beats (bv, bi) as torch.argmax ranks them: NaN above every number, then the larger value,
// then on ties the smaller index.
__device__ __forceinline__ bool argmax_beats(float v, int i, float bv, int bi) {
  const bool n = v != v, bn = bv != bv;
  if (n != bn) return n;
  return (!n && v > bv) || ((n || v == bv) && i < bi);
}

// The block's best (value, index) into thread 0's (bv, bi).
__device__ __forceinline__ void argmax_block(float& bv, int& bi, float* sv, int* si) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, bv, off);
    const int i = __shfl_xor_sync(0xffffffffu, bi, off);
    if (argmax_beats(v, i, bv, bi)) { bv = v; bi = i; }
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
  __syncthreads();
  if (warp == 0) {
    bv = lane < warps ? sv[lane] : -__int_as_float(0x7f800000);
    bi = lane < warps ? si[lane] : 0x7fffffff;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float v = __shfl_xor_sync(0xffffffffu, bv, off);
      const int i = __shfl_xor_sync(0xffffffffu, bi, off);
      if (argmax_beats(v, i, bv, bi)) { bv = v; bi = i; }
    }
  }
}

// Whether this block is the last of `blocks` to take a ticket from *tk, for every thread (last: a shared
// flag). Thread 0's writes before it (the block's best) are visible to the last block after it.
__device__ __forceinline__ bool argmax_last_block(unsigned* tk, int blocks, bool* last) {
  if (threadIdx.x == 0) {
    __threadfence();
    *last = atomicAdd(tk, 1u) == (unsigned)(blocks - 1);
  }
  __syncthreads();
  if (*last) __threadfence();
  return *last;
}

// The last block: the best of n blocks' results (pv[c], pi[c]) into thread 0's (bv, bi).
__device__ __forceinline__ void argmax_partials(const float* pv, const int* pi, int n, float& bv, int& bi, float* sv,
                                                int* si) {
  bv = -__int_as_float(0x7f800000);
  bi = 0x7fffffff;
  for (int c = threadIdx.x; c < n; c += blockDim.x) {
    const float v = __ldcg(pv + c);
    const int i = __ldcg(pi + c);
    if (argmax_beats(v, i, bv, bi)) { bv = v; bi = i; }
  }
  argmax_block(bv, bi, sv, si);
}

// Row b's token v into out (device memory: the next step's ids) and, where out_host is not null, into
// mapped pinned host memory too, where the host reads it once the launch is done: no copy node after
// the kernel in the step's graph (one cost 8-10 us per step on the H100; benchmarks/NOTES.md, item 68).
__device__ __forceinline__ void put_token(long long* out, long long* out_host, int b, long long v) {
  out[b] = v;
  if (out_host) out_host[b] = v;
}

// With G = 0 (16-bit T): ss is instead the previous layer's out_proj sums [BM, K] (ssm_out), the residual is
// h + round_T(ss) (as gemv_residual adds out_proj's output; rounded to T after the add unless out_float's bit 1
// says it is kept in fp32), and block 0 writes it to h + BM K (the next layer's h). (Fields of their own for
// those made ptxas cap the fp32 FMA kernels at 64 registers, with spills: NOTES item 80.)
struct NormGemvArgs {
  const float* h;        // [BM, K] residual stream
  const float* ss;       // [G, BM] partial sums of squares of h
  const void* norm_w;    // [K] T
  const void* W;         // [N, K] T
  const void* bias;      // [N] T or null
  void* out;             // [BM, N]: T, or float when out_float (bit 0)
  unsigned* ctr;         // GemvBulk's unit counter of this launch (zero before it; unused by the others)
  long long G, N, K, out_float, param;  // param: GemvWarp's L2 prefetch rows, GemvBulk's ring stages; out_float:
                                        // bit 0 float outputs, bit 1 the residual in fp32 (G = 0)
  float eps;
  long long* amax;       // [BM] the index of each row's first largest output (the greedy token), or null
                         // (the tensor-core kinds only)
  int* ascr;             // with amax: [BM, gridDim.x] the blocks' best values (float bits), [BM, gridDim.x]
                         // their indices, a ticket (zero before the launch, zero again after it). (The
                         // scratch is one pointer: with four argmax fields the FMA kernels' arguments made
                         // them spill; these three do not.)
  long long* amax_host;  // with amax: [BM] the same indices in mapped pinned host memory, or null (put_token)
};

// norm_gemv's argmax (a.amax): every thread's best output (av, ai) of each row, then each block's into
// a.ascr, and the last block to finish (ticket) reduces them, as argmax_rows does over the logits.
template <int BM>
__device__ void gemv_argmax(const NormGemvArgs& a, float* av, int* ai) {
  __shared__ float sv[32];
  __shared__ int si[32];
  __shared__ bool last;
  const int G = gridDim.x;
  float* apv = reinterpret_cast<float*>(a.ascr);
  int* api = a.ascr + BM * G;
  unsigned* atk = reinterpret_cast<unsigned*>(a.ascr + 2 * BM * G);
#pragma unroll
  for (int b = 0; b < BM; ++b) {
    float bv = av[b];
    int bi = ai[b];
    argmax_block(bv, bi, sv, si);
    if (threadIdx.x == 0) {
      apv[b * G + blockIdx.x] = bv;
      api[b * G + blockIdx.x] = bi;
    }
  }
  if (!argmax_last_block(atk, G, &last)) return;
#pragma unroll
  for (int b = 0; b < BM; ++b) {
    float bv;
    int bi;
    argmax_partials(apv + b * G, api + b * G, G, bv, bi, sv, si);
    if (threadIdx.x == 0) put_token(a.amax, a.amax_host, b, bi);
  }
  if (threadIdx.x == 0) *atk = 0u;
}

// ------------------------------------------------------------------------------------------------
// The same product with the weights streamed by the copy engine (sm_90+). Work comes in units of 16
// rows: each block's own unit first, then whichever is next on a counter (zeroed before the launch), so
// that blocks which start early (programmatic dependent launch starts them as the previous kernel's
// blocks leave, SM by SM) take more units (measured 1 % faster than a fixed range per block on 2.8b). A unit is cut into stages of 16 rows x BULK_KS columns; one producer warp
// issues a cp.async.bulk per row of a stage (BULK_KS * sizeof(T) contiguous bytes) into a ring of
// `stages` shared-memory slots, each with a "full" mbarrier (the copy engine's byte count) and an
// "empty" one (one arrival per consumer warp), and writes the unit into the slot's tag (-1: no more
// work). BULK_WARPS consumer warps split a stage's columns into 16-wide steps and multiply them on the
// tensor cores (ldmatrix of the 16 x 16 weight tile, x from shared memory as in GemvMma), then reduce
// D across warps per unit. The producer issues the first `stages` stages in start(), before
// griddepcontrol.wait. Why: the load-instruction GEMVs above stream a 52 MB matrix at 1.8-1.9 TB/s,
// this one at 2.3 TB/s standalone (benchmarks/NOTES.md, session 5), as fast as cuBLAS's TMA-fed kernel.
// Rows are padded by 16 bytes in shared memory so that ldmatrix's eight row addresses hit different
// banks. Needs K % 16 == 0, W 16-byte aligned; rows past N in a unit are stale and their sums unused.
// The copies carry an L2 evict-first policy (MRT_BULK_EVICT_FIRST): a step reads each weight once, and
// streaming 52 MB through the 50 MB L2 with the normal policy evicts what the kernels around the GEMVs
// re-read (state, activations, the next GEMV's prefetch); measured 2-3 % faster steps at 1.4b and 2.8b
// (benchmarks/NOTES.md, session 6).
#ifndef MRT_BULK_EVICT_FIRST
#define MRT_BULK_EVICT_FIRST 1
#endif
constexpr int BULK_WARPS = 8;
constexpr int BULK_THREADS = (BULK_WARPS + 1) * 32;
constexpr int BULK_KS = 512;                          // columns per stage
constexpr int BULK_STEPS = BULK_KS / 16 / BULK_WARPS;  // 16-wide steps per consumer warp per stage

// The copy-engine ring's pieces (sm_90+; nothing elsewhere), shared by GemvBulk and `layers`.
constexpr int BULK_ROWB = BULK_KS * 2 + 16;  // a stage row in shared memory (16 bytes of padding)
constexpr int BULK_STAGE = 16 * BULK_ROWB;   // a stage: 16 rows

// One thread: the S "full" barriers full[0, S) (one arrival plus the copies' bytes) and the S "empty"
// ones after them (`consumers` arrivals); mbar_init_fence() once every barrier is made.
__device__ __forceinline__ void mbar_init_ring(unsigned long long* full, int S, int consumers) {
  for (int s = 0; s < S; ++s) {
    mbar_init(full + s, 1);
    mbar_init(full + S + s, consumers);
  }
}

__device__ __forceinline__ void mbar_init_fence() {
#if __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, int bytes) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
#endif
}

// A consumer's place in a ring of S stages: the next stage's slot and its full barrier's phase, counted as
// the stages go. Not t % S and t / S per stage: S is a run-time count, so each was an integer division
// between a stage's wait and its loads (NOTES item 71: 1.4b 5 % of a step in `layers`).
__device__ __forceinline__ void ring_next(int& slot, int& phase, int S) {
  if (++slot == S) {
    slot = 0;
    phase ^= 1;
  }
}

// bytes (a multiple of 16, both addresses 16-byte aligned) from global src into shared dst, counted on bar
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, int bytes, unsigned long long* bar,
                                          unsigned long long pol) {
#if __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
               ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(pol) : "memory");
#endif
}

// d += one 16 x 16 weight tile a (ldmatrix.x4's four 8 x 8 tiles, which are the mma's A registers in order;
// mma_16816 takes them as (wa.x, wb.x, wa.y, wb.y)) times x's 16 values b
template <typename T>
__device__ __forceinline__ void stage_product(float* d, const unsigned (&a)[4], const unsigned (&b)[2]) {
  mma_16816<T>(d, uint4{a[0], a[2], 0u, 0u}, uint4{a[1], a[3], 0u, 0u}, b[0], b[1], false);
}

// d += the 16 rows x BULK_KS columns of one stage st (rows ROWB bytes apart) times x (BM rows of K values
// of T in shared memory) at columns kb + ...: consumer warp w takes the 16-wide steps w * BULK_STEPS ..;
// ldmatrix.x4 reads the 16 x 16 weight tile (lanes 0-15: rows 0-15 at k0, lanes 16-31: at k0 + 8).
// Then lane 0 arrives on rel, the stage's empty barrier (its release orders the warp's loads before the
// producer may refill the slot). EARLY: every step's tile and x are loaded first and the slot released
// before the products, so it goes back to the producer as soon as the warp holds its part (`layers`:
// 2-3 % faster per step; GemvBulk at 2 rows: 4.7 % slower; NOTES item 67); else each product follows its
// loads and the slot is released after the last. ACC: step i's product goes into accumulator i % ACC (d
// holds 4 ACC floats; the caller sums them), so that the steps are not one dependent chain (item 71).
template <typename T, int BM, bool EARLY, int ACC = 1>
__device__ __forceinline__ void bulk_stage_mma(float* d, const unsigned char* st, const T* xs, int K, int kb,
                                               unsigned long long* rel) {
  constexpr int ROWB = BULK_ROWB;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int lrow = lane & 15, lcol = (lane >> 4) * 8;
  unsigned a[BULK_STEPS][4], b[BULK_STEPS][2];
#pragma unroll
  for (int i = 0; i < BULK_STEPS; ++i) {
    const int k = kb + (warp * BULK_STEPS + i) * 16;
    a[i][0] = a[i][1] = a[i][2] = a[i][3] = b[i][0] = b[i][1] = 0u;
    if (k < K) {  // warp-uniform
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                   : "=r"(a[i][0]), "=r"(a[i][1]), "=r"(a[i][2]), "=r"(a[i][3])
                   : "r"(smem_addr(st + lrow * ROWB + (k - kb + lcol) * 2)));
      if (g < BM) {
        b[i][0] = *reinterpret_cast<const unsigned*>(xs + g * K + k + 2 * q);
        b[i][1] = *reinterpret_cast<const unsigned*>(xs + g * K + k + 2 * q + 8);
      }
      if (!EARLY) stage_product<T>(d + 4 * (i % ACC), a[i], b[i]);
    }
  }
  __syncwarp();
  if (lane == 0) mbar_arrive(rel);
#pragma unroll
  for (int i = 0; i < BULK_STEPS; ++i)
    if (EARLY && kb + (warp * BULK_STEPS + i) * 16 < K) stage_product<T>(d + 4 * (i % ACC), a[i], b[i]);
}

template <typename T, int BM>
struct GemvBulk {
  static_assert(sizeof(T) == 2 && BM >= 1 && BM <= 8, "16-bit T, at most 8 batch rows");
  static constexpr int ROWB = BULK_ROWB, STAGE = BULK_STAGE;
  const T* W;
  unsigned char* ring;
  unsigned long long* full;  // [stages], then empty [stages]
  int* tag;                  // [stages]: the unit of the slot's stage, -1 after the last
  unsigned* ctr;
  long long N;
  int K, S, nseg, units;
  int t, unit, seg;          // producer: next stage, its unit and column segment
  int ps, pph;               // producer: the next stage's slot and its round's parity (t % S, (t / S) & 1)
  int nxt;                   // producer lane 0: the unit after this one
  bool done;

  // Lane 0 of the producer: the unit after `unit`, from the counter (units past the grid's first);
  // asked a unit ahead, so that the atomic's latency hides behind the unit's stages.
  __device__ __forceinline__ void ask() { nxt = (int)(gridDim.x + atomicAdd(ctr, 1u)); }

  // Shared bytes in front of the ring (x, the reduction, the barriers, the tags), for BM rows of K.
  static __device__ __host__ constexpr long long head_bytes(long long K, int S) {
    return ((BM * K * 2 + 15) / 16) * 16 + 2 * BULK_WARPS * 16 * BM * 4 + ((20 * S + 15) / 16) * 16;
  }

  __device__ __forceinline__ void issue() {  // producer warp: the next stage into slot ps
#if __CUDA_ARCH__ >= 900
    const int lane = threadIdx.x & 31, slot = ps;
    if (t >= S) mbar_wait(full + S + slot, pph ^ 1);  // the slot's round before
    if (seg == nseg) {  // the next unit: the one lane 0 asked for a unit ago
      const int u = __shfl_sync(0xffffffffu, nxt, 0);
      unit = u < units ? u : -1;
      seg = 0;
      if (lane == 0 && unit >= 0) ask();
    }
    if (unit < 0) {  // no more work: an empty stage tagged -1 ends the consumers' loop
      if (lane == 0) {
        tag[slot] = -1;
        mbar_arrive(full + slot);
      }
      done = true;
      return;
    }
    const long long row0 = 16LL * unit;
    const int rows = (int)min(16LL, N - row0);
    const int cols = min(BULK_KS, K - seg * BULK_KS);
    if (lane == 0) {
      tag[slot] = unit;
      mbar_expect_tx(full + slot, rows * cols * 2);
    }
    __syncwarp();
    if (lane < rows)
      bulk_copy(ring + slot * STAGE + lane * ROWB, W + (row0 + lane) * K + seg * BULK_KS, cols * 2, full + slot,
                l2_policy<MRT_BULK_EVICT_FIRST>());
    ++seg;
    ++t;
    ring_next(ps, pph, S);
#endif
  }

  // All threads; the producer warp (the last) issues the first stages. ctr_: this launch's counter.
  __device__ __forceinline__ void start(unsigned char* smem, const T* W_, long long N_, int K_, int stages,
                                        unsigned* ctr_) {
    W = W_; N = N_; K = K_; S = stages; ctr = ctr_;
    nseg = (K + BULK_KS - 1) / BULK_KS;
    units = (int)((N + 15) / 16);
    t = 0; seg = 0; ps = 0; pph = 0; done = false;
    unit = blockIdx.x < units ? (int)blockIdx.x : -1;  // first the block's own unit
    if (unit >= 0 && (threadIdx.x & 31) == 0 && (threadIdx.x >> 5) == BULK_WARPS) ask();
    const long long head = head_bytes(K, S);
    full = reinterpret_cast<unsigned long long*>(smem + head - ((20 * S + 15) / 16) * 16);
    tag = reinterpret_cast<int*>(full + 2 * S);
    ring = smem + head;
#if __CUDA_ARCH__ >= 900
    if (threadIdx.x == 0) {
      mbar_init_ring(full, S, BULK_WARPS);
      mbar_init_fence();
    }
    __syncthreads();
    if ((threadIdx.x >> 5) == BULK_WARPS)
      while (!done && t < S) issue();
#endif
  }

  // xs: BM rows of K values of T in shared memory; red: 2 x BULK_WARPS x 16 x BM floats.
  template <typename Epi>
  __device__ __forceinline__ void run(const T* xs, float* red, Epi epi) {
#if __CUDA_ARCH__ >= 900
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (warp == BULK_WARPS) {
      while (!done) issue();
      return;
    }
    const int g = lane >> 2, q = lane & 3;
    int slot = 0, ph = 0;  // ring_next (batch 2: 1.4b -1.0 %, 2.8b -1.1 % against dividing; item 71)
    for (int grp = 0;; ++grp) {
      mbar_wait(full + slot, ph);
      const int u = tag[slot];
      if (u < 0) break;
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      for (int seg = 0; seg < nseg; ++seg) {
        if (seg) mbar_wait(full + slot, ph);
        bulk_stage_mma<T, BM, false>(d, ring + slot * STAGE, xs, K, seg * BULK_KS, full + S + slot);
        ring_next(slot, ph, S);
      }
      mma_d_put<BM>(red + (grp & 1) * (BULK_WARPS * 16 * BM) + warp * 16 * BM, g, q, d);
      asm volatile("bar.sync 1, %0;" ::"r"(BULK_WARPS * 32) : "memory");
      const long long row = 16LL * u + threadIdx.x;
      if (threadIdx.x < 16 && row < N) {
        float acc[BM];
        mma_d_sum<BM, BULK_WARPS>(red + (grp & 1) * (BULK_WARPS * 16 * BM), threadIdx.x, acc);
        epi(row, acc);
      }
    }
#endif
  }
};

// The weight stream of norm_gemv / gemv_residual, by KIND: GemvWarp (GEMV_FMA; any T), GemvMma
// (GEMV_MMA; tensor cores, 16-bit T) or GemvBulk (GEMV_BULK; copy engine + tensor cores, 16-bit T,
// sm_90+). The kernels write x (values of T) with put_x between start() and run(); epi(n, acc) runs on
// the one thread that owns row n. Dynamic shared memory: FMA BM K floats; MMA BM K values of T
// (rounded up to 16 bytes), then 2 MMA_WARPS 16 BM floats for the cross-warp reduction; BULK
// GemvBulk::head_bytes, then the ring.
enum { GEMV_FMA = 0, GEMV_MMA = 1, GEMV_BULK = 2 };
template <typename T, int BM, int KIND>
struct GemvStream {
  GemvWarp<T, BM, GEMV_U> g;
  float* xs;
  __device__ __forceinline__ void start(unsigned char* smem, const T* W, long long N, int K, long long pf_rows,
                                        unsigned*) {
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5;
    xs = reinterpret_cast<float*>(smem);
    g.start(W, N, K, (long long)blockIdx.x * warps + warp, (long long)gridDim.x * warps, pf_rows);
  }
  __device__ __forceinline__ void put_x(int i, float v) { xs[i] = v; }
  template <typename Epi>
  __device__ __forceinline__ void run(Epi epi) {
    g.run(xs, (long long)gridDim.x * (blockDim.x >> 5), [&](long long n, const float* acc) {
      if ((threadIdx.x & 31) == 0) epi(n, acc);
    });
  }
};
template <typename T, int BM>
struct GemvStream<T, BM, GEMV_MMA> {
  GemvMma<T, BM> g;
  T* xs;
  float* red;
  __device__ __forceinline__ void start(unsigned char* smem, const T* W, long long N, int K, long long, unsigned*) {
    xs = reinterpret_cast<T*>(smem);
    red = reinterpret_cast<float*>(smem + ((BM * K * sizeof(T) + 15) & ~(size_t)15));
    g.start(W, N, K);
  }
  __device__ __forceinline__ void put_x(int i, float v) { xs[i] = from_float<T>(v); }
  template <typename Epi>
  __device__ __forceinline__ void run(Epi epi) { g.run(xs, red, epi); }
};
template <typename T, int BM>
struct GemvStream<T, BM, GEMV_BULK> {
  GemvBulk<T, BM> g;
  T* xs;
  float* red;
  __device__ __forceinline__ void start(unsigned char* smem, const T* W, long long N, int K, long long stages,
                                        unsigned* ctr) {
    xs = reinterpret_cast<T*>(smem);
    red = reinterpret_cast<float*>(smem + ((BM * K * sizeof(T) + 15) & ~(size_t)15));
    g.start(smem, W, N, K, (int)stages, ctr);
  }
  __device__ __forceinline__ void put_x(int i, float v) { xs[i] = from_float<T>(v); }
  template <typename Epi>
  __device__ __forceinline__ void run(Epi epi) { g.run(xs, red, epi); }
};

// With NormGemvArgs.G = 0: element i of the residual, h + round_T(ss) (ss: out_proj's sums).
template <typename T>
__device__ __forceinline__ float residual_plus(const NormGemvArgs& a, int i) {
  const float hn = a.h[i] + round_t<T>(a.ss[i]);
  return (a.out_float & 2) ? hn : round_t<T>(hn);
}

// With NormGemvArgs.G = 0: the residual's values of this thread (row b, column threadIdx.x + j blockDim.x in
// hv[b][j]; K <= ACC_KV blockDim.x, which the host checks), each row's 1 / rms from the whole residual row
// (every block sums it: for 130m, 768 values, one round trip of loads), and block 0 writes the residual to
// h + BM K. (By row and column, not by flat index: a division by K per value cost more than the loads.)
constexpr int ACC_KV = 4;
template <typename T, int BM>
__device__ __forceinline__ void residual_from_acc(const NormGemvArgs& a, int K, float (&hv)[BM][ACC_KV],
                                                  float* rstd_s) {
  __shared__ float red[32][BM];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int b = 0; b < BM; ++b) {
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < ACC_KV; ++j) {
      const int k = threadIdx.x + j * blockDim.x;
      hv[b][j] = k < K ? residual_plus<T>(a, b * K + k) : 0.f;
      ss = fmaf(hv[b][j], hv[b][j], ss);
    }
    ss = warp_sum(ss);
    if (lane == 0) red[warp][b] = ss;
  }
  __syncthreads();
  if (threadIdx.x < BM) {
    float s = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += red[w][threadIdx.x];
    rstd_s[threadIdx.x] = rsqrtf(s / (float)K + a.eps);
  }
  if (blockIdx.x == 0) {
    float* h_out = const_cast<float*>(a.h) + BM * K;
#pragma unroll
    for (int b = 0; b < BM; ++b)
#pragma unroll
      for (int j = 0; j < ACC_KV; ++j) {
        const int k = threadIdx.x + j * blockDim.x;
        if (k < K) h_out[b * K + k] = hv[b][j];
      }
  }
}

// out = W . round_T(h * rstd * norm_w) (+ bias), rounded to T (then widened when out_float).
template <typename T, int BM, int KIND>
__device__ void norm_gemv(const NormGemvArgs& a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float rstd_s[BM];
  const int K = (int)a.K;
  const long long N = a.N;
  GemvStream<T, BM, KIND> g;
  g.start(smem, static_cast<const T*>(a.W), N, K, a.param, a.ctr);
  pdl_launch_dependents();
  pdl_wait();
  const bool acc = sizeof(T) == 2 && a.G == 0;  // ssm_out's sums in ss (16-bit T only: ssm_out's)
  float hv[BM][ACC_KV];
  if (acc) residual_from_acc<T, BM>(a, K, hv, rstd_s);
  else rstd_from_partials<BM>(a.ss, (int)a.G, K, a.eps, rstd_s);
  __syncthreads();
  const T* nw = static_cast<const T*>(a.norm_w);
  if (acc) {
#pragma unroll
    for (int j = 0; j < ACC_KV; ++j) {
      const int k = threadIdx.x + j * blockDim.x;
      if (k < K) {
        const float w = to_float(nw[k]);
#pragma unroll
        for (int b = 0; b < BM; ++b) g.put_x(b * K + k, round_t<T>(hv[b][j] * rstd_s[b] * w));
      }
    }
  } else {
    for (int i = threadIdx.x; i < BM * K; i += blockDim.x) {
      const int b = i / K, k = i - b * K;
      g.put_x(i, round_t<T>(a.h[i] * rstd_s[b] * to_float(nw[k])));
    }
  }
  __syncthreads();
  const T* bias = static_cast<const T*>(a.bias);
  float av[BM];  // with a.amax: the best output of each row among this thread's (its index in ai)
  int ai[BM];
#pragma unroll
  for (int b = 0; b < BM; ++b) {
    av[b] = -__int_as_float(0x7f800000);
    ai[b] = 0x7fffffff;
  }
  g.run([&](long long n, const float* acc) {
    const float bv = bias ? to_float(bias[n]) : 0.f;
#pragma unroll
    for (int b = 0; b < BM; ++b) {
      const T o = from_float<T>(acc[b] + bv);
      const float of = to_float(o);
      if (a.out_float & 1) static_cast<float*>(a.out)[b * N + n] = of;
      else static_cast<T*>(a.out)[b * N + n] = o;
      if constexpr (KIND != GEMV_FMA) {
        if (a.amax && argmax_beats(of, (int)n, av[b], ai[b])) {
          av[b] = of;
          ai[b] = (int)n;
        }
      }
    }
  });
  // every thread (the copy-engine kind's producer warp too); not the FMA kind, where the tracking took
  // local memory (the host runs the argmax kernel after it)
  if constexpr (KIND != GEMV_FMA) {
    if (a.amax) gemv_argmax<BM>(a, av, ai);
  }
}

struct GemvResidualArgs {
  const void* y;         // [BM, K] T
  const void* W;         // [N, K] T
  const void* bias;      // [N] T or null
  float* h;              // [BM, N] residual stream, updated in place
  float* ss_out;         // [gridDim.x, BM] partial sums of squares of the new h
  unsigned* ctr;         // as in NormGemvArgs
  long long N, K, res_fp32, param;  // param as in NormGemvArgs
};

// h += round_T(W . y (+ bias)); ss_out[block] = sum over this block's rows of h^2.
template <typename T, int BM, int KIND>
__device__ void gemv_residual(const GemvResidualArgs& a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float ss_s[32][BM];
  const int K = (int)a.K;
  const long long N = a.N;
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  GemvStream<T, BM, KIND> g;
  g.start(smem, static_cast<const T*>(a.W), N, K, a.param, a.ctr);
  pdl_launch_dependents();
  pdl_wait();
  const T* y = static_cast<const T*>(a.y);
  for (int i = threadIdx.x; i < BM * K; i += blockDim.x) g.put_x(i, to_float(y[i]));
  __syncthreads();
  const T* bias = static_cast<const T*>(a.bias);
  float ssw[BM];
#pragma unroll
  for (int b = 0; b < BM; ++b) ssw[b] = 0.f;
  g.run([&](long long n, const float* acc) {
    const float bv = bias ? to_float(bias[n]) : 0.f;
#pragma unroll
    for (int b = 0; b < BM; ++b) {
      float hn = a.h[b * N + n] + round_t<T>(acc[b] + bv);
      if (!a.res_fp32) hn = round_t<T>(hn);
      a.h[b * N + n] = hn;
      ssw[b] = fmaf(hn, hn, ssw[b]);
    }
  });
#pragma unroll
  for (int b = 0; b < BM; ++b) {
    const float v = warp_sum(ssw[b]);
    if (lane == 0) ss_s[warp][b] = v;
  }
  __syncthreads();
  if (threadIdx.x < BM) {
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += ss_s[w][threadIdx.x];
    a.ss_out[blockIdx.x * BM + threadIdx.x] = s;
  }
}

struct EmbedArgs {
  const long long* ids;  // [B]
  const void* emb;       // [V, K] T
  float* h;              // [B, K]
  float* ss_out;         // [gridDim.x, B] partial sums of squares (when norm_w is null)
  const void* norm_w;    // [K] T: also write xn = round_T(norm(h)) (one block per row), or null
  void* xn;              // [B, K] T
  long long B, V, K;
  float eps;
  unsigned* zero;        // nzero words this kernel zeroes (the step's accumulators and counters, where the
  long long nzero;       // kernels after it touch them only after griddepcontrol.wait), or null
  unsigned* seen;        // [slots, seen_w] the slots' seen tokens (bit id % 32 of word id / 32), or null: each
  const long long* idx;  // row's token marked in its slot idx[b]'s row (the repetition penalty's: penalize_rows)
  long long seen_w, slots;
};

// Block-wide sum over the block's threads (red: 32 floats of shared memory).
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += red[w];
  return s;
}

// h[b] = emb[ids[b]] (widened to fp32). Without norm_w: grid-stride over all elements, partial sums of
// squares per block. With norm_w: block b owns row b and also writes the normalised row (batched path).
template <typename T>
__device__ void embed(const EmbedArgs& a) {
  __shared__ float red[32];
  pdl_launch_dependents();
  pdl_wait();
  const T* emb = static_cast<const T*>(a.emb);
  const int K = (int)a.K, B = (int)a.B;
  if (a.seen && blockIdx.x == 0)
    for (int b = threadIdx.x; b < B; b += blockDim.x) {
      const long long id = a.ids[b], sl = a.idx[b];
      if (id >= 0 && (id >> 5) < a.seen_w && sl >= 0 && sl < a.slots)  // checked on the host; never written outside
        atomicOr(a.seen + sl * a.seen_w + (id >> 5), 1u << (id & 31));
    }
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < a.nzero; i += (long long)gridDim.x * blockDim.x)
    a.zero[i] = 0u;
  if (a.norm_w) {
    const int b = blockIdx.x;
    long long id = a.ids[b];
    id = id < 0 ? 0 : (id >= a.V ? a.V - 1 : id);  // ids are checked on the host; never read outside
    float s = 0.f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
      const float v = to_float(emb[id * K + k]);
      a.h[(long long)b * K + k] = v;
      s = fmaf(v, v, s);
    }
    const float rstd = rsqrtf(block_sum(s, red) / (float)K + a.eps);
    const T* nw = static_cast<const T*>(a.norm_w);
    for (int k = threadIdx.x; k < K; k += blockDim.x)
      static_cast<T*>(a.xn)[(long long)b * K + k] = from_float<T>(a.h[(long long)b * K + k] * rstd * to_float(nw[k]));
    return;
  }
  for (int b = 0; b < B; ++b) {
    long long id = a.ids[b];
    id = id < 0 ? 0 : (id >= a.V ? a.V - 1 : id);
    float s = 0.f;
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < K; k += gridDim.x * blockDim.x) {
      const float v = to_float(emb[id * K + k]);
      a.h[(long long)b * K + k] = v;
      s = fmaf(v, v, s);
    }
    s = block_sum(s, red);
    if (threadIdx.x == 0) a.ss_out[blockIdx.x * B + b] = s;
  }
}

struct PenalizeArgs {
  float* x;               // [B, V] logits, penalised in place
  const long long* idx;   // [B] the rows' state slots
  const unsigned* seen;   // [slots, W] the slots' seen tokens: bit i % 32 of word i / 32 (embed marks them)
  const float* r;         // [B] the rows' repetition penalties (1: off)
  long long V, W, slots;
};

// The repetition penalty (runtime/sampling.py, step 1; Hugging Face's rule) on the GPU: each logit of row b
// whose token its slot has seen is divided by r[b] where positive, else multiplied by it, each rounded once to
// float32 as the numpy reference rounds. Block b takes row b; its threads go over the slot's words and touch
// only the seen tokens' logits, so a row costs its V / 8 bytes of bitmap and not its V logits.
__device__ void penalize_rows(const PenalizeArgs& a) {
  pdl_launch_dependents();
  pdl_wait();
  const int b = blockIdx.x;
  const float r = a.r[b];
  const long long sl = a.idx[b];
  if (r == 1.f || sl < 0 || sl >= a.slots) return;  // slots are checked on the host; never read outside
  float* x = a.x + (long long)b * a.V;
  const unsigned* row = a.seen + sl * a.W;
  for (long long w = threadIdx.x; w < a.W; w += blockDim.x) {
    for (unsigned m = row[w]; m; m &= m - 1) {
      const long long i = 32 * w + __ffs(m) - 1;
      if (i < a.V) {
        const float v = x[i];
        x[i] = v > 0.f ? __fdiv_rn(v, r) : __fmul_rn(v, r);
      }
    }
  }
}

struct ArgmaxArgs {
  const float* x;       // [B, V] logits
  long long* out;       // [B]
  float* pv;            // [B, gridDim.x] the blocks' best values
  int* pi;              // [B, gridDim.x] and their indices
  unsigned* tk;         // [B] tickets: zero before the launch, zero again after it
  long long V;
  long long* out_host;  // [B] out's values in mapped pinned host memory as well, or null (put_token)
};

// out[b] = the index of the first largest logit of row b, on the GPU: block (c, b) takes ARGMAX_CHUNK
// logits of row b (8 loads in flight per thread; rows are not 16-byte aligned in general, vocab
// 50277), and the last block of the row to finish (ticket) reduces the row's partial results and
// resets the ticket. One block per row took ~10 us for a 50k row and torch.argmax 12-18 us
// (benchmarks/NOTES.md, session 5).
constexpr int ARGMAX_CHUNK = 8 * ARGMAX_THREADS;
__device__ void argmax_rows(const ArgmaxArgs& a) {
  __shared__ float sv[32];
  __shared__ int si[32];
  __shared__ bool last;
  pdl_launch_dependents();
  pdl_wait();
  const int V = (int)a.V, b = blockIdx.y, C = gridDim.x;
  const float* x = a.x + (long long)b * V;
  float bv = -__int_as_float(0x7f800000);  // -inf
  int bi = 0x7fffffff;
  float v[8];
  const int base = blockIdx.x * ARGMAX_CHUNK + threadIdx.x;
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int i = base + u * ARGMAX_THREADS;
    v[u] = i < V ? x[i] : 0.f;
  }
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int i = base + u * ARGMAX_THREADS;
    if (i < V && argmax_beats(v[u], i, bv, bi)) { bv = v[u]; bi = i; }
  }
  argmax_block(bv, bi, sv, si);
  if (threadIdx.x == 0) {
    a.pv[b * C + blockIdx.x] = bv;
    a.pi[b * C + blockIdx.x] = bi;
  }
  if (!argmax_last_block(a.tk + b, C, &last)) return;
  argmax_partials(a.pv + b * C, a.pi + b * C, C, bv, bi, sv, si);
  if (threadIdx.x == 0) {
    put_token(a.out, a.out_host, b, bi);
    a.tk[b] = 0u;
  }
}

// ---- draw: one sampled token per row (temperature, top-k, top-p), as runtime/sampling.py's numpy
// reference picks it, on the GPU (sm_90+: thread block clusters). A cluster of DRAW_CLUSTER blocks per
// row; thread g of the cluster (block rank q, thread t: g = q * DRAW_THREADS + t) holds the row's tokens
// [g n, g n + n) in registers (n = ceil(V / (DRAW_CLUSTER * DRAW_THREADS)) <= DRAW_ITEMS), so the logits
// are read once and every pass after that runs on registers and shared memory. Cluster-wide sums meet
// in each block's shared memory (read by the others through distributed shared memory, in rank order:
// every block gets the same bits); histograms are merged by the leader block (rank 0).
struct DrawArgs {
  const float* x;        // [B, V] logits, contiguous rows (penalised already)
  const double* knobs;   // [B, 4]: temperature, sorted position of the k-th largest logit (V - 1: top-k
                         //         off), top_p (1: off), u in [0, 1)
  long long* out;        // [B]
  long long V;           // <= DRAW_MAX_VOCAB
  long long* out_host;   // [B] out's values in mapped pinned host memory as well, or null (put_token)
};

constexpr int DRAW_CLUSTER = 8, DRAW_THREADS = 512, DRAW_WARPS = DRAW_THREADS / 32, DRAW_ITEMS = 16;
constexpr int DRAW_MAX_VOCAB = DRAW_CLUSTER * DRAW_THREADS * DRAW_ITEMS;
constexpr int DRAW_CBITS = 8, DRAW_CBINS = 1 << DRAW_CBITS;   // digits of the cluster-wide passes
constexpr int DRAW_GATHER = 4096;  // candidates few enough for the leader to finish a selection alone
constexpr int DRAW_COUNT = 256;    // candidates few enough for it to rank by counting

#if __CUDA_ARCH__ >= 900
struct DrawSel {  // a pass's choice, copied by the leader into every block (by words: 0, 4, 8, 16)
  unsigned bin, count, r;
  double above;
};
static_assert(sizeof(DrawSel) == 24, "DrawSel's layout (draw_select copies it word by word)");

struct DrawShared {
  unsigned cnt[DRAW_CBINS];              // histogram: counts
  double mass[DRAW_CBINS];               //            masses (top-p)
  unsigned mcnt[DRAW_CBINS];             // leader: the cluster's merged histogram
  double mmass[DRAW_CBINS];
  unsigned long long cand[DRAW_GATHER];  // leader: gathered candidates' keys
  unsigned long long small[DRAW_COUNT];  //         the last few of them
  unsigned nsmall;
  unsigned wc[DRAW_WARPS];               // block scans / reductions, per warp
  double wm[DRAW_WARPS];
  float wf[DRAW_WARPS];
  int wi[DRAW_WARPS];
  DrawSel sel;
  int pick_t;
  unsigned ncand;                        // leader: candidates gathered
  unsigned long long result;             // leader: a selection's key
  float c_max;                           // per block, read by the cluster: the block's largest logit,
  double c_sum, c_tot;                   // sum of e, sum of kept e,
  int c_last;                            // last kept token
};

__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

// Every thread of the cluster; makes each block's shared-memory writes before it visible to all.
__device__ __forceinline__ void cluster_barrier() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// The address of p (in this block's shared memory) in block `rank`'s shared memory.
__device__ __forceinline__ unsigned cluster_addr(const void* p, unsigned rank) {
  unsigned a;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(smem_addr(p)), "r"(rank));
  return a;
}
// Loads and stores at such addresses: ld_cluster_<suffix>(a), st_cluster_<suffix>(a, v).
#define MRT_CLUSTER_LDST(T, SUFFIX, C)                                                                 \
  __device__ __forceinline__ T ld_cluster_##SUFFIX(unsigned a) {                                       \
    T v;                                                                                               \
    asm volatile("ld.shared::cluster." #SUFFIX " %0, [%1];" : "=" C(v) : "r"(a) : "memory");           \
    return v;                                                                                          \
  }                                                                                                    \
  __device__ __forceinline__ void st_cluster_##SUFFIX(unsigned a, T v) {                               \
    asm volatile("st.shared::cluster." #SUFFIX " [%0], %1;" ::"r"(a), C(v) : "memory");                \
  }
MRT_CLUSTER_LDST(float, f32, "f")
MRT_CLUSTER_LDST(double, f64, "d")
MRT_CLUSTER_LDST(unsigned, u32, "r")
MRT_CLUSTER_LDST(unsigned long long, u64, "l")
#undef MRT_CLUSTER_LDST
__device__ __forceinline__ float4 ld_cluster_f32x4(unsigned a) {  // 16 bytes (a 16-byte aligned)
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(a) : "memory");
  return v;
}
__device__ __forceinline__ unsigned atom_cluster_add(unsigned a, unsigned v) {
  unsigned old;
  asm volatile("atom.shared::cluster.add.u32 %0, [%1], %2;" : "=r"(old) : "r"(a), "r"(v) : "memory");
  return old;
}

// float -> unsigned with the same order (for non-NaN values)
__device__ __forceinline__ unsigned draw_key(float v) {
  const unsigned u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The sum over the block of each thread's v, in a fixed order (every thread gets it).
__device__ __forceinline__ double draw_block_sum(DrawShared& sh, double v) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (lane == 0) sh.wm[warp] = v;
  __syncthreads();
  v = lane < DRAW_WARPS ? sh.wm[lane] : 0.0;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();  // sh.wm free again
  return v;
}

// The cluster's sum of a per-block value at `slot` (after a cluster barrier), in a fixed order.
__device__ __forceinline__ double draw_cluster_sum(const double* slot) {
  const int lane = threadIdx.x & 31;
  double v = lane < DRAW_CLUSTER ? ld_cluster_f64(cluster_addr(slot, lane)) : 0.0;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// One block: chooses a bin of the histogram c (counts), m (masses, MASS only) of nb <= DRAW_THREADS bins,
// thread t holding bin nb - 1 - t (descending order of key). MASS = false: the bin holding descending
// position r (sel.r: r within it); MASS = true: the lowest bin with items whose strictly larger items'
// mass (above plus the bins above it) is below ps (sel.above: that mass). Leaves the choice in sh.sel.
static_assert(DRAW_CBINS <= DRAW_THREADS, "a bin per thread");
template <bool MASS>
__device__ void draw_pick(DrawShared& sh, const unsigned* c, const double* m, int nb, unsigned r, double ps,
                          double above) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, bin = nb - 1 - tid;
  const unsigned n = bin >= 0 ? c[bin] : 0u;
  const double mb = MASS && bin >= 0 ? m[bin] : 0.0;
  // the bins before this thread's: an exclusive scan over the threads
  unsigned ic = n;
  double im = mb;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned tc = __shfl_up_sync(0xffffffffu, ic, off);
    const double tm = __shfl_up_sync(0xffffffffu, im, off);
    if (lane >= off) { ic += tc; im += tm; }
  }
  if (lane == 31) { sh.wc[warp] = ic; sh.wm[warp] = im; }
  if (tid == 0) sh.pick_t = -1;
  __syncthreads();
  unsigned cc = ic - n;
  double cm = __shfl_up_sync(0xffffffffu, im, 1);
  if (lane == 0) cm = 0.0;
  for (int v = 0; v < warp; ++v) { cc += sh.wc[v]; cm += sh.wm[v]; }
  const bool hit = n && (MASS ? above + cm < ps : cc <= r && r < cc + n);
  if (hit) atomicMax(&sh.pick_t, tid);  // MASS: the lowest such bin
  __syncthreads();
  if (tid == sh.pick_t) sh.sel = DrawSel{(unsigned)bin, n, r - cc, above + cm};
  __syncthreads();
}

// The key where a selection among the cluster's items stops (every thread gets it). Items: key[j] where
// bit j of `in` is set, the undecided low `rem` bits of keys matching `prefix` (set bits of the rest);
// MASS: the keys are non-negative doubles' bits and their values are the masses. MASS = false: the key
// at descending position r (top-k's k-th largest logit); MASS = true: the smallest key whose strictly
// larger items' mass is below ps (top-p). Cluster-wide passes of DRAW_CBITS-bit digits until the chosen
// bin holds at most DRAW_GATHER items, which are then gathered into the leader. It goes on alone over
// them in shared memory until at most DRAW_COUNT match, which it ranks by counting.
template <bool MASS>
__device__ unsigned long long draw_select(DrawShared& sh, const unsigned long long (&key)[DRAW_ITEMS], unsigned in,
                                          unsigned long long prefix, int rem, unsigned r, double ps, unsigned rank) {
  const int tid = threadIdx.x;
  unsigned long long pmask = ~0ull << rem;
  double above = 0.0;
  bool gathered = false;
  while (rem > 0) {
    const int bits = rem < DRAW_CBITS ? rem : DRAW_CBITS, shift = rem - bits, nb = 1 << bits;
    for (int i = tid; i < nb; i += DRAW_THREADS) { sh.cnt[i] = 0u; if (MASS) sh.mass[i] = 0.0; }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < DRAW_ITEMS; ++j) {
      if ((in >> j & 1u) && (key[j] & pmask) == prefix) {
        const unsigned d = (unsigned)(key[j] >> shift) & (nb - 1u);
        atomicAdd(sh.cnt + d, 1u);
        if (MASS) atomicAdd(sh.mass + d, __longlong_as_double((long long)key[j]));
      }
    }
    cluster_barrier();  // every block's histogram complete
    if (rank == 0) {
      for (int i = tid; i < nb; i += DRAW_THREADS) {
        unsigned n = 0u;
        double s = 0.0;
        for (int q = 0; q < DRAW_CLUSTER; ++q) {
          n += ld_cluster_u32(cluster_addr(sh.cnt + i, q));
          if (MASS) s += ld_cluster_f64(cluster_addr(sh.mass + i, q));
        }
        sh.mcnt[i] = n;
        sh.mmass[i] = s;
      }
      __syncthreads();
      draw_pick<MASS>(sh, sh.mcnt, sh.mmass, nb, r, ps, above);
      if (tid < DRAW_CLUSTER) {  // the choice into every block
        const unsigned a = cluster_addr(&sh.sel, tid);
        st_cluster_u32(a, sh.sel.bin);
        st_cluster_u32(a + 4, sh.sel.count);
        st_cluster_u32(a + 8, sh.sel.r);
        st_cluster_f64(a + 16, sh.sel.above);
      }
    }
    cluster_barrier();  // the choice everywhere; the histograms free again
    const DrawSel s = sh.sel;
    prefix |= (unsigned long long)s.bin << shift;
    pmask |= (unsigned long long)(nb - 1u) << shift;
    rem = shift;
    r = s.r;
    above = s.above;
    if (rem > 0 && s.count <= DRAW_GATHER) { gathered = true; break; }
  }
  if (!gathered) return prefix;  // every bit decided by the cluster's passes

  const unsigned n_at = cluster_addr(&sh.ncand, 0), cand_at = cluster_addr(sh.cand, 0);
#pragma unroll
  for (int j = 0; j < DRAW_ITEMS; ++j) {
    if ((in >> j & 1u) && (key[j] & pmask) == prefix) st_cluster_u64(cand_at + 8u * atom_cluster_add(n_at, 1u), key[j]);
  }
  cluster_barrier();  // the candidates in the leader
  if (rank == 0) {
    // more passes of the same digits over the candidates in shared memory while many match
    unsigned count = sh.ncand;
    const int n = (int)count;
    while (rem > 0 && count > DRAW_COUNT) {
      const int bits = rem < DRAW_CBITS ? rem : DRAW_CBITS, shift = rem - bits, nb = 1 << bits;
      for (int i = tid; i < nb; i += DRAW_THREADS) { sh.mcnt[i] = 0u; if (MASS) sh.mmass[i] = 0.0; }
      __syncthreads();
      for (int i = tid; i < n; i += DRAW_THREADS) {
        const unsigned long long k = sh.cand[i];
        if ((k & pmask) == prefix) {
          const unsigned d = (unsigned)(k >> shift) & (nb - 1u);
          atomicAdd(sh.mcnt + d, 1u);
          if (MASS) atomicAdd(sh.mmass + d, __longlong_as_double((long long)k));
        }
      }
      __syncthreads();
      draw_pick<MASS>(sh, sh.mcnt, sh.mmass, nb, r, ps, above);
      prefix |= (unsigned long long)sh.sel.bin << shift;
      pmask |= (unsigned long long)(nb - 1u) << shift;
      rem = shift;
      r = sh.sel.r;
      above = sh.sel.above;
      count = sh.sel.count;
    }
    // the rest by counting: the (at most DRAW_COUNT) matching candidates first, then each one's
    // number and mass of strictly larger ones among them, from shared memory (no bits left: all of
    // them equal, the key is the prefix)
    if (tid == 0) { sh.nsmall = 0u; sh.result = rem == 0 ? prefix : MASS ? ~0ull : 0ull; }
    __syncthreads();
    if (rem > 0) {
      for (int i = tid; i < n; i += DRAW_THREADS) {
        const unsigned long long k = sh.cand[i];
        if ((k & pmask) == prefix) sh.small[atomicAdd(&sh.nsmall, 1u)] = k;
      }
      __syncthreads();
      const int m = (int)sh.nsmall;
      for (int i = tid; i < m; i += DRAW_THREADS) {
        const unsigned long long v = sh.small[i];
        unsigned gt = 0u, eq = 0u;
        double mgt = above;
        for (int j = 0; j < m; ++j) {
          const unsigned long long w = sh.small[j];
          if (w > v) { ++gt; if (MASS) mgt += __longlong_as_double((long long)w); }
          eq += w == v;
        }
        if (!MASS && gt <= r && r < gt + eq) sh.result = v;  // ties: the same key
        if (MASS && mgt < ps) atomicMin(&sh.result, v);
      }
      __syncthreads();
    }
    if (tid == 0) sh.ncand = 0u;
  }
  cluster_barrier();  // the leader's key (and its candidate count reset for the next selection)
  return ld_cluster_u64(cluster_addr(&sh.result, 0));
}

__device__ void draw_rows(const DrawArgs& a) {
  __shared__ DrawShared sh;
  pdl_launch_dependents();
  const unsigned rank = cluster_rank();
  const int V = (int)a.V, b = blockIdx.y, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int per = (V + DRAW_CLUSTER * DRAW_THREADS - 1) / (DRAW_CLUSTER * DRAW_THREADS);
  const int g0 = ((int)rank * DRAW_THREADS + tid) * per;  // this thread's first token
  if (tid == 0) sh.ncand = 0u;
  pdl_wait();
  const float* x = a.x + (long long)b * V;
  const double T = a.knobs[4 * b], top_p = a.knobs[4 * b + 2], u = a.knobs[4 * b + 3];
  const long long kth_at = (long long)a.knobs[4 * b + 1];

  float xv[DRAW_ITEMS];
  unsigned valid = 0u;
#pragma unroll
  for (int j = 0; j < DRAW_ITEMS; ++j) {
    const bool ok = j < per && g0 + j < V;
    xv[j] = ok ? x[g0 + j] : -__int_as_float(0x7f800000);
    valid |= (unsigned)ok << j;
  }

  // the largest logit
  float m = xv[0];
#pragma unroll
  for (int j = 1; j < DRAW_ITEMS; ++j) m = fmaxf(m, xv[j]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (lane == 0) sh.wf[warp] = m;
  __syncthreads();
  m = lane < DRAW_WARPS ? sh.wf[lane] : m;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (tid == 0) sh.c_max = m;
  cluster_barrier();
  m = lane < DRAW_CLUSTER ? ld_cluster_f32(cluster_addr(&sh.c_max, lane)) : m;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));

  // top-k: the key of the logit at sorted (descending) position kth_at
  unsigned kth_key = 0u;  // off: every logit kept
  if (kth_at >= 0 && kth_at < V - 1) {
    unsigned long long k[DRAW_ITEMS];
#pragma unroll
    for (int j = 0; j < DRAW_ITEMS; ++j) k[j] = draw_key(xv[j]);
    kth_key = (unsigned)draw_select<false>(sh, k, valid, 0ull, 32, (unsigned)kth_at, 0.0, rank);
  }

  // e = exp(x / T - max / T) of the kept logits (x times 1/T: the reference divides, which can differ
  // in the last bit), and their sum
  const double rT = 1.0 / T, mT = (double)m * rT;
  double e[DRAW_ITEMS], part = 0.0;
#pragma unroll
  for (int j = 0; j < DRAW_ITEMS; ++j) {
    e[j] = (valid >> j & 1u) && draw_key(xv[j]) >= kth_key ? exp((double)xv[j] * rT - mT) : 0.0;
    part += e[j];
  }
  part = draw_block_sum(sh, part);
  if (tid == 0) sh.c_sum = part;
  cluster_barrier();
  const double S = draw_cluster_sum(&sh.c_sum);

  // top-p: thr = the smallest e whose strictly larger mass is < top_p * S (the reference's: the last
  // of the most probable tokens kept while the mass before each is < top_p). e's bits order as e does.
  double thr = 0.0;
  if (top_p < 1.0) {
    const double PS = top_p * S;
    // a token with e <= (1 - top_p) S / V cannot be thr (all the mass at or below it is at most
    // (1 - top_p) S, so the mass above it is at least PS): such tokens stay out. So every candidate has
    // e > 2^-53 / V >= 2^-69 (e <= 1), an exponent in [954, 1023]: sign and the exponent's top three
    // bits (0b011) are decided, 60 bits are left.
    const double cut = (S - PS) / (double)V;
    unsigned long long k[DRAW_ITEMS];
    unsigned in = 0u;
#pragma unroll
    for (int j = 0; j < DRAW_ITEMS; ++j) {
      k[j] = (unsigned long long)__double_as_longlong(e[j]);
      in |= (unsigned)(e[j] > cut) << j;
    }
    thr = __longlong_as_double((long long)draw_select<true>(sh, k, in, 0x300ull << 52, 60, 0u, PS, rank));
  }

  // the draw: the first token whose running sum of kept e exceeds u times their total, in vocabulary
  // order. Each thread's [lo, hi) of that running sum tiles [0, total) exactly (hi of one thread is lo
  // of the next, bit for bit), so exactly one thread holds u * total unless it rounds up to the total.
  double ts = 0.0;
  int last = -1;
#pragma unroll
  for (int j = 0; j < DRAW_ITEMS; ++j) {
    if (e[j] > 0.0 && e[j] >= thr) { ts += e[j]; last = g0 + j; }
  }
  double incl = ts;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const double t = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += t;
  }
  int wlast = last;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) wlast = max(wlast, __shfl_xor_sync(0xffffffffu, wlast, off));
  if (lane == 31) sh.wm[warp] = incl;
  if (lane == 0) sh.wi[warp] = wlast;
  __syncthreads();
  double wp = 0.0;  // the warps before this one, in order
  for (int v = 0; v < warp; ++v) wp += sh.wm[v];
  if (tid == 0) {
    double bt = 0.0;
    int bl = -1;
    for (int v = 0; v < DRAW_WARPS; ++v) { bt += sh.wm[v]; bl = max(bl, sh.wi[v]); }
    sh.c_tot = bt;
    sh.c_last = bl;
  }
  cluster_barrier();
  double bp = 0.0, total = 0.0;  // the blocks before this one, all blocks: in rank order
  int glast = -1;
  for (int q = 0; q < DRAW_CLUSTER; ++q) {
    const double t = ld_cluster_f64(cluster_addr(&sh.c_tot, q));
    if (q < (int)rank) bp += t;
    total += t;
    glast = max(glast, (int)ld_cluster_u32(cluster_addr(&sh.c_last, q)));
  }
  const double target = u * total, hi = bp + (wp + incl);
  double lo = __shfl_up_sync(0xffffffffu, hi, 1);
  if (lane == 0) lo = bp + wp;
  if (lo <= target && target < hi) {
    double cum = lo;
    int pick = last;  // the walk did not cross (rounding): this thread's last kept token
#pragma unroll
    for (int j = 0; j < DRAW_ITEMS; ++j) {
      if (e[j] > 0.0 && e[j] >= thr) {
        cum += e[j];
        if (cum > target) { pick = g0 + j; break; }
      }
    }
    put_token(a.out, a.out_host, b, pick);
  } else if (rank == 0 && tid == 0 && !(target < total)) {
    put_token(a.out, a.out_host, b, glast);  // u * total rounded up to the total: the last kept token
  }
  cluster_barrier();  // no block leaves while another may still read its shared memory
}
#endif

struct ResidualNormArgs {
  float* h;              // [B, K] residual stream, updated in place
  const void* o;         // [B, K] T: the mixer output (out_proj result)
  const void* norm_w;    // [K] T: the next norm (a layer's or norm_f)
  void* xn;              // [B, K] T: round_T(norm(h))
  long long K, res_fp32;
  float eps;
};

// Batched path and prompts, one block per row: h += o; xn = round_T(h * rstd * norm_w). The first
// RN_ITEMS * blockDim columns are held in registers, their loads all issued before any store (h and o
// may alias for the compiler, which would otherwise order each load after the previous store), so a
// row costs one memory round trip instead of one per strided pass; wider rows loop over the rest.
constexpr int RN_ITEMS = 8;

template <typename T>
__device__ void residual_norm(const ResidualNormArgs& a) {
  __shared__ float red[32];
  pdl_launch_dependents();
  pdl_wait();
  const int K = (int)a.K, nt = (int)blockDim.x;
  const long long row = (long long)blockIdx.x * K;
  const T* o = static_cast<const T*>(a.o);
  const T* nw = static_cast<const T*>(a.norm_w);
  float hv[RN_ITEMS], ov[RN_ITEMS];
#pragma unroll
  for (int i = 0; i < RN_ITEMS; ++i) {
    const int k = threadIdx.x + i * nt;
    hv[i] = k < K ? a.h[row + k] : 0.f;
    ov[i] = k < K ? to_float(o[row + k]) : 0.f;
  }
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < RN_ITEMS; ++i) {
    const int k = threadIdx.x + i * nt;
    float hn = hv[i] + ov[i];
    if (!a.res_fp32) hn = round_t<T>(hn);
    hv[i] = hn;
    if (k < K) {
      a.h[row + k] = hn;
      s = fmaf(hn, hn, s);
    }
  }
  for (int k = threadIdx.x + RN_ITEMS * nt; k < K; k += nt) {
    float hn = a.h[row + k] + to_float(o[row + k]);
    if (!a.res_fp32) hn = round_t<T>(hn);
    a.h[row + k] = hn;
    s = fmaf(hn, hn, s);
  }
  float wv[RN_ITEMS];
#pragma unroll
  for (int i = 0; i < RN_ITEMS; ++i) {
    const int k = threadIdx.x + i * nt;
    wv[i] = k < K ? to_float(nw[k]) : 0.f;
  }
  const float rstd = rsqrtf(block_sum(s, red) / (float)K + a.eps);
  T* xn = static_cast<T*>(a.xn);
#pragma unroll
  for (int i = 0; i < RN_ITEMS; ++i) {
    const int k = threadIdx.x + i * nt;
    if (k < K) xn[row + k] = from_float<T>(hv[i] * rstd * wv[i]);
  }
  for (int k = threadIdx.x + RN_ITEMS * nt; k < K; k += nt)
    xn[row + k] = from_float<T>(a.h[row + k] * rstd * to_float(nw[k]));
}

struct ConvXprojArgs {
  const void* xz;          // [B, 2d] T (x = first d columns)
  void* conv_state;        // this layer's [slots, d, k-1] T, updated in place
  const long long* idx;    // [B] slot of each row
  const void* conv_w;      // [d, k] T
  const void* conv_b;      // [d] T or null
  const void* Wx;          // [R, d] T, or null: no x_proj share (batched path)
  void* u;                 // [B, d] T: silu(conv) output
  float* xdbl;             // [B, R] fp32 accumulator (zeroed before the step)
  long long d, k, R;       // rows: BM (conv_xproj) or the grid's y (conv_only)
  long long B;             // rows (conv_xproj_rows: the accumulator's row stride there is R rounded up to 8)
};

// A channel's conv window (its k - 1 state values s, oldest first) and taps (cw, k of them) in registers,
// right-aligned: position MAX_CONV - 1 is the tap of the newest input (x, not loaded here), positions
// before MAX_CONV - k are zero and unused. Every register index is a compile-time constant and k only
// moves the loads, so the arrays stay in registers (a run-time index such as w[k - 1] put them in local
// memory; tests/plugins_cuda/test_decode_step_build.py checks that no decode kernel has a stack frame).
template <typename T>
__device__ __forceinline__ void conv_load_win(float (&win)[MAX_CONV], const T* s, int k, bool ok) {
  const int o = MAX_CONV - k;
#pragma unroll
  for (int j = 0; j < MAX_CONV; ++j) win[j] = ok && j >= o && j < MAX_CONV - 1 ? to_float(s[j - o]) : 0.f;
}
template <typename T>
__device__ __forceinline__ void conv_load_taps(float (&w)[MAX_CONV], const T* cw, int k, bool ok) {
  const int o = MAX_CONV - k;
#pragma unroll
  for (int j = 0; j < MAX_CONV; ++j) w[j] = ok && j >= o ? to_float(cw[j - o]) : 0.f;
}
template <typename T>
__device__ __forceinline__ void conv_load(float (&win)[MAX_CONV], float (&w)[MAX_CONV], const T* s, const T* cw,
                                          int k, bool ok) {
  conv_load_win<T>(win, s, k, ok);
  conv_load_taps<T>(w, cw, k, ok);
}

// One (row, channel) of the conv update from conv_load's registers: u = silu(bias + w . (state, x)), the
// taps summed oldest first; the state shifted left with x appended (in place, in the row's slot).
template <typename T>
__device__ __forceinline__ T conv_one(const float (&win)[MAX_CONV], const float (&w)[MAX_CONV], float bias, int k,
                                      T xv, T* s) {
  const int o = MAX_CONV - k;
  float acc = bias;
#pragma unroll
  for (int j = 0; j < MAX_CONV - 1; ++j) {
    if (j >= o) acc = fmaf(w[j], win[j], acc);
  }
  acc = fmaf(w[MAX_CONV - 1], to_float(xv), acc);
#pragma unroll
  for (int j = 1; j < MAX_CONV - 1; ++j) {
    if (j > o) s[j - o - 1] = from_float<T>(win[j]);
  }
  s[k - 2] = xv;
  return from_float<T>(silu(acc));
}

// Batched path (any B): the conv update only; grid (ceil(d / CONV_THREADS), B), a thread per channel.
template <typename T>
__device__ void conv_only(const ConvXprojArgs& a) {
  const int d = (int)a.d, k = (int)a.k, b = blockIdx.y;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int cc = c < d ? c : d - 1;
  const T* cw = static_cast<const T*>(a.conv_w);
  const T* cb = static_cast<const T*>(a.conv_b);
  T* s = static_cast<T*>(a.conv_state) + (a.idx[b] * d + cc) * (k - 1);
  float win[MAX_CONV], w[MAX_CONV];
  conv_load<T>(win, w, s, cw + (long long)cc * k, k, true);
  const float bias = cb ? to_float(cb[cc]) : 0.f;
  pdl_launch_dependents();
  pdl_wait();
  if (c >= d) return;
  static_cast<T*>(a.u)[(long long)b * d + c] =
      conv_one<T>(win, w, bias, k, static_cast<const T*>(a.xz)[(long long)b * 2 * d + c], s);
}

// GEMV path (BM rows): conv update for XP_CH channels, then their share of x_proj,
// xdbl[b, j] += sum_{c in chunk} Wx[j, c] * u[b, c] (fp32 atomics). Everything that does not depend on
// the previous kernel (slots, conv state and weights, this chunk's x_proj columns) is loaded before
// waiting for it.
template <typename T, int BM>
__device__ void conv_xproj(const ConvXprojArgs& a) {
  constexpr int V = Vec<T>::N, LPR = XP_CH / V;      // lanes per x_proj row: one 16-byte vector each
  constexpr int RPP = (XP_THREADS / 32) * (32 / LPR);  // x_proj rows per pass of the block
  constexpr int PMAX = 10;                             // passes held in registers (R <= PMAX * RPP)
  constexpr int IPT = (BM * XP_CH + XP_THREADS - 1) / XP_THREADS;  // conv items per thread
  __shared__ __align__(16) T us[BM * XP_CH];
  const int d = (int)a.d, k = (int)a.k, R = (int)a.R;
  const int c0 = blockIdx.x * XP_CH;
  const int nch = d - c0 < XP_CH ? d - c0 : XP_CH;
  const T* Wx = static_cast<const T*>(a.Wx);
  const T* cw = static_cast<const T*>(a.conv_w);
  const T* cb = static_cast<const T*>(a.conv_b);
  const int lane = threadIdx.x & 31, sub = lane % LPR;
  const int jrow = (threadIdx.x / 32) * (32 / LPR) + lane / LPR;
  const bool vec = nch == XP_CH && (d % V) == 0 && aligned16(Wx) && R <= PMAX * RPP;
  uint4 wx[PMAX];
  if (vec) {
#pragma unroll
    for (int q = 0; q < PMAX; ++q) {
      const int j = q * RPP + jrow;
      wx[q] = j < R ? ld_stream(Wx + (long long)j * d + c0 + sub * V) : uint4{0u, 0u, 0u, 0u};
    }
  }
  float win[IPT][MAX_CONV], w[IPT][MAX_CONV], bias[IPT];
  T* sp[IPT];
#pragma unroll
  for (int it = 0; it < IPT; ++it) {
    const int p = threadIdx.x + it * XP_THREADS, b = p / XP_CH, c = c0 + p % XP_CH;
    const bool ok = p < BM * XP_CH && c < d;
    sp[it] = ok ? static_cast<T*>(a.conv_state) + (a.idx[b] * d + c) * (k - 1) : nullptr;
    bias[it] = ok && cb ? to_float(cb[c]) : 0.f;
    conv_load<T>(win[it], w[it], sp[it], ok ? cw + (long long)c * k : cw, k, ok);
  }
  pdl_launch_dependents();
  pdl_wait();
#pragma unroll
  for (int it = 0; it < IPT; ++it) {
    const int p = threadIdx.x + it * XP_THREADS, b = p / XP_CH, c = c0 + p % XP_CH;
    if (p >= BM * XP_CH) continue;
    if (!sp[it]) {
      us[p] = from_float<T>(0.f);
      continue;
    }
    const T uo = conv_one<T>(win[it], w[it], bias[it], k, static_cast<const T*>(a.xz)[(long long)b * 2 * d + c], sp[it]);
    static_cast<T*>(a.u)[(long long)b * d + c] = uo;
    us[p] = uo;
  }
  if (!Wx) return;
  __syncthreads();
  if (vec) {
#pragma unroll
    for (int q = 0; q < PMAX; ++q) {
      if (q * RPP >= R) break;
      const int j = q * RPP + jrow;
      float wf[V];
      unpack<T>(wx[q], wf);
#pragma unroll
      for (int b = 0; b < BM; ++b) {
        float xf[V];
        unpack<T>(*reinterpret_cast<const uint4*>(us + b * XP_CH + sub * V), xf);
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i) s = fmaf(wf[i], xf[i], s);
#pragma unroll
        for (int off = LPR / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (sub == 0 && j < R) atomicAdd(a.xdbl + b * R + j, s);
      }
    }
  } else {
    for (int j = threadIdx.x; j < R; j += blockDim.x) {
#pragma unroll
      for (int b = 0; b < BM; ++b) {
        float s = 0.f;
        for (int cl = 0; cl < nch; ++cl) s = fmaf(to_float(Wx[(long long)j * d + c0 + cl]), to_float(us[b * XP_CH + cl]), s);
        atomicAdd(a.xdbl + b * R + j, s);
      }
    }
  }
}

// Four states of one channel one step on: h = exp(dt A) h + (dt u) B; returns their share of C . h.
__device__ __forceinline__ float state_step4(float4& hv, const float4& av, float dt, float dtu, const float* Bv,
                                             const float* Cv) {
  hv.x = fmaf(expf(dt * av.x), hv.x, dtu * Bv[0]);
  hv.y = fmaf(expf(dt * av.y), hv.y, dtu * Bv[1]);
  hv.z = fmaf(expf(dt * av.z), hv.z, dtu * Bv[2]);
  hv.w = fmaf(expf(dt * av.w), hv.w, dtu * Bv[3]);
  float yp = Cv[0] * hv.x;
  yp = fmaf(Cv[1], hv.y, yp);
  yp = fmaf(Cv[2], hv.z, yp);
  return fmaf(Cv[3], hv.w, yp);
}

struct SsmStepArgs {
  const float* xdbl_acc;   // [B, R] fp32 x_proj accumulator, or null (then xdbl_t)
  const void* xdbl_t;      // [B, R] T x_proj output (batched path)
  const void* delta;       // [B, d] T dt_proj output (batched path), or null: computed here
  const void* Wdt;         // [d, r] T
  const float* dt_bias;    // [d]
  const float* A;          // [d, n] = -exp(A_log)
  const float* D;          // [d] or null
  const void* u;           // [B, d] T
  const void* xz;          // [B, 2d] T (z = last d columns)
  float* ssm_state;        // this layer's [slots, d, n] fp32, updated in place
  const long long* idx;    // [B]
  void* y;                 // [B, d] T
  long long d, r, R;
  long long B;             // rows (dt_rows: xdbl_acc's row stride there is R rounded up to 8)
};

// p[0..3] += v (16-byte aligned); one reduction on sm_90+.
__device__ __forceinline__ void red_add4(float* p, float4 v) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
#else
  atomicAdd(p, v.x); atomicAdd(p + 1, v.y); atomicAdd(p + 2, v.z); atomicAdd(p + 3, v.w);
#endif
}

// One channel's state update by TPC = N / 4 threads (4 states each), in three parts around the wait for the
// previous kernel: load (the state, A, D, the bias and this thread's share of the dt_proj row), inputs (u
// and z) and finish (dt, the update, y). ssm_step and ssm_out run it. PRE (the batched path: delta
// precomputed by cuBLAS, x_proj's output in T): no dt_proj share, and each thread reads its 4 B and 4 C
// values directly (the block's threads share them through L1), so no shared row and no barrier; 30-odd
// registers instead of 70, i.e. full occupancy for a kernel that streams the batch's state.
template <typename T, int N, bool PRE>
struct SsmThread {
  static constexpr int TPC = N / 4, V = Vec<T>::N, WMAX = PRE ? 1 : 8;
  uint4 wv[WMAX];
  float4 av, hv;
  float dbias, Dv, uv, zv;
  float* hp;
  const T* w;
  int b, cc, g;
  bool active, wvec;

  // channel c of row b; g: this thread's quarter of the channel's states
  __device__ __forceinline__ void load(const SsmStepArgs& a, int c, int g_, int b_) {
    const int d = (int)a.d, r = (int)a.r;
    b = b_; g = g_;
    active = c < d;
    cc = active ? c : 0;
    w = static_cast<const T*>(a.Wdt) + (long long)cc * r;
    wvec = !PRE && (r % V) == 0 && aligned16(a.Wdt) && r / V <= WMAX * TPC;
    if (wvec) {
#pragma unroll
      for (int q = 0; q < WMAX; ++q) {
        const int i = g + q * TPC;
        wv[q] = i < r / V ? ld_stream(w + i * V) : uint4{0u, 0u, 0u, 0u};
      }
    }
    hp = a.ssm_state + (a.idx[b] * d + cc) * N + g * 4;
    av = *reinterpret_cast<const float4*>(a.A + (long long)cc * N + g * 4);
    hv = *reinterpret_cast<const float4*>(hp);
    dbias = a.dt_bias[cc];
    Dv = a.D ? a.D[cc] : 0.f;
  }

  __device__ __forceinline__ void inputs(const SsmStepArgs& a) {
    const int d = (int)a.d;
    uv = to_float(static_cast<const T*>(a.u)[(long long)b * d + cc]);
    zv = to_float(static_cast<const T*>(a.xz)[(long long)b * 2 * d + d + cc]);
  }

  // xs: x_proj's output row b (ssm_xdbl_rows; unused with PRE). Returns y (every thread of the channel),
  // and stores the state.
  __device__ __forceinline__ float finish(const SsmStepArgs& a, const float* xs) {
    const int r = (int)a.r, R = (int)a.R, d = (int)a.d;
    float dt, Bv[4], Cv[4];
    if constexpr (PRE) {
      const T* xr = static_cast<const T*>(a.xdbl_t) + (long long)b * R + r + g * 4;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        Bv[j] = to_float(xr[j]);
        Cv[j] = to_float(xr[N + j]);
      }
      dt = to_float(static_cast<const T*>(a.delta)[(long long)b * d + cc]);
    } else {
      float s = 0.f;
      if (wvec) {
#pragma unroll
        for (int q = 0; q < WMAX; ++q) {
          const int i = g + q * TPC;
          if (i < r / V) {
            float wf[V];
            unpack<T>(wv[q], wf);
#pragma unroll
            for (int j = 0; j < V; ++j) s = fmaf(wf[j], xs[i * V + j], s);
          }
        }
      } else {
        for (int i = g; i < r; i += TPC) s = fmaf(to_float(w[i]), xs[i], s);
      }
#pragma unroll
      for (int off = TPC / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      dt = round_t<T>(s);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        Bv[j] = xs[r + g * 4 + j];
        Cv[j] = xs[r + N + g * 4 + j];
      }
    }
    dt = softplus(dt + dbias);
    float yp = state_step4(hv, av, dt, dt * uv, Bv, Cv);
#pragma unroll
    for (int off = TPC / 2; off > 0; off >>= 1) yp += __shfl_xor_sync(0xffffffffu, yp, off);
    if (active) *reinterpret_cast<float4*>(hp) = hv;
    return (a.D ? fmaf(Dv, uv, yp) : yp) * silu(zv);
  }
};

// rows rows of x_proj's output from row b0 into xs (rows x R floats of shared memory) by the block's threads,
// rounded to T (the reference's x_proj output): from the fp32 accumulator, or the T row.
template <typename T>
__device__ __forceinline__ void ssm_xdbl_rows(const SsmStepArgs& a, float* xs, int b0, int rows) {
  const int R = (int)a.R;
  for (int j = threadIdx.x; j < rows * R; j += blockDim.x) {
    const long long i = (long long)b0 * R + j;
    xs[j] = a.xdbl_acc ? round_t<T>(a.xdbl_acc[i]) : to_float(static_cast<const T*>(a.xdbl_t)[i]);
  }
}

// grid (ceil(d / CPB), B); TPC = N / 4 threads per channel (a power of two), 4 states each. The
// state, A, D, the bias and this thread's share of the dt_proj row are loaded before waiting for the
// previous kernel; after it, only x_proj's output, u and z.
template <typename T, int N, bool PRE>
__device__ void ssm_step(const SsmStepArgs& a) {
  constexpr int TPC = N / 4;
  __shared__ float xs[PRE ? 1 : MAX_XDBL];  // x_proj output row
  const int b = blockIdx.y;
  SsmThread<T, N, PRE> st;
  st.load(a, blockIdx.x * (SSM_THREADS / TPC) + threadIdx.x / TPC, threadIdx.x % TPC, b);
  pdl_launch_dependents();
  pdl_wait();
  st.inputs(a);
  if constexpr (!PRE) {
    ssm_xdbl_rows<T>(a, xs, b, 1);
    __syncthreads();
  }
  const float yv = st.finish(a, xs);
  if (st.active && st.g == 0) static_cast<T*>(a.y)[(long long)b * a.d + st.cc] = from_float<T>(yv);
}

// ssm_step and out_proj in one kernel (the GEMV path's buckets: BM rows in each block; 16-bit T): block
// j takes channels [SO_CH j, SO_CH (j + 1)) of every row, runs their state update as ssm_step does, then
// their share of out_proj, acc[b, n] += sum_c Wo[n, c] y[b, c] (fp32 reductions into an accumulator
// zeroed before the step, the bias added by block 0); the next norm_gemv adds the sums, rounded to T, to
// the residual (NormGemvArgs.G = 0). One kernel boundary per layer less than ssm_step + gemv_residual. The
// block's slice of Wo (dm rows of SO_CH columns, 16 bytes of SO_ITERS rows per thread) is loaded into
// registers before the wait, with the state: no shared memory for it, so that the blocks fit beside the
// GEMV's and start as early as ssm_step's. 16 channels a block (130m: 96 blocks): H100 fp16 130m, GPU ms per
// step, 32 / 16 channels 0.2596 / 0.2416 at batch 1, 0.3145 / 0.2876 at batch 2; 8 channels, or 128 threads,
// slower (NOTES item 81).
constexpr int SO_CH = 16, SO_THREADS = 256, SO_ITERS = 8;
struct SsmOutArgs {
  SsmStepArgs s;
  const void* Wo;    // [dm, d] T
  const void* bias;  // [dm] T or null
  float* acc;        // [BM, dm] zero before the launch
  long long dm;      // at most SO_ITERS * SO_THREADS / (SO_CH / 8) = 1024 (16-bit T)
};

template <typename T, int N, int BM>
__device__ void ssm_out(const SsmOutArgs& a) {
  constexpr int TPC = N / 4, ROWT = SO_CH * TPC;  // threads per batch row in the state update
  constexpr int V = Vec<T>::N, LPR = SO_CH / V;   // lanes per Wo row: one 16-byte vector each
  constexpr int RPW = 32 / LPR, RPB = (SO_THREADS / 32) * RPW;  // Wo rows per warp and per block, each pass
  static_assert(ROWT * BM <= SO_THREADS && SO_CH % V == 0 && LPR <= 8, "ssm_out: shape");
  __shared__ float xs[BM * MAX_XDBL];
  __shared__ float ys[BM][SO_CH];
  const int dm = (int)a.dm, d = (int)a.s.d, R = (int)a.s.R;
  const int c0 = blockIdx.x * SO_CH, nch = d - c0 < SO_CH ? d - c0 : SO_CH;
  const int b = threadIdx.x / ROWT, lt = threadIdx.x % ROWT;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, q = lane % LPR, n1 = warp * RPW + lane / LPR;
  const T* Wo = static_cast<const T*>(a.Wo);
  uint4 wr[SO_ITERS];  // row n1 + it * RPB, columns c0 + q V ..
  const bool vec = nch == SO_CH && d % V == 0 && aligned16(Wo);
#pragma unroll
  for (int it = 0; it < SO_ITERS; ++it) {
    const int n = n1 + it * RPB;
    wr[it] = uint4{0u, 0u, 0u, 0u};
    if (n < dm) {
      const T* src = Wo + (long long)n * d + c0 + q * V;
      if (vec) {
        wr[it] = ld_stream(src);
      } else {
        T* e = reinterpret_cast<T*>(&wr[it]);
#pragma unroll
        for (int i = 0; i < V; ++i) e[i] = q * V + i < nch ? src[i] : T{};
      }
    }
  }
  SsmThread<T, N, false> st;
  if (b < BM) st.load(a.s, c0 + lt / TPC, lt % TPC, b);
  pdl_launch_dependents();
  pdl_wait();
  if (b < BM) st.inputs(a.s);
  ssm_xdbl_rows<T>(a.s, xs, 0, BM);
  __syncthreads();
  if (b < BM) {
    const float yv = st.finish(a.s, xs + b * R);
    if (st.g == 0) ys[b][lt / TPC] = st.active ? round_t<T>(yv) : 0.f;
  }
  __syncthreads();
  // lane (row n, vector q) multiplies its 16 bytes of row n by the matching y of each batch row; the LPR lanes
  // of a row sum by shuffles; the lanes of every fourth row gather four rows' sums and add them into acc with
  // one 16-byte reduction
  float yq[BM][V];
#pragma unroll
  for (int bb = 0; bb < BM; ++bb)
#pragma unroll
    for (int i = 0; i < V; ++i) yq[bb][i] = ys[bb][q * V + i];
  const T* bias = blockIdx.x == 0 ? static_cast<const T*>(a.bias) : nullptr;
#pragma unroll
  for (int it = 0; it < SO_ITERS; ++it) {
    const int n = n1 + it * RPB;
    if (it * RPB >= dm) break;  // block-uniform
    float wf[V];
    unpack<T>(wr[it], wf);
#pragma unroll
    for (int bb = 0; bb < BM; ++bb) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < V; ++i) s = fmaf(wf[i], yq[bb][i], s);
#pragma unroll
      for (int off = LPR / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (bias && n < dm) s += to_float(bias[n]);
      const float s1 = __shfl_down_sync(0xffffffffu, s, LPR), s2 = __shfl_down_sync(0xffffffffu, s, 2 * LPR),
                  s3 = __shfl_down_sync(0xffffffffu, s, 3 * LPR);
      if (lane % (4 * LPR) == 0 && n < dm) red_add4(a.acc + (long long)bb * dm + n, make_float4(s, s1, s2, s3));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// The GEMM path's x_proj and dt_proj without cuBLAS (16-bit T; buckets of 9-16 rows from mamba-1.4b up:
// decode_step.ROWS_*): conv_xproj_rows + dt_rows replace conv_only and the x_proj and dt_proj GEMMs before
// ssm_step_pre. At 16 rows of mamba-1.4b / 2.8b those took ~2.8 + 8.5 (split-K) + 1.7 (its reduction) +
// 3.0 us per layer for 2 MB of x_proj and 1.6 MB of dt_proj weights (benchmarks/NOTES.md, item 56).
//
//   conv_xproj_rows  block (XR_CH channels, XR_ROWS rows): the conv update of its (row, channel) items
//                    (their conv state prefetched into L2 before waiting for in_proj), then its share of
//                    x_proj, acc[row, j] += sum_{c in its channels} u[row, c] Wx[j, c], as m16n8k16 mma
//                    tiles (rows x j, K = its channels) added into the fp32 accumulator acc [B, Rp] (Rp = R
//                    rounded up to 8) with 16-byte reductions. The weight slice arrives by cp.async while
//                    the conv runs.
//   dt_rows          block (DR_CH channels, DR_ROWS rows): dt_proj as mma tiles (channels x rows, K = r) from
//                    acc rounded to T (the reference's x_proj output), rounded to T into delta; the grid
//                    also writes acc rounded to T (ssm_step_pre's B and C).
// Operands of an mma sit in shared memory as [K / 32][rows][32] T: lane (g, q) reads 8 consecutive K of
// row g (and g + 8) as one 16-byte vector (mma_16816's K order), conflict-free.
// Measured against cuBLAS (item 56): faster at 16 rows of 1.4b / 2.8b (-7 % / -3 % per step), even or
// slower at 64 rows and on mamba-130m, where the accumulator's contended reductions (each output gets a
// sum from every channel block) and the conv's two dependent round trips cost what cuBLAS's split-K does.
constexpr int XR_CH = 128, XR_ROWS = 32, XR_THREADS = 512;
constexpr int DR_CH = 32, DR_ROWS = 64, DR_THREADS = 256;  // DR_ROWS: the most rows a block takes
constexpr int ROWS_MAX_R = 512;  // r + 2n limit (conv_xproj_rows' weight slice: 128 KB of shared memory)

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
#endif
}

// rows x K of T (row stride ld) into [K32 / 32][rows_s][32] of shared memory, rows past `rows` and K past
// `K` (to K32) zero: by cp.async where every 16-byte piece is aligned (src and ld), else element by element.
template <typename T>
__device__ __forceinline__ void stage_rows(T* s, const T* src, long long ld, int rows, int rows_s, int K, int K32) {
  const bool vec = ld % 8 == 0 && aligned16(src);
  for (int e = threadIdx.x; e < rows_s * (K32 / 8); e += blockDim.x) {
    const int row = e / (K32 / 8), v = e % (K32 / 8);
    T* dst = s + ((v / 4) * rows_s + row) * 32 + (v % 4) * 8;
    if (vec && row < rows && 8 * v + 8 <= K) {
      cp_async16(dst, src + row * ld + 8 * v);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) dst[i] = row < rows && 8 * v + i < K ? src[row * ld + 8 * v + i] : T{};
    }
  }
}

template <typename T>
__device__ void conv_xproj_rows(const ConvXprojArgs& a) {
  extern __shared__ __align__(16) unsigned char rows_smem[];
  const int d = (int)a.d, k = (int)a.k, R = (int)a.R, Rp = (R + 7) & ~7, B = (int)a.B;
  const int c0 = blockIdx.x * XR_CH, r0 = blockIdx.y * XR_ROWS;
  T* ws = reinterpret_cast<T*>(rows_smem);  // Wx[:, c0 .. c0 + XR_CH) as [XR_CH / 32][Rp][32]
  T* us = ws + Rp * XR_CH;                  // u of the block's rows as [XR_CH / 32][XR_ROWS][32]
  stage_rows<T>(ws, static_cast<const T*>(a.Wx) + c0, a.d, R, Rp, d - c0 < XR_CH ? d - c0 : XR_CH, XR_CH);
  const int cl = threadIdx.x % XR_CH, rg = threadIdx.x / XR_CH, c = c0 + cl;
  const bool cok = c < d;
  float w[MAX_CONV];
  conv_load_taps<T>(w, static_cast<const T*>(a.conv_w) + (long long)(cok ? c : 0) * k, k, cok);
  const float bias = cok && a.conv_b ? to_float(static_cast<const T*>(a.conv_b)[c]) : 0.f;
  // the conv state of the thread's items (written by this kernel a step before, not by in_proj) into L2
  constexpr int IT = XR_ROWS / (XR_THREADS / XR_CH), BATCH = 4;  // items per thread, loaded 4 at a time
  T* spi[IT];
#pragma unroll
  for (int i = 0; i < IT; ++i) {
    const int row = r0 + rg + (XR_THREADS / XR_CH) * i;
    spi[i] = cok && row < B ? static_cast<T*>(a.conv_state) + (a.idx[row] * d + c) * (k - 1) : nullptr;
    if (spi[i]) prefetch_l2(spi[i]);
  }
  pdl_launch_dependents();
  pdl_wait();
#pragma unroll
  for (int i0 = 0; i0 < IT; i0 += BATCH) {
    float win[BATCH][MAX_CONV];
    T xv[BATCH];
    T* sp[BATCH];
#pragma unroll
    for (int i = 0; i < BATCH; ++i) {
      const int row = r0 + rg + (XR_THREADS / XR_CH) * (i0 + i);
      sp[i] = spi[i0 + i];
      conv_load_win<T>(win[i], sp[i], k, sp[i] != nullptr);
      xv[i] = sp[i] ? static_cast<const T*>(a.xz)[(long long)row * 2 * d + c] : T{};
    }
#pragma unroll
    for (int i = 0; i < BATCH; ++i) {
      const int rl = rg + (XR_THREADS / XR_CH) * (i0 + i), row = r0 + rl;
      T uo = from_float<T>(0.f);
      if (sp[i]) {
        uo = conv_one<T>(win[i], w, bias, k, xv[i], sp[i]);
        static_cast<T*>(a.u)[(long long)row * d + c] = uo;
      }
      us[((cl / 32) * XR_ROWS + rl) * 32 + cl % 32] = uo;
    }
  }
  cp_async_wait_all();
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  float* acc = a.xdbl;
  for (int nt = warp; nt < Rp / 8; nt += XR_THREADS / 32) {
    uint4 bw[XR_CH / 32];
#pragma unroll
    for (int kc = 0; kc < XR_CH / 32; ++kc)
      bw[kc] = *reinterpret_cast<const uint4*>(ws + (kc * Rp + nt * 8 + g) * 32 + 8 * q);
#pragma unroll
    for (int mt = 0; mt < XR_ROWS / 16; ++mt) {
      float dd[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int kc = 0; kc < XR_CH / 32; ++kc) {
        const uint4 a0 = *reinterpret_cast<const uint4*>(us + (kc * XR_ROWS + mt * 16 + g) * 32 + 8 * q);
        const uint4 a1 = *reinterpret_cast<const uint4*>(us + (kc * XR_ROWS + mt * 16 + g + 8) * 32 + 8 * q);
        mma_16816<T>(dd, a0, a1, bw[kc].x, bw[kc].y, false);
        mma_16816<T>(dd, a0, a1, bw[kc].z, bw[kc].w, true);
      }
      // lane (g, q) holds rows g, g + 8 at columns 2q, 2q + 1: pairs of lanes swap halves so that an
      // even q adds row g's columns 2q .. 2q + 3 and an odd q row g + 8's columns 2q - 2 .. 2q + 1
      const bool odd = q & 1;
      const float s0 = __shfl_xor_sync(0xffffffffu, odd ? dd[0] : dd[2], 1);
      const float s1 = __shfl_xor_sync(0xffffffffu, odd ? dd[1] : dd[3], 1);
      const int row = r0 + mt * 16 + g + (odd ? 8 : 0);
      if (row < B)
        red_add4(acc + (long long)row * Rp + nt * 8 + 2 * (q & ~1),
                 odd ? make_float4(s0, s1, dd[2], dd[3]) : make_float4(dd[0], dd[1], s0, s1));
    }
  }
}

// dt_proj of DR_CH channels x RB rows as mma tiles (channels x rows, K = r) from x_proj's output as
// conv_xproj_rows or proj_wg left it (fp32, rounded to T here, as the reference holds it), rounded to T into
// delta; the grid also writes x_proj's output rows in T (xdbl_t: B and C for ssm_step_pre). RB: the rows
// spread over the grid's gridDim.y row blocks, rounded up to 8 (at most DR_ROWS: the host's grid).
template <typename T>
__device__ void dt_rows(const SsmStepArgs& a) {
  extern __shared__ __align__(16) unsigned char rows_smem[];
  const int d = (int)a.d, r = (int)a.r, R = (int)a.R, Rp = (R + 7) & ~7, B = (int)a.B;
  const int K32 = (r + 31) & ~31;
  const int RB = ((B + (int)gridDim.y - 1) / (int)gridDim.y + 7) & ~7;
  if (RB > DR_ROWS) asm volatile("trap;");  // a grid of too few row blocks for the shared memory (host: dt_rows)
  const int c0 = blockIdx.x * DR_CH, r0 = blockIdx.y * RB;
  T* wdt = reinterpret_cast<T*>(rows_smem);  // dt_proj rows c0 .. c0 + DR_CH as [K32 / 32][DR_CH][32]
  T* xs = wdt + K32 * DR_CH;                 // x_proj's dt columns of the block's rows, [K32 / 32][RB][32]
  stage_rows<T>(wdt, static_cast<const T*>(a.Wdt) + (long long)c0 * r, r, d - c0 < DR_CH ? d - c0 : DR_CH, DR_CH, r,
                K32);
  pdl_launch_dependents();
  pdl_wait();
  const float* acc = a.xdbl_acc;
  // the rows' x_proj output in T (ssm_step_pre's B and C): four values per thread of the grid (once, as a
  // rule)
  T* xt = static_cast<T*>(const_cast<void*>(a.xdbl_t));
  for (int e = (blockIdx.x * DR_THREADS + threadIdx.x) * 4; e < RB * Rp; e += gridDim.x * DR_THREADS * 4) {
    const int row = r0 + e / Rp, j = e % Rp;
    if (row < B) {
      const float4 f = *reinterpret_cast<const float4*>(acc + (long long)row * Rp + j);
      const float fv[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (j + i < R) xt[(long long)row * R + j + i] = from_float<T>(fv[i]);
    }
  }
  // dt_proj's input, rounded to T, into shared memory: XI loads issued before their stores
  constexpr int XI = 8;
  for (int e0 = 0; e0 < RB * (K32 / 4); e0 += XI * DR_THREADS) {
    float4 fx[XI];
#pragma unroll
    for (int i = 0; i < XI; ++i) {
      const int e = e0 + threadIdx.x + i * DR_THREADS, rl = e / (K32 / 4), v = e % (K32 / 4), row = r0 + rl;
      fx[i] = e < RB * (K32 / 4) && row < B && 4 * v < r
                  ? *reinterpret_cast<const float4*>(acc + (long long)row * Rp + 4 * v)
                  : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int i = 0; i < XI; ++i) {
      const int e = e0 + threadIdx.x + i * DR_THREADS, rl = e / (K32 / 4), v = e % (K32 / 4);
      if (e < RB * (K32 / 4)) {
        T* dst = xs + (((4 * v) / 32) * RB + rl) * 32 + (4 * v) % 32;  // (columns from r on: B's, not dt's)
        dst[0] = from_float<T>(4 * v < r ? fx[i].x : 0.f);
        dst[1] = from_float<T>(4 * v + 1 < r ? fx[i].y : 0.f);
        dst[2] = from_float<T>(4 * v + 2 < r ? fx[i].z : 0.f);
        dst[3] = from_float<T>(4 * v + 3 < r ? fx[i].w : 0.f);
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  T* delta = static_cast<T*>(const_cast<void*>(a.delta));
  for (int p = warp; p < (DR_CH / 16) * (RB / 8); p += DR_THREADS / 32) {
    const int mt = p % (DR_CH / 16), nt = p / (DR_CH / 16);
    float dd[4] = {0.f, 0.f, 0.f, 0.f};
    for (int kc = 0; kc < K32 / 32; ++kc) {
      const uint4 a0 = *reinterpret_cast<const uint4*>(wdt + (kc * DR_CH + mt * 16 + g) * 32 + 8 * q);
      const uint4 a1 = *reinterpret_cast<const uint4*>(wdt + (kc * DR_CH + mt * 16 + g + 8) * 32 + 8 * q);
      const uint4 bv = *reinterpret_cast<const uint4*>(xs + (kc * RB + nt * 8 + g) * 32 + 8 * q);
      mma_16816<T>(dd, a0, a1, bv.x, bv.y, false);
      mma_16816<T>(dd, a0, a1, bv.z, bv.w, true);
    }
#pragma unroll
    for (int h = 0; h < 4; ++h) {  // lane (g, q): channels g, g + 8; rows 2q, 2q + 1
      const int c = c0 + mt * 16 + g + (h >= 2 ? 8 : 0), row = r0 + nt * 8 + 2 * q + (h & 1);
      if (row < B && c < d) delta[(long long)row * d + c] = from_float<T>(dd[h]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// proj_wg: the GEMM path's projections on Hopper's warpgroup MMA (sm_90a only: the host compiles these
// entries into a program of their own, MRT_DECODE_PROJ, for that target), in place of cuBLAS.
//
//   out[b, n] = sum_k x[b, k] W[n, k] (+ bias[n]), b < B, n < N; W [N, K] row-major (the weights as the model
//   holds them), x rows ldx apart, out rows ldo apart, in T or float32; fp32 sums, rounded once.
//
// A block (one warpgroup, 128 threads) owns NT rows of W (columns of out) for 64 batch rows (wgmma's M) over a
// range of K. W and x stream through a ring of `stages` stages; a stage is PJ_ATOMS boxes of 64 columns (128
// bytes of a row: the swizzle's span) of each, copied by the tensor memory accelerator (one instruction per box,
// columns past K and rows past N as zeros) into the 128-byte-swizzled layout that wgmma's shared-memory
// descriptors read: 4 k-steps of m64nNTk16 per box (NT made of 64/32/16/8-wide instructions). x's boxes hold
// B rows rounded up to 8 (xbox); the other rows of its 64 in shared memory are stale and meet only outputs that
// are not stored. The block's W boxes of the whole ring are requested before griddepcontrol.wait: weights do not
// depend on the previous kernel, which is still draining. Where K is split (gridDim.y > 1) the blocks of an
// output tile form a cluster; each leaves its fp32 tile in shared memory and, after a cluster barrier, sums a
// share of the tile over the cluster's blocks in rank order (deterministic) and stores it.
// Measured in the step (benchmarks/NOTES.md, items 57-58): faster than cuBLAS for x_proj, for the head up to 64 rows
// and for in_proj and out_proj at 4-32 rows, slower for dt_proj; beyond 64 rows each block of 64 reads all of W.
// Where proj_wg runs out_proj and the projection after it (in_proj or the head), the residual add and RMSNorm between
// them go into their epilogues (ProjNorm below; item 89): one kernel boundary per layer less than residual_norm's.
struct ProjArgs {
  const void* tmx; const void* tmw;  // TMA tensor maps (128 bytes each, in global memory) of x [B, K] and W [N, K]
  const void* bias; void* out;
  long long ldo, B, N, K, kchunk, out_float, stages, xbox;  // xbox: rows of x's boxes (B rounded up to 8, <= 64)
};
// The residual add and RMSNorm between out_proj and the projection after it, in their epilogues (entry points of
// their own, whose argument is ProjArgs then these: the plain entries' code stays as it was; with the fields in
// ProjArgs and runtime switches, the plain code changed and the step measured ~3 % slower):
//   residual (out_proj): its output o, rounded to T, is added to the residual, h[b, n] += o (h [B, N] fp32,
//     rounded to T unless res_fp32); out gets T(h[b, n] res_w[n]) (res_w: the next RMSNorm's weight) and ss_out
//     [gridDim.x, B] the sum of h^2 over the block column's outputs of each row;
//   row scale (the next projection, reading that out): out[b, n] = rsqrt(sum_t ss_in[t, b] / K + eps) (x W^T)[b, n]
//     (+ bias), t < ss_tiles in order: the RMSNorm's scale, applied after the sums.
struct ProjNorm {
  float* res_h; const void* res_w; float* ss_out;
  const float* ss_in;
  long long ss_tiles, res_fp32;
  float eps;
};
struct ProjNormArgs {
  ProjArgs p;
  ProjNorm e;
};
constexpr int PJ_THREADS = 128;  // one warpgroup
constexpr int PJ_M = 64;         // batch rows per block (wgmma's M)
constexpr int PJ_ATOM = 64;      // columns of a box: one 128-byte row of 16-bit values (the swizzle's span)
constexpr int PJ_ATOMS = 4;      // boxes per part per stage: 512 bytes of each W row at a time
constexpr int PJ_KT = PJ_ATOM * PJ_ATOMS;  // columns per stage
constexpr int PJ_PLAIN = 0, PJ_RESIDUAL = 1, PJ_SCALE = 2;  // proj_wg's epilogues (ProjNorm)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// A box of a 2D tensor (tensor map tm, in global memory) at (column c0, row c1) into shared memory, counted on bar.
__device__ __forceinline__ void tma_2d(unsigned dst, const void* tm, int c0, int c1, unsigned bar, unsigned long long pol) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
               " [%0], [%1, {%2, %3}], [%4], %5;"
               ::"r"(dst), "l"(tm), "r"(c0), "r"(c1), "r"(bar), "l"(pol) : "memory");
}

// A shared-memory matrix descriptor: K-major rows of 128 bytes, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ unsigned long long wg_desc(unsigned saddr) {
  return (unsigned long long)((saddr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

// D[64 x N] += A[64 x 16] B[16 x N] (A, B by descriptor), D as wgmma's fragments, N = 8, 16, 32, 64.
#define MRT_WG_FN(N, NR, REGS, ...)                                                                         \
  template <typename T>                                                                                      \
  __device__ __forceinline__ void wg_n##N(float* d, unsigned long long da, unsigned long long db) {        \
    if constexpr (IsBf16<T>::value)                                                                          \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #NR ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N     \
                   "k16.f32.bf16.bf16 " REGS ", p, 1, 1, 0, 0;\n}\n"                                         \
                   : __VA_ARGS__ : "l"(da), "l"(db), "r"(1));                                                \
    else                                                                                                     \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #NR ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N     \
                   "k16.f32.f16.f16 " REGS ", p, 1, 1, 0, 0;\n}\n"                                           \
                   : __VA_ARGS__ : "l"(da), "l"(db), "r"(1));                                                \
  }
#define MRT_F4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
MRT_WG_FN(8, 6, "{%0, %1, %2, %3}, %4, %5", MRT_F4(0))
MRT_WG_FN(16, 10, "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9", MRT_F4(0), MRT_F4(4))
MRT_WG_FN(32, 18, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17",
          MRT_F4(0), MRT_F4(4), MRT_F4(8), MRT_F4(12))
MRT_WG_FN(64, 34,
          "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
          "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33",
          MRT_F4(0), MRT_F4(4), MRT_F4(8), MRT_F4(12), MRT_F4(16), MRT_F4(20), MRT_F4(24), MRT_F4(28))
#undef MRT_F4
#undef MRT_WG_FN

// One k-step (16 columns) of the block's NT-wide tile: wgmma instructions 64, 32, 16, 8 wide from column c0.
// Their fragments sit in d in column order (fragment register g: column 8 (g / 4) + 2 (lane % 4) + g % 2, row
// 16 warp + lane / 4 + 8 ((g / 2) % 2)), and B's rows of a 64-wide part start 64 x 128 bytes further on.
template <typename T, int NT, int C0 = 0>
__device__ __forceinline__ void wg_tile(float* d, unsigned long long da, unsigned long long db) {
  if constexpr (NT - C0 >= 64) {
    wg_n64<T>(d + C0 / 2, da, db + (C0 * 128 >> 4));
    wg_tile<T, NT, C0 + 64>(d, da, db);
  } else if constexpr (NT - C0 >= 32) {
    wg_n32<T>(d + C0 / 2, da, db + (C0 * 128 >> 4));
    wg_tile<T, NT, C0 + 32>(d, da, db);
  } else if constexpr (NT - C0 >= 16) {
    wg_n16<T>(d + C0 / 2, da, db + (C0 * 128 >> 4));
    wg_tile<T, NT, C0 + 16>(d, da, db);
  } else if constexpr (NT - C0 >= 8) {
    wg_n8<T>(d + C0 / 2, da, db + (C0 * 128 >> 4));
  }
}

// MODE: PJ_PLAIN, PJ_RESIDUAL (the residual epilogue) or PJ_SCALE (the row scale), with e (ProjNorm) for the last two.
template <typename T, int NT, int MODE>
__device__ void proj_wg(const ProjArgs& a, const ProjNorm& e) {
  static_assert(NT % 8 == 0 && NT <= 256, "NT: a multiple of 8, at most 256");
  extern __shared__ unsigned char pj_raw[];
  // the swizzle repeats every 1024 bytes of address: stages start on such a boundary
  unsigned char* sm = pj_raw + ((1024 - (smem_addr(pj_raw) & 1023)) & 1023);
  // a stage: PJ_ATOMS boxes of x (64 rows of 128 bytes each, of which the first xbox are copied), then PJ_ATOMS
  // boxes of W (NT rows each)
  constexpr int XA = PJ_M * 128, WA = NT * 128, XB = PJ_ATOMS * XA, SB = XB + PJ_ATOMS * WA;
  const int tid = threadIdx.x, ST = (int)a.stages, xbox = (int)a.xbox;
  const long long K = a.K, n0 = (long long)blockIdx.x * NT, b0 = (long long)blockIdx.z * PJ_M;
  const long long k0 = blockIdx.y * a.kchunk, k1 = min(K, k0 + a.kchunk);
  const int nk = (int)((k1 - k0 + PJ_KT - 1) / PJ_KT);
  const int xrows = (int)min((long long)PJ_M, a.B - b0);
  const int S = (int)gridDim.y;  // blocks over K: a cluster along y where more than one
  unsigned long long* full = reinterpret_cast<unsigned long long*>(sm + ST * SB);  // a barrier per slot
  const unsigned s0 = smem_addr(sm);
  const unsigned long long pol_w = l2_policy<MRT_LD_EVICT_FIRST != 0>(), pol_x = l2_policy<false>();
  // stage `it` into its slot: W's boxes (and x's, after the wait), all counted on the slot's barrier
  auto issue_w = [&](int it) {
    const int s = it % ST;
    mbar_expect_tx(full + s, PJ_ATOMS * (xbox + NT) * 128);
#pragma unroll
    for (int j = 0; j < PJ_ATOMS; ++j)
      tma_2d(s0 + s * SB + XB + j * WA, a.tmw, (int)(k0 + (long long)it * PJ_KT + j * PJ_ATOM), (int)n0,
             smem_addr(full + s), pol_w);
  };
  auto issue_x = [&](int it) {
    const int s = it % ST;
#pragma unroll
    for (int j = 0; j < PJ_ATOMS; ++j)
      tma_2d(s0 + s * SB + j * XA, a.tmx, (int)(k0 + (long long)it * PJ_KT + j * PJ_ATOM), (int)b0,
             smem_addr(full + s), pol_x);
  };
  if (tid == 0) {
    for (int s = 0; s < ST; ++s) mbar_init(full + s, 1);
    mbar_init_fence();
  }
  __syncthreads();
  if (tid == 0) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(a.tmw) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(a.tmx) : "memory");
    for (int s = 0; s < ST && s < nk; ++s) issue_w(s);
  }
  pdl_wait();
  if (tid == 0)
    for (int s = 0; s < ST && s < nk; ++s) issue_x(s);
  // the rows' RMSNorm scale (row scale), in shared memory past the barriers; its loads overlap the first stages
  float* rs = reinterpret_cast<float*>(sm + ST * SB + ((8 * ST + 15) & ~15));
  if (MODE == PJ_SCALE && tid < xrows) {
    float t = 0.f;
    for (int i = 0; i < (int)e.ss_tiles; ++i) t += e.ss_in[i * a.B + b0 + tid];
    rs[tid] = rsqrtf(t / (float)K + e.eps);
  }
  if (MODE == PJ_RESIDUAL) {  // the residuals the epilogue reads (its block's rows of the tile), into L1 meanwhile
    const int rank = S > 1 ? (int)cluster_rank() : 0, lines = (NT + 31) / 32 + 1;
    const int r0 = xrows * rank / S, r1 = xrows * (rank + 1) / S;
    for (int i = tid; i < (r1 - r0) * lines; i += PJ_THREADS) {
      const long long n = n0 + min((i % lines) * 32, NT - 1);
      if (n < a.N) asm volatile("prefetch.global.L1 [%0];" ::"l"(e.res_h + (b0 + r0 + i / lines) * a.N + n));
    }
  }
  float d[NT / 2];
#pragma unroll
  for (int i = 0; i < NT / 2; ++i) d[i] = 0.f;
  for (int it = 0; it < nk; ++it) {
    const int s = it % ST;
    mbar_wait(full + s, (it / ST) & 1);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int j = 0; j < PJ_ATOMS; ++j) {
      const unsigned long long da = wg_desc(s0 + s * SB + j * XA), db = wg_desc(s0 + s * SB + XB + j * WA);
#pragma unroll
      for (int q = 0; q < PJ_ATOM / 16; ++q) wg_tile<T, NT>(d, da + 2 * q, db + 2 * q);  // +32 bytes per k-step
    }
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#pragma unroll
    for (int i = 0; i < NT / 2; ++i) asm volatile("" : "+f"(d[i])::"memory");
    __syncthreads();  // every warp is done with slot s
    if (tid == 0 && it + ST < nk) {
      issue_w(it + ST);
      issue_x(it + ST);
    }
  }
  pdl_launch_dependents();
  const int warp = tid >> 5, lane = tid & 31;
  // the row and column of the tile that fragment registers g and g + 1 (g even) hold (wg_tile's order)
  auto frag_row = [&](int g) { return 16 * warp + (lane >> 2) + 8 * ((g >> 1) & 1); };
  auto frag_col = [&](int g) { return 8 * (g >> 2) + 2 * (lane & 3); };
  // split K: the cluster's blocks (ranks 0..S-1 along y) add up their tiles (the ring is free: every stage
  // was awaited, and the loop's last barrier saw every warp's wgmma done)
  constexpr int LD = NT + 4;  // floats per row of the tile in shared memory (16-byte aligned rows)
  float* red = reinterpret_cast<float*>(sm);
  auto cluster_tile = [&]() {  // this block's tile into shared memory, then the cluster's barrier
#pragma unroll
    for (int g = 0; g < NT / 2; g += 2)
      *reinterpret_cast<float2*>(red + frag_row(g) * LD + frag_col(g)) = make_float2(d[g], d[g + 1]);
    cluster_barrier();
  };
  auto cluster_sum = [&](int row, int col, float* v) {  // outputs (row, col..col + 3) of the tile, summed in rank order
    v[0] = v[1] = v[2] = v[3] = 0.f;
    for (int q = 0; q < S; ++q) {
      const float4 p = ld_cluster_f32x4(cluster_addr(red + row * LD + col, q));
      v[0] += p.x; v[1] += p.y; v[2] += p.z; v[3] += p.w;
    }
  };
  if constexpr (MODE == PJ_RESIDUAL) {
    // cnt outputs of row b from column n with their residuals hv: h = hv + o rounded to T, out = h res_w; returns the
    // sum of the new residuals' squares
    auto store = [&](long long b, long long n, const float* vals, const float* hv, int cnt) {
      float sq = 0.f;
      for (int i = 0; i < cnt && n + i < a.N; ++i) {
        float o = vals[i];
        if (a.bias) o += to_float(static_cast<const T*>(a.bias)[n + i]);
        float hn = hv[i] + round_t<T>(o);
        if (!e.res_fp32) hn = round_t<T>(hn);
        e.res_h[b * a.N + n + i] = hn;
        sq = fmaf(hn, hn, sq);
        static_cast<T*>(a.out)[b * a.ldo + n + i] = from_float<T>(hn * to_float(static_cast<const T*>(e.res_w)[n + i]));
      }
      return sq;
    };
    auto res_load = [&](long long b, long long n, float* hv, int cnt) {  // loaded before any is stored
#pragma unroll
      for (int i = 0; i < cnt; ++i) hv[i] = b < a.B && n + i < a.N ? e.res_h[b * a.N + n + i] : 0.f;
    };
    auto ss_rows = [&](const float* sq, int w, int r0, int r1) {  // partials sq [rows][w], summed in order per row
      __syncthreads();
      for (int r = r0 + tid; r < r1; r += PJ_THREADS) {
        float t = 0.f;
        for (int j = 0; j < w; ++j) t += sq[r * w + j];
        e.ss_out[blockIdx.x * a.B + b0 + r] = t;
      }
    };
    if (S == 1) {
      constexpr int HC = 16;  // fragment registers whose residuals are loaded at a time (registers: NT 192 has 96)
      float sq[2] = {0.f, 0.f};
#pragma unroll
      for (int c0 = 0; c0 < NT / 2; c0 += HC) {
        float hv[HC];
#pragma unroll
        for (int g = c0; g < c0 + HC && g < NT / 2; g += 2)
          res_load(b0 + frag_row(g), n0 + frag_col(g), hv + g - c0, 2);
#pragma unroll
        for (int g = c0; g < c0 + HC && g < NT / 2; g += 2)
          if (frag_row(g) < xrows)
            sq[(g >> 1) & 1] += store(b0 + frag_row(g), n0 + frag_col(g), d + g, hv + g - c0, 2);
      }
      float* sqs = reinterpret_cast<float*>(sm);  // the ring is free: every stage was awaited
      sqs[frag_row(0) * 4 + (lane & 3)] = sq[0];
      sqs[frag_row(2) * 4 + (lane & 3)] = sq[1];
      ss_rows(sqs, 4, 0, xrows);
      return;
    }
    cluster_tile();
    // each block stores whole rows of the tile, so that its sums of squares stay in the block
    const int rank = (int)cluster_rank(), r0 = xrows * rank / S, r1 = xrows * (rank + 1) / S;
    float* sqs = red + PJ_M * LD;  // [rows][NT / 4] partials, past the tile
    for (int gi = r0 * (NT / 4) + tid; gi < r1 * (NT / 4); gi += PJ_THREADS) {
      const int row = gi / (NT / 4), col = 4 * (gi % (NT / 4));
      float v[4], hv[4];
      res_load(b0 + row, n0 + col, hv, 4);
      cluster_sum(row, col, v);
      sqs[gi] = store(b0 + row, n0 + col, v, hv, 4);
    }
    ss_rows(sqs, NT / 4, r0, r1);
    cluster_barrier();  // no block leaves while another reads its tile
    return;
  }
  auto store = [&](long long b, long long n, const float* vals, int cnt) {  // cnt consecutive outputs from n
    for (int i = 0; i < cnt && n + i < a.N; ++i) {
      float o = vals[i];
      if constexpr (MODE == PJ_SCALE) o *= rs[b - b0];
      if (a.bias) o += to_float(static_cast<const T*>(a.bias)[n + i]);
      if (a.out_float) static_cast<float*>(a.out)[b * a.ldo + n + i] = o;
      else static_cast<T*>(a.out)[b * a.ldo + n + i] = from_float<T>(o);
    }
  };
  if (S == 1) {
#pragma unroll
    for (int g = 0; g < NT / 2; g += 2)
      if (frag_row(g) < xrows) store(b0 + frag_row(g), n0 + frag_col(g), d + g, 2);
    return;
  }
  cluster_tile();
  const int rank = (int)cluster_rank();
  const int groups = xrows * (NT / 4), lo = groups * rank / S, hi = groups * (rank + 1) / S;
  for (int e = lo + tid; e < hi; e += PJ_THREADS) {
    const int row = e / (NT / 4), col = 4 * (e % (NT / 4));
    float v[4];
    cluster_sum(row, col, v);
    store(b0 + row, n0 + col, v, 4);
  }
  cluster_barrier();  // no block leaves while another reads its tile
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// ------------------------------------------------------------------------------------------------
// Every layer of a batch-1 step in one persistent kernel (16-bit T, sm_90+): `layers`.
//
// Why: the four kernels per layer above leave the batch-1 step at ~42 us per 2.8b layer for 82 MB of
// weights (1.95 TB/s): each weight stream ramps up and drains at a kernel boundary, and the small
// kernels' dependent round trips sit between the streams (benchmarks/NOTES.md, sessions 3-12). Here
// one block per SM runs for the whole step, and its producer warp streams weights through a ring of
// shared-memory stages without stopping at phase boundaries: in_proj of layer l, then out_proj of l,
// then in_proj of l + 1, ..., the next phase's stages filling while the consumer warps wait at a grid
// barrier for the activations. The earlier persistent kernel (item 10) ran the phases in turn behind
// barriers with load-fed GEMVs and lost; this one never lets the weight stream wait for a barrier.
//
// Work of block b (G blocks, one per SM, all resident: the host checks):
//   * in_proj by channels: the block takes the units of 8 channels [u0, u1) (balanced), i.e. the
//     channels [8 u0, 8 u1) and their rows of W_in, x and z, so the block that reduces a channel's x row
//     runs its conv update (state in place) and keeps u and z in shared memory.
//     The block streams its x rows first, then its z rows, in groups of 16 (LyWork::row).
//   * x_proj: the block's share over its channels (from x_proj's transposed copy W_x^T [d, R], fp32
//     atomics into xacc[l]) once its x rows are in, then its arrival at a grid barrier, then its z rows:
//     the barrier's round trips overlap the z rows' stream. After the barrier, the state update of its
//     channels (dt_proj, softplus, state, D, gate) writes y, each value tagged with the layer and step.
//   * out_proj in tiles of 16 rows x BULK_KS columns (split K), the block taking the tiles [t0, t1),
//     once the y it reads carries this layer's tag (no barrier). A block's run of tiles in one row
//     group gives one partial sum per row, written tagged into its own slot (the block's distance from
//     the row group's first block: at most P slots, the host's layers_partials). Combined (from the
//     host's LY_COMBINE_MIN_DMODEL up), the row group's first block, whose run there is its last, adds
//     the others' (their first runs) into slot 0 instead.
//   * at the next layer's start (no barrier), every block reads the P partials (or slot 0's sum) of
//     every output as they come (their tags; two slots per round trip up to d_model 2048: the host's
//     pw), sums them in order and forms h = h + round_T(sum) (+ bias) and its norm itself; block b
//     writes its slice of h to the other half of hbuf.
// One grid barrier per layer (after x_proj, whose sums are atomic) instead of three; a tagged word is
// either this layer's or an older one, so the tagged buffers are never reset (benchmarks/NOTES.md,
// items 40-45).
// The channels' side data of a layer (conv state and weights, W_x^T rows, dt_proj rows, dt bias, A, D,
// SSM state; each a contiguous range of the block's channels) arrives by bulk copies into one side
// buffer, issued by the producer once the consumers are done with the layer before's (after its state
// update); the norm weight is read into registers before the out_proj sums are awaited. After the
// last layer: h and per-block sums of squares for the head's norm_gemv. The barrier's counter is zeroed
// before the step. The head follows as its own launch (norm_gemv, PDL).
// Measured against the four kernels per layer (benchmarks/NOTES.md, items 39 and 42-45; H100, GPU ms per
// step): three barriers per layer, 1.4b 1.59 -> 1.44, 2.8b 2.74 -> 2.63; with the tagged exchanges, 1.4b
// 1.60 -> 1.30, 2.8b 2.73 -> 2.36, 790m 1.16 -> 1.01, 370m 0.75 -> 0.68; with x rows first (item 43),
// 1.4b 1.60 -> 1.28, 2.8b 2.74 -> 2.26 (2-6 % faster than unit by unit from 370m up); the arrival a
// group later and, at 2.8b, the partials combined: 1-2 % each (items 44-45). Where the time goes is in
// benchmarks/trace_layers.py's phase trace: each grid barrier and each dependent round trip between
// phases costs 1-3 us while the weight stream saturates the memory system, and those gaps are longer
// than the ring of stages can cover, so the stream still stalls (without any wait on another block,
// MRT_LY_NOSYNC, a 2.8b layer takes 30.7 us against 33.1: item 44).
// Filling the gaps with more traffic (L2 prefetch past the ring) made every round trip slower and the
// step 17-50 % slower (item 40): what is left to cut is round trips, not idle bandwidth.
#ifdef MRT_LY_TRACE  // development only: per block and layer (64 x 32 slots), clock64 at phase ends
// (benchmarks/trace_layers.py reads them)
}  // namespace mrt
extern "C" __device__ long long mrt_ly_trace[MRT_LY_TRACE];
namespace mrt {
#define LY_AT(l, p) mrt_ly_trace[(blockIdx.x * 64 + (l)) * 32 + (p)]
#define LY_ON(l) ((l) < 64 && (blockIdx.x + 1) * 64 * 32 <= MRT_LY_TRACE)
#define LY_MARK(l, p) do { if (LY_ON(l)) LY_AT(l, p) = clock64(); } while (0)
#define LY_ADD(l, p, v) do { if (LY_ON(l)) LY_AT(l, p) += (v); } while (0)
#else
#define LY_MARK(l, p) do {} while (0)
#define LY_ADD(l, p, v) do {} while (0)
#endif
#ifndef MRT_LY_NOSYNC  // development only: 1 skips every wait on another block (wrong results, no hang):
#define MRT_LY_NOSYNC 0  // what the weight stream and the phases cost without the exchanges' waits; or a
#endif                   // mask of them: 2 out_proj's partials, 4 the grid barrier, 8 y (what each costs)
#ifndef MRT_LY_NOMMA  // development only: 1 releases every stage unread, no products (wrong results): what
#define MRT_LY_NOMMA 0  // the consumers' loads and products cost in the step (NOTES item 71)
#endif
#ifndef MRT_LY_ACC  // accumulators per consumer warp: a stage's products alternate between them, so that
#define MRT_LY_ACC 2  // they are not one dependent chain (1.4b: 2 or 4 ~0.8 % faster than 1; item 71)
#endif
constexpr int LY_ACC = MRT_LY_ACC;
constexpr bool LY_NOSYNC_P = MRT_LY_NOSYNC & 3, LY_NOSYNC_B = MRT_LY_NOSYNC & 5, LY_NOSYNC_Y = MRT_LY_NOSYNC & 9;
constexpr int LY_WARPS = BULK_WARPS;       // consumer warps
constexpr int LY_CT = LY_WARPS * 32;       // consumer threads
constexpr int LY_THREADS = LY_CT + 32;     // + the producer warp
constexpr int LY_CH = 8;                   // channels per in_proj unit
constexpr int LY_HV = 16;                  // h values per consumer thread: d_model <= LY_HV * LY_CT
constexpr int LY_YV = 8;                   // y loads (4 words) per consumer thread: d_inner <= 4 LY_YV LY_CT

struct LayerPtrs {
  const void* w_in; const void* b_in; const void* norm_w; const void* conv_w; const void* conv_b;
  const void* wx_t; const void* w_dt; const float* dt_b; const float* A; const float* D;
  const void* w_out; const void* b_out; void* conv_state; float* ssm_state;
};

struct LayersArgs {
  const LayerPtrs* L;     // [n_layer]
  const long long* idx;   // [1] the row's slot
  float* h;               // [dm] residual stream: the embedding in, the last layer's out
  float* ss;              // [gridDim.x] per-block sums of squares of the final h (the head's partials)
  float* hbuf;            // [2, dm] h between layers
  float* xacc;            // [n_layer, R] x_proj accumulators, zero
  unsigned long long* part;  // [2, P, dm] out_proj's tagged partial sums (tag << 32 | float bits), kept
  unsigned* y;            // [d] tagged y (tag << 16 | bits of T), kept
  unsigned* stepc;        // [1] steps run (the tags' base), kept
  unsigned* bar;          // grid barrier counter, zero
  long long n_layer, dm, d, n, r, k, res_fp32, stages, P;
  long long xfirst;       // in_proj's rows in the order x then z (1) or per unit of LY_CH channels (0)
  long long lag;          // groups of in_proj rows between x_proj's share and the barrier's arrival
  long long combine;      // out_proj's partials summed by each row group's first block (1) or by every reader
  long long pw;           // out_proj's partials read per round trip at a layer's start: 1 or 2
  float eps;
  const void* pf;         // the head's weights, whose first pf_bytes the producers prefetch into L2 once
  long long pf_bytes;     // the last layer's stages are issued (a multiple of 16 gridDim.x; 0: none)
  // The head in this kernel (hw not null; else norm_gemv's, after it): the final norm of h and the product
  // with hw, its units of 16 rows streamed by each block's producer right after the last layer's weights
  const void* hw;         // [hN, dm] T, rows 16-byte aligned
  const void* hnorm;      // [dm] T: the final norm's weight
  float* logits;          // [hN] the step's logits (rounded to T, widened)
  long long hN;
  long long* amax;        // [1] the greedy token (the first largest logit; NaN above all), or null
  unsigned* ascr;         // with amax: the best key so far (64 bits: layers_argmax_key) and a ticket, zero
                          // before the launch and zero again after it
  long long* amax_host;   // with amax: the token in mapped pinned host memory too, or null (put_token)
};

// Shared-memory layout of `layers` (byte offsets; decode_step.py's layers_smem mirrors it).
struct LyLayout {
  int CH, R, red, wsum, xs, uz, xrow, side, ring, total;
  int cs, cw, cb, wx, wdt, dtb, A, D, st;  // offsets inside the side buffer
  __device__ __forceinline__ static int up16(int v) { return (v + 15) & ~15; }
  __device__ __forceinline__ void init(const LayersArgs& a) {
    const int dm = (int)a.dm, d = (int)a.d, n = (int)a.n, r = (int)a.r, k = (int)a.k;
    const int NU = d / LY_CH, G = gridDim.x;
    CH = LY_CH * ((NU + G - 1) / G);
    R = r + 2 * n;
    int o = up16(8 * (2 * (int)a.stages + 2));  // mbarriers: full, empty [stages]; side full, side empty
    red = o; o += 2 * LY_WARPS * 16 * 4;
    wsum = o; o += up16(LY_WARPS * 4);
    xs = o; o += up16((dm > d ? dm : d) * 2);
    uz = o; o += up16(2 * CH * 4);
    xrow = o; o += up16(R * 4);
    int s = 0;
    cs = s; s += up16(CH * (k - 1) * 2);
    cw = s; s += up16(CH * k * 2);
    cb = s; s += up16(CH * 2);
    wx = s; s += up16(CH * R * 2);
    wdt = s; s += up16(CH * r * 2);
    dtb = s; s += up16(CH * 4);
    A = s; s += up16(CH * n * 4);
    D = s; s += up16(CH * 4);
    st = s; s += up16(CH * n * 4);
    side = o; o += s;
    ring = o; o += (int)a.stages * BULK_STAGE;
    total = o;
  }
};

__device__ __forceinline__ void ly_bar() { asm volatile("bar.sync 1, %0;" ::"r"(LY_CT) : "memory"); }

// All consumer threads: a grid-wide barrier in two halves, so that work can run between them (the
// counter only grows; epoch: thread 0's target). Arrive: the block's writes so far are published.
__device__ __forceinline__ void ly_grid_arrive(unsigned* bar, unsigned& epoch) {
  ly_bar();
  if (threadIdx.x == 0) {
    epoch += gridDim.x;
    __threadfence();
    atomicAdd(bar, 1u);
  }
}
// Wait: every block has arrived (and its writes before the arrival are visible).
__device__ __forceinline__ void ly_grid_wait(const unsigned* bar, unsigned epoch) {
  if (threadIdx.x == 0 && !LY_NOSYNC_B) {
    unsigned v;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
    } while (v < epoch);
  }
  ly_bar();
}

// Relaxed (morally strong) accesses at GPU scope for the tagged exchanges: a word written by one block
// is read whole by another, and its tag says whether it is this layer's.
__device__ __forceinline__ void st_tagged(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void st_tagged(unsigned* p, unsigned v) {
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ unsigned long long ld_tagged(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint4 ld_tagged4(const unsigned* p) {
  uint4 v;
  asm volatile("ld.relaxed.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}

// The block's work: channel units [u0, u1), out_proj tiles [t0, t1) (tile t: rows 16 (t / nchunk) ..,
// columns BULK_KS (t % nchunk) ..), h slice [h0, h1).
struct LyWork {
  int u0, u1, nseg, nchunk, t0, t1, h0, h1, NT;
  // the block whose out_proj tiles include tile t (t0 (b) = b NT / G; NT G < 2^31: the host checks)
  __device__ __forceinline__ int owner(int t) const { return (int)(((t + 1) * gridDim.x + NT - 1) / NT) - 1; }
  // block b's first out_proj tile (its tiles: [first_tile(b), first_tile(b + 1)))
  __device__ __forceinline__ int first_tile(long long b) const { return (int)(b * NT / gridDim.x); }
  __device__ __forceinline__ bool has_tiles(int b) const { return first_tile(b) < first_tile(b + 1); }
  __device__ __forceinline__ void init(const LayersArgs& a) {
    const long long G = gridDim.x, b = blockIdx.x, NU = a.d / LY_CH;
    NT = (int)((a.dm / 16) * ((a.d + BULK_KS - 1) / BULK_KS));
    u0 = (int)(b * NU / G); u1 = (int)((b + 1) * NU / G);
    t0 = first_tile(b); t1 = first_tile(b + 1);
    h0 = (int)(b * a.dm / G); h1 = (int)((b + 1) * a.dm / G);
    nseg = (int)((a.dm + BULK_KS - 1) / BULK_KS);
    nchunk = (int)((a.d + BULK_KS - 1) / BULK_KS);
  }
  // the block's units of 16 head rows [hu0, hu1), computed where used: kept in LyWork they stay live across
  // the layer loop (164 registers against 162; before the final h ran as the loop's last turn they made the
  // kernel spill)
  __device__ __forceinline__ static void head_units(const LayersArgs& a, int& hu0, int& hu1) {
    const long long G = gridDim.x, b = blockIdx.x, HU = (a.hN + 15) / 16;
    hu0 = (int)(b * HU / G); hu1 = (int)((b + 1) * HU / G);
  }
  // in_proj row i < 16 of the block's group gq (gq < u1 - u0): channel li of the block's (x or z: isx).
  // xfirst: the x rows of all the block's channels, then their z rows, so that x_proj's share and its
  // barrier arrival come before the z rows are streamed; else group gq is unit u0 + gq (x rows, z rows)
  __device__ __forceinline__ void row(bool xfirst, int gq, int i, bool& isx, int& li) const {
    const int nch = LY_CH * (u1 - u0), j = 16 * gq + i;
    isx = xfirst ? j < nch : i < LY_CH;
    li = xfirst ? (isx ? j : j - nch) : LY_CH * gq + (i & (LY_CH - 1));
  }
  // the group after which every x row of the block is reduced (-1: the block has no channels)
  __device__ __forceinline__ int x_done(bool xfirst) const {
    const int nch = LY_CH * (u1 - u0);
    return nch == 0 ? -1 : xfirst ? (nch - 1) / 16 : u1 - u0 - 1;
  }
};

// One thread: layer l's side data of this block's channels into the side buffer sb, completing on sfull.
template <typename T>
__device__ void layers_side(const LayersArgs& a, const LyLayout& ly, const LyWork& wk, unsigned char* sb,
                            unsigned long long* sfull, int l) {
  const long long d = a.d, n = a.n, r = a.r, k = a.k, R = r + 2 * n, slot = a.idx[0];
  const long long c0 = (long long)LY_CH * wk.u0, nch = (long long)LY_CH * (wk.u1 - wk.u0);
  const unsigned long long npol = l2_policy<false>();
  const LayerPtrs& P = a.L[l];
  const int tot = (int)(nch * ((k - 1) * 2 + k * 2 + (P.conv_b ? 2 : 0) + R * 2 + r * 2 + 4 + n * 4 +
                                        (P.D ? 4 : 0) + n * 4));
  if (!nch) {  // nothing to copy: complete the phase by arriving
    mbar_arrive(sfull);
    return;
  }
  mbar_expect_tx(sfull, tot);
  bulk_copy(sb + ly.cs, static_cast<const T*>(P.conv_state) + (slot * d + c0) * (k - 1), (int)(nch * (k - 1) * 2),
          sfull, npol);
  bulk_copy(sb + ly.cw, static_cast<const T*>(P.conv_w) + c0 * k, (int)(nch * k * 2), sfull, npol);
  if (P.conv_b) bulk_copy(sb + ly.cb, static_cast<const T*>(P.conv_b) + c0, (int)(nch * 2), sfull, npol);
  bulk_copy(sb + ly.wx, static_cast<const T*>(P.wx_t) + c0 * R, (int)(nch * R * 2), sfull, npol);
  bulk_copy(sb + ly.wdt, static_cast<const T*>(P.w_dt) + c0 * r, (int)(nch * r * 2), sfull, npol);
  bulk_copy(sb + ly.dtb, P.dt_b + c0, (int)(nch * 4), sfull, npol);
  bulk_copy(sb + ly.A, P.A + c0 * n, (int)(nch * n * 4), sfull, npol);
  if (P.D) bulk_copy(sb + ly.D, P.D + c0, (int)(nch * 4), sfull, npol);
  bulk_copy(sb + ly.st, P.ssm_state + (slot * d + c0) * n, (int)(nch * n * 4), sfull, npol);
}

template <typename T>
__device__ void layers_producer(const LayersArgs& a, const LyLayout& ly, const LyWork& wk, unsigned char* smem) {
#if __CUDA_ARCH__ >= 900
  constexpr int ROWB = BULK_ROWB, STAGE = BULK_STAGE;
  const int lane = threadIdx.x & 31, S = (int)a.stages;
  const long long dm = a.dm, d = a.d;
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem);
  unsigned long long* empty = full + S;
  unsigned long long* sfull = full + 2 * S;  // the side buffer's full and empty barriers
  unsigned long long* sempty = sfull + 1;
  const unsigned long long wpol = l2_policy<MRT_BULK_EVICT_FIRST>();
  int t = 0;
  // one stage: lane i < rows copies `bytes` from its row src (16 rows; those past `rows` stale). The slot
  // and round come from a division per stage here, unlike the consumers' running counts: without it the
  // producer's loop is shorter and the step was 2.5-3 % slower at 1.4b and 2.8b (NOTES item 71)
  auto stage = [&](const T* src, int bytes, int rows = 16) {
    const int slot_ = t % S;
    if (t >= S) mbar_wait(empty + slot_, ((t / S) - 1) & 1);
    if (lane == 0) mbar_expect_tx(full + slot_, rows * bytes);
    __syncwarp();
    if (lane < rows) bulk_copy(smem + ly.ring + slot_ * STAGE + lane * ROWB, src, bytes, full + slot_, wpol);
    ++t;
  };
  for (int l = 0; l < (int)a.n_layer; ++l) {
    const T* wi = static_cast<const T*>(a.L[l].w_in);
    for (int gq = 0; gq < wk.u1 - wk.u0; ++gq) {
      bool isx;
      int li;
      wk.row(a.xfirst, gq, lane & 15, isx, li);
      const long long row = (long long)LY_CH * wk.u0 + li + (isx ? 0 : d);
      for (int sg = 0; sg < wk.nseg; ++sg)
        stage(wi + row * dm + sg * BULK_KS, (int)min((long long)BULK_KS, dm - sg * BULK_KS) * 2);
    }
    if (threadIdx.x == LY_CT) LY_MARK(l, 12);
    const T* wo = static_cast<const T*>(a.L[l].w_out);
    for (int tt = wk.t0; tt < wk.t1; ++tt) {
      const int rg = tt / wk.nchunk, ch = tt % wk.nchunk;
      stage(wo + (16LL * rg + lane) * d + (long long)ch * BULK_KS, (int)min((long long)BULK_KS, d - ch * BULK_KS) * 2);
    }
    if (threadIdx.x == LY_CT) LY_MARK(l, 13);
    if (l + 1 == (int)a.n_layer && a.pf_bytes && lane == 0) {  // the head's first rows, this block's share
      const long long share = a.pf_bytes / gridDim.x;
      bulk_prefetch_l2(static_cast<const unsigned char*>(a.pf) + blockIdx.x * share, (unsigned)share);
    }
    // layer l + 1's side data once the consumers are done with layer l's (after its state update)
    if (l + 1 < (int)a.n_layer) {
      mbar_wait(sempty, l & 1);
      if (lane == 0) layers_side<T>(a, ly, wk, smem + ly.side, sfull, l + 1);
    }
  }
  if (a.hw) {  // the head's units of this block, straight after the last layer's stages
    const T* hw = static_cast<const T*>(a.hw);
    int hu0, hu1;
    LyWork::head_units(a, hu0, hu1);
    for (int hu = hu0; hu < hu1; ++hu) {
      const int rows = (int)min(16LL, a.hN - 16LL * hu);
      const T* src = hw + (16LL * hu + (lane & 15)) * dm;
      for (int sg = 0; sg < wk.nseg; ++sg)
        stage(src + sg * BULK_KS, (int)min((long long)BULK_KS, dm - sg * BULK_KS) * 2, rows);
    }
  }
#endif
}

// The head's greedy argmax in `layers` as one 64-bit key per row: the logit's bits mapped to an unsigned
// order (NaN above every number, -0 as +0), then the complement of the index (ties: the first index).
// Key 0 is below every row's.
__device__ __forceinline__ unsigned long long layers_argmax_key(float v, int i) {
  unsigned u = __float_as_uint(v == 0.f ? 0.f : v);
  u = v != v ? 0xffffffffu : (u & 0x80000000u) ? ~u : u | 0x80000000u;
  return ((unsigned long long)u << 32) | (0xffffffffu - (unsigned)i);
}

// Warp 0 of each block, key: the best key of the block's rows (0: none). The largest key of the grid
// by atomicMax, then a ticket; the last block to take one writes its token (put_token) and zeroes both.
__device__ __forceinline__ void layers_argmax(const LayersArgs& a, unsigned long long key) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const unsigned long long o = __shfl_xor_sync(0xffffffffu, key, off);
    key = o > key ? o : key;
  }
  if ((threadIdx.x & 31) != 0) return;
  unsigned long long* best = reinterpret_cast<unsigned long long*>(a.ascr);
  unsigned* ticket = a.ascr + 2;
  if (key) atomicMax(best, key);
  __threadfence();
  if (atomicAdd(ticket, 1u) != gridDim.x - 1) return;
  __threadfence();
  const unsigned long long k = atomicExch(best, 0ull);
  put_token(a.amax, a.amax_host, 0, (long long)(0xffffffffu - (unsigned)k));
  *ticket = 0u;
}

template <typename T>
__device__ void layers(const LayersArgs& a) {
#if __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char smem[];
  LyLayout ly;
  ly.init(a);
  LyWork wk;
  wk.init(a);
  const int S = (int)a.stages;
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem);
  unsigned long long* empty = full + S;
  unsigned long long* sfull = full + 2 * S;  // the side buffer's full and empty barriers
  unsigned long long* sempty = sfull + 1;
  unsigned char* sb = smem + ly.side;
  unsigned dyn;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
  if ((unsigned)ly.total > dyn) __trap();  // the host's layers_smem disagrees with this layout
  if (threadIdx.x == 0) {  // the host's layers_partials disagrees with the owners of the block's row groups
    for (int rg = wk.t0 / wk.nchunk; rg * wk.nchunk < wk.t1; ++rg)
      if (wk.owner((rg + 1) * wk.nchunk - 1) - wk.owner(rg * wk.nchunk) + 1 > a.P) __trap();
  }
  if (threadIdx.x == 0) {
    mbar_init_ring(full, S, LY_WARPS);
    mbar_init(sfull, 1);
    mbar_init(sempty, 1);
    mbar_init_fence();
    layers_side<T>(a, ly, wk, sb, sfull, 0);
  }
  __syncthreads();
  if ((threadIdx.x >> 5) == LY_WARPS) {
    layers_producer<T>(a, ly, wk, smem);
    return;
  }
  constexpr int STAGE = BULK_STAGE;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, q = lane & 3;
  const int dm = (int)a.dm, d = (int)a.d, n = (int)a.n, r = (int)a.r, k = (int)a.k, R = r + 2 * n;
  const long long slot = a.idx[0];
  const int c0 = LY_CH * wk.u0, nch = LY_CH * (wk.u1 - wk.u0), CH = ly.CH;
  float* red = reinterpret_cast<float*>(smem + ly.red);
  float* wsum = reinterpret_cast<float*>(smem + ly.wsum);
  T* xs = reinterpret_cast<T*>(smem + ly.xs);
  float* uz = reinterpret_cast<float*>(smem + ly.uz);
  float* xrow = reinterpret_cast<float*>(smem + ly.xrow);
  unsigned epoch = 0;
  unsigned step0 = 0u, tag0 = 0u;  // set after pdl_wait
  const int NP = (int)a.P;         // out_proj's partial sums per output (slots)
  const int NR = a.combine ? 1 : NP;  // of them read by every block: slot 0 holds the sum when combined
  // the next stage's slot and phase (ring_next: every consumer warp takes ~1,250 stages a 1.4b step; counting
  // instead of dividing took 1.4b -5 %, 370m -3 %, 2.8b -0.7 %, item 71)
  int csl = 0, cph = 0, par = 0;
  // the reduction of one group of 16 rows across the consumer warps: thread t < 16 gets row t's sum; the
  // trace adds warp 0's and warp 1's time in it (the barrier's wait included) to slots t0 and t1 of layer l
  auto reduce16 = [&](float* dd, float& out, int l, int t0, int t1) {
#ifdef MRT_LY_TRACE
    const long long r0 = clock64();
#endif
#pragma unroll
    for (int i = 1; i < LY_ACC; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) dd[j] += dd[4 * i + j];
    }
    mma_d_put<1>(red + par * (LY_WARPS * 16) + warp * 16, g, q, dd);
    ly_bar();
    if (tid < 16) {
      float acc[1];
      mma_d_sum<1, LY_WARPS>(red + par * (LY_WARPS * 16), tid, acc);
      out = acc[0];
    }
    par ^= 1;
#ifdef MRT_LY_TRACE
    if (tid == 0) LY_ADD(l, t0, clock64() - r0);
    if (tid == 32) LY_ADD(l, t1, clock64() - r0);
#endif
  };
  // the next stage of the ring (columns kb .. of a K-long product) into dd, its slot released after;
  // the trace adds warp 0's wait for it to slot tr of layer l (warp 1's to tr + 12, warp 0's time after it
  // to tr + 6)
  auto consume = [&](float* dd, int K, int kb, int l, int tr) {
    const int sl = csl;
#ifdef MRT_LY_TRACE
    const long long w0 = clock64();
#endif
    mbar_wait(full + sl, cph);
#ifdef MRT_LY_TRACE
    const long long w1 = clock64();
    if (tid == 0) LY_ADD(l, tr, w1 - w0);
    if (tid == 32) LY_ADD(l, tr + 12, w1 - w0);  // 22, 23, 27: warp 1's waits
#endif
#if MRT_LY_NOMMA  // development only: the stage released unread (wrong results; what the products cost)
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + sl);
#else
    bulk_stage_mma<T, 1, true, LY_ACC>(dd, smem + ly.ring + sl * STAGE, xs, K, kb, empty + sl);
#endif
#ifdef MRT_LY_TRACE
    if (tid == 0) LY_ADD(l, tr + 6, clock64() - w1);  // 16, 17, 21: warp 0 loading and multiplying
#endif
    ring_next(csl, cph, S);
  };
  // the consumers' block sum (all consumer threads get it)
  auto bsum = [&](float v) {
    v = warp_sum(v);
    if (lane == 0) wsum[warp] = v;
    ly_bar();
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < LY_WARPS; ++w) s += wsum[w];
    ly_bar();
    return s;
  };
  // h after layer l - 1's out_proj (l = n_layer: the final h), elements tid + LY_CT j held by this thread:
  // load() the input before the barrier that completes oacc[l - 1] (h is complete since then), add()
  // out_proj's sums after it (every load issued before the first use)
  float hv[LY_HV];
  auto h_load = [&](int l) {
    const float* hin = l == 0 ? a.h : a.hbuf + (l & 1) * dm;
#pragma unroll
    for (int j = 0; j < LY_HV; ++j) {
      const int i = tid + j * LY_CT;
      hv[j] = i < dm ? hin[i] : 0.f;
    }
  };
  // out_proj(l - 1)'s sums: the NR tagged partials of each element (part[(l - 1) & 1]) polled until
  // current and summed in slot order, one slot per round trip, or two (a.pw: where d_model <= LY_HV / 2
  // LY_CT, word w < LY_HV / 2 holds slot k of element w and word LY_HV / 2 + w slot k + 1 of it). The
  // registers hold LY_HV words in flight: the kernel's 168 (one block of 288 threads per SM) leave no
  // room for more without spilling.
  auto h_add = [&](int l, const T* bo) {
    if (l == 0) return;
    constexpr int H2 = LY_HV / 2;
    const unsigned tag = tag0 + (unsigned)(l - 1);
    const unsigned long long* pp = a.part + (long long)((l - 1) & 1) * NP * dm;
    const bool two = a.pw == 2;
    const int step = two ? 2 : 1;
    float o[LY_HV];
    unsigned long long va[LY_HV];
    // word w: slot kp + sw (w), element tid + ew (w) LY_CT
    auto sw = [&](int w) { return two && w >= H2 ? 1 : 0; };
    auto ew = [&](int w) { return two ? w & (H2 - 1) : w; };
    auto want = [&](int kp, int w) { return tid + ew(w) * LY_CT < dm && kp + sw(w) < NR; };
    auto load = [&](int kp, int w) { return ld_tagged(pp + (long long)(kp + sw(w)) * dm + tid + ew(w) * LY_CT); };
#pragma unroll
    for (int j = 0; j < LY_HV; ++j) {
      const int i = tid + j * LY_CT;
      o[j] = i < dm && bo ? to_float(bo[i]) : 0.f;
      va[j] = want(0, j) ? load(0, j) : 0ull;
    }
    for (int kp = 0; kp < NR; kp += step) {
      if (kp > 0) {
#pragma unroll
        for (int w = 0; w < LY_HV; ++w) va[w] = want(kp, w) ? load(kp, w) : 0ull;
      }
      for (;;) {  // until every wanted word is this layer's
        if (LY_NOSYNC_P) break;
        bool stale = false;
#pragma unroll
        for (int w = 0; w < LY_HV; ++w) stale |= want(kp, w) && (unsigned)(va[w] >> 32) != tag;
        if (!stale) break;
#pragma unroll
        for (int w = 0; w < LY_HV; ++w)
          if (want(kp, w) && (unsigned)(va[w] >> 32) != tag) va[w] = load(kp, w);
      }
      if (two) {  // element j: slot kp, then slot kp + 1 (if there is one; its words are 0 otherwise)
#pragma unroll
        for (int j = 0; j < H2; ++j) {
          o[j] += __uint_as_float((unsigned)va[j]);
          if (kp + 1 < NR) o[j] += __uint_as_float((unsigned)va[H2 + j]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < LY_HV; ++j) o[j] += __uint_as_float((unsigned)va[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < LY_HV; ++j) {
      hv[j] += round_t<T>(o[j]);
      if (!a.res_fp32) hv[j] = round_t<T>(hv[j]);
    }
  };
  const T* bo_prev = nullptr;  // out_proj's bias of the layer before
  pdl_wait();
  // this step's tags: layer l's out_proj partials and y carry tag0 + l (y its low 16 bits); a slot
  // holds this layer's value or one written before (a smaller tag, also modulo 2^16 for y: the last
  // layer or step before), so no reset between steps. Block 0 counts the step once every block has
  // read the count (after the first grid barrier).
  step0 = __ldcg(a.stepc);
  tag0 = step0 * (unsigned)a.n_layer + 1u;
  const int nl = (int)a.n_layer;
  for (int l = 0; l <= nl; ++l) {  // l = nl: the final h, then the head (or its slice for norm_gemv's)
    const bool fin = l == nl;
    const LayerPtrs P = a.L[fin ? l - 1 : l];  // by value: loaded before the barrier below
    if (tid == 0) LY_MARK(l, 0);
    h_load(l);
    float nwv[LY_HV];  // this thread's norm weights (the final norm's for the head)
    const T* nw = static_cast<const T*>(fin && a.hw ? a.hnorm : P.norm_w);
#pragma unroll
    for (int j = 0; j < LY_HV; ++j) {
      const int i = tid + j * LY_CT;
      nwv[j] = i < dm ? to_float(nw[i]) : 0.f;
    }
    // -- h (with out_proj(l - 1)'s sums as they come), its norm into xs; this block's slice of h to hbuf
    h_add(l, bo_prev);
    if (fin && !a.hw) {  // the final h's slice of this block and its sum of squares, for norm_gemv after
      float ssq = 0.f;
#pragma unroll
      for (int j = 0; j < LY_HV; ++j) {
        const int i = tid + j * LY_CT;
        if (i >= wk.h0 && i < wk.h1) {
          a.h[i] = hv[j];
          ssq = fmaf(hv[j], hv[j], ssq);
        }
      }
      ssq = bsum(ssq);
      if (tid == 0) a.ss[blockIdx.x] = ssq;
      return;
    }
    if (tid == 0) LY_MARK(l, 1);
    float ssq = 0.f;
#pragma unroll
    for (int j = 0; j < LY_HV; ++j) ssq = fmaf(hv[j], hv[j], ssq);
    const float rstd = rsqrtf(bsum(ssq) / (float)dm + a.eps);
#pragma unroll
    for (int j = 0; j < LY_HV; ++j) {
      const int i = tid + j * LY_CT;
      if (i < dm) {
        xs[i] = from_float<T>(hv[j] * rstd * nwv[j]);
        if (!fin && i >= wk.h0 && i < wk.h1) a.hbuf[((l + 1) & 1) * dm + i] = hv[j];  // the next layer's h
      }
    }
    ly_bar();
    if (fin) break;
    if (tid == 0) LY_MARK(l, 2);
    // -- in_proj in groups of 16 rows (LyWork::row): x rows through their conv update into u, z rows
    // kept; once every x row is in, this block's share of x_proj (atomics) and its arrival at the grid
    // barrier, which the rest of the groups then cover (xfirst)
    const T* cs = reinterpret_cast<const T*>(sb + ly.cs);
    const T* cw = reinterpret_cast<const T*>(sb + ly.cw);
    const T* cb = reinterpret_cast<const T*>(sb + ly.cb);
    const T* bi = static_cast<const T*>(P.b_in);
    const int gx = wk.x_done(a.xfirst);
    auto xproj = [&]() {
      ly_bar();  // u of every channel of the block
      mbar_wait(sfull, l & 1);
      if (tid == 0) LY_MARK(l, 3);
      if (nch) {
        const T* wx = reinterpret_cast<const T*>(sb + ly.wx);
        for (int j = tid; j < R; j += LY_CT) {
          float sx[LY_CH] = {};
          for (int l8 = 0; l8 < nch; l8 += LY_CH) {  // nch: a multiple of LY_CH; LY_CH sums in flight
#pragma unroll
            for (int i = 0; i < LY_CH; ++i) sx[i] = fmaf(to_float(wx[(l8 + i) * R + j]), uz[l8 + i], sx[i]);
          }
#pragma unroll
          for (int i = 1; i < LY_CH; ++i) sx[0] += sx[i];
          atomicAdd(a.xacc + (long long)l * R + j, sx[0]);
        }
      }
      if (tid == 0) LY_MARK(l, 4);
    };
    auto arrive = [&]() {
      ly_grid_arrive(a.bar, epoch);  // x_proj's share of this block published
      if (tid == 0) LY_MARK(l, 14);
    };
    // the arrival (its fence waits for the block's atomics to be performed) a.lag groups after them,
    // at the latest after the last group
    const int ga = gx < 0 ? -1 : min(gx + (int)a.lag, wk.u1 - wk.u0 - 1);
    if (gx < 0) {  // no channels: nothing to add, arrive at once
      xproj();
      arrive();
    }
    for (int gq = 0; gq < wk.u1 - wk.u0; ++gq) {
      float dd[4 * LY_ACC] = {};
      for (int sg = 0; sg < wk.nseg; ++sg) consume(dd, dm, sg * BULK_KS, l, 10);
      float acc = 0.f;
      reduce16(dd, acc, l, 18, 24);
#ifdef MRT_LY_TRACE
      const long long e0 = clock64();
#endif
      if (tid < 16) {
        bool isx;
        int li;
        wk.row(a.xfirst, gq, tid, isx, li);
        const long long c = c0 + li;
        const T v = from_float<T>(acc + (bi ? to_float(bi[isx ? c : d + c]) : 0.f));
        if (isx) {
          mbar_wait(sfull, l & 1);  // this layer's side data, first used here (lands during the first group)
          float win[MAX_CONV], w[MAX_CONV];
          conv_load<T>(win, w, cs + li * (k - 1), cw + li * k, k, true);
          T* gs = static_cast<T*>(P.conv_state) + (slot * d + c) * (k - 1);
          uz[li] = to_float(conv_one<T>(win, w, P.conv_b ? to_float(cb[li]) : 0.f, k, v, gs));
        } else {
          uz[CH + li] = to_float(v);
        }
      }
#ifdef MRT_LY_TRACE
      if (tid == 0) LY_ADD(l, 19, clock64() - e0);  // warp 0's epilogue (conv, z)
#endif
      if (gq == gx) xproj();
      if (gq == ga) arrive();
    }
    if (tid == 0) LY_MARK(l, 5);
    ly_grid_wait(a.bar, epoch);  // x_proj complete (and z: the wait's block barrier)
    if (l == 0) {
      pdl_launch_dependents();  // every block is resident: the head may be scheduled
      if (blockIdx.x == 0 && tid == 0) *a.stepc = step0 + 1u;
    }
    if (tid == 0) LY_MARK(l, 6);
    // -- the state update of this block's channels
    for (int j = tid; j < R; j += LY_CT) xrow[j] = round_t<T>(a.xacc[(long long)l * R + j]);
    ly_bar();
    {
      const int TPC = n / 4, gi = tid % TPC;
      const T* wdt = reinterpret_cast<const T*>(sb + ly.wdt);
      const float* dtb = reinterpret_cast<const float*>(sb + ly.dtb);
      const float* Av = reinterpret_cast<const float*>(sb + ly.A);
      const float* Dv = reinterpret_cast<const float*>(sb + ly.D);
      const float* st = reinterpret_cast<const float*>(sb + ly.st);
      for (int base = 0; base < nch; base += LY_CT / TPC) {
        const int li = base + tid / TPC;
        const bool on = li < nch;
        const int lc = on ? li : 0;
        float sd = 0.f;
        for (int i = gi; i < r; i += TPC) sd = fmaf(to_float(wdt[lc * r + i]), xrow[i], sd);
        for (int off = TPC / 2; off > 0; off >>= 1) sd += __shfl_xor_sync(0xffffffffu, sd, off);
        const float dt = softplus(round_t<T>(sd) + dtb[lc]);
        const float uv = uz[lc];
        float4 hv = *reinterpret_cast<const float4*>(st + lc * n + gi * 4);
        float yp = state_step4(hv, *reinterpret_cast<const float4*>(Av + lc * n + gi * 4), dt, dt * uv,
                               xrow + r + gi * 4, xrow + r + n + gi * 4);
        for (int off = TPC / 2; off > 0; off >>= 1) yp += __shfl_xor_sync(0xffffffffu, yp, off);
        if (on) {
          *reinterpret_cast<float4*>(P.ssm_state + (slot * d + c0 + li) * n + gi * 4) = hv;
          if (gi == 0) {
            const float yv = (P.D ? fmaf(Dv[li], uv, yp) : yp) * silu(uz[CH + li]);
            const T yt = from_float<T>(yv);
            st_tagged(a.y + c0 + li, ((tag0 + (unsigned)l) << 16) | *reinterpret_cast<const unsigned short*>(&yt));
          }
        }
      }
    }
    ly_bar();
    if (tid == 0) mbar_arrive(sempty);  // the side buffer is free: the producer fills it with layer l + 1's
    if (tid == 0) LY_MARK(l, 7);
    // -- y into xs as it comes (every block's state update; no barrier): four tagged words per load
    {
      const unsigned ty = (tag0 + (unsigned)l) & 0xffffu;
      auto stale = [&](const uint4& v) {
        return (v.x >> 16) != ty || (v.y >> 16) != ty || (v.z >> 16) != ty || (v.w >> 16) != ty;
      };
      uint4 v[LY_YV];
#pragma unroll
      for (int m = 0; m < LY_YV; ++m) {
        const int i = tid + m * LY_CT;
        v[m] = i < d / 4 ? ld_tagged4(a.y + 4 * i) : make_uint4(ty << 16, ty << 16, ty << 16, ty << 16);
      }
      for (;;) {  // until every word is this layer's
        if (LY_NOSYNC_Y) break;
        bool any = false;
#pragma unroll
        for (int m = 0; m < LY_YV; ++m) any |= stale(v[m]);
        if (!any) break;
#pragma unroll
        for (int m = 0; m < LY_YV; ++m)
          if (stale(v[m])) v[m] = ld_tagged4(a.y + 4 * (tid + m * LY_CT));
      }
#pragma unroll
      for (int m = 0; m < LY_YV; ++m) {
        const int i = tid + m * LY_CT;
        if (i < d / 4)
          reinterpret_cast<uint2*>(xs)[i] = make_uint2((v[m].x & 0xffffu) | (v[m].y << 16), (v[m].z & 0xffffu) | (v[m].w << 16));
      }
    }
    ly_bar();
    if (tid == 0) LY_MARK(l, 8);
    // -- out_proj tiles of this block, split K; the sums of each row group's run of tiles are partial
    // kp = b - (the block of the row group's first tile) of its rows in part[l & 1]. Combined (a.combine):
    // the first block (kp 0) runs its row group's head last, adds the partials of the row group's other
    // blocks (written at their start; loaded two tiles ahead) in block order and writes the sum into
    // slot 0, the one slot the readers poll. Else every block writes its slot and the block with the
    // row group's last tile fills the slots after its own with tagged zeros, and the readers sum them.
    float dd[4 * LY_ACC] = {};
    const unsigned ctag = tag0 + (unsigned)l;
    const unsigned long long ptag = (unsigned long long)ctag << 32;
    unsigned long long* pp = a.part + (long long)(l & 1) * NP * dm;
    for (int tt = wk.t0; tt < wk.t1;) {  // one run of tiles (one row group) per iteration
      const int rg = tt / wk.nchunk, b0 = wk.owner(rg * wk.nchunk), kp = (int)blockIdx.x - b0;
      const int rend = min(wk.t1, (rg + 1) * wk.nchunk);  // the end of this run
      const int b1 = wk.owner((rg + 1) * wk.nchunk - 1);    // the block of the row group's last tile
      // the first other block's partial of the row (combined), loaded two tiles before the run's end
      const int tpf = a.combine && kp == 0 && b1 > b0 ? max(tt, rend - 2) : -1;
      unsigned long long pf = 0ull;
      for (; tt < rend; ++tt) {
        if (tt == tpf && tid < 16) pf = ld_tagged(pp + (long long)dm + 16LL * rg + tid);  // slot 1: block b0 + 1
        consume(dd, d, (tt % wk.nchunk) * BULK_KS, l, 11);                               // (if it has tiles)
      }
      float acc = 0.f;
      reduce16(dd, acc, l, 20, 25);
      if (tid < 16) {
        const long long row = 16LL * rg + tid;
        if (a.combine && kp == 0) {
          for (int z = 1; z <= b1 - b0; ++z) {  // in block order; blocks without tiles have no partial
            if (!wk.has_tiles(b0 + z)) continue;
            unsigned long long v = z == 1 ? pf : ld_tagged(pp + (long long)z * dm + row);
            while ((unsigned)(v >> 32) != ctag && !LY_NOSYNC_P) v = ld_tagged(pp + (long long)z * dm + row);
            acc += __uint_as_float((unsigned)v);
          }
          st_tagged(pp + row, ptag | __float_as_uint(acc));
        } else {
          st_tagged(pp + (long long)kp * dm + row, ptag | __float_as_uint(acc));
          if (!a.combine && rend % wk.nchunk == 0)
            for (int z = kp + 1; z < NP; ++z) st_tagged(pp + (long long)z * dm + row, ptag);
        }
      }
#pragma unroll
      for (int j = 0; j < 4 * LY_ACC; ++j) dd[j] = 0.f;
    }
    if (!a.combine && wk.t0 == wk.t1 && wk.t0 < wk.NT && tid < 16) {  // no tiles (more blocks than tiles):
      const int rg = wk.t0 / wk.nchunk, kp = (int)blockIdx.x - wk.owner(rg * wk.nchunk);  // a zero partial
      if (kp >= 0) st_tagged(pp + (long long)kp * dm + 16LL * rg + tid, ptag);        // in the row group's range
    }
    if (tid == 0) LY_MARK(l, 9);
    bo_prev = static_cast<const T*>(P.b_out);
  }
  // -- the head (a.hw): the final h's norm is in xs; this block's units of its rows
  unsigned long long key = 0ull;  // this thread's best row (tid < 16: one row of each unit)
  int hu0, hu1;
  LyWork::head_units(a, hu0, hu1);
  for (int hu = hu0; hu < hu1; ++hu) {
    float dd[4 * LY_ACC] = {};
    for (int sg = 0; sg < wk.nseg; ++sg) consume(dd, dm, sg * BULK_KS, nl - 1, 15);
    float acc = 0.f;
    reduce16(dd, acc, nl - 1, 28, 29);
    const long long row = 16LL * hu + tid;
    if (tid < 16 && row < a.hN) {
      const float of = to_float(from_float<T>(acc));
      a.logits[row] = of;
      const unsigned long long kr = layers_argmax_key(of, (int)row);
      key = kr > key ? kr : key;
    }
  }
  if (a.amax && warp == 0) layers_argmax(a, key);  // the rows' sums are warp 0's (tid < 16)
#endif
}

}  // namespace mrt

// Entry points: <kernel>_<dtype tag>_<variant>. The host (decode_step.py) picks BM / N and the grid.
// One pair of GEMV kernels (norm_gemv, gemv_residual) of a stream KIND: <kernel><NAME>_<tag>_b<BM>.
#define MRT_DECODE_GEMVS(NAME, TAG, T, BM, KIND, THREADS)                                              \
  extern "C" __global__ void __launch_bounds__(THREADS)                                               \
      mrt_norm_gemv##NAME##_##TAG##_b##BM(const mrt::NormGemvArgs a) { mrt::norm_gemv<T, BM, KIND>(a); } \
  extern "C" __global__ void __launch_bounds__(THREADS)                                               \
      mrt_gemv_residual##NAME##_##TAG##_b##BM(const mrt::GemvResidualArgs a) { mrt::gemv_residual<T, BM, KIND>(a); }

#define MRT_DECODE_XP(TAG, T, BM)                                                                      \
  extern "C" __global__ void __launch_bounds__(mrt::XP_THREADS)                                       \
      mrt_conv_xproj_##TAG##_b##BM(const mrt::ConvXprojArgs a) { mrt::conv_xproj<T, BM>(a); }

#define MRT_DECODE_BM(TAG, T, BM)                                                                      \
  MRT_DECODE_GEMVS(, TAG, T, BM, mrt::GEMV_FMA, mrt::GEMV_THREADS)                                     \
  MRT_DECODE_XP(TAG, T, BM)

// The tensor-core GEMVs (16-bit T only), for BM up to 8: fed by loads, and by the copy engine (sm_90+;
// empty bodies on older GPUs, where the host never launches them).
#define MRT_DECODE_MMA(TAG, T, BM)                                                                     \
  MRT_DECODE_GEMVS(_mma, TAG, T, BM, mrt::GEMV_MMA, mrt::MMA_THREADS)                                  \
  MRT_DECODE_GEMVS(_bulk, TAG, T, BM, mrt::GEMV_BULK, mrt::BULK_THREADS)

// Every layer of a batch-1 step in one persistent kernel (16-bit T, sm_90+; empty elsewhere).
#define MRT_DECODE_LAYERS(TAG, T)                                                                      \
  extern "C" __global__ void __launch_bounds__(mrt::LY_THREADS, 1)                                    \
      mrt_layers_##TAG(const mrt::LayersArgs a) { mrt::layers<T>(a); }

// The GEMM path's conv + x_proj and its dt_proj on the tensor cores (16-bit T).
#define MRT_DECODE_ROWS(TAG, T)                                                                        \
  extern "C" __global__ void __launch_bounds__(mrt::XR_THREADS)                                       \
      mrt_conv_xproj_rows_##TAG(const mrt::ConvXprojArgs a) { mrt::conv_xproj_rows<T>(a); }          \
  extern "C" __global__ void __launch_bounds__(mrt::DR_THREADS)                                       \
      mrt_dt_rows_##TAG(const mrt::SsmStepArgs a) { mrt::dt_rows<T>(a); }

// The projections on wgmma (sm_90a): one entry per tile width NT (decode_step.PJ_NTS), in a program of their own.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MRT_PJ(TAG, T, NT)                                                                             \
  extern "C" __global__ void __launch_bounds__(mrt::PJ_THREADS)                                       \
      mrt_proj_wg_##TAG##_##NT(const mrt::ProjArgs a) { mrt::proj_wg<T, NT, mrt::PJ_PLAIN>(a, {}); } \
  extern "C" __global__ void __launch_bounds__(mrt::PJ_THREADS)                                       \
      mrt_proj_wg_res_##TAG##_##NT(const mrt::ProjNormArgs a) {                                        \
    mrt::proj_wg<T, NT, mrt::PJ_RESIDUAL>(a.p, a.e);                                                   \
  }                                                                                                    \
  extern "C" __global__ void __launch_bounds__(mrt::PJ_THREADS)                                       \
      mrt_proj_wg_rs_##TAG##_##NT(const mrt::ProjNormArgs a) { mrt::proj_wg<T, NT, mrt::PJ_SCALE>(a.p, a.e); }
#define MRT_DECODE_PROJ(TAG, T)                                                                        \
  MRT_PJ(TAG, T, 16) MRT_PJ(TAG, T, 24) MRT_PJ(TAG, T, 32) MRT_PJ(TAG, T, 40) MRT_PJ(TAG, T, 48)      \
  MRT_PJ(TAG, T, 64) MRT_PJ(TAG, T, 80) MRT_PJ(TAG, T, 96) MRT_PJ(TAG, T, 128) MRT_PJ(TAG, T, 192)
#endif

// ssm_step_pre at most 32 registers (16 blocks of 128 threads per SM: it streams the batch's state at copy
// bandwidth at batch 64, NOTES item 22; since the state update became SsmThread, shared with ssm_out, ptxas needs
// the bound to keep it there).
#define MRT_DECODE_N(TAG, T, N)                                                                        \
  extern "C" __global__ void __launch_bounds__(mrt::SSM_THREADS)                                      \
      mrt_ssm_step_##TAG##_n##N(const mrt::SsmStepArgs a) { mrt::ssm_step<T, N, false>(a); }        \
  extern "C" __global__ void __launch_bounds__(mrt::SSM_THREADS, 16)                                  \
      mrt_ssm_step_pre_##TAG##_n##N(const mrt::SsmStepArgs a) { mrt::ssm_step<T, N, true>(a); }

// ssm_step + out_proj (16-bit T; the GEMV path's buckets; d_state up to 16: SO_CH channels x N / 4 threads a
// row within SO_THREADS).
#define MRT_SSM_OUT(TAG, T, N, BM)                                                                     \
  extern "C" __global__ void __launch_bounds__(mrt::SO_THREADS)                                       \
      mrt_ssm_out_##TAG##_n##N##_b##BM(const mrt::SsmOutArgs a) { mrt::ssm_out<T, N, BM>(a); }
#define MRT_DECODE_SSM_OUT(TAG, T)                                                                     \
  MRT_SSM_OUT(TAG, T, 4, 1) MRT_SSM_OUT(TAG, T, 8, 1) MRT_SSM_OUT(TAG, T, 16, 1)                      \
  MRT_SSM_OUT(TAG, T, 4, 2) MRT_SSM_OUT(TAG, T, 8, 2) MRT_SSM_OUT(TAG, T, 16, 2)

// The draw runs in clusters (sm_90+); older GPUs have no draw entry (the host draws with torch there).
#if __CUDA_ARCH__ >= 900
#define MRT_DRAW_ENTRY(TAG)                                                                            \
  extern "C" __global__ void __cluster_dims__(mrt::DRAW_CLUSTER, 1, 1) __launch_bounds__(mrt::DRAW_THREADS) \
      mrt_draw_##TAG(const mrt::DrawArgs a) { mrt::draw_rows(a); }
#else
#define MRT_DRAW_ENTRY(TAG)
#endif

#define MRT_DECODE_ENTRIES(TAG, T)                                                                     \
  MRT_DECODE_BM(TAG, T, 1)                                                                             \
  MRT_DECODE_BM(TAG, T, 2)                                                                             \
  MRT_DECODE_XP(TAG, T, 4)                                                                             \
  MRT_DECODE_XP(TAG, T, 8)                                                                             \
  MRT_DECODE_XP(TAG, T, 16)                                                                            \
  MRT_DECODE_N(TAG, T, 4)                                                                              \
  MRT_DECODE_N(TAG, T, 8)                                                                              \
  MRT_DECODE_N(TAG, T, 16)                                                                             \
  MRT_DECODE_N(TAG, T, 32)                                                                             \
  MRT_DECODE_N(TAG, T, 64)                                                                             \
  extern "C" __global__ void __launch_bounds__(mrt::CONV_THREADS)                                     \
      mrt_conv_only_##TAG(const mrt::ConvXprojArgs a) { mrt::conv_only<T>(a); }                    \
  extern "C" __global__ void __launch_bounds__(mrt::ROW_THREADS)                                      \
      mrt_embed_##TAG(const mrt::EmbedArgs a) { mrt::embed<T>(a); }                                    \
  extern "C" __global__ void __launch_bounds__(mrt::ROW_THREADS)                                      \
      mrt_residual_norm_##TAG(const mrt::ResidualNormArgs a) { mrt::residual_norm<T>(a); }               \
  extern "C" __global__ void __launch_bounds__(mrt::ARGMAX_THREADS)                                   \
      mrt_argmax_##TAG(const mrt::ArgmaxArgs a) { mrt::argmax_rows(a); }                                \
  extern "C" __global__ void __launch_bounds__(mrt::PENALIZE_THREADS)                                 \
      mrt_penalize_##TAG(const mrt::PenalizeArgs a) { mrt::penalize_rows(a); }                          \
  MRT_DRAW_ENTRY(TAG)

// 16-bit T: every entry point plus the tensor-core GEMVs. (Buckets of 4 and 8 rows through them
// measured slower than the cuBLAS path: benchmarks/NOTES.md.)
#define MRT_DECODE_ENTRIES_16(TAG, T)                                                                  \
  MRT_DECODE_ENTRIES(TAG, T)                                                                           \
  MRT_DECODE_MMA(TAG, T, 1)                                                                            \
  MRT_DECODE_MMA(TAG, T, 2)                                                                            \
  MRT_DECODE_ROWS(TAG, T)                                                                              \
  MRT_DECODE_SSM_OUT(TAG, T)                                                                           \
  MRT_DECODE_LAYERS(TAG, T)
