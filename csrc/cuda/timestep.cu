// Sinusoidal timestep embedding, CUDA kernel (math in csrc/common/timestep.h).
//
// One thread per (row, frequency): a sincosf and two coalesced stores. The
// kernel is store-bound: N * dim * sizeof(out) bytes written, N * sizeof(t)
// read; at (N=256, dim=256, fp32) that is 256 KiB, a ~0.1 us floor at
// 3 TB/s, so launch latency dominates and one launch is the whole win.
#include "common/timestep.h"
#include "dispatch.cuh"
#include "kernels.h"

namespace vqkernels::cuda {
namespace {

template <typename T, typename Out>
__global__ void timestep_embedding_kernel(const T* __restrict__ t, Out* __restrict__ out,
                                          int64_t n, common::TimestepParams p) {
  // Columns per row handled by threads: the frequencies, plus one for the
  // zero column of an odd dim.
  const int64_t work_cols = p.half + (p.dim & 1);
  const int64_t total = n * work_cols;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / work_cols;
    const int i = static_cast<int>(idx - row * work_cols);
    Out* out_row = out + row * p.dim;
    if (i == p.half) {
      out_row[p.dim - 1] = from_float<Out>(0.0f);
      continue;
    }
    float s, c;
    sincosf(common::timestep_argument(to_float(t[row]), i, p), &s, &c);
    out_row[common::cos_column(i, p)] = from_float<Out>(c);
    out_row[common::sin_column(i, p)] = from_float<Out>(s);
  }
}

}  // namespace

cudaError_t launch_timestep_embedding(const void* t, DType t_dtype, void* out, DType out_dtype,
                                      int64_t n, const common::TimestepParams& params,
                                      cudaStream_t stream) {
  const int64_t work = n * (params.half + (params.dim & 1));
  if (work == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  return dispatch_float_or_int(t_dtype, [&](auto t_tag) {
    using T = decltype(t_tag);
    return dispatch_float(out_dtype, [&](auto out_tag) {
      using Out = decltype(out_tag);
      timestep_embedding_kernel<T, Out><<<blocks_for(work, kThreads), kThreads, 0, stream>>>(
          static_cast<const T*>(t), static_cast<Out*>(out), n, params);
      return cudaGetLastError();
    });
  });
}

}  // namespace vqkernels::cuda
