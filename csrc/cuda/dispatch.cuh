#pragma once
// Maps a runtime DType to a CUDA element type (the CUDA twin of AT_DISPATCH),
// and converts element types to and from float. The conversions are explicit
// because torch builds with __CUDA_NO_HALF_CONVERSIONS__.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/dtype.h"

namespace vqkernels::cuda {

template <typename T>
__device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }

// The 16-bit types convert through their intrinsics (round to nearest even).
#define VQK_FLOAT_CONVERSIONS(T, TO_FLOAT, FROM_FLOAT)                                \
  template <>                                                                         \
  __device__ __forceinline__ float to_float(T x) { return TO_FLOAT(x); }              \
  template <>                                                                         \
  __device__ __forceinline__ T from_float(float x) { return FROM_FLOAT(x); }
VQK_FLOAT_CONVERSIONS(__half, __half2float, __float2half_rn)
VQK_FLOAT_CONVERSIONS(__nv_bfloat16, __bfloat162float, __float2bfloat16_rn)
#undef VQK_FLOAT_CONVERSIONS

template <typename F>
cudaError_t dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

// The element types of the GPU kernels (float64 is CPU-only there).
template <typename F>
cudaError_t dispatch_gpu_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename F>
cudaError_t dispatch_float_or_int(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Int32: return f(int32_t{});
    case DType::Int64: return f(int64_t{});
    default: return dispatch_float(dtype, f);
  }
}

inline int blocks_for(int64_t work, int threads, int64_t max_blocks = 65535LL * 16) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks < max_blocks ? blocks : max_blocks));
}

}  // namespace vqkernels::cuda
