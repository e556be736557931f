#pragma once
// Rows of D owned by groups of threads, the machinery of the row-wise kernels (adaln.cu). A
// group is blockDim.x = 32w threads (w <= kMaxWarpsPerRow); a block runs blockDim.y one-warp
// groups, or one wider group. A thread holds K packs of its group's row (16 bytes each, or one
// element when the layout rules 16 out), j = tile + k * blockDim.x + threadIdx.x; group sums
// are xor-shuffles plus one shared-memory step. Host side: the group shape of a row, the
// compile-time dispatch to it, and a persistent grid of one wave.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "kernels.h"

namespace vqkernels::cuda {

constexpr int kWarp = 32;
constexpr int kMaxWarpsPerRow = 16;
constexpr int kMaxThreads = kWarp * kMaxWarpsPerRow;  // the launch bound of a row kernel
constexpr int kLoopedPacks = 4;  // packs a thread holds of each tile of a looped row

template <int N>
using IntC = std::integral_constant<int, N>;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
__device__ __forceinline__ const T* row_start(const StridedRows& rows, int64_t b, int64_t t) {
  return static_cast<const T*>(rows.data) + b * rows.batch_stride + t * rows.token_stride;
}

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* row, int j) {
  return reinterpret_cast<const Pack<T, N>*>(row)[j];
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* row, int j, const Pack<T, N>& p) {
  reinterpret_cast<Pack<T, N>*>(row)[j] = p;
}

// f(k, j) for this thread's packs j = tile + k * blockDim.x + threadIdx.x < packs.
template <int K, typename F>
__device__ __forceinline__ void for_each_pack(int tile, int packs, F&& f) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int j = tile + k * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
    if (j < packs) f(k, j);
  }
}

// Sums v over the row's group (the blockDim.x threads). Every thread gets the same bits: an
// xor butterfly adds the same pairs on both lanes, then each thread adds the warps in order.
template <int N>
__device__ __forceinline__ void group_sum(float (&v)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int lanes = kWarp / 2; lanes > 0; lanes /= 2) v[i] += __shfl_xor_sync(~0u, v[i], lanes);
  }
  if (blockDim.x == kWarp) return;
  __shared__ float warp_sums[kMaxWarpsPerRow][N];
  if (threadIdx.x % kWarp == 0) {
    for (int i = 0; i < N; ++i) warp_sums[threadIdx.x / kWarp][i] = v[i];
  }
  __syncthreads();
  for (int i = 0; i < N; ++i) {
    v[i] = 0.0f;
    for (int w = 0; w < static_cast<int>(blockDim.x) / kWarp; ++w) v[i] += warp_sums[w][i];
  }
  __syncthreads();  // before the next call overwrites warp_sums
}

// f(row) for this group's rows of [begin, end): every blockDim.y-th, from begin + threadIdx.y.
template <typename F>
__device__ __forceinline__ void for_group_rows(int64_t begin, int64_t end, F&& f) {
  for (int64_t first = begin; first < end; first += blockDim.y) {
    if (first + threadIdx.y < end) f(first + threadIdx.y);
  }
}

inline bool is_16_byte_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether every row of every tensor starts on a whole pack (those not given are null).
inline bool packs_fit(int64_t dim, int pack, std::initializer_list<StridedRows> inputs,
                      std::initializer_list<const void*> contiguous_outputs) {
  if (dim % pack != 0) return false;
  for (const StridedRows& r : inputs) {
    if (r.data && !(is_16_byte_aligned(r.data) && r.batch_stride % pack == 0 &&
                    r.token_stride % pack == 0)) {
      return false;
    }
  }
  for (const void* p : contiguous_outputs) {
    if (p && !is_16_byte_aligned(p)) return false;
  }
  return true;
}

struct RowShape {
  int warps, packs_per_thread;
  bool looped;
};

// The fewest warps whose threads hold a row of `packs` in at most max_packs each (7 rounds up
// to a compiled 8), else kMaxWarpsPerRow warps looping over tiles.
inline RowShape row_shape(int64_t packs, int max_packs) {
  for (int warps = 1; warps <= kMaxWarpsPerRow; ++warps) {
    const int64_t needed = ceil_div(packs, int64_t{kWarp} * warps);
    if (needed <= max_packs) return {warps, needed == 7 ? 8 : static_cast<int>(needed), false};
  }
  return {kMaxWarpsPerRow, kLoopedPacks, true};
}

// launch(pack, packs per thread, looped, shape), the first three compile-time: 16-byte packs
// when `fit` (1-element ones otherwise) and the row shape of kRowBytes a thread.
template <typename T, int kRowBytes, typename F>
cudaError_t dispatch_row_kernel(int64_t dim, bool fit, F&& launch) {
  const auto with_pack = [&](auto pack) -> cudaError_t {
    constexpr int kPack = decltype(pack)::value;
    constexpr int kMaxK = std::clamp(kRowBytes / static_cast<int>(sizeof(T) * kPack), 1, 8);
    const RowShape shape = row_shape(dim / kPack, kMaxK);
    if (shape.looped) return launch(pack, IntC<kLoopedPacks>{}, std::true_type{}, shape);
    cudaError_t err = cudaErrorInvalidValue;
    const auto try_k = [&](auto k) {
      if constexpr (decltype(k)::value <= kMaxK) {
        if (shape.packs_per_thread == decltype(k)::value) {
          err = launch(pack, k, std::false_type{}, shape);
        }
      }
    };
    (try_k(IntC<1>{}), try_k(IntC<2>{}), try_k(IntC<3>{}), try_k(IntC<4>{}), try_k(IntC<5>{}),
     try_k(IntC<6>{}), try_k(IntC<8>{}));
    return err;
  };
  return fit ? with_pack(IntC<static_cast<int>(16 / sizeof(T))>{}) : with_pack(IntC<1>{});
}

struct Grid {
  dim3 block;
  int blocks = 0;
  int64_t rows_per_block = 0;
};

// One wave of resident blocks, each a contiguous range of rows (balanced to a row). A block
// is one group of `shape.warps` warps, or rows_at_once one-warp groups.
template <typename Kernel>
cudaError_t plan_grid(Kernel kernel, const RowShape& shape, int64_t rows, int rows_at_once,
                      Grid* grid) {
  const dim3 block(kWarp * shape.warps, shape.warps == 1 ? rows_at_once : 1);
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block.x * block.y, 0);
  }
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorLaunchOutOfResources;
  const int64_t blocks = min64(ceil_div(rows, block.y), int64_t{per_sm} * sms);
  grid->block = block;
  grid->rows_per_block = ceil_div(rows, blocks);
  grid->blocks = static_cast<int>(ceil_div(rows, grid->rows_per_block));
  return cudaSuccess;
}

}  // namespace vqkernels::cuda
