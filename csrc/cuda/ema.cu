// EMA codebook update, CUDA kernels (math in csrc/common/ema.h, spec in
// vqkernels/reference/ema.py). Rows whose index is outside [0, K) are skipped
// in-kernel: nothing is checked on the host (no sync), nothing is written out
// of bounds. Statistics in one pass over z, either atomic (fast; the fp32
// summation order varies between runs) or sorted (deterministic: the same
// sequential sums on every run, GPU and grid, as the C++ CPU kernel). Then one
// block updates cluster_size and reduces the total in fp64 in a fixed tree, and
// one thread per (code, column) updates embed_sum and writes the codebook.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/ema.h"
#include "dispatch.cuh"
#include "kernels.h"

namespace vqkernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kClusterThreads = 1024;  // one block; a power of two for the tree

// One thread per element of z: atomicAdd into sums (fp32) and the u64 counts.
// Bytes: N D s read, N D fp32 atomics, N u64 atomics.
template <typename T, typename I>
__global__ void code_stats_atomic_kernel(const T* __restrict__ z, const I* __restrict__ indices,
                                         int64_t n, int64_t k, int64_t dim,
                                         unsigned long long* __restrict__ counts,
                                         float* __restrict__ sums) {
  const int64_t work = n * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < work;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / dim, col = i - row * dim;
    const I code = indices[row];
    if (!common::is_valid_code(code, k)) continue;
    atomicAdd(sums + static_cast<int64_t>(code) * dim + col, to_float(z[i]));
    if (col == 0) atomicAdd(counts + code, 1ULL);
  }
}

// First position in sorted[0, n) whose value is >= value.
__device__ __forceinline__ int64_t lower_bound(const int64_t* __restrict__ sorted, int64_t n,
                                               int64_t value) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < value) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Rows sorted stably by code (by the launcher): one thread per (code,
// column) finds its code's segment by binary search and sums its rows in row
// order. Bytes: N D s gathered (coalesced across columns), 8 N row ids per column.
template <typename T>
__global__ void code_stats_sorted_kernel(const T* __restrict__ z,
                                         const int64_t* __restrict__ sorted_codes,
                                         const int64_t* __restrict__ order, int64_t n, int64_t k,
                                         int64_t dim, unsigned long long* __restrict__ counts,
                                         float* __restrict__ sums) {
  const int64_t work = k * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < work;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t code = i / dim, col = i - code * dim;
    const int64_t begin = lower_bound(sorted_codes, n, code);
    const int64_t end = lower_bound(sorted_codes, n, code + 1);
    float acc = 0.0f;
#pragma unroll 4
    for (int64_t j = begin; j < end; ++j) acc += to_float(z[order[j] * dim + col]);
    sums[i] = acc;
    if (col == 0) counts[code] = static_cast<unsigned long long>(end - begin);
  }
}

__global__ void counts_to_float_kernel(const unsigned long long* __restrict__ counts,
                                       float* __restrict__ out, int64_t k) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<float>(counts[i]);
  }
}

// One block: cluster_size's moving average and the total of its debiased sizes.
template <typename Count>
__device__ void ema_cluster_block(float* __restrict__ cluster_size,
                                  const Count* __restrict__ counts, int64_t k,
                                  const common::EmaParams& p, float* __restrict__ total) {
  __shared__ double partial[kClusterThreads];
  double sum = 0.0;
  for (int64_t c = threadIdx.x; c < k; c += kClusterThreads) {
    const float size = common::ema_mix(cluster_size[c], static_cast<float>(counts[c]), p);
    cluster_size[c] = size;
    sum += common::ema_debiased(size, p);
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kClusterThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *total = static_cast<float>(partial[0]);
}

template <typename Count>
__global__ void __launch_bounds__(kClusterThreads)
    ema_cluster_kernel(float* __restrict__ cluster_size, const Count* __restrict__ counts,
                       int64_t k, common::EmaParams p, float* __restrict__ total) {
  ema_cluster_block(cluster_size, counts, k, p, total);
}

// The embed sums and codebook rows of one codebook, in a grid-stride loop over its K D
// elements. Bytes of the update (this and ema_cluster_block): 12 K + K D (12 + s).
template <typename C>
__device__ void ema_codebook_elements(float* __restrict__ embed_sum, const float* __restrict__ sums,
                                      const float* __restrict__ cluster_size,
                                      C* __restrict__ codebook, const float* __restrict__ total_ptr,
                                      int64_t k, int64_t dim, const common::EmaParams& p) {
  const float total = *total_ptr;
  const int64_t work = k * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < work;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t code = i / dim;
    const float smoothed =
        common::ema_smoothed_size(common::ema_debiased(cluster_size[code], p), total, p);
    const float e = common::ema_mix(embed_sum[i], sums[i], p);
    embed_sum[i] = e;
    if (common::ema_code_is_updated(smoothed)) {
      codebook[i] = from_float<C>(common::ema_code_value(e, smoothed, p));
    }
  }
}

template <typename C>
__global__ void ema_codebook_kernel(float* __restrict__ embed_sum, const float* __restrict__ sums,
                                    const float* __restrict__ cluster_size, C* __restrict__ codebook,
                                    const float* __restrict__ total_ptr, int64_t k, int64_t dim,
                                    common::EmaParams p) {
  ema_codebook_elements(embed_sum, sums, cluster_size, codebook, total_ptr, k, dim, p);
}

// Stage q's parameters: K_q eps rounded from double, as make_ema_params rounds it.
__device__ common::EmaParams stage_params(common::EmaParams p, const EmaStages& stages, int q) {
  p.k_eps = static_cast<float>(static_cast<double>(stages.stage[q].k) * stages.eps);
  return p;
}

// Every stage of a residual quantizer in two launches: block q updates stage q's
// cluster sizes and total, then blocks (x, q) its embed sums and codebook.
__global__ void __launch_bounds__(kClusterThreads)
    ema_cluster_stages_kernel(EmaStages stages, common::EmaParams p, float* __restrict__ totals) {
  const EmaStage& stage = stages.stage[blockIdx.x];
  ema_cluster_block(stage.cluster_size, stage.counts, stage.k, stage_params(p, stages, blockIdx.x),
                    totals + blockIdx.x);
}

template <typename C>
__global__ void ema_codebook_stages_kernel(EmaStages stages, common::EmaParams p,
                                           const float* __restrict__ totals) {
  const EmaStage& stage = stages.stage[blockIdx.y];
  ema_codebook_elements(stage.embed_sum, stage.sums, stage.cluster_size,
                        static_cast<C*>(stage.codebook), totals + blockIdx.y, stage.k, stages.dim,
                        stage_params(p, stages, blockIdx.y));
}

template <typename F>
cudaError_t dispatch_index(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Int32: return f(int32_t{});
    case DType::Int64: return f(int64_t{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_code_stats(const void* z, DType z_dtype, const void* indices,
                              DType index_dtype, int64_t n, int64_t k, int64_t dim,
                              const int64_t* sorted_codes, const int64_t* order,
                              unsigned long long* counts, float* sums, cudaStream_t stream) {
  if (k < 1 || dim < 1 || n < 0) return cudaErrorInvalidValue;
  const bool sorted = sorted_codes != nullptr;
  if (sorted && order == nullptr) return cudaErrorInvalidValue;
  if (!sorted || n == 0) {  // atomics add into zeros; an empty batch is all zeros
    cudaError_t err = cudaMemsetAsync(counts, 0, static_cast<size_t>(k) * sizeof(*counts), stream);
    if (err != cudaSuccess) return err;
    err = cudaMemsetAsync(sums, 0, static_cast<size_t>(k * dim) * sizeof(*sums), stream);
    if (err != cudaSuccess || n == 0) return err;
  }
  return dispatch_gpu_float(z_dtype, [&](auto z_tag) {
    using T = decltype(z_tag);
    const T* zt = static_cast<const T*>(z);
    if (sorted) {
      code_stats_sorted_kernel<T><<<blocks_for(k * dim, kThreads), kThreads, 0, stream>>>(
          zt, sorted_codes, order, n, k, dim, counts, sums);
      return cudaGetLastError();
    }
    return dispatch_index(index_dtype, [&](auto index_tag) {
      using I = decltype(index_tag);
      code_stats_atomic_kernel<T, I><<<blocks_for(n * dim, kThreads), kThreads, 0, stream>>>(
          zt, static_cast<const I*>(indices), n, k, dim, counts, sums);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_counts_to_float(const unsigned long long* counts, float* out, int64_t k,
                                   cudaStream_t stream) {
  if (k < 1) return cudaErrorInvalidValue;
  counts_to_float_kernel<<<blocks_for(k, kThreads), kThreads, 0, stream>>>(counts, out, k);
  return cudaGetLastError();
}

cudaError_t launch_ema_finalize(float* cluster_size, float* embed_sum, void* codebook,
                                DType codebook_dtype, const void* counts, DType counts_dtype,
                                const float* sums, int64_t k, int64_t dim,
                                const common::EmaParams& params, float* total,
                                cudaStream_t stream) {
  if (k < 1 || dim < 1) return cudaErrorInvalidValue;
  cudaError_t err;
  switch (counts_dtype) {  // Int64: the u64 counts of launch_code_stats
    case DType::Int64:
      ema_cluster_kernel<<<1, kClusterThreads, 0, stream>>>(
          cluster_size, static_cast<const unsigned long long*>(counts), k, params, total);
      break;
    case DType::Float32:
      ema_cluster_kernel<<<1, kClusterThreads, 0, stream>>>(
          cluster_size, static_cast<const float*>(counts), k, params, total);
      break;
    default: return cudaErrorInvalidValue;
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return dispatch_gpu_float(codebook_dtype, [&](auto tag) {
    using C = decltype(tag);
    ema_codebook_kernel<C><<<blocks_for(k * dim, kThreads), kThreads, 0, stream>>>(
        embed_sum, sums, cluster_size, static_cast<C*>(codebook), total, k, dim, params);
    return cudaGetLastError();
  });
}

cudaError_t launch_ema_finalize_stages(const EmaStages& stages, DType codebook_dtype,
                                       const common::EmaParams& params, float* totals,
                                       cudaStream_t stream) {
  if (stages.count < 1 || stages.count > kMaxEmaStages || stages.dim < 1) {
    return cudaErrorInvalidValue;
  }
  int64_t most = 0;
  for (int q = 0; q < stages.count; ++q) {
    if (stages.stage[q].k < 1) return cudaErrorInvalidValue;
    most = std::max(most, stages.stage[q].k * stages.dim);
  }
  ema_cluster_stages_kernel<<<stages.count, kClusterThreads, 0, stream>>>(stages, params, totals);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return dispatch_gpu_float(codebook_dtype, [&](auto tag) {
    const dim3 grid(static_cast<unsigned>(blocks_for(most, kThreads)), stages.count);
    ema_codebook_stages_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(stages, params,
                                                                            totals);
    return cudaGetLastError();
  });
}

}  // namespace vqkernels::cuda
