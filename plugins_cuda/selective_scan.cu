// SelectiveScan (DESIGN.md "The two custom ops"): Mamba-1's S6 recurrence with a carried state.
//
//   u, delta, z [B, d, L] (z optional); A [d, n] fp32; Bm, Cm [B, n, L]; D, delta_bias [d] fp32
//   (optional); ssm_state [B, d, n] fp32 (optional: zeros) -> y [B, d, L], ssm_state_out [B, d, n] fp32
//   dt = softplus(delta + delta_bias)   (softplus only when the flag is set)
//   h_t = exp(dt_t A) * h_{t-1} + dt_t Bm_t u_t ;  y_t = (Cm_t . h_t + D u_t) * silu(z_t)
//
// NP is n rounded up to 8, 16, 32 or 64; states past n are padding (A = B = C = 0, so h stays 0).
// In scan_fwd each lane owns SPT states of one (b, c) (ScanCfg); TPC = NP / SPT lanes share a channel.
//
//   scan_fwd     any L >= 1. A block owns CPW channels per warp of one batch row (its warps: a launch
//                choice, ScanCfg::WARPS .. MAX_WARPS; its shared memory dynamic) and walks the whole sequence
//                in chunks of TCH steps, so L is unbounded (65,537 tokens in one call) and the state
//                never leaves registers. Per chunk: each lane computes dt = softplus(delta + bias)
//                and dt * u for its own IPL consecutive steps of its channel (on the special-function
//                unit, once per (c, t)) into warp-private shared memory; the block's Bm / Cm chunk
//                sits in shared memory as fp32, double-buffered (staged during the previous chunk
//                from registers loaded a chunk ahead: one barrier per chunk); the recurrence runs 4
//                steps per group (one 16-byte shared load per operand, one MUFU.EX2 per state and
//                step) leaving each lane's partial C . h per step in shared memory; then each lane
//                sums the partials of its own IPL steps and writes y, coalesced along time. Full
//                chunks of time-contiguous, aligned rows use vector loads and no bounds checks;
//                where every chunk is such (L a multiple of TCH, every row vector-accessible: a
//                block-wide vote) the chunk loop runs a copy compiled without the partial-chunk and
//                scalar paths (4-8 % faster, benchmarks/NOTES.md item 54). Each copy of the chunk
//                loop must stay small (about 8 KB of SASS): see ScanCfg::QU. Its WIDE
//                configuration (entry mrt_selective_scan_wide_fwd_*) gives each lane more states
//                and keeps Bm / Cm in 16 bits, for many rows (ScanCfg).
//   scan_fwd_tp  the same contract, time-parallel: a warp per (b, c), each lane owning a run of IPL
//                steps of every 512-step chunk, the states walked one after another with a warp
//                scan of each state's segment aggregates (TpCfg). Faster where the grid of scan_fwd
//                would leave SMs idle (few rows of long sequences: mamba-130m / 370m prompts at
//                batch 1); the launcher picks (TP_MAX_ROWS, TP_MIN_SEQLEN).
//   state_update L == 1, the decode step (memory-bound: the fp32 state is read and written once).
//                TPC threads per (b, c), each loading its 4 states and 4 A values as one 16-byte
//                vector when the layout allows (checked per thread), so a warp's state access is one
//                contiguous 512-byte run.
// Each state element is read and written by exactly one thread, so ssm_state_out may be ssm_state.
#include "common.cuh"

namespace mrt {

struct ScanParams {  // mirrored field for field by launcher._ScanParams (all 8-byte fields)
  const void* u;
  const void* delta;
  const void* A;
  const void* Bm;
  const void* Cm;
  const void* D;           // may be null
  const void* z;           // may be null
  const void* delta_bias;  // may be null
  const void* ssm_state;   // may be null (zeros)
  void* y;
  void* ssm_state_out;
  long long batch, dim, seqlen, dstate, softplus;
  long long u_bs, u_cs, u_ts;  // element strides over (batch, channel, time)
  long long d_bs, d_cs, d_ts;  // delta
  long long A_cs, A_ss;        // A over (channel, state)
  long long B_bs, B_ss, B_ts;  // Bm over (batch, state, time)
  long long C_bs, C_ss, C_ts;
  long long D_cs, db_cs;
  long long z_bs, z_cs, z_ts;
  long long h_bs, h_cs, h_ss;  // ssm_state over (batch, channel, state)
  long long y_bs, y_cs, y_ts;
  long long ho_bs, ho_cs, ho_ss;
};

__device__ __forceinline__ ScanParams scan_contiguous(
    const void* u, const void* delta, const void* A, const void* Bm, const void* Cm, const void* D,
    const void* z, const void* delta_bias, const void* ssm_state, int batch, int dim, int seqlen,
    int dstate, int softplus, void* y, void* ssm_state_out) {
  ScanParams p;
  p.u = u; p.delta = delta; p.A = A; p.Bm = Bm; p.Cm = Cm; p.D = D; p.z = z;
  p.delta_bias = delta_bias; p.ssm_state = ssm_state; p.y = y; p.ssm_state_out = ssm_state_out;
  p.batch = batch; p.dim = dim; p.seqlen = seqlen; p.dstate = dstate; p.softplus = softplus;
  const long long dl = (long long)dim * seqlen, nl = (long long)dstate * seqlen;
  const long long dn = (long long)dim * dstate;
  p.u_bs = dl; p.u_cs = seqlen; p.u_ts = 1;
  p.d_bs = dl; p.d_cs = seqlen; p.d_ts = 1;
  p.z_bs = dl; p.z_cs = seqlen; p.z_ts = 1;
  p.y_bs = dl; p.y_cs = seqlen; p.y_ts = 1;
  p.A_cs = dstate; p.A_ss = 1;
  p.B_bs = nl; p.B_ss = seqlen; p.B_ts = 1;
  p.C_bs = nl; p.C_ss = seqlen; p.C_ts = 1;
  p.D_cs = 1; p.db_cs = 1;
  p.h_bs = dn; p.h_cs = dstate; p.h_ss = 1;
  p.ho_bs = dn; p.ho_cs = dstate; p.ho_ss = 1;
  return p;
}

// Benchmark-only overrides (benchmarks/bench_kernels.py compiles variants with -D); the launcher's
// SCAN_CFG mirrors the defaults.
#ifndef MRT_SCAN_SPT16
#define MRT_SCAN_SPT16 2
#endif
#ifndef MRT_SCAN_WARPS
#define MRT_SCAN_WARPS 4
#endif
#ifndef MRT_SCAN_MAX_WARPS
#define MRT_SCAN_MAX_WARPS 8
#endif
#ifndef MRT_SCAN_TCH
#define MRT_SCAN_TCH 32
#endif
#ifndef MRT_SCAN_BC16
#define MRT_SCAN_BC16 0
#endif
#ifndef MRT_SCAN_XMAP
#define MRT_SCAN_XMAP 1
#endif

template <bool C, typename A, typename B> struct Pick { using type = A; };
template <typename A, typename B> struct Pick<false, A, B> { using type = B; };

template <int NP, bool WIDE = false>
struct ScanCfg {
  // Lane mapping: a warp holds CPW channels, TPC lanes each; a lane owns SPT of its channel's states
  // (states g, g + TPC, ...). n = 16: two states per lane (1,280 warps at batch 1, d = 5120) measured
  // fastest at batch 1 (one: 0.176 ms, MIO-bound on the per-lane shared loads; two: 0.124 ms; four:
  // 0.152 ms, too few warps); benchmarks/NOTES.md.
  static constexpr int SPT0 = NP <= 8 ? 1 : NP == 16 ? MRT_SCAN_SPT16 : NP == 32 ? 2 : 4;
  // WIDE (the launcher's "wide" kernel, for many rows: batch x d_inner >= launcher.WIDE_MIN_ROWS):
  // twice the states per lane (at most 4) and Bm / Cm kept in shared memory in their 16-bit type,
  // i.e. fewer shared-memory wavefronts per state-step for half the warps; n = 16: 5-19 % faster
  // from 8,192 rows up, 10-20 % slower at 3,072-6,144 (benchmarks/NOTES.md, item 31).
  static constexpr int SPT = WIDE ? (2 * SPT0 < 4 ? 2 * SPT0 : 4) : SPT0;
  static constexpr bool BC16 = WIDE || MRT_SCAN_BC16;   // (only where the input type is 16-bit)
  static constexpr int TPC = NP / SPT;                  // lanes per channel: 8, 8, 16, 16 (wide 4, 4, 8, 16)
  static constexpr int CPW = 32 / TPC;                  // channels per warp: 4, 4, 2, 2
  // Warps per block: a launch choice (blockDim.x / 32) between WARPS and MAX_WARPS. WARPS is the
  // default (TensorRT's ahead-of-time launch, and wherever the launcher does not balance);
  // launcher.scan_block_warps picks more so that every SM runs one or two blocks holding the same
  // number of warps, give or take one. With blocks of 4, d = 5120 is 320 blocks on 132 SMs: 56 SMs
  // run three and the rest two, and the kernel lasts as long as the SMs with three (benchmarks/
  // NOTES.md, item 52). Only the kernels with at most two states per lane (n <= 16, not WIDE) take
  // more than WARPS: two blocks of MAX_WARPS must fit an SM's registers (MIN_BLOCKS).
  static constexpr int WARPS = MRT_SCAN_WARPS;
  static constexpr int MAX_WARPS = (NP <= 16 && !WIDE) ? MRT_SCAN_MAX_WARPS : WARPS;
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int MAX_THREADS = 32 * MAX_WARPS;
  static constexpr int MIN_BLOCKS = MAX_WARPS > WARPS ? 2 : 1;  // __launch_bounds__: two such blocks per SM
  static constexpr int TCH = NP == 64 ? 16 : MRT_SCAN_TCH;  // steps per chunk (64: 16, its shared memory < 48 KB)
  static constexpr int IPL = TCH / TPC;                 // (channel, step) items per lane: 4, 4, 2, 1
  // 4-step groups unrolled per iteration of the recurrence loop: at most 32 state-steps of code per
  // lane. The loop body must stay small: with 64 (two states, 32 steps fully unrolled, ~12 KB of
  // SASS in the chunk loop) the kernel ran 4x slower, its warps waiting on instruction fetch.
#ifdef MRT_SCAN_QU
  static constexpr int QU = MRT_SCAN_QU;
#else
  static constexpr int QU = (32 / (4 * SPT)) < (TCH / 4) ? (32 / (4 * SPT)) : (TCH / 4);
#endif
  static constexpr int RS = TCH + 4;                    // shared row stride: 16-byte rows, 4 banks apart
  // The recurrence's lane mapping (scan_fwd): XMAP puts CPW channels of 8 / CPW state groups in each
  // quarter warp, so that the per-step 16-byte shared loads of Bm / Cm touch 8 / CPW rows per
  // quarter warp instead of 8 (at CPW 4: two shared-memory wavefronts per load instead of four; dt
  // and dt*u then take four instead of two). 2-5 % faster at batch 1 (benchmarks/NOTES.md, item 83).
  // Not in the WIDE kernel (eight channels of one state group per quarter warp: not measured).
  static constexpr bool XMAP = !WIDE && MRT_SCAN_XMAP;
  // y partial-sum planes (one per recurrence lane group) offset so that a quarter warp's 16-byte
  // stores hit 8 different 4-bank groups: one channel's 8 groups (4-bank steps of the plane offset),
  // or with XMAP CPW channels (RS apart: 4-bank steps) of 8 / CPW groups (4 * CPW banks apart).
  static constexpr int YPL_TARGET = XMAP ? 4 * CPW : TPC == 4 ? 8 : 4;
  static constexpr int YPL = CPW * RS + ((YPL_TARGET - (CPW * RS) % 32) + 32) % 32;
  static constexpr int BCV = NP * TCH / 4;              // 4-step runs of Bm (and of Cm) per chunk
  static constexpr int BCE = (BCV + THREADS - 1) / THREADS;  // (enough for any block of >= WARPS warps)
  // Dynamic shared memory: Bm and Cm ([2][NP][RS] each, of BCT), then per warp dt and dt*u
  // ([CPW][RS] floats each) and the y partial planes (TPC * YPL floats). launcher.scan_smem_bytes
  // restates this with the y planes padded for the items' lane mapping (target 8 / 4 above), never less than
  // XMAP's; the kernel traps if it was given less.
  static constexpr int WARP_FLOATS = 2 * CPW * RS + TPC * YPL;
  __device__ static constexpr unsigned int smem_bytes(int warps, unsigned int bc_bytes) {
    return 2u * 2u * NP * RS * bc_bytes + 4u * WARP_FLOATS * static_cast<unsigned int>(warps);
  }
  static_assert(TCH % 4 == 0 && TCH % TPC == 0, "chunk must tile");
};

// N consecutive elements of T, loadable / storable as one or two vectors.
template <typename T, int N>
struct alignas(N * sizeof(T) >= 16 ? 16 : N * sizeof(T)) Pack {
  T e[N];
};

template <typename T, int N>
__device__ __forceinline__ void ld_pack(Pack<T, N>& r, const T* p) {
  constexpr int BYTES = N * sizeof(T);
  if constexpr (BYTES >= 16) {
#pragma unroll
    for (int k = 0; k < BYTES / 16; ++k)
      reinterpret_cast<uint4*>(&r)[k] = reinterpret_cast<const uint4*>(p)[k];
  } else if constexpr (BYTES == 8) {
    *reinterpret_cast<uint2*>(&r) = *reinterpret_cast<const uint2*>(p);
  } else if constexpr (BYTES == 4) {
    *reinterpret_cast<unsigned int*>(&r) = *reinterpret_cast<const unsigned int*>(p);
  } else {
    r.e[0] = p[0];
  }
}

template <typename T, int N>
__device__ __forceinline__ void st_pack(T* p, const Pack<T, N>& r) {
  constexpr int BYTES = N * sizeof(T);
  if constexpr (BYTES >= 16) {
#pragma unroll
    for (int k = 0; k < BYTES / 16; ++k)
      reinterpret_cast<uint4*>(p)[k] = reinterpret_cast<const uint4*>(&r)[k];
  } else if constexpr (BYTES == 8) {
    *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(&r);
  } else if constexpr (BYTES == 4) {
    *reinterpret_cast<unsigned int*>(p) = *reinterpret_cast<const unsigned int*>(&r);
  } else {
    p[0] = r.e[0];
  }
}

// Elements t .. t+N-1 of a row with element stride ts; past L reads as 0. vec: one vector access
// (the caller checked ts == 1, alignment and t + N <= L).
template <typename T, int N>
__device__ __forceinline__ void ld_run(Pack<T, N>& r, const T* __restrict__ row, long long ts, int t,
                                       int L, bool vec) {
  if (vec) {
    ld_pack(r, row + t);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) r.e[i] = t + i < L ? row[(t + i) * ts] : T{};
  }
}

template <typename T, int N>
__device__ __forceinline__ void st_run(T* __restrict__ row, long long ts, int t, int L, bool vec,
                                       const Pack<T, N>& r) {
  if (vec) {
    st_pack(row + t, r);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (t + i < L) row[(t + i) * ts] = r.e[i];
  }
}

// A lane's run of outputs: y = (scan + D u) * silu(z) (no gate without z), rounded to T.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> gate_run(float Dc, const float (&uf)[N], const float (&ys)[N],
                                               const float (&zf)[N], bool has_z) {
  Pack<T, N> py;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float yv = fmaf(Dc, uf[i], ys[i]);
    if (has_z) yv *= silu_mufu(zf[i]);
    py.e[i] = from_float<T>(yv);
  }
  return py;
}

// Pack -> floats. bf16 pairs are split with one shift / mask each.
template <typename T, int N>
__device__ __forceinline__ void unpack(const Pack<T, N>& r, float (&f)[N]) {
  if constexpr (N % 2 == 0 && IsBf16<T>::value) {
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      const unsigned int w = reinterpret_cast<const unsigned int*>(&r)[k];
      f[2 * k] = __uint_as_float(w << 16);
      f[2 * k + 1] = __uint_as_float(w & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = to_float(r.e[i]);
  }
}

// N consecutive floats of shared memory (16-byte aligned when N >= 4).
template <int N>
__device__ __forceinline__ void lds_floats(const float* p, float (&v)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int k = 0; k < N / 4; ++k) {
      const float4 q = reinterpret_cast<const float4*>(p)[k];
      v[4 * k] = q.x; v[4 * k + 1] = q.y; v[4 * k + 2] = q.z; v[4 * k + 3] = q.w;
    }
  } else if constexpr (N == 2) {
    const float2 q = *reinterpret_cast<const float2*>(p);
    v[0] = q.x; v[1] = q.y;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = p[k];
  }
}

template <int N>
__device__ __forceinline__ void sts_floats(float* p, const float (&v)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int k = 0; k < N / 4; ++k)
      reinterpret_cast<float4*>(p)[k] = make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
  } else if constexpr (N == 2) {
    *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) p[k] = v[k];
  }
}

__device__ __forceinline__ bool aligned_to(const void* p, unsigned int bytes) {
  return (reinterpret_cast<unsigned long long>(p) & (bytes - 1)) == 0ull;
}

// A lane's SPT states (j TPC + rg) of channel cr of batch row b: A scaled by log2 e and the initial
// state; zeros past n, for channels past dim, and without a state.
template <int TPC, int SPT>
__device__ __forceinline__ void scan_lane_states(const ScanParams& p, long long b, long long cr, bool crok, int rg,
                                                 float (&a2)[SPT], float (&h)[SPT]) {
#pragma unroll
  for (int j = 0; j < SPT; ++j) {
    const long long s = j * TPC + rg;
    const bool ok = crok && s < p.dstate;
    a2[j] = ok ? static_cast<const float*>(p.A)[cr * p.A_cs + s * p.A_ss] * LOG2E : 0.f;
    h[j] = ok && p.ssm_state
               ? static_cast<const float*>(p.ssm_state)[b * p.h_bs + cr * p.h_cs + s * p.h_ss]
               : 0.f;
  }
}

// The lane's SPT final states into ssm_state_out (scan_lane_states' lanes).
template <int TPC, int SPT>
__device__ __forceinline__ void scan_lane_states_out(const ScanParams& p, long long b, long long cr, bool crok,
                                                     int rg, const float (&h)[SPT]) {
#pragma unroll
  for (int j = 0; j < SPT; ++j) {
    const long long s = j * TPC + rg;
    if (crok && s < p.dstate)
      static_cast<float*>(p.ssm_state_out)[b * p.ho_bs + cr * p.ho_cs + s * p.ho_ss] = h[j];
  }
}

// A lane's N (channel, step) items: dt = softplus(delta + bias) (softplus where the op asks for it) and
// dt * u; with mask, the items from `valid` on (steps past L) get dt = 0: exp(0) = 1 and no input, the
// state passes through unchanged.
template <int N>
__device__ __forceinline__ void scan_dt(const float (&uf)[N], const float (&xf)[N], float dbias, bool softplus,
                                        bool mask, int valid, float (&dtv)[N], float (&duv)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float x = xf[i] + dbias;
    dtv[i] = softplus ? softplus_mufu(x) : x;
  }
  if (mask) {
#pragma unroll
    for (int i = 0; i < N; ++i) dtv[i] = i < valid ? dtv[i] : 0.f;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) duv[i] = dtv[i] * uf[i];
}

// The sum of a lane's N items over the TPC y partial planes (yw: its items in the first plane).
template <int N, int TPC, int YPL>
__device__ __forceinline__ void scan_sum_planes(const float* yw, float (&out)[N]) {
  lds_floats<N>(yw, out);
#pragma unroll
  for (int kk = 1; kk < TPC; ++kk) {
    float part[N];
    lds_floats<N>(yw + kk * YPL, part);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] += part[i];
  }
}

// One chunk of the recurrence for a lane's SPT states (scan_fwd and scan_fwd_ws), 4 steps per group: one
// 16-byte shared load each of dt, dt*u (dtr, dur: the lane's channel row) and of every owned state's
// Bm and Cm (Bb, Cb: its first state's row; the others TPC rows apart); per state and step one ex2
// and 4 FP32 operations. The lane's partial C . h of each step goes to yp[step] (its y plane).
template <typename Cfg, typename T, bool BC16, typename BCT>
__device__ __forceinline__ void scan_recurrence(float (&h)[Cfg::SPT], const float (&a2)[Cfg::SPT],
                                                const BCT* __restrict__ Bb, const BCT* __restrict__ Cb,
                                                const float* __restrict__ dtr, const float* __restrict__ dur,
                                                float* __restrict__ yp) {
  constexpr int SPT = Cfg::SPT, TPC = Cfg::TPC, TCH = Cfg::TCH, RS = Cfg::RS;
  // Operands of group q+1 are loaded before group q is computed (shared-memory latency hidden
  // inside the warp, not only by other warps).
  float d4[2][4], u4[2][4], bq[2][SPT][4], cq[2][SPT][4];
  auto lds_group = [&](int q, int slot) {
    lds_floats<4>(dtr + 4 * q, d4[slot]);
    lds_floats<4>(dur + 4 * q, u4[slot]);
#pragma unroll
    for (int j = 0; j < SPT; ++j) {
      if constexpr (BC16) {
        Pack<T, 4> rb, rc;
        ld_pack(rb, Bb + j * TPC * RS + 4 * q);
        ld_pack(rc, Cb + j * TPC * RS + 4 * q);
        unpack(rb, bq[slot][j]);
        unpack(rc, cq[slot][j]);
      } else {
        lds_floats<4>(Bb + j * TPC * RS + 4 * q, bq[slot][j]);
        lds_floats<4>(Cb + j * TPC * RS + 4 * q, cq[slot][j]);
      }
    }
  };
  lds_group(0, 0);
  static_assert(Cfg::QU == TCH / 4 || Cfg::QU % 2 == 0, "slot parity must survive the outer loop");
#pragma unroll 1
  for (int q0 = 0; q0 < TCH / 4; q0 += Cfg::QU) {
#pragma unroll
    for (int qi = 0; qi < Cfg::QU; ++qi) {
      const int q = q0 + qi, cur = qi & 1;
      if (q + 1 < TCH / 4) lds_group(q + 1, cur ^ 1);
      float acc[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < SPT; ++j) {
          h[j] = fmaf(fast_exp2(d4[cur][i] * a2[j]), h[j], u4[cur][i] * bq[cur][j][i]);
          acc[i] = j == 0 ? cq[cur][j][i] * h[j] : fmaf(cq[cur][j][i], h[j], acc[i]);
        }
      }
      sts_floats<4>(yp + 4 * q, acc);
    }
  }
}

template <typename T, int NP, bool WIDE>
__device__ __forceinline__ void scan_fwd(const ScanParams& p) {
  using Cfg = ScanCfg<NP, WIDE>;
  constexpr int SPT = Cfg::SPT, TPC = Cfg::TPC, CPW = Cfg::CPW;
  constexpr int TCH = Cfg::TCH, IPL = Cfg::IPL;
  constexpr int RS = Cfg::RS, YPL = Cfg::YPL, BCV = Cfg::BCV, BCE = Cfg::BCE;
  constexpr unsigned int LANE_ALIGN = IPL * sizeof(T) >= 16 ? 16 : IPL * sizeof(T);
  constexpr unsigned int BC_ALIGN = 4 * sizeof(T) >= 16 ? 16 : 4 * sizeof(T);

  // Bm, Cm of a chunk as [state][step], double-buffered: the block stages chunk k+1's while
  // (after) chunk k's recurrence, so one barrier per chunk suffices. BC16: kept in the input's 16-bit
  // type (half the shared-memory wavefronts per value; widened at use), else as fp32.
  constexpr bool BC16 = Cfg::BC16 && sizeof(T) == 2;
  using BCT = typename Pick<BC16, T, float>::type;
  // Per warp: dt and dt*u per (channel, step), and the lanes' partial C . h per step (one plane
  // per lane group g). Only the warp's own lanes touch these (__syncwarp).
  extern __shared__ __align__(16) float scan_smem[];
  const int warps = static_cast<int>(blockDim.x) / 32;
  const int THREADS = 32 * warps, CPB = CPW * warps;
  {
    unsigned int dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (blockDim.x % 32 != 0 || warps < Cfg::WARPS || warps > Cfg::MAX_WARPS ||
        dyn < Cfg::smem_bytes(warps, sizeof(BCT)))
      asm volatile("trap;");  // a launch that disagrees with launcher.scan_block_warps / scan_smem_bytes
  }
  BCT(*B_s)[NP][RS] = reinterpret_cast<BCT(*)[NP][RS]>(scan_smem);
  BCT(*C_s)[NP][RS] = B_s + 2;
  const int tid = threadIdx.x, w = tid / 32, lane = tid % 32;
  float* const wsm = scan_smem + (2 * 2 * NP * RS * sizeof(BCT)) / 4 + w * Cfg::WARP_FLOATS;
  float(*dt_w)[RS] = reinterpret_cast<float(*)[RS]>(wsm);
  float(*du_w)[RS] = dt_w + CPW;
  float* const yw = wsm + 2 * CPW * RS;

  // Two lane mappings. Items (u, dt, z, y of a (channel, step)): lane = lc * TPC + g, a channel's steps
  // contiguous across its TPC lanes (coalesced global runs, conflict-free sums of the y planes). The
  // recurrence (a lane's states and their per-step shared loads): with XMAP lane = rg * CPW + rc,
  // else the same as the items'. A 16-byte shared load takes one wavefront per quarter warp unless
  // each quarter warp touches at most two 16-byte words; two such quarter warps share one (measured,
  // benchmarks/NOTES.md item 83). Bm / Cm are the per-step loads that all CPW channels share.
  const int lc = lane / TPC, g = lane % TPC;
  const int rc = Cfg::XMAP ? lane % CPW : lc, rg = Cfg::XMAP ? lane / CPW : g;
  const long long b = blockIdx.y;
  const long long c0 = (long long)blockIdx.x * CPB + w * CPW;
  const long long c = c0 + lc;    // the items' channel
  const bool cok = c < p.dim;
  const long long cr = c0 + rc;   // the recurrence's channel
  const bool crok = cr < p.dim;
  const int L = static_cast<int>(p.seqlen);  // the launcher keeps seqlen within int32

  // This lane's channel rows (u, delta, z, y), read / written IPL steps at a time.
  const T* __restrict__ urow = static_cast<const T*>(p.u) + b * p.u_bs + c * p.u_cs;
  const T* __restrict__ drow = static_cast<const T*>(p.delta) + b * p.d_bs + c * p.d_cs;
  const T* __restrict__ zrow = p.z ? static_cast<const T*>(p.z) + b * p.z_bs + c * p.z_cs : nullptr;
  T* __restrict__ yrow = static_cast<T*>(p.y) + b * p.y_bs + c * p.y_cs;
  const bool lvec = p.u_ts == 1 && p.d_ts == 1 && p.y_ts == 1 && aligned_to(urow, LANE_ALIGN) &&
                    aligned_to(drow, LANE_ALIGN) && aligned_to(yrow, LANE_ALIGN) &&
                    (!zrow || (p.z_ts == 1 && aligned_to(zrow, LANE_ALIGN)));

  float a2[SPT], h[SPT];
  scan_lane_states<TPC>(p, b, cr, crok, rg, a2, h);
  const float dbias = cok && p.delta_bias ? static_cast<const float*>(p.delta_bias)[c * p.db_cs] : 0.f;
  const float Dc = cok && p.D ? static_cast<const float*>(p.D)[c * p.D_cs] : 0.f;

  // Bm / Cm staging: run v = tid + e * THREADS is state v / (TCH/4), steps 4 (v % (TCH/4)) + 0..3.
  const T* brow[BCE];
  const T* crow[BCE];
  bool bok[BCE], bvec[BCE];
#pragma unroll
  for (int e = 0; e < BCE; ++e) {
    const int v = tid + e * THREADS, s = v / (TCH / 4);
    bok[e] = v < BCV && s < p.dstate;
    brow[e] = static_cast<const T*>(p.Bm) + b * p.B_bs + s * p.B_ss;
    crow[e] = static_cast<const T*>(p.Cm) + b * p.C_bs + s * p.C_ss;
    bvec[e] = p.B_ts == 1 && p.C_ts == 1 && aligned_to(brow[e], BC_ALIGN) && aligned_to(crow[e], BC_ALIGN);
  }
  Pack<T, 4> pb[BCE], pc[BCE];
  Pack<T, IPL> pu, pd, pz;
#pragma unroll
  for (int e = 0; e < BCE; ++e)
#pragma unroll
    for (int i = 0; i < 4; ++i) pb[e].e[i] = pc[e].e[i] = T{};
#pragma unroll
  for (int i = 0; i < IPL; ++i) pu.e[i] = pd.e[i] = pz.e[i] = T{};

  // fc: every chunk is full and every row takes vector accesses (all_vec below; a constant at each
  // call, so the inlined copies drop the other paths).
  auto load_bc = [&](int t0, bool full, bool fc) {
#pragma unroll
    for (int e = 0; e < BCE; ++e) {
      if (bok[e]) {
        const int t = t0 + 4 * ((tid + e * THREADS) % (TCH / 4));
        const bool vec = fc || (bvec[e] && full);
        ld_run(pb[e], brow[e], p.B_ts, t, L, vec);
        ld_run(pc[e], crow[e], p.C_ts, t, L, vec);
      }
    }
  };
  auto stage_bc = [&](int buf) {
#pragma unroll
    for (int e = 0; e < BCE; ++e) {
      const int v = tid + e * THREADS;
      if (v < BCV) {
        const int s = v / (TCH / 4), m = 4 * (v % (TCH / 4));
        if constexpr (BC16) {
          st_pack(&B_s[buf][s][m], pb[e]);
          st_pack(&C_s[buf][s][m], pc[e]);
        } else {
          float fb[4], fc[4];
          unpack(pb[e], fb);
          unpack(pc[e], fc);
          sts_floats<4>(&B_s[buf][s][m], fb);
          sts_floats<4>(&C_s[buf][s][m], fc);
        }
      }
    }
  };
  auto load_lane = [&](int t0, bool full, bool fc) {
    if (cok) {
      const int t = t0 + g * IPL;
      const bool vec = fc || (lvec && full);
      ld_run(pu, urow, p.u_ts, t, L, vec);
      ld_run(pd, drow, p.d_ts, t, L, vec);
      if (zrow) ld_run(pz, zrow, p.z_ts, t, L, vec);
    }
  };

  const int nchunks = (L - 1) / TCH + 1;
  load_bc(0, L >= TCH, false);
  load_lane(0, L >= TCH, false);
  stage_bc(0);
  // Whole chunks only, every row vector-accessible (contiguous, aligned: any prompt whose length is a
  // multiple of TCH): the chunk loop below is then compiled without its partial-chunk and scalar
  // paths. The same choice in every thread of the block (both loops hold barriers).
  bool bc_vec = true;
#pragma unroll
  for (int e = 0; e < BCE; ++e) bc_vec = bc_vec && (!bok[e] || bvec[e]);
  const bool all_vec = __syncthreads_and(L % TCH == 0 && (!cok || lvec) && bc_vec);

  float* __restrict__ dts = dt_w[lc];
  float* __restrict__ dus = du_w[lc];
  auto chunk = [&](int k, bool FC) {
    const int t0 = k * TCH;
    const bool full = FC || L - t0 >= TCH;
    // dt and dt * u, once per (channel, step)
    float uf[IPL], xf[IPL], dtv[IPL], duv[IPL];
    unpack(pu, uf);
    unpack(pd, xf);
    Pack<T, IPL> zk = pz;
    scan_dt(uf, xf, dbias, p.softplus, !full, L - t0 - g * IPL, dtv, duv);
    sts_floats<IPL>(dts + g * IPL, dtv);
    sts_floats<IPL>(dus + g * IPL, duv);
    if (k + 1 < nchunks) {  // next chunk's global loads, in flight during this chunk's recurrence
      const bool nfull = FC || L - t0 - TCH >= TCH;
      load_lane(t0 + TCH, nfull, FC);
      load_bc(t0 + TCH, nfull, FC);
    }
    __syncwarp();

    scan_recurrence<Cfg, T, BC16>(h, a2, &B_s[k & 1][rg][0], &C_s[k & 1][rg][0], dt_w[rc], du_w[rc],
                                  yw + rg * YPL + rc * RS);
    __syncwarp();

    // Each lane sums the TPC partials of its own IPL items and writes y (coalesced along time).
    float out[IPL];
    scan_sum_planes<IPL, TPC, YPL>(yw + lc * RS + g * IPL, out);
    if (cok) {
      float zf[IPL];
      unpack(zk, zf);
      st_run(yrow, p.y_ts, t0 + g * IPL, L, FC || (lvec && full),
             gate_run<T, IPL>(Dc, uf, out, zf, zrow != nullptr));
    }
    if (k + 1 < nchunks) stage_bc((k + 1) & 1);
    __syncthreads();
  };
  if (all_vec) {
#pragma unroll 1
    for (int k = 0; k < nchunks; ++k) chunk(k, true);
  } else {
#pragma unroll 1
    for (int k = 0; k < nchunks; ++k) chunk(k, false);
  }
  scan_lane_states_out<TPC>(p, b, cr, crok, rg, h);
}

// The warp-specialized sequence scan (scan_fwd_ws; entry mrt_selective_scan_ws_fwd_*, flat arguments
// only): the same lane mappings, recurrence and results as scan_fwd, bit for bit, with the work split
// between two kinds of warps. A block has R recurrence warps (CPW channels each, as scan_fwd's warps) and
// R side warps, side warp i serving recurrence warp i's channels. Recurrence warps run only the
// recurrence (scan_recurrence) of chunk k from buffers k & 1. Side warps do everything else, one chunk
// apart: the y of chunk k - 2 (sum of the planes, D u, the gate, the store), the staging of chunk k
// (Bm / Cm to fp32, softplus, dt * u) and the global loads of chunk k + 2 (into registers: the side loop
// is unrolled by four chunks, so no in-flight register is ever moved). They hand over through
// per-buffer mbarriers: full[b] (the R side warps staged it) and empty[b] (the R recurrence warps are
// done with it: its planes hold y partials, its inputs may be overwritten), so recurrence warps never
// wait for each other, only for their inputs. Work beside the recurrence instead of between its chunks:
// d_inner 5120, 2048 steps, bf16 on the H100 0.099-0.101 ms against scan_fwd's 0.107 (benchmarks/NOTES.md,
// item 85), 0.096-0.098 since the four-chunk unroll and the one-MUFU softplus (item 88). Rows are
// time-contiguous (the flat entry); a row that is not vector-aligned, the last partial chunk and a missing
// z / D / delta_bias / state take the same guarded paths as scan_fwd's.
template <int NP, int TBYTES>
struct WsCfg {
  using Cfg = ScanCfg<NP, false>;
  // Recurrence warps per block, MIN_R .. MAX_R (launcher.ws_block_warps picks R): two blocks of
  // 2 MAX_R warps per SM (96 registers; fp32 inputs, whose side warps hold twice the bytes, 128); at
  // least MIN_R so that each side thread stages one 4-step run of Bm and of Cm per chunk. Only NP 8 and
  // 16 have this kernel.
  static_assert(NP <= 16, "the warp-specialized scan is built for n <= 16 only");
  static constexpr int MAX_R = TBYTES == 4 ? 4 : 5;
  static constexpr int MIN_R = (Cfg::BCV + 31) / 32;
  static_assert(MIN_R <= MAX_R, "one Bm / Cm run per side thread");
  static constexpr int MAX_THREADS = 64 * MAX_R;
  static constexpr int PLANE = Cfg::TPC * Cfg::YPL;  // a recurrence warp's y planes, floats
  // Dynamic shared memory (restated by launcher.ws_smem_bytes): Bm, Cm [2][NP][RS], dt, dt*u
  // [2][CPW R][RS], the y planes [R][2][PLANE] (fp32), then the 4 mbarriers.
  __host__ __device__ static constexpr unsigned int smem_bytes(int R) {
    return 4u * (2u * 2u * NP * Cfg::RS + 2u * 2u * Cfg::CPW * R * Cfg::RS + 2u * PLANE * R) + 32u;
  }
};

template <typename T, int NP>
__device__ __forceinline__ void scan_fwd_ws(const ScanParams& p) {
  using Cfg = ScanCfg<NP, false>;
  using W = WsCfg<NP, sizeof(T)>;
  constexpr int SPT = Cfg::SPT, TPC = Cfg::TPC, CPW = Cfg::CPW, TCH = Cfg::TCH, IPL = Cfg::IPL;
  constexpr int RS = Cfg::RS, YPL = Cfg::YPL, BCV = Cfg::BCV, PLANE = W::PLANE;
  constexpr unsigned int LANE_ALIGN = IPL * sizeof(T) >= 16 ? 16 : IPL * sizeof(T);
  constexpr unsigned int BC_ALIGN = 4 * sizeof(T) >= 16 ? 16 : 4 * sizeof(T);
  // Bm / Cm runs of 4 steps per side thread (R >= MIN_R). Kept as one-element arrays and loops: the two
  // scalar rewritings tried (session 42's review) compiled to other register allocations, with spills.
  constexpr int BCE = 1;
  static_assert(Cfg::XMAP, "the recurrence's lane mapping is scan_fwd's XMAP one");
  extern __shared__ __align__(16) float scan_smem[];
  const int R = static_cast<int>(blockDim.x) / 64, CPB = CPW * R;
  {
    unsigned int dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (blockDim.x % 64 != 0 || R < W::MIN_R || R > W::MAX_R || dyn < W::smem_bytes(R))
      asm volatile("trap;");  // a launch that disagrees with launcher.ws_block_warps / ws_smem_bytes
  }
  float(*B_s)[NP][RS] = reinterpret_cast<float(*)[NP][RS]>(scan_smem);
  float(*C_s)[NP][RS] = B_s + 2;
  float* const dt0 = scan_smem + 4 * NP * RS;  // [2][CPB][RS]
  float* const du0 = dt0 + 2 * CPB * RS;       // [2][CPB][RS]
  float* const pl0 = du0 + 2 * CPB * RS;       // [R][2][PLANE]
  unsigned long long* const full = reinterpret_cast<unsigned long long*>(pl0 + 2 * PLANE * R);
  unsigned long long* const empty = full + 2;
  const int tid = threadIdx.x, w = tid / 32, lane = tid % 32;
  const long long b = blockIdx.y, cb = (long long)blockIdx.x * CPB;
  const int L = static_cast<int>(p.seqlen);
  const int nchunks = (L - 1) / TCH + 1;
  if (tid == 0) {
    for (int i = 0; i < 2; ++i) {
      mbar_init(full + i, R);
      mbar_init(empty + i, R);
    }
  }
  __syncthreads();

  if (w < R) {  // ---- recurrence warp: lane = rg * CPW + rc (ScanCfg::XMAP)
    const int rc = lane % CPW, rg = lane / CPW;
    const long long cr = cb + w * CPW + rc;
    const bool crok = cr < p.dim;
    float a2[SPT], h[SPT];
    scan_lane_states<TPC>(p, b, cr, crok, rg, a2, h);
#pragma unroll 1
    for (int k = 0; k < nchunks; ++k) {
      const int buf = k & 1;
      mbar_wait(full + buf, (k >> 1) & 1);
      scan_recurrence<Cfg, T, false>(h, a2, &B_s[buf][rg][0], &C_s[buf][rg][0],
                                     dt0 + (buf * CPB + w * CPW + rc) * RS, du0 + (buf * CPB + w * CPW + rc) * RS,
                                     pl0 + (w * 2 + buf) * PLANE + rg * YPL + rc * RS);
      __syncwarp();
      if (lane == 0) mbar_arrive(empty + buf);
    }
    scan_lane_states_out<TPC>(p, b, cr, crok, rg, h);
    return;
  }

  // ---- side warp sw: recurrence warp sw's channels, lane = lc * TPC + g (scan_fwd's items)
  const int sw = w - R, lc = lane / TPC, g = lane % TPC;
  const long long c0 = cb + sw * CPW + lc;
  const bool cok = c0 < p.dim;
  const long long c = cok ? c0 : p.dim - 1;  // (past dim: another channel's rows read, nothing written)
  const T* __restrict__ urow = static_cast<const T*>(p.u) + b * p.u_bs + c * p.u_cs;
  const T* __restrict__ drow = static_cast<const T*>(p.delta) + b * p.d_bs + c * p.d_cs;
  const T* __restrict__ zrow = p.z ? static_cast<const T*>(p.z) + b * p.z_bs + c * p.z_cs : nullptr;
  T* __restrict__ yrow = static_cast<T*>(p.y) + b * p.y_bs + c * p.y_cs;
  const float dbias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[c * p.db_cs] : 0.f;
  const float Dc = p.D ? static_cast<const float*>(p.D)[c * p.D_cs] : 0.f;
  const bool lvec = p.u_ts == 1 && p.d_ts == 1 && p.y_ts == 1 && aligned_to(urow, LANE_ALIGN) &&
                    aligned_to(drow, LANE_ALIGN) && aligned_to(yrow, LANE_ALIGN) &&
                    (!zrow || (p.z_ts == 1 && aligned_to(zrow, LANE_ALIGN)));
  // Bm / Cm staging: run v = lane + 32 (sw + e R) is state v / (TCH/4), steps 4 (v % (TCH/4)) + 0..3.
  const T* brow[BCE];
  const T* crow[BCE];
  bool bok[BCE], bvec[BCE];
#pragma unroll
  for (int e = 0; e < BCE; ++e) {
    const int v = lane + 32 * (sw + e * R), st = v / (TCH / 4);
    bok[e] = v < BCV && st < p.dstate;
    brow[e] = static_cast<const T*>(p.Bm) + b * p.B_bs + (bok[e] ? st : 0) * p.B_ss;
    crow[e] = static_cast<const T*>(p.Cm) + b * p.C_bs + (bok[e] ? st : 0) * p.C_ss;
    bvec[e] = p.B_ts == 1 && p.C_ts == 1 && aligned_to(brow[e], BC_ALIGN) && aligned_to(crow[e], BC_ALIGN);
  }
  // Raw inputs of chunk j: u and z in register slot j & 3 (they live from the chunk's load, two chunks
  // ahead, until its y, two chunks behind), delta, Bm and Cm in slot j & 1 (until the chunk's staging).
  // The side loops are unrolled by four chunks so that every slot is a constant and a chunk's registers
  // stay where its load put them: with two u / z slots and copies into save registers, ptxas rotated
  // the slots through moves after the back edge, each waiting for the load issued just before it.
  Pack<T, IPL> ru[4], rz[4], rd[2];
  Pack<T, 4> rb[2][BCE], rcb[2][BCE];
#pragma unroll
  for (int s4 = 0; s4 < 4; ++s4)  // (z: read by nothing without z; the others always loaded before use)
#pragma unroll
    for (int i = 0; i < IPL; ++i) rz[s4].e[i] = T{};
  // FC (a constant in both chunk loops): chunk j is whole and every row of the warp vector-accessible, so the
  // inlined copy has no scalar or partial-chunk paths (the side warps' instructions per chunk are what
  // keeps them beside the recurrence: the general copy of this loop was as slow as the recurrence).
  auto issue = [&](int j, int s4, bool FC) {  // chunk j's loads (s4 = j & 3)
    if (j < nchunks) {
      const int s2 = s4 & 1, t0 = j * TCH;
      const bool whole = FC || L - t0 >= TCH;
      const int t = t0 + g * IPL;
      ld_run(ru[s4], urow, p.u_ts, t, L, FC || (lvec && whole));
      ld_run(rd[s2], drow, p.d_ts, t, L, FC || (lvec && whole));
      if (zrow) ld_run(rz[s4], zrow, p.z_ts, t, L, FC || (lvec && whole));
#pragma unroll
      for (int e = 0; e < BCE; ++e) {
        if (bok[e]) {
          const int tb = t0 + 4 * ((lane + 32 * (sw + e * R)) % (TCH / 4));
          ld_run(rb[s2][e], brow[e], p.B_ts, tb, L, FC || (bvec[e] && whole));
          ld_run(rcb[s2][e], crow[e], p.C_ts, tb, L, FC || (bvec[e] && whole));
        }
      }
    }
  };
  auto stage = [&](int j, int s4, bool FC) {  // chunk j (slot s4 = j & 3) into buffers j & 1
    const int s2 = s4 & 1;
#pragma unroll
    for (int e = 0; e < BCE; ++e) {
      const int v = lane + 32 * (sw + e * R);
      if (v < BCV) {  // (runs of states past dstate: zeros)
        const int st = v / (TCH / 4), m = 4 * (v % (TCH / 4));
        float fb[4] = {0.f, 0.f, 0.f, 0.f}, fc[4] = {0.f, 0.f, 0.f, 0.f};
        if (bok[e]) {
          unpack(rb[s2][e], fb);
          unpack(rcb[s2][e], fc);
        }
        sts_floats<4>(&B_s[s2][st][m], fb);
        sts_floats<4>(&C_s[s2][st][m], fc);
      }
    }
    float uf[IPL], xf[IPL], dtv[IPL], duv[IPL];
    unpack(ru[s4], uf);
    unpack(rd[s2], xf);
    scan_dt(uf, xf, dbias, p.softplus, !FC, L - j * TCH - g * IPL, dtv, duv);
    const int row = sw * CPW + lc;
    sts_floats<IPL>(dt0 + (s2 * CPB + row) * RS + g * IPL, dtv);
    sts_floats<IPL>(du0 + (s2 * CPB + row) * RS + g * IPL, duv);
  };
  auto ystep = [&](int j, int s4, bool FC) {  // chunk j's y (its planes, buffers j & 1; u, z of slot s4 = j & 3)
    float out[IPL];
    scan_sum_planes<IPL, TPC, YPL>(pl0 + (sw * 2 + (s4 & 1)) * PLANE + lc * RS + g * IPL, out);
    if (cok) {
      float uf[IPL], zf[IPL];
      unpack(ru[s4], uf);
      unpack(rz[s4], zf);
      const int t0 = j * TCH;
      st_run(yrow, p.y_ts, t0 + g * IPL, L, FC || (lvec && L - t0 >= TCH),
             gate_run<T, IPL>(Dc, uf, out, zf, zrow != nullptr));
    }
  };
  // Step j (s4 = j & 3): wait until the recurrence warps are done with buffers j & 1 (chunk j - 2), write
  // that chunk's y; then, for j < nchunks, stage chunk j, hand it over and load chunk j + 2 into the slots
  // chunks j - 2 (u, z) and j (delta, Bm, Cm) no longer need. FC: those of chunks j - 2 .. j + 2 that exist
  // are whole and the warp's rows vector-accessible.
  auto step = [&](int j, int s4, bool FC) {
    const int s2 = s4 & 1, sb = (s4 + 2) & 3;
    if (j >= 2) {
      mbar_wait(empty + s2, ((j >> 1) - 1) & 1);
      ystep(j - 2, sb, FC);
    }
    if (FC || j < nchunks) {  // (FC: inside the whole-chunk loop, always)
      stage(j, s4, FC);
      __syncwarp();
      if (lane == 0) mbar_arrive(full + s2);
      issue(j + 2, sb, FC);
    }
  };
  bool bv = true;
#pragma unroll
  for (int e = 0; e < BCE; ++e) bv = bv && (!bok[e] || bvec[e]);
  const bool wvec = __all_sync(0xffffffffu, lvec && bv);  // (lvec: of the rows read, clamped ones too)
  // runs of four staging steps j .. j + 3 whose chunks j - 2 .. j + 5 (those that exist) are whole: the FC
  // copy; the rest (0-3 staging steps where L is a multiple of the chunk, 3-6 where the last chunk is
  // partial, all where some row is not vector-accessible; then the 2 y-only steps) the general one
  const int nwhole = L / TCH;
  const int jfc = !wvec ? 0 : nwhole == nchunks ? nchunks & ~3 : nwhole > 2 ? (nwhole - 2) & ~3 : 0;
  issue(0, 0, jfc > 0);
  issue(1, 1, jfc > 0);
  int j = 0;
#pragma unroll 1
  for (; j < jfc; j += 4) {
    step(j, 0, true);
    step(j + 1, 1, true);
    step(j + 2, 2, true);
    step(j + 3, 3, true);
  }
  // (steps nchunks and nchunks + 1 only write the last two chunks' y: inside the unrolled loop, so that
  // their slots are constants; an array indexed at run time goes to local memory)
#pragma unroll 1
  for (; j < nchunks + 2; j += 4) {
    const int rem = nchunks + 2 - j;
    step(j, 0, false);
    if (rem > 1) step(j + 1, 1, false);
    if (rem > 2) step(j + 2, 2, false);
    if (rem > 3) step(j + 3, 3, false);
  }
}

// The time-parallel kernel (scan_fwd_tp). Benchmark-only overrides as above; the launcher's TP_CFG
// mirrors the defaults.
#ifndef MRT_TP_WARPS
#define MRT_TP_WARPS 4
#endif
#ifndef MRT_TP_IPL
#define MRT_TP_IPL 16
#endif
#ifndef MRT_TP_G
#define MRT_TP_G 32
#endif
#ifndef MRT_TP_MINB
#define MRT_TP_MINB 4
#endif

template <int NP>
struct TpCfg {
  // G lanes per (b, c); lane g of a channel owns steps g * IPL .. g * IPL + IPL - 1 of each chunk of
  // TCH = G * IPL steps. The states are a runtime loop; NP only sizes the shared per-state arrays.
  // Measured (benchmarks/NOTES.md, item 21): G = 32 fastest at every shape tried (8, 16: slower, the
  // scan rounds were not the limit); 4 blocks per SM (128 registers, a few spilled) against 2
  // unbounded: 0.046 against 0.066 ms at d = 1536.
  static constexpr int WARPS = MRT_TP_WARPS;
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int G = MRT_TP_G;
  static constexpr int CPB = WARPS * (32 / G);  // channels per block
  static constexpr int IPL = MRT_TP_IPL;
  static constexpr int TCH = G * IPL;
  static constexpr int MINB = MRT_TP_MINB;      // __launch_bounds__ blocks per SM (caps registers)
  static_assert(G >= 2 && G <= 32 && (G & (G - 1)) == 0, "G: a power of two that divides a warp");
};

template <typename T, int N>
__device__ __forceinline__ void zero_pack(Pack<T, N>& r) {
#pragma unroll
  for (int i = 0; i < N; ++i) r.e[i] = T{};
}

// Time-parallel scan: G lanes per (b, c). Per chunk of TCH steps, each lane computes dt and dt * u
// of its IPL steps once; then for every state s:
//   pass 1  a_t = 2^(dt_t A_s log2 e), b_t = dt_t u_t B_st and the lane's segment aggregate
//           H = fold(h -> a_t h + b_t) from 0 (the decay over the segment, P = 2^(sum dt A_s log2 e),
//           is one more ex2); the channel's first lane folds in the state carried from the previous
//           chunk;
//   scan    an inclusive scan of the segments' (P, H) over the channel's G lanes (log2 G shuffle
//           rounds), so lane g's H is the state after its segment and lane g - 1's the state it
//           starts from; the last lane's is carried to the next chunk;
//   pass 2  h_t = a_t h_{t-1} + b_t from that start, y_t += C_st h_t (a_t, b_t still in registers).
// One ex2 per state-step plus 1/IPL for P; A and the carried state sit in shared memory per
// (channel, state); no block barriers.
template <typename T, int NP>
__device__ __forceinline__ void scan_fwd_tp(const ScanParams& p) {
  using Cfg = TpCfg<NP>;
  constexpr int IPL = Cfg::IPL, TCH = Cfg::TCH, G = Cfg::G, CPB = Cfg::CPB;
  constexpr unsigned int FULL = 0xffffffffu;
  constexpr unsigned int VA = IPL * sizeof(T) >= 16 ? 16 : IPL * sizeof(T);  // a lane's run, bytes
  __shared__ float a2_s[CPB][NP];  // A * log2(e)
  __shared__ float h_s[CPB][NP];   // the state carried across chunks

  const int lane = threadIdx.x % 32, g = lane % G;
  const int lc = threadIdx.x / G;  // channel within the block
  const long long b = blockIdx.y;
  const long long craw = (long long)blockIdx.x * CPB + lc;
  const bool cok = craw < p.dim;
  // A channel past dim (a partial last block) computes on channel dim - 1 and writes nothing: its
  // lanes stay in the warp's shuffles.
  const long long c = cok ? craw : p.dim - 1;
  const int L = static_cast<int>(p.seqlen);  // the launcher keeps seqlen within int32
  const int n = static_cast<int>(p.dstate);

  const T* __restrict__ urow = static_cast<const T*>(p.u) + b * p.u_bs + c * p.u_cs;
  const T* __restrict__ drow = static_cast<const T*>(p.delta) + b * p.d_bs + c * p.d_cs;
  const T* __restrict__ zrow = p.z ? static_cast<const T*>(p.z) + b * p.z_bs + c * p.z_cs : nullptr;
  T* __restrict__ yrow = static_cast<T*>(p.y) + b * p.y_bs + c * p.y_cs;
  const T* __restrict__ Bb = static_cast<const T*>(p.Bm) + b * p.B_bs;
  const T* __restrict__ Cb = static_cast<const T*>(p.Cm) + b * p.C_bs;
  const bool lvec = p.u_ts == 1 && p.d_ts == 1 && p.y_ts == 1 && aligned_to(urow, VA) &&
                    aligned_to(drow, VA) && aligned_to(yrow, VA) &&
                    (!zrow || (p.z_ts == 1 && aligned_to(zrow, VA)));
  const bool bcvec = p.B_ts == 1 && p.C_ts == 1 && aligned_to(Bb, VA) && aligned_to(Cb, VA) &&
                     (p.B_ss * sizeof(T)) % VA == 0 && (p.C_ss * sizeof(T)) % VA == 0;

  float* __restrict__ a2c = a2_s[lc];
  float* __restrict__ hc = h_s[lc];
  for (int s = g; s < n; s += G) {
    a2c[s] = static_cast<const float*>(p.A)[c * p.A_cs + s * p.A_ss] * LOG2E;
    hc[s] = p.ssm_state ? static_cast<const float*>(p.ssm_state)[b * p.h_bs + c * p.h_cs + s * p.h_ss] : 0.f;
  }
  __syncwarp();
  const float dbias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[c * p.db_cs] : 0.f;
  const float Dc = p.D ? static_cast<const float*>(p.D)[c * p.D_cs] : 0.f;

#pragma unroll 1
  for (int t0 = 0; t0 < L; t0 += TCH) {
    const int tl = t0 + g * IPL;
    const bool full = tl + IPL <= L;
    const bool vec = lvec && full, bvec = bcvec && full;
    Pack<T, IPL> pb;  // B row of state 0; later states' are loaded one state ahead
    ld_run(pb, Bb, p.B_ts, tl, L, bvec);

    // dt = softplus(delta + bias) and dt * u, once per step; steps past L get dt = 0 (a = 1, b = 0:
    // the state passes through those lanes unchanged).
    float dt[IPL], du[IPL], y[IPL];
    {
      Pack<T, IPL> pu, pd;
      ld_run(pu, urow, p.u_ts, tl, L, vec);
      ld_run(pd, drow, p.d_ts, tl, L, vec);
      float uf[IPL], xf[IPL];
      unpack(pu, uf);
      unpack(pd, xf);
#pragma unroll
      for (int i = 0; i < IPL; ++i) {
        const float x = xf[i] + dbias;
        const float v = p.softplus ? softplus_mufu(x) : x;
        dt[i] = tl + i < L ? v : 0.f;
        du[i] = dt[i] * uf[i];
        y[i] = 0.f;
      }
    }
    float dsum = 0.f;
#pragma unroll
    for (int i = 0; i < IPL; ++i) dsum += dt[i];
    asm volatile("" : "+f"(dsum));  // kept in a register: not re-summed in every state's iteration

#pragma unroll 1
    for (int s = 0; s < n; ++s) {
      const float a2 = a2c[s];
      const float carry = hc[s];
      Pack<T, IPL> pc, pbn;
      ld_run(pc, Cb + s * p.C_ss, p.C_ts, tl, L, bvec);
      if (s + 1 < n) ld_run(pbn, Bb + (s + 1) * p.B_ss, p.B_ts, tl, L, bvec);
      else zero_pack(pbn);

      float bf[IPL], ea[IPL], eb[IPL];
      unpack(pb, bf);
      float H = 0.f;
#pragma unroll
      for (int i = 0; i < IPL; ++i) {
        ea[i] = fast_exp2(dt[i] * a2);
        eb[i] = du[i] * bf[i];
        H = fmaf(ea[i], H, eb[i]);
      }
      float P = fast_exp2(dsum * a2);
      if (g == 0) H = fmaf(P, carry, H);
#pragma unroll
      for (int off = 1; off < G; off <<= 1) {
        const float Pu = __shfl_up_sync(FULL, P, off, G);
        const float Hu = __shfl_up_sync(FULL, H, off, G);
        if (g >= off) {
          H = fmaf(P, Hu, H);
          P *= Pu;
        }
      }
      float h = __shfl_up_sync(FULL, H, 1, G);
      if (g == 0) h = carry;
      if (g == G - 1) hc[s] = H;  // read again by lane 0 in the next chunk (after __syncwarp)

      float cf[IPL];
      unpack(pc, cf);
#pragma unroll
      for (int i = 0; i < IPL; ++i) {
        h = fmaf(ea[i], h, eb[i]);
        y[i] = fmaf(cf[i], h, y[i]);
      }
      pb = pbn;
    }
    __syncwarp();

    // u and z again (cache hits) rather than held through the state loop: registers.
    Pack<T, IPL> pu, pz;
    ld_run(pu, urow, p.u_ts, tl, L, vec);
    if (zrow) ld_run(pz, zrow, p.z_ts, tl, L, vec);
    float uf[IPL], zf[IPL];
    unpack(pu, uf);
    if (zrow) unpack(pz, zf);
    if (cok) st_run(yrow, p.y_ts, tl, L, vec, gate_run<T, IPL>(Dc, uf, y, zf, zrow != nullptr));
  }

  if (cok)
    for (int s = g; s < n; s += G)
      static_cast<float*>(p.ssm_state_out)[b * p.ho_bs + c * p.ho_cs + s * p.ho_ss] = hc[s];
}

constexpr int SSU_THREADS = 128;

template <typename T, int NP>
__device__ __forceinline__ void state_update(const ScanParams& p) {
  constexpr int SPT = 4, TPC = NP / SPT;
  const long long gid = (long long)blockIdx.x * SSU_THREADS + threadIdx.x;
  const long long row = gid / TPC;
  const int g = static_cast<int>(gid % TPC);
  const bool active = row < p.batch * p.dim;  // whole groups are active or not (TPC divides 32)
  const long long b = active ? row / p.dim : 0;
  const long long c = active ? row - b * p.dim : 0;
  const long long s0 = (long long)g * SPT;

  const float* __restrict__ Ap = static_cast<const float*>(p.A) + c * p.A_cs;
  const float* __restrict__ hp =
      p.ssm_state ? static_cast<const float*>(p.ssm_state) + b * p.h_bs + c * p.h_cs : nullptr;
  float* __restrict__ hop = static_cast<float*>(p.ssm_state_out) + b * p.ho_bs + c * p.ho_cs;
  // One 16-byte access per thread when the 4 states are contiguous and aligned (per-thread check).
  const bool vec = s0 + SPT <= p.dstate && p.A_ss == 1 && p.ho_ss == 1 && aligned16(Ap + s0) &&
                   aligned16(hop + s0) && (!hp || (p.h_ss == 1 && aligned16(hp + s0)));

  float a[SPT], h[SPT], bb[SPT], cc[SPT];
  float uv = 0.f, dt = 0.f;
  if (active) {
    uv = ld(static_cast<const T*>(p.u), b * p.u_bs + c * p.u_cs);
    dt = ld(static_cast<const T*>(p.delta), b * p.d_bs + c * p.d_cs);
    if (p.delta_bias) dt += static_cast<const float*>(p.delta_bias)[c * p.db_cs];
    if (p.softplus) dt = softplus(dt);
  }
  if (active && vec) {
    const float4 av = *reinterpret_cast<const float4*>(Ap + s0);
    a[0] = av.x; a[1] = av.y; a[2] = av.z; a[3] = av.w;
    if (hp) {
      const float4 hv = *reinterpret_cast<const float4*>(hp + s0);
      h[0] = hv.x; h[1] = hv.y; h[2] = hv.z; h[3] = hv.w;
    } else {
      h[0] = h[1] = h[2] = h[3] = 0.f;
    }
  } else {
#pragma unroll
    for (int j = 0; j < SPT; ++j) {
      const bool ok = active && s0 + j < p.dstate;
      a[j] = ok ? Ap[(s0 + j) * p.A_ss] : 0.f;
      h[j] = ok && hp ? hp[(s0 + j) * p.h_ss] : 0.f;
    }
  }
  const T* __restrict__ Bp = static_cast<const T*>(p.Bm) + b * p.B_bs;
  const T* __restrict__ Cp = static_cast<const T*>(p.Cm) + b * p.C_bs;
#pragma unroll
  for (int j = 0; j < SPT; ++j) {
    const bool ok = active && s0 + j < p.dstate;
    bb[j] = ok ? ld(Bp, (s0 + j) * p.B_ss) : 0.f;
    cc[j] = ok ? ld(Cp, (s0 + j) * p.C_ss) : 0.f;
  }

  const float dtu = dt * uv;
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < SPT; ++j) {
    h[j] = fmaf(fast_exp2(dt * a[j] * LOG2E), h[j], dtu * bb[j]);
    acc = fmaf(cc[j], h[j], acc);
  }
#pragma unroll
  for (int off = TPC / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);

  if (!active) return;
  if (vec) {
    *reinterpret_cast<float4*>(hop + s0) = make_float4(h[0], h[1], h[2], h[3]);
  } else {
#pragma unroll
    for (int j = 0; j < SPT; ++j)
      if (s0 + j < p.dstate) hop[(s0 + j) * p.ho_ss] = h[j];
  }
  if (g == 0) {
    float out = acc;
    if (p.D) out = fmaf(static_cast<const float*>(p.D)[c * p.D_cs], uv, out);
    if (p.z) out *= silu(ld(static_cast<const T*>(p.z), b * p.z_bs + c * p.z_cs));
    static_cast<T*>(p.y)[b * p.y_bs + c * p.y_cs] = from_float<T>(out);
  }
}

}  // namespace mrt

// Entry points, instantiated per (dtype, NP) by the compile layer (compiler.py appends one
// MRT_SCAN_ENTRIES line). Flat ones: TensorRT ahead-of-time plugin order (input pointers, scalars,
// output pointers), contiguous tensors. *_strided: the params struct by value. Launch configuration:
// launcher.scan_launch_config.
#define MRT_SCAN_FLAT_ARGS(T)                                                                      \
  const T *u, const T *delta, const float *A, const T *Bm, const T *Cm, const float *D, const T *z, \
      const float *delta_bias, const float *ssm_state, int batch, int dim, int seqlen, int dstate,  \
      int delta_softplus, T *y, float *ssm_state_out
#define MRT_SCAN_FLAT_PARAMS(L)                                                                    \
  mrt::scan_contiguous(u, delta, A, Bm, Cm, D, z, delta_bias, ssm_state, batch, dim, L, dstate,    \
                       delta_softplus, y, ssm_state_out)
// The warp-specialized scan's entry (n <= 16 only: WsCfg).
#define MRT_SCAN_WS_ENTRY(TAG, T, NP)                                                              \
  extern "C" __global__ void __launch_bounds__(mrt::WsCfg<NP, sizeof(T)>::MAX_THREADS, 2)            \
      mrt_selective_scan_ws_fwd_##TAG##_n##NP(MRT_SCAN_FLAT_ARGS(T)) {                             \
    mrt::scan_fwd_ws<T, NP>(MRT_SCAN_FLAT_PARAMS(seqlen));                                         \
  }
#define MRT_SCAN_WS_ENTRY_8(TAG, T) MRT_SCAN_WS_ENTRY(TAG, T, 8)
#define MRT_SCAN_WS_ENTRY_16(TAG, T) MRT_SCAN_WS_ENTRY(TAG, T, 16)
#define MRT_SCAN_WS_ENTRY_32(TAG, T)
#define MRT_SCAN_WS_ENTRY_64(TAG, T)
#define MRT_SCAN_ENTRIES(TAG, T, NP)                                                               \
  extern "C" __global__ void __launch_bounds__(mrt::ScanCfg<NP>::MAX_THREADS, mrt::ScanCfg<NP>::MIN_BLOCKS) \
      mrt_selective_scan_fwd_##TAG##_n##NP(MRT_SCAN_FLAT_ARGS(T)) {                                \
    mrt::scan_fwd<T, NP, false>(MRT_SCAN_FLAT_PARAMS(seqlen));                                     \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(mrt::ScanCfg<NP>::MAX_THREADS, mrt::ScanCfg<NP>::MIN_BLOCKS) \
      mrt_selective_scan_fwd_strided_##TAG##_n##NP(const __grid_constant__ mrt::ScanParams p) {    \
    mrt::scan_fwd<T, NP, false>(p);                                                                \
  }                                                                                                \
  MRT_SCAN_WS_ENTRY_##NP(TAG, T)                                                                   \
  extern "C" __global__ void __launch_bounds__(mrt::ScanCfg<NP, true>::MAX_THREADS, mrt::ScanCfg<NP, true>::MIN_BLOCKS) \
      mrt_selective_scan_wide_fwd_##TAG##_n##NP(MRT_SCAN_FLAT_ARGS(T)) {                           \
    mrt::scan_fwd<T, NP, true>(MRT_SCAN_FLAT_PARAMS(seqlen));                                      \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(mrt::ScanCfg<NP, true>::MAX_THREADS, mrt::ScanCfg<NP, true>::MIN_BLOCKS) \
      mrt_selective_scan_wide_fwd_strided_##TAG##_n##NP(const __grid_constant__ mrt::ScanParams p) { \
    mrt::scan_fwd<T, NP, true>(p);                                                                 \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(mrt::TpCfg<NP>::THREADS, mrt::TpCfg<NP>::MINB)     \
      mrt_selective_scan_tp_fwd_##TAG##_n##NP(MRT_SCAN_FLAT_ARGS(T)) {                             \
    mrt::scan_fwd_tp<T, NP>(MRT_SCAN_FLAT_PARAMS(seqlen));                                         \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(mrt::TpCfg<NP>::THREADS, mrt::TpCfg<NP>::MINB)     \
      mrt_selective_scan_tp_fwd_strided_##TAG##_n##NP(const __grid_constant__ mrt::ScanParams p) { \
    mrt::scan_fwd_tp<T, NP>(p);                                                                    \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(mrt::SSU_THREADS)                                  \
      mrt_selective_state_update_##TAG##_n##NP(MRT_SCAN_FLAT_ARGS(T)) {                            \
    mrt::state_update<T, NP>(MRT_SCAN_FLAT_PARAMS(1));                                             \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(mrt::SSU_THREADS)                                  \
      mrt_selective_state_update_strided_##TAG##_n##NP(const __grid_constant__ mrt::ScanParams p) { \
    mrt::state_update<T, NP>(p);                                                                   \
  }
