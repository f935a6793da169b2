// Shared device helpers for mamba-rt's kernels.
//
// Self-contained on purpose: no CUDA, torch or TensorRT header is included, so NVRTC compiles these
// files with no include path at all (CI compiles them on a machine with no GPU and no CUDA toolkit).
// fp16 / bf16 values are carried as their 16-bit patterns and converted with single PTX
// instructions (cvt.*.f16 / cvt.rn.bf16.f32, sm_80+), which is what cuda_fp16.h / cuda_bf16.h
// would emit anyway.
#pragma once

namespace mrt {

struct half_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(half_t v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
}
__device__ __forceinline__ float to_float(bf16_t v) {
  return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ half_t from_float<half_t>(float f) {
  half_t v;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v.bits) : "f"(f));
  return v;
}
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float f) {
  bf16_t v;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v.bits) : "f"(f));
  return v;
}

// Element i of a strided array of T, as float.
template <typename T>
__device__ __forceinline__ float ld(const T* __restrict__ p, long long i) { return to_float(p[i]); }

// 2^x on the special-function unit (MUFU.EX2; relative error about 2^-22). The scan's hot loop uses
// it as exp(dt * A) = 2^(dt * A * log2(e)) with A * log2(e) precomputed once per state.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

constexpr float LOG2E = 1.4426950408889634f;

// torch.nn.functional.softplus with beta 1, threshold 20.
__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

// The same two functions on the special-function unit, for the kernels where they run once per
// (channel, step) (the sequence kernels and the conv decode update): about 8 instructions each instead of ~30 (expf + log1pf / an IEEE division).
// mufu_lg2: lg2.approx (absolute error ~2^-22 on [0.5, 2]); mufu_rcp: rcp.approx (~1 ulp).
__device__ __forceinline__ float mufu_lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float mufu_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

constexpr float LN2 = 0.6931471805599453f;

// softplus (beta 1, threshold 20) as max(x, 0) + log1p(e), e = 2^(-|x| log2 e) in [0, 1], with log1p(e) =
// e Q(e) and Q a degree-8 polynomial fitted to log1p(e) / e on [0, 1] (error < 3e-8): one MUFU operation
// (ex2) and nine FMA-pipe ones. Relative error of the result (fp32 emulation against float64, exact ex2):
// < 4e-7 from x = -5 up (the Horner steps' rounding), ~1e-6 below (x log2 e's rounding, as in any ex2 form);
// the ln2 lg2(1 + e) form with a series below e = 2^-4 it replaces (two MUFU operations and as many FMA-pipe
// ones) reached 3e-6 at x in [-5, -1]. Above ~17 the e Q(e) term is below half an ulp of x, so the result
// is x, as torch's threshold of 20 gives. A NaN x gives NaN (e is NaN), -inf gives 0, +inf gives +inf.
__device__ __forceinline__ float softplus_mufu(float x) {
  const float e = fast_exp2(fabsf(x) * -LOG2E);
  float q = 0.005383691750466824f;
  q = fmaf(q, e, -0.030109023675322533f);
  q = fmaf(q, e, 0.07920673489570618f);
  q = fmaf(q, e, -0.13746197521686554f);
  q = fmaf(q, e, 0.1914486587047577f);
  q = fmaf(q, e, -0.2485286444425583f);
  q = fmaf(q, e, 0.3332032859325409f);
  q = fmaf(q, e, -0.49999552965164185f);
  q = fmaf(q, e, 1.f);
  return fmaf(e, q, fmaxf(x, 0.f));
}

// x * sigmoid(x); for x < -88, 2^(-x log2 e) is +inf, its reciprocal 0 and the result -0.
__device__ __forceinline__ float silu_mufu(float x) {
  return x * mufu_rcp(1.f + fast_exp2(-x * LOG2E));
}

template <typename T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<bf16_t> { static constexpr bool value = true; };

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0ull;
}

// Shared-memory mbarriers (sm_80+; the wait suspends in hardware on sm_90+, polls before).
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(unsigned long long* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Until the phase of `parity` (0 / 1) has completed.
__device__ __forceinline__ void mbar_wait(const void* bar, unsigned parity) {
#if __CUDA_ARCH__ >= 900
  asm volatile("{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}\n"
               ::"r"(smem_addr(bar)), "r"(parity) : "memory");
#else
  asm volatile("{\n .reg .pred p;\n W: mbarrier.test_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}\n"
               ::"r"(smem_addr(bar)), "r"(parity) : "memory");
#endif
}

}  // namespace mrt
