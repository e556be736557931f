#pragma once
// Raw-pointer launchers of the CUDA kernels. This header and the .cu files
// include no torch headers, which keeps nvcc fast; csrc/cuda/aten_ops.cpp
// turns tensors into these calls. Each launcher returns the launch status.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/timestep.h"

namespace vqkernels::cuda {

cudaError_t launch_timestep_embedding(const void* t, DType t_dtype, void* out, DType out_dtype,
                                      int64_t n, const common::TimestepParams& params,
                                      cudaStream_t stream);

// Nearest-codebook search of z (n, dim) against codebook (k, dim), both
// contiguous and of dtype (fp32 / fp16 / bf16); keys is an n-element scratch
// buffer. Writes indices (n,) and exact fp32 distances (n,).
cudaError_t launch_nearest_code(const void* z, const void* codebook, DType dtype, int64_t n,
                                int64_t k, int64_t dim, unsigned long long* keys,
                                int64_t* indices, float* distances, cudaStream_t stream);

}  // namespace vqkernels::cuda
