// SelectiveScan (DESIGN.md "The two custom ops"): Mamba-1's S6 recurrence with a carried state.
//
//   u, delta, z [B, d, L] (z optional); A [d, n] fp32; Bm, Cm [B, n, L]; D, delta_bias [d] fp32
//   (optional); ssm_state [B, d, n] fp32 (optional: zeros) -> y [B, d, L], ssm_state_out [B, d, n] fp32
//   dt = softplus(delta + delta_bias)   (softplus only when the flag is set)
//   h_t = exp(dt_t A) * h_{t-1} + dt_t Bm_t u_t ;  y_t = (Cm_t . h_t + D u_t) * silu(z_t)
//
// NP is n rounded up to 8, 16, 32 or 64; states past n are padding (A = B = C = 0, so h stays 0).
// Each thread owns SPT consecutive states of one (b, c) (ScanCfg); TPC = NP / SPT threads share a
// channel.
//
//   scan_fwd     any L >= 1. A block owns CPB channels of one batch row and walks the whole sequence
//                in chunks of TCH steps, so L is unbounded (65,537 tokens in one call) and the state
//                never leaves registers. Per chunk: the chunk's u, delta, z, Bm, Cm were prefetched into
//                registers during the previous chunk (global-load latency hidden behind compute), are
//                staged into shared memory (dt = softplus(delta + bias) computed once per (c, t), not
//                once per state), the recurrence runs from shared memory (one MUFU.EX2 per state and
//                step: the kernel is bound by the special-function unit, see benchmarks/NOTES.md)
//                and leaves each thread's partial Cm . h per step in shared memory; then the thread
//                that loaded u and z sums the partials and writes y, coalesced along time.
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

template <int NP>
struct ScanCfg {
  // States per thread: 2 up to n = 16, so a d = 5120, batch-1 prefill still has ~10 warps per SM
  // to hide latency with (the recurrence is sequential in time; parallelism is d * n / SPT).
  static constexpr int SPT = NP <= 16 ? 2 : 4;
  static constexpr int TPC = NP / SPT;                          // threads per channel: 4, 8, 8, 16
  static constexpr int THREADS = 128;
  static constexpr int CPB = THREADS / TPC;                     // channels per block: 32, 16, 16, 8
  static constexpr int TCH = NP == 64 ? 16 : 32;                // steps per chunk
  static constexpr int E = CPB * TCH / THREADS;                 // (c, t) staged per thread: 8,4,4,1
  static constexpr int BCE = NP * TCH / THREADS;                // (s, t) of Bm (and Cm) per thread
  static constexpr int TP = TCH + 1;                            // padded rows: no bank conflicts
  static constexpr int NPP = NP + 4;                            // padded, keeps 16-byte alignment
  // Partial sums Cm . h of the TPC threads of a channel, yp[g][lc][t], one plane per g; planes are
  // offset so the TPC threads of a channel land in different banks.
  static constexpr int YPLANE = CPB * TP + ((32 / TPC) - (CPB * TP) % 32 + 32) % 32;
  static_assert(CPB * TCH % THREADS == 0 && NP * TCH % THREADS == 0, "staging must tile");
  static_assert(THREADS % TCH == 0, "a block must cover whole time rows");
};

// SPT consecutive floats from shared memory as one 4-, 8- or 16-byte access.
template <int SPT>
__device__ __forceinline__ void lds_vec(const float* p, float (&v)[SPT]) {
  if constexpr (SPT == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
  } else if constexpr (SPT == 2) {
    const float2 q = *reinterpret_cast<const float2*>(p);
    v[0] = q.x; v[1] = q.y;
  } else {
    static_assert(SPT == 1, "SPT is 1, 2 or 4");
    v[0] = *p;
  }
}

template <typename T, int NP>
__device__ __forceinline__ void scan_fwd(const ScanParams& p) {
  using Cfg = ScanCfg<NP>;
  constexpr int SPT = Cfg::SPT, TPC = Cfg::TPC, CPB = Cfg::CPB, THREADS = Cfg::THREADS;
  constexpr int TCH = Cfg::TCH, E = Cfg::E, BCE = Cfg::BCE, TP = Cfg::TP, NPP = Cfg::NPP;
  __shared__ float2 dtu_s[CPB][TP];  // (dt, dt * u) per (channel, step): one 8-byte load per step
  __shared__ float yp[TPC * Cfg::YPLANE];
  __shared__ __align__(16) float B_s[TCH][NPP];
  __shared__ __align__(16) float C_s[TCH][NPP];

  const int tid = threadIdx.x;
  const long long b = blockIdx.y;
  const long long c0 = (long long)blockIdx.x * CPB;
  const T* __restrict__ u = static_cast<const T*>(p.u) + b * p.u_bs;
  const T* __restrict__ delta = static_cast<const T*>(p.delta) + b * p.d_bs;
  const T* __restrict__ z = p.z ? static_cast<const T*>(p.z) + b * p.z_bs : nullptr;
  const T* __restrict__ Bm = static_cast<const T*>(p.Bm) + b * p.B_bs;
  const T* __restrict__ Cm = static_cast<const T*>(p.Cm) + b * p.C_bs;
  const float* __restrict__ Dp = static_cast<const float*>(p.D);
  const float* __restrict__ dbp = static_cast<const float*>(p.delta_bias);

  // Recurrence mapping: local channel lc, states g*SPT .. g*SPT+SPT-1.
  const int lc = tid / TPC, g = tid % TPC;
  const long long c = c0 + lc;
  float h[SPT], a2[SPT];
#pragma unroll
  for (int j = 0; j < SPT; ++j) {
    const long long s = g * SPT + j;
    const bool ok = c < p.dim && s < p.dstate;
    a2[j] = ok ? static_cast<const float*>(p.A)[c * p.A_cs + s * p.A_ss] * LOG2E : 0.f;
    h[j] = ok && p.ssm_state
               ? static_cast<const float*>(p.ssm_state)[b * p.h_bs + c * p.h_cs + s * p.h_ss]
               : 0.f;
  }

  // Staging mapping: element e of this thread is (channel c0 + sc0 + e * CSTEP, time t0 + st) for
  // u, delta, z and y, and (state sc0 + e * CSTEP, time t0 + st) for Bm and Cm: consecutive threads
  // touch consecutive times, so global accesses are coalesced along time.
  constexpr int CSTEP = THREADS / TCH;
  const int st = tid % TCH, sc0 = tid / TCH;
  const long long cs0 = c0 + sc0;
  float nu[E], nd[E], nz[E], nb[BCE], nc[BCE];
  auto prefetch = [&](long long t0) {
    const long long t = t0 + st;
    const bool tok = t < p.seqlen;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const long long cc = cs0 + e * CSTEP;
      const bool ok = tok && cc < p.dim;
      nu[e] = ok ? ld(u, cc * p.u_cs + t * p.u_ts) : 0.f;
      nd[e] = ok ? ld(delta, cc * p.d_cs + t * p.d_ts) : 0.f;
      nz[e] = ok && z ? ld(z, cc * p.z_cs + t * p.z_ts) : 0.f;
    }
#pragma unroll
    for (int e = 0; e < BCE; ++e) {
      const int s = sc0 + e * CSTEP;
      const bool ok = tok && s < p.dstate;
      nb[e] = ok ? ld(Bm, s * p.B_ss + t * p.B_ts) : 0.f;
      nc[e] = ok ? ld(Cm, s * p.C_ss + t * p.C_ts) : 0.f;
    }
  };

  prefetch(0);
  for (long long t0 = 0; t0 < p.seqlen; t0 += TCH) {
    float cu[E], cz[E];
    const bool tok = t0 + st < p.seqlen;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int sc = sc0 + e * CSTEP;
      const long long cc = c0 + sc;
      const bool ok = tok && cc < p.dim;
      float dt = nd[e] + (dbp && cc < p.dim ? dbp[cc * p.db_cs] : 0.f);
      if (p.softplus) dt = softplus(dt);
      dt = ok ? dt : 0.f;  // padding steps: exp(0) = 1 and no input, so h passes through unchanged
      dtu_s[sc][st] = make_float2(dt, dt * nu[e]);
      cu[e] = nu[e];
      cz[e] = nz[e];
    }
#pragma unroll
    for (int e = 0; e < BCE; ++e) {
      const int s = sc0 + e * CSTEP;
      B_s[st][s] = nb[e];
      C_s[st][s] = nc[e];
    }
    __syncthreads();
    if (t0 + TCH < p.seqlen) prefetch(t0 + TCH);

    // The recurrence: no cross-thread traffic inside the chunk (each thread stores its partial
    // Cm . h per step), so the fully unrolled steps' loads and exponentials overlap freely and
    // only the FMA on h is serial.
    float* __restrict__ ypg = yp + g * Cfg::YPLANE + lc * TP;
#pragma unroll
    for (int t = 0; t < TCH; ++t) {
      const float2 q = dtu_s[lc][t];
      const float dt = q.x, dtu = q.y;
      float bb[SPT], cc[SPT];
      lds_vec<SPT>(&B_s[t][g * SPT], bb);
      lds_vec<SPT>(&C_s[t][g * SPT], cc);
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < SPT; ++j) {
        h[j] = fmaf(fast_exp2(dt * a2[j]), h[j], dtu * bb[j]);
        acc = fmaf(cc[j], h[j], acc);
      }
      ypg[t] = acc;
    }
    __syncthreads();

    T* __restrict__ y = static_cast<T*>(p.y) + b * p.y_bs;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int sc = sc0 + e * CSTEP;
      const long long cc = c0 + sc, t = t0 + st;
      if (cc < p.dim && t < p.seqlen) {
        float out = 0.f;
#pragma unroll
        for (int k = 0; k < TPC; ++k) out += yp[k * Cfg::YPLANE + sc * TP + st];
        if (Dp) out = fmaf(Dp[cc * p.D_cs], cu[e], out);
        if (z) out *= silu(cz[e]);
        y[cc * p.y_cs + t * p.y_ts] = from_float<T>(out);
      }
    }
    // The next chunk's staging writes dtu_s/B_s/C_s, which this chunk's recurrence finished
    // reading before the barrier above; yp is rewritten only after the next staging barrier.
  }

#pragma unroll
  for (int j = 0; j < SPT; ++j) {
    const long long s = g * SPT + j;
    if (c < p.dim && s < p.dstate)
      static_cast<float*>(p.ssm_state_out)[b * p.ho_bs + c * p.ho_cs + s * p.ho_ss] = h[j];
  }
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
#define MRT_SCAN_ENTRIES(TAG, T, NP)                                                               \
  extern "C" __global__ void __launch_bounds__(mrt::ScanCfg<NP>::THREADS)                         \
      mrt_selective_scan_fwd_##TAG##_n##NP(MRT_SCAN_FLAT_ARGS(T)) {                                \
    mrt::scan_fwd<T, NP>(MRT_SCAN_FLAT_PARAMS(seqlen));                                            \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(mrt::ScanCfg<NP>::THREADS)                         \
      mrt_selective_scan_fwd_strided_##TAG##_n##NP(const __grid_constant__ mrt::ScanParams p) {    \
    mrt::scan_fwd<T, NP>(p);                                                                       \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(mrt::SSU_THREADS)                                  \
      mrt_selective_state_update_##TAG##_n##NP(MRT_SCAN_FLAT_ARGS(T)) {                            \
    mrt::state_update<T, NP>(MRT_SCAN_FLAT_PARAMS(1));                                             \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(mrt::SSU_THREADS)                                  \
      mrt_selective_state_update_strided_##TAG##_n##NP(const __grid_constant__ mrt::ScanParams p) { \
    mrt::state_update<T, NP>(p);                                                                   \
  }
