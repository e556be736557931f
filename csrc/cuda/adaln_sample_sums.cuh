#pragma once
// The per-sample parameter grads of the adaLN backward (adaln.cu): a block's register sums
// flushed in a fixed order, the samples split across blocks added up from their partial slots,
// and looped rows summed column by column. No atomics, so the sums are deterministic.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"
#include "row_groups.cuh"

namespace vqkernels::cuda {
namespace {

// An element's terms of the parameter grads from g and v = xhat (adaLN) or y (gated
// residual): (dshift, dscale) = (g, g xhat), or (dgate, -) = (g y, -).
__device__ __forceinline__ float2 param_grads(bool gated, float g, float v) {
  return make_float2(gated ? g * v : g, g * v);
}

// Offset of a block's partial per-sample sums: slot 0 holds the sample that began before the
// block, slot 1 the one that goes on after it; n is the grad (0: shift / gate, 1: scale).
__host__ __device__ constexpr int64_t partial_offset(int64_t block, int slot, int n, int64_t dim) {
  return ((block * 2 + slot) * 2 + n) * dim;
}

// The block's sums over its rows of sample b: its one-warp groups add theirs in order through
// shared memory; the last writes the grads if the block held all the sample's rows, else its
// partial slot (added up by sum_split_samples_kernel).
template <typename T, int kPack, int K>
__device__ void flush_sample_sums(const AdalnBackwardArgs& a, const float (&sums)[2][K][kPack],
                                  int64_t b, int64_t begin, int64_t end, int packs,
                                  float* partial) {
  __shared__ float carried[2][K * kWarp * kPack];  // used only when blockDim.x == kWarp
  const int64_t dim = a.shape.dim, tokens = a.shape.tokens;
  const bool whole = b * tokens >= begin && (b + 1) * tokens <= end;
  const int slot = b * tokens < begin ? 0 : 1;
  for (int y = 0; y < static_cast<int>(blockDim.y); ++y) {
    if (static_cast<int>(threadIdx.y) == y) {
      const bool last = y + 1 == static_cast<int>(blockDim.y);
      for_each_pack<K>(0, packs, [&](int k, int j) {
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          if (n == 1 && a.gated) break;
          T* out = static_cast<T*>(n == 0 ? a.param_grad : a.scale_grad) + b * dim;
#pragma unroll
          for (int e = 0; e < kPack; ++e) {
            const int c = (k * kWarp + static_cast<int>(threadIdx.x)) * kPack + e;
            const float s = sums[n][k][e] + (y > 0 ? carried[n][c] : 0.0f);
            if (!last) carried[n][c] = s;
            else if (whole) out[j * kPack + e] = from_float<T>(s);
            else partial[partial_offset(blockIdx.x, slot, n, dim) + j * kPack + e] = s;
          }
        }
      });
    }
    __syncthreads();
  }
}

// Per-sample grads of the samples split across blocks: block `first`'s slot 1, then slot 0 of
// each later block of the sample, in order. One thread per (sample, column); reads 8 bytes a
// split block and grad.
template <typename T>
__global__ void sum_split_samples_kernel(AdalnBackwardArgs a, int64_t rows_per_block,
                                         const float* __restrict__ partial) {
  const int64_t dim = a.shape.dim, tokens = a.shape.tokens, total = a.shape.batch * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / dim, col = i - b * dim;
    const int64_t first = b * tokens / rows_per_block;
    const int64_t last = ((b + 1) * tokens - 1) / rows_per_block;
    if (first == last) continue;  // that block wrote the sample's grads
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      if (n == 1 && a.gated) break;
      float s = partial[partial_offset(first, 1, n, dim) + col];
      for (int64_t block = first + 1; block <= last; ++block) {
        s += partial[partial_offset(block, 0, n, dim) + col];
      }
      static_cast<T*>(n == 0 ? a.param_grad : a.scale_grad)[i] = from_float<T>(s);
    }
  }
}

// Per-sample grads of looped rows (too long to sum in registers): one thread per (sample, pack
// of columns) adds them over T in order. Re-reads grad and input: 2 B T D elements.
template <typename T, int kPack>
__global__ void sum_columns_kernel(AdalnBackwardArgs a) {
  const int packs = static_cast<int>(a.shape.dim / kPack);
  const int64_t tokens = a.shape.tokens, total = a.shape.batch * packs;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / packs;
    const int j = static_cast<int>(i - b * packs);
    float sums[2][kPack] = {};
    for (int64_t t = 0; t < tokens; ++t) {
      const auto g = load_pack<kPack>(row_start<T>(a.grad, b, t), j);
      const auto in = load_pack<kPack>(row_start<T>(a.input, b, t), j);
      const int64_t row = b * tokens + t;
      const float mean = a.gated ? 0.0f : a.mean[row], rstd = a.gated ? 0.0f : a.rstd[row];
#pragma unroll
      for (int e = 0; e < kPack; ++e) {
        const float v = a.gated ? to_float(in.v[e]) : (to_float(in.v[e]) - mean) * rstd;
        const float2 terms = param_grads(a.gated, to_float(g.v[e]), v);
        sums[0][e] += terms.x;
        sums[1][e] += terms.y;
      }
    }
    Pack<T, kPack> first, second;
#pragma unroll
    for (int e = 0; e < kPack; ++e) {
      first.v[e] = from_float<T>(sums[0][e]);
      second.v[e] = from_float<T>(sums[1][e]);
    }
    store_pack(static_cast<T*>(a.param_grad) + b * a.shape.dim, j, first);
    if (!a.gated) store_pack(static_cast<T*>(a.scale_grad) + b * a.shape.dim, j, second);
  }
}

}  // namespace
}  // namespace vqkernels::cuda
