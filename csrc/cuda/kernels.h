#pragma once
// Raw-pointer launchers of the CUDA kernels. This header and the .cu files
// include no torch headers, which keeps nvcc fast; csrc/cuda/aten_ops.cpp
// turns tensors into these calls. Each launcher returns the launch status.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/ddim.h"
#include "common/dtype.h"
#include "common/ema.h"
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

// EMA statistics (csrc/cuda/ema.cu) of z (n, dim) [fp32 / fp16 / bf16] grouped
// by indices (n,) [Int32 / Int64]; rows whose index is outside [0, k) are
// skipped. Writes all of counts (k,) u64 and sums (k, dim) fp32.
// sorted_codes == nullptr: atomics (fast; the order of the fp32 additions
// varies). Otherwise deterministic: sorted_codes (n,) the indices sorted stably
// with out-of-range ones mapped to k, and order (n,) their rows.
cudaError_t launch_code_stats(const void* z, DType z_dtype, const void* indices,
                              DType index_dtype, int64_t n, int64_t k, int64_t dim,
                              const int64_t* sorted_codes, const int64_t* order,
                              unsigned long long* counts, float* sums, cudaStream_t stream);

// out[i] = counts[i] as fp32, i < k.
cudaError_t launch_counts_to_float(const unsigned long long* counts, float* out, int64_t k,
                                   cudaStream_t stream);

// The EMA finalize (csrc/common/ema.h) in place on cluster_size (k,), embed_sum
// (k, dim) fp32 and codebook (k, dim) [fp32 / fp16 / bf16], from counts (k,)
// [Int64: the u64 counts of launch_code_stats, or Float32] and sums (k, dim)
// fp32; total is a one-float scratch.
cudaError_t launch_ema_finalize(float* cluster_size, float* embed_sum, void* codebook,
                                DType codebook_dtype, const void* counts, DType counts_dtype,
                                const float* sums, int64_t k, int64_t dim,
                                const common::EmaParams& params, float* total,
                                cudaStream_t stream);

// One fused DDIM step (csrc/cuda/ddim.cu); pointers as csrc/common/ddim.h,
// sample (and noise, prev, x0) of sample_dtype, cond / uncond of output_dtype.
cudaError_t launch_ddim_step(const common::DdimPointers& ptr, DType sample_dtype, DType output_dtype,
                             int64_t b, int64_t m, const common::DdimParams& params,
                             cudaStream_t stream);

}  // namespace vqkernels::cuda
