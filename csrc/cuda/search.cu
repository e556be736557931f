// Nearest-codebook search, CUDA SIMT kernel (result rule and math in
// csrc/common/search.h):
//   indices[n]   = argmin_k ||z_n - e_k||^2     (lowest k on ties)
//   distances[n] = ||z_n - e_indices[n]||^2     (exact)
// It ranks by the exact distance (no ||e||^2, no cancellation), in fp32 FMA for
// every precision mode; fp16 / bf16 are converted on load. Three launches on
// the caller's stream: init the packed (score, k) keys, search (an atomicMin
// per row and code split, merged in a fixed order so the result does not depend
// on timing), finalize. Memory beyond inputs and outputs: the keys, 8 N bytes.
#include <cuda_runtime.h>

#include "common/search.h"
#include "dispatch.cuh"
#include "kernels.h"

namespace vqkernels::cuda {
namespace {

constexpr int kRows = 128;   // threads per block, one row each
constexpr int kCodes = 32;   // codes per shared-memory tile
constexpr int kChunk = 32;   // dims per chunk when D > 64 (z streamed from L1/L2)
constexpr int kMinTilesPerSplit = 4;

struct ToFloat {
  template <typename T>
  __device__ __forceinline__ float operator()(T x) const { return to_float(x); }
};

// keys[n] = search_key(+inf, 0). Bytes 8 N.
__global__ void init_keys_kernel(unsigned long long* __restrict__ keys, int64_t n) {
  const unsigned long long init = common::initial_search_key();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    keys[i] = init;
  }
}

// Grid (row blocks, code splits). A thread owns one row of z; the block stages
// a tile of kCodes codes x DC dims of the codebook in shared memory (fp32); each
// thread accumulates its row's exact distances to the tile in registers in
// increasing d (chunks zero padded: (0 - 0)^2 adds nothing) and keeps a running
// (min, argmin) in increasing k; one atomicMin per row and split merges them.
// FLOPs 3 N K D; bytes: z N D (once per split when D <= 64, else once per code
// tile, from L1/L2), codebook ceil(N / kRows) K D, keys 8 N.
// DC: dims per chunk (a multiple of 4, for float4 shared-memory reads).
// kOneChunk: D <= DC, so the row of z stays in registers for the whole split.
template <typename T, int DC, bool kOneChunk>
__global__ void __launch_bounds__(kRows)
    nearest_code_search_kernel(const T* __restrict__ z, const T* __restrict__ e, int64_t n,
                               int64_t k, int64_t dim, int64_t codes_per_split,
                               unsigned long long* __restrict__ keys) {
  __shared__ __align__(16) float tile[kCodes * DC];
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRows) + threadIdx.x;
  const bool active = row < n;
  const T* z_row = z + (active ? row : 0) * dim;
  const int64_t k_begin = blockIdx.y * codes_per_split;
  const int64_t k_end = k_begin + codes_per_split < k ? k_begin + codes_per_split : k;

  float zr[DC];
  if constexpr (kOneChunk) {
#pragma unroll
    for (int c = 0; c < DC; ++c) zr[c] = (active && c < dim) ? to_float(z_row[c]) : 0.0f;
  }
  float best = INFINITY;
  uint32_t best_k = 0;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kCodes) {
    float acc[kCodes];
#pragma unroll
    for (int j = 0; j < kCodes; ++j) acc[j] = 0.0f;
    for (int64_t d0 = 0; d0 < dim; d0 += DC) {
      __syncthreads();  // the previous tile is consumed
      for (int i = threadIdx.x; i < kCodes * DC; i += kRows) {
        const int64_t kk = k0 + i / DC, dd = d0 + i % DC;
        tile[i] = (kk < k_end && dd < dim) ? to_float(e[kk * dim + dd]) : 0.0f;
      }
      if constexpr (!kOneChunk) {
#pragma unroll
        for (int c = 0; c < DC; ++c)
          zr[c] = (active && d0 + c < dim) ? to_float(z_row[d0 + c]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kCodes; ++j) {
#pragma unroll
        for (int c = 0; c < DC; c += 4) {
          const float4 t = *reinterpret_cast<const float4*>(&tile[j * DC + c]);  // broadcast
          float diff = zr[c] - t.x;
          acc[j] = fmaf(diff, diff, acc[j]);
          diff = zr[c + 1] - t.y;
          acc[j] = fmaf(diff, diff, acc[j]);
          diff = zr[c + 2] - t.z;
          acc[j] = fmaf(diff, diff, acc[j]);
          diff = zr[c + 3] - t.w;
          acc[j] = fmaf(diff, diff, acc[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kCodes; ++j) {
      if (k0 + j < k_end) common::update_best(acc[j], static_cast<uint32_t>(k0 + j), best, best_k);
    }
  }
  if (active) {
    atomicMin(keys + row, static_cast<unsigned long long>(common::search_key(best, best_k)));
  }
}

// indices[n] = k of keys[n]; distances[n] = the exact distance to that code,
// recomputed (a NaN row keeps index 0, distance NaN). Bytes 2 N D + 12 N.
template <typename T>
__global__ void finalize_kernel(const T* __restrict__ z, const T* __restrict__ e,
                                const unsigned long long* __restrict__ keys, int64_t n,
                                int64_t dim, int64_t* __restrict__ indices,
                                float* __restrict__ distances) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t best = common::search_key_index(keys[i]);
    indices[i] = best;
    distances[i] = common::squared_distance<float>(z + i * dim, e + best * dim, dim, ToFloat{});
  }
}

template <typename T, int DC, bool kOneChunk>
cudaError_t launch_search(const T* z, const T* e, int64_t n, int64_t k, int64_t dim,
                          unsigned long long* keys, cudaStream_t stream) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  // Split the codes across blocks until the grid fills the GPU ~8 times over,
  // keeping at least kMinTilesPerSplit tiles per split.
  const int64_t row_blocks = (n + kRows - 1) / kRows;
  const int64_t tiles = (k + kCodes - 1) / kCodes;
  int64_t splits = (8LL * sms + row_blocks - 1) / row_blocks;
  splits = splits < tiles / kMinTilesPerSplit ? splits : tiles / kMinTilesPerSplit;
  splits = splits < 65535 ? (splits > 1 ? splits : 1) : 65535;
  const int64_t codes_per_split = (tiles + splits - 1) / splits * kCodes;
  splits = (k + codes_per_split - 1) / codes_per_split;
  if (row_blocks > 0x7FFFFFFFLL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits));
  nearest_code_search_kernel<T, DC, kOneChunk>
      <<<grid, kRows, 0, stream>>>(z, e, n, k, dim, codes_per_split, keys);
  return cudaGetLastError();
}

template <typename T>
cudaError_t search_by_dim(const T* z, const T* e, int64_t n, int64_t k, int64_t dim,
                          unsigned long long* keys, cudaStream_t stream) {
  if (dim <= 4) return launch_search<T, 4, true>(z, e, n, k, dim, keys, stream);
  if (dim <= 8) return launch_search<T, 8, true>(z, e, n, k, dim, keys, stream);
  if (dim <= 16) return launch_search<T, 16, true>(z, e, n, k, dim, keys, stream);
  if (dim <= 32) return launch_search<T, 32, true>(z, e, n, k, dim, keys, stream);
  if (dim <= 64) return launch_search<T, 64, true>(z, e, n, k, dim, keys, stream);
  return launch_search<T, kChunk, false>(z, e, n, k, dim, keys, stream);
}

}  // namespace

cudaError_t launch_nearest_code(const void* z, const void* codebook, DType dtype, int64_t n,
                                int64_t k, int64_t dim, unsigned long long* keys,
                                int64_t* indices, float* distances, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (k < 1 || k > (int64_t{1} << 30) || dim < 1) return cudaErrorInvalidValue;
  constexpr int kThreads = 256;
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* zt = static_cast<const T*>(z);
    const T* et = static_cast<const T*>(codebook);
    init_keys_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(keys, n);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    err = search_by_dim(zt, et, n, k, dim, keys, stream);
    if (err != cudaSuccess) return err;
    finalize_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(zt, et, keys, n, dim,
                                                                          indices, distances);
    return cudaGetLastError();
  };
  return dispatch_gpu_float(dtype, run);
}

}  // namespace vqkernels::cuda
