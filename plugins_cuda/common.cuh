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

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0ull;
}

}  // namespace mrt
