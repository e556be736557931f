// Residual search over Q codebooks, CUDA SIMT kernel (the stage rule of
// csrc/cuda/search.cu, spec in vqkernels/reference/search.py):
//   r_0 = z,  i_q = argmin_k ||r_q - e^q_k||^2 (lowest k on ties),  r_(q+1) = r_q - e^q[i_q]
//   out = sum_q e^q[i_q]   (fp32 residual and sum, out in z's dtype)
// A thread owns one row and keeps its residual and sum in registers through
// every stage; the block stages each codebook's tiles in shared memory. Unlike
// nearest_code it cannot split codes across blocks (a stage needs the last
// one's winner), so a block holds fewer rows to fill the GPU. D <= 64.
#include <cuda_runtime.h>

#include "common/search.h"
#include "dispatch.cuh"
#include "kernels.h"

namespace vqkernels::cuda {
namespace {

constexpr int kRows = 64;    // threads per block, one row each
constexpr int kCodes = 32;   // codes per shared-memory tile

// Grid: row blocks. Exact distances in fp32 FMA in increasing d, as
// nearest_code_search_kernel (D zero padded to DC: (0 - 0)^2 adds nothing).
// FLOPs 3 N D sum_q K_q; bytes: z and out N D s, indices 8 N Q, the codebooks
// once per block (L2), each winner's code once per row and stage.
template <typename T, int DC>
__global__ void __launch_bounds__(kRows)
    residual_search_kernel(const T* __restrict__ z, const T* __restrict__ books,
                           ResidualStages stages, int64_t n, int64_t dim,
                           int64_t* __restrict__ indices, T* __restrict__ out) {
  __shared__ __align__(16) float tile[kCodes * DC];
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRows) + threadIdx.x;
  const bool active = row < n;
  float residual[DC], sum[DC];
#pragma unroll
  for (int c = 0; c < DC; ++c) {
    residual[c] = (active && c < dim) ? to_float(z[row * dim + c]) : 0.0f;
    sum[c] = 0.0f;
  }
  for (int q = 0; q < stages.count; ++q) {
    const T* codes = books + stages.start[q] * dim;
    const int64_t k = stages.start[q + 1] - stages.start[q];
    float best = INFINITY;
    uint32_t best_k = 0;
    for (int64_t k0 = 0; k0 < k; k0 += kCodes) {
      __syncthreads();  // the previous tile is consumed
      for (int i = threadIdx.x; i < kCodes * DC; i += kRows) {
        const int64_t kk = k0 + i / DC, dd = i % DC;
        tile[i] = (kk < k && dd < dim) ? to_float(codes[kk * dim + dd]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kCodes; ++j) {
        float acc = 0.0f;
#pragma unroll
        for (int c = 0; c < DC; c += 4) {
          const float4 t = *reinterpret_cast<const float4*>(&tile[j * DC + c]);  // broadcast
          float diff = residual[c] - t.x;
          acc = fmaf(diff, diff, acc);
          diff = residual[c + 1] - t.y;
          acc = fmaf(diff, diff, acc);
          diff = residual[c + 2] - t.z;
          acc = fmaf(diff, diff, acc);
          diff = residual[c + 3] - t.w;
          acc = fmaf(diff, diff, acc);
        }
        if (k0 + j < k) common::update_best(acc, static_cast<uint32_t>(k0 + j), best, best_k);
      }
    }
    if (active) {
      const T* code = codes + best_k * dim;
#pragma unroll
      for (int c = 0; c < DC; ++c) {
        const float e = c < dim ? to_float(code[c]) : 0.0f;
        residual[c] -= e;
        sum[c] += e;
      }
      indices[row * stages.count + q] = best_k;
    }
  }
  if (active) {
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      if (c < dim) out[row * dim + c] = from_float<T>(sum[c]);
    }
  }
}

template <typename T, int DC>
cudaError_t launch(const T* z, const T* books, const ResidualStages& stages, int64_t n,
                   int64_t dim, int64_t* indices, T* out, cudaStream_t stream) {
  const int64_t blocks = (n + kRows - 1) / kRows;
  if (blocks > 0x7FFFFFFFLL) return cudaErrorInvalidConfiguration;
  residual_search_kernel<T, DC><<<static_cast<unsigned>(blocks), kRows, 0, stream>>>(
      z, books, stages, n, dim, indices, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_residual_nearest_code(const void* z, const void* books,
                                         const ResidualStages& stages, DType dtype, int64_t n,
                                         int64_t dim, int64_t* indices, void* out,
                                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (dim < 1 || dim > kResidualMaxDim || stages.count < 1 || stages.count > kMaxResidualStages) {
    return cudaErrorInvalidValue;
  }
  for (int q = 0; q < stages.count; ++q) {
    const int64_t k = stages.start[q + 1] - stages.start[q];
    if (k < 1 || k > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  }
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* zt = static_cast<const T*>(z);
    const T* bt = static_cast<const T*>(books);
    T* ot = static_cast<T*>(out);
    if (dim <= 8) return launch<T, 8>(zt, bt, stages, n, dim, indices, ot, stream);
    if (dim <= 16) return launch<T, 16>(zt, bt, stages, n, dim, indices, ot, stream);
    if (dim <= 32) return launch<T, 32>(zt, bt, stages, n, dim, indices, ot, stream);
    return launch<T, 64>(zt, bt, stages, n, dim, indices, ot, stream);
  };
  return dispatch_gpu_float(dtype, run);
}

}  // namespace vqkernels::cuda
