// CausalConv1d (DESIGN.md "The two custom ops"): depthwise causal convolution with a carried state.
//
//   x [B, d, L], weight [d, K], bias [d] (optional), conv_state [B, d, K-1] (optional: zeros)
//   -> y [B, d, L], conv_state_out [B, d, K-1]
//   y[b, c, t] = act(bias[c] + sum_j weight[c, j] * xt[b, c, t + j]),  xt = cat(conv_state, x) in time
//   conv_state_out = the last K-1 columns of xt.
//
// Two kernels, one params struct:
//   conv_fwd    any L >= 1. One thread per (b, c, run of CONV_ITEMS consecutive outputs); the thread
//               keeps a sliding window of K-1+CONV_ITEMS inputs in registers, so each input is read
//               from memory once (the K-1 inputs before a run come from the previous lane by shuffle,
//               from memory only at a row's or a warp's first run). Threads of a warp cover
//               consecutive runs of one row, so loads and stores are coalesced along time. Index
//               math in 32 bits where it fits.
//               conv_state_out must not overlap conv_state when L > CONV_ITEMS (the launcher checks).
//   conv_update L == 1, the decode step: one thread per (b, c). Reads its whole state before writing,
//               so conv_state_out may be conv_state (in-place update).
// T is the activation dtype of x, weight, bias, conv_state, y and conv_state_out; arithmetic is fp32;
// silu on the special-function unit (silu_mufu, common.cuh).
#include "common.cuh"

namespace mrt {

struct ConvParams {  // mirrored field for field by launcher._ConvParams (all 8-byte fields)
  const void* x;
  const void* weight;
  const void* bias;        // may be null
  const void* conv_state;  // may be null (zeros)
  void* y;
  void* conv_state_out;
  long long batch, dim, seqlen, silu;
  long long x_bs, x_cs, x_ts;   // element strides of x over (batch, channel, time)
  long long w_cs, w_ks;         // weight over (channel, tap)
  long long b_cs;               // bias over channel
  long long s_bs, s_cs, s_ks;   // conv_state over (batch, channel, tap)
  long long y_bs, y_cs, y_ts;
  long long so_bs, so_cs, so_ks;
};

#ifndef MRT_CONV_ITEMS  // outputs per thread (a compile-time knob for experiments; launcher.CONV_ITEMS)
#define MRT_CONV_ITEMS 16
#endif
constexpr int CONV_THREADS = 128;
constexpr int CONV_ITEMS = MRT_CONV_ITEMS;

// q = n / d, r = n - q d; in 32 bits when both fit (a 64-bit division is a ~70-instruction routine).
__device__ __forceinline__ void divmod(long long n, long long d, long long& q, long long& r) {
  if (((unsigned long long)n | (unsigned long long)d) >> 32 == 0) {
    const unsigned q32 = (unsigned)n / (unsigned)d;
    q = q32;
    r = (unsigned)n - q32 * (unsigned)d;
  } else {
    q = n / d;
    r = n - q * d;
  }
}

// One thread's run of CONV_ITEMS values of T, viewable as 16-byte vectors.
template <typename T>
union Run {
  static constexpr int NV = CONV_ITEMS * sizeof(T) / 16;
  uint4 v[NV];
  T e[CONV_ITEMS];
};

__device__ __forceinline__ ConvParams conv_contiguous(
    const void* x, const void* weight, const void* bias, const void* conv_state, int batch, int dim,
    int seqlen, int width, int silu, void* y, void* conv_state_out) {
  ConvParams p;
  p.x = x; p.weight = weight; p.bias = bias; p.conv_state = conv_state;
  p.y = y; p.conv_state_out = conv_state_out;
  p.batch = batch; p.dim = dim; p.seqlen = seqlen; p.silu = silu;
  p.x_bs = (long long)dim * seqlen; p.x_cs = seqlen; p.x_ts = 1;
  p.w_cs = width; p.w_ks = 1;
  p.b_cs = 1;
  p.s_bs = (long long)dim * (width - 1); p.s_cs = width - 1; p.s_ks = 1;
  p.y_bs = p.x_bs; p.y_cs = p.x_cs; p.y_ts = 1;
  p.so_bs = p.s_bs; p.so_cs = p.s_cs; p.so_ks = 1;
  return p;
}

template <typename T, int K>
__device__ __forceinline__ void conv_fwd(const ConvParams& p) {
  static_assert(CONV_ITEMS >= K - 1, "the halo comes from the previous run");
  const long long nruns = (p.seqlen + CONV_ITEMS - 1) / CONV_ITEMS;
  const long long total = p.batch * p.dim * nruns;
  const unsigned lane = threadIdx.x & 31;
  const long long gid0 = (long long)blockIdx.x * CONV_THREADS + threadIdx.x;
  if (gid0 - lane >= total) return;  // whole warps only: the halo shuffle below needs every lane
  // lanes past the end redo the last run and store nothing
  const bool valid = gid0 < total;
  const long long gid = valid ? gid0 : total - 1;
  long long row, run, b, c;
  divmod(gid, nruns, row, run);
  divmod(row, p.dim, b, c);

  const T* __restrict__ x = static_cast<const T*>(p.x) + b * p.x_bs + c * p.x_cs;
  const T* __restrict__ st =
      p.conv_state ? static_cast<const T*>(p.conv_state) + b * p.s_bs + c * p.s_cs : nullptr;
  const T* __restrict__ wp = static_cast<const T*>(p.weight) + c * p.w_cs;
  float w[K];
#pragma unroll
  for (int j = 0; j < K; ++j) w[j] = ld(wp, j * p.w_ks);
  const float bias = p.bias ? ld(static_cast<const T*>(p.bias), c * p.b_cs) : 0.f;

  // win[i] holds x at time t0 - (K-1) + i; negative times come from the carried state.
  const long long t0 = run * CONV_ITEMS;
  float win[K - 1 + CONV_ITEMS];
  // Whole, 16-byte aligned runs of a time-contiguous row are read (and written) as 16-byte vectors.
  T* __restrict__ y = static_cast<T*>(p.y) + b * p.y_bs + c * p.y_cs;
  const bool vec = p.x_ts == 1 && p.y_ts == 1 && t0 + CONV_ITEMS <= p.seqlen && aligned16(x + t0) &&
                   aligned16(y + t0);
  if (vec) {
    Run<T> r;
#pragma unroll
    for (int k = 0; k < Run<T>::NV; ++k) r.v[k] = reinterpret_cast<const uint4*>(x + t0)[k];
#pragma unroll
    for (int i = 0; i < CONV_ITEMS; ++i) win[K - 1 + i] = to_float(r.e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < CONV_ITEMS; ++i) win[K - 1 + i] = t0 + i < p.seqlen ? ld(x, (t0 + i) * p.x_ts) : 0.f;
  }
  // The K-1 inputs before the run: the end of the previous lane's run when that lane holds this row's
  // previous run (the usual case: consecutive lanes take consecutive runs), else from memory.
#pragma unroll
  for (int j = 0; j < K - 1; ++j) win[j] = __shfl_up_sync(0xffffffffu, win[CONV_ITEMS + j], 1);
  if (lane == 0 || run == 0) {
#pragma unroll
    for (int j = 0; j < K - 1; ++j) {
      const long long t = t0 - (K - 1) + j;
      float v = 0.f;
      if (t >= 0) v = ld(x, t * p.x_ts);
      else if (st) v = ld(st, (t + K - 1) * p.s_ks);
      win[j] = v;
    }
  }
  // The last run also produces the final state: xt[L + j], j < K-1. Read before any write.
  const bool last = valid && run == nruns - 1;
  float fin[K - 1];
#pragma unroll
  for (int j = 0; j < K - 1; ++j) {
    fin[j] = 0.f;
    if (last) {
      const long long t = p.seqlen + j - (K - 1);
      if (t >= 0) fin[j] = ld(x, t * p.x_ts);
      else if (st) fin[j] = ld(st, (p.seqlen + j) * p.s_ks);
    }
  }

  Run<T> out;
#pragma unroll
  for (int i = 0; i < CONV_ITEMS; ++i) {
    float acc = bias;
#pragma unroll
    for (int j = 0; j < K; ++j) acc = fmaf(w[j], win[i + j], acc);
    if (p.silu) acc = silu_mufu(acc);
    out.e[i] = from_float<T>(acc);
  }
  if (!valid) {
  } else if (vec) {
#pragma unroll
    for (int k = 0; k < Run<T>::NV; ++k) reinterpret_cast<uint4*>(y + t0)[k] = out.v[k];
  } else {
#pragma unroll
    for (int i = 0; i < CONV_ITEMS; ++i)
      if (t0 + i < p.seqlen) y[(t0 + i) * p.y_ts] = out.e[i];
  }
  if (last) {
    T* __restrict__ so = static_cast<T*>(p.conv_state_out) + b * p.so_bs + c * p.so_cs;
#pragma unroll
    for (int j = 0; j < K - 1; ++j) so[j * p.so_ks] = from_float<T>(fin[j]);
  }
}

template <typename T, int K>
__device__ __forceinline__ void conv_update(const ConvParams& p) {
  const long long row = (long long)blockIdx.x * CONV_THREADS + threadIdx.x;
  if (row >= p.batch * p.dim) return;
  long long b, c;
  divmod(row, p.dim, b, c);
  const T* __restrict__ st =
      p.conv_state ? static_cast<const T*>(p.conv_state) + b * p.s_bs + c * p.s_cs : nullptr;
  const T* __restrict__ wp = static_cast<const T*>(p.weight) + c * p.w_cs;
  float win[K];
#pragma unroll
  for (int j = 0; j < K - 1; ++j) win[j] = st ? ld(st, j * p.s_ks) : 0.f;
  win[K - 1] = ld(static_cast<const T*>(p.x), b * p.x_bs + c * p.x_cs);
  float acc = p.bias ? ld(static_cast<const T*>(p.bias), c * p.b_cs) : 0.f;
#pragma unroll
  for (int j = 0; j < K; ++j) acc = fmaf(ld(wp, j * p.w_ks), win[j], acc);
  if (p.silu) acc = silu_mufu(acc);
  static_cast<T*>(p.y)[b * p.y_bs + c * p.y_cs] = from_float<T>(acc);
  T* __restrict__ so = static_cast<T*>(p.conv_state_out) + b * p.so_bs + c * p.so_cs;
#pragma unroll
  for (int j = 0; j < K - 1; ++j) so[j * p.so_ks] = from_float<T>(win[j + 1]);
}

}  // namespace mrt

// Entry points, instantiated per (dtype, width) by the compile layer (compiler.py appends one
// MRT_CONV_ENTRIES line). The flat ones take arguments in TensorRT's ahead-of-time plugin order
// (input pointers, scalars, output pointers) and assume contiguous tensors; the *_strided ones take
// the params struct by value. Launch configuration: launcher.conv_launch_config.
#define MRT_CONV_ENTRIES(TAG, T, K)                                                                \
  extern "C" __global__ void __launch_bounds__(mrt::CONV_THREADS)                                 \
      mrt_causal_conv1d_fwd_##TAG##_k##K(const T* x, const T* weight, const T* bias,               \
                                         const T* conv_state, int batch, int dim, int seqlen,      \
                                         int silu, T* y, T* conv_state_out) {                      \
    mrt::conv_fwd<T, K>(mrt::conv_contiguous(x, weight, bias, conv_state, batch, dim, seqlen, K,   \
                                             silu, y, conv_state_out));                            \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(mrt::CONV_THREADS)                                 \
      mrt_causal_conv1d_fwd_strided_##TAG##_k##K(const __grid_constant__ mrt::ConvParams p) {      \
    mrt::conv_fwd<T, K>(p);                                                                        \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(mrt::CONV_THREADS)                                 \
      mrt_causal_conv1d_update_##TAG##_k##K(const T* x, const T* weight, const T* bias,            \
                                            const T* conv_state, int batch, int dim, int seqlen,   \
                                            int silu, T* y, T* conv_state_out) {                   \
    mrt::conv_update<T, K>(mrt::conv_contiguous(x, weight, bias, conv_state, batch, dim, 1, K,     \
                                                silu, y, conv_state_out));                         \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(mrt::CONV_THREADS)                                 \
      mrt_causal_conv1d_update_strided_##TAG##_k##K(const __grid_constant__ mrt::ConvParams p) {   \
    mrt::conv_update<T, K>(p);                                                                     \
  }
