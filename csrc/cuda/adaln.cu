// adaLN-Zero glue of a DiT block, CUDA kernels (math in csrc/common/adaln.h, spec in
// vqkernels/reference/adaln.py). Memory-bound, so a row is read once and kept in registers by
// a group of 32w threads (csrc/cuda/row_groups.cuh), in 16-byte packs when D, pointers and
// strides allow; the variance is two-pass on the registers; longer rows loop over tiles (L2).
// bf16 D = 1152: the forward runs a warp a row (5 packs a thread, 4 rows a block), the backward
// 3 warps a row (2 packs). One wave of blocks, each a contiguous range of rows; per-sample
// parameter grads sum in registers, then over blocks in a fixed order (no atomics).
// H200 floor (4.3 TB/s), bf16 (B, T, D) = (256, 256, 1152) | (32, 1024, 1152), 151 | 75 MB a
// tensor: layer_norm_modulate (x -> h) 70 | 35 us; fused step (x, y -> x_new, h) 140 | 70 us;
// backward (g, x -> dx) 105 | 53 us, with grad_x_new 140 | 70 us; gated residual forward and
// backward 105 | 53 us. 6-13 FLOP an element (0.5-1 GFLOP a call): far below the compute roof.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/adaln.h"
#include "dispatch.cuh"
#include "kernels.h"
#include "adaln_sample_sums.cuh"
#include "row_groups.cuh"

namespace vqkernels::cuda {
namespace {

constexpr int kRowsPerBlock = 4;  // one-warp rows a block works on at once
// Bytes of each row tensor a thread takes on. The forward keeps the row (as floats once
// summed), the backward gs, xhat and two per-sample sums: 4 floats an element. ptxas, sm_90,
// bf16: forward 5 packs 82 registers, backward 2 packs 128 (32 bytes spilled), no stack.
constexpr int kForwardRowBytes = 128;
constexpr int kBackwardRowBytes = 32;
constexpr int kSumThreads = 256;

// One row of launch_adaln_forward. The row sits in v from the first pass on, unless kLooped:
// then it spans tiles of K * blockDim.x packs, each re-read by every pass.
template <typename T, int kPack, int K, bool kLooped>
__device__ __forceinline__ void forward_row(const AdalnForwardArgs& a, int64_t row, int packs) {
  const int64_t dim = a.shape.dim, b = row / a.shape.tokens, t = row - b * a.shape.tokens;
  const bool residual = a.gate.data != nullptr;
  const T* x = row_start<T>(a.x, b, t);
  T* x_new = residual ? static_cast<T*>(a.x_new) + row * dim : nullptr;
  const T* normalized = residual ? x_new : x;  // this thread wrote the x_new it re-reads
  const int step = K * static_cast<int>(blockDim.x);
  Pack<T, kPack> v[K];
  float sum[1] = {0.0f};
  for (int tile = 0; tile < packs; tile += step) {
    for_each_pack<K>(tile, packs, [&](int k, int j) {
      v[k] = load_pack<kPack>(x, j);
      if (residual) {
        const auto gate = load_pack<kPack>(row_start<T>(a.gate, b, t), j);
        const auto y = load_pack<kPack>(row_start<T>(a.y, b, t), j);
#pragma unroll
        for (int e = 0; e < kPack; ++e) {
          v[k].v[e] = from_float<T>(common::gated_residual(to_float(v[k].v[e]),
                                                           to_float(gate.v[e]), to_float(y.v[e])));
        }
        store_pack(x_new, j, v[k]);
      }
#pragma unroll
      for (int e = 0; e < kPack; ++e) sum[0] += to_float(v[k].v[e]);
    });
  }
  if (a.h == nullptr) return;  // the gated residual alone
  const auto reload = [&](int tile) {
    if constexpr (kLooped) {
      for_each_pack<K>(tile, packs, [&](int k, int j) { v[k] = load_pack<kPack>(normalized, j); });
    }
  };
  group_sum(sum);
  const float mean = sum[0] / static_cast<float>(dim);
  float squares[1] = {0.0f};
  for (int tile = 0; tile < packs; tile += step) {
    reload(tile);
    for_each_pack<K>(tile, packs, [&](int k, int) {
#pragma unroll
      for (int e = 0; e < kPack; ++e) {
        const float centered = to_float(v[k].v[e]) - mean;
        squares[0] += centered * centered;
      }
    });
  }
  group_sum(squares);
  // 1 / sqrtf (both correctly rounded without fast math): within ~1 ulp, where rsqrtf is ~2.
  const float rstd = 1.0f / sqrtf(squares[0] / static_cast<float>(dim) + a.eps);
  T* h = static_cast<T*>(a.h) + row * dim;
  for (int tile = 0; tile < packs; tile += step) {
    reload(tile);
    for_each_pack<K>(tile, packs, [&](int k, int j) {
      const auto shift = load_pack<kPack>(row_start<T>(a.shift, b, t), j);
      const auto scale = load_pack<kPack>(row_start<T>(a.scale, b, t), j);
      Pack<T, kPack> out;
#pragma unroll
      for (int e = 0; e < kPack; ++e) {
        out.v[e] = from_float<T>(common::modulate((to_float(v[k].v[e]) - mean) * rstd,
                                                  to_float(shift.v[e]), to_float(scale.v[e])));
      }
      store_pack(h, j, out);
    });
  }
  if (threadIdx.x == 0) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

// Block (32w, rows at once), rows [blockIdx.x * rows_per_block, +rows_per_block). Bytes: x
// (+ gate, y read and x_new written when fused) read once, h written, params (L2) per row.
template <typename T, int kPack, int K, bool kLooped>
__global__ void __launch_bounds__(kMaxThreads)
    adaln_forward_kernel(AdalnForwardArgs a, int64_t rows_per_block) {
  const int packs = static_cast<int>(a.shape.dim / kPack);
  const int64_t begin = blockIdx.x * rows_per_block;
  const int64_t end = min64(a.shape.batch * a.shape.tokens, begin + rows_per_block);
  for_group_rows(begin, end,
                 [&](int64_t row) { forward_row<T, kPack, K, kLooped>(a, row, packs); });
}

// One row of launch_adaln_backward. The first pass writes the gated residual's dy and the
// per-token parameter grads, or adds per-sample ones to sums (unless kLooped: sum_columns_kernel
// adds those); the second writes adaLN's dx from gs and xhat, kept from the first unless kLooped.
template <typename T, int kPack, int K, bool kLooped>
__device__ __forceinline__ void backward_row(const AdalnBackwardArgs& a, int64_t row, int packs,
                                             float (&sums)[2][K][kPack]) {
  const int64_t dim = a.shape.dim, b = row / a.shape.tokens, t = row - b * a.shape.tokens;
  const T* grad = row_start<T>(a.grad, b, t);
  const T* input = row_start<T>(a.input, b, t);
  const T* param = row_start<T>(a.param, b, t);
  const float mean = a.gated ? 0.0f : a.mean[row], rstd = a.gated ? 0.0f : a.rstd[row];
  const bool per_token = !a.per_sample;
  T* grad_input = static_cast<T*>(a.grad_input) + row * dim;
  T* param_grad = per_token ? static_cast<T*>(a.param_grad) + row * dim : nullptr;
  T* scale_grad = per_token && !a.gated ? static_cast<T*>(a.scale_grad) + row * dim : nullptr;
  const int step = K * static_cast<int>(blockDim.x);
  float gs[K][kPack], xhat[K][kPack];  // gs = g (1 + scale)
  const auto load_gs_xhat = [&](int k, int j) {
    const auto g = load_pack<kPack>(grad, j), x = load_pack<kPack>(input, j);
    const auto scale = load_pack<kPack>(param, j);
#pragma unroll
    for (int e = 0; e < kPack; ++e) {
      gs[k][e] = to_float(g.v[e]) * (to_float(scale.v[e]) + 1.0f);
      xhat[k][e] = (to_float(x.v[e]) - mean) * rstd;
    }
    return g;
  };
  float means[2] = {0.0f, 0.0f};  // sums of gs and gs xhat over the row, then means
  for (int tile = 0; tile < packs; tile += step) {
    for_each_pack<K>(tile, packs, [&](int k, int j) {
      Pack<T, kPack> g, dparam, dscale;
      float v[kPack];  // what g multiplies in the parameter grads
      if (a.gated) {
        g = load_pack<kPack>(grad, j);
        const auto y = load_pack<kPack>(input, j), gate = load_pack<kPack>(param, j);
        Pack<T, kPack> dy;
#pragma unroll
        for (int e = 0; e < kPack; ++e) {
          v[e] = to_float(y.v[e]);
          dy.v[e] = from_float<T>(to_float(gate.v[e]) * to_float(g.v[e]));
        }
        store_pack(grad_input, j, dy);
      } else {
        g = load_gs_xhat(k, j);
#pragma unroll
        for (int e = 0; e < kPack; ++e) {
          v[e] = xhat[k][e];
          means[0] += gs[k][e];
          means[1] += gs[k][e] * xhat[k][e];
        }
      }
#pragma unroll
      for (int e = 0; e < kPack; ++e) {
        const float2 terms = param_grads(a.gated, to_float(g.v[e]), v[e]);
        if (per_token) {
          dparam.v[e] = from_float<T>(terms.x);
          dscale.v[e] = from_float<T>(terms.y);
        } else if constexpr (!kLooped) {
          sums[0][k][e] += terms.x;
          sums[1][k][e] += terms.y;
        }
      }
      if (param_grad) store_pack(param_grad, j, dparam);
      if (scale_grad) store_pack(scale_grad, j, dscale);
    });
  }
  if (a.gated) return;
  group_sum(means);
  means[0] /= static_cast<float>(dim);
  means[1] /= static_cast<float>(dim);
  const T* grad_x_new = a.grad_x_new.data ? row_start<T>(a.grad_x_new, b, t) : nullptr;
  for (int tile = 0; tile < packs; tile += step) {
    for_each_pack<K>(tile, packs, [&](int k, int j) {
      if constexpr (kLooped) load_gs_xhat(k, j);
      Pack<T, kPack> dx_new{}, dx;
      if (grad_x_new) dx_new = load_pack<kPack>(grad_x_new, j);
#pragma unroll
      for (int e = 0; e < kPack; ++e) {
        dx.v[e] = from_float<T>(
            common::layer_norm_input_grad(gs[k][e], xhat[k][e], rstd, means[0], means[1]) +
            to_float(dx_new.v[e]));
      }
      store_pack(grad_input, j, dx);
    });
  }
}

// Block (32w, rows at once), rows [blockIdx.x * rows_per_block, +rows_per_block), cut at
// sample ends when per-sample grads sum in registers. Bytes: grad, input (+ grad_x_new) read
// once, grad_input written; per-token parameter grads written, per-sample ones 16 D a block.
template <typename T, int kPack, int K, bool kLooped>
__global__ void __launch_bounds__(kMaxThreads)
    adaln_backward_kernel(AdalnBackwardArgs a, int64_t rows_per_block, float* partial) {
  const int packs = static_cast<int>(a.shape.dim / kPack);
  const int64_t tokens = a.shape.tokens, begin = blockIdx.x * rows_per_block;
  const int64_t end = min64(a.shape.batch * tokens, begin + rows_per_block);
  const bool sums_in_registers = a.per_sample && !kLooped;
  for (int64_t first = begin; first < end;) {
    const int64_t b = first / tokens;
    const int64_t last = sums_in_registers ? min64(end, (b + 1) * tokens) : end;
    float sums[2][K][kPack] = {};
    for_group_rows(first, last, [&](int64_t row) {
      backward_row<T, kPack, K, kLooped>(a, row, packs, sums);
    });
    if constexpr (!kLooped) {
      if (sums_in_registers) flush_sample_sums<T, kPack, K>(a, sums, b, begin, end, packs, partial);
    }
    first = last;
  }
}

bool valid_shape(const AdalnShape& s) {
  return s.batch >= 0 && s.tokens >= 0 && s.dim >= 1 && s.dim <= (int64_t{1} << 30);
}

// f(T{}, pack, kernel, grid, sums_in_registers) with the backward kernel and grid of a's layout.
template <typename F>
cudaError_t with_backward_plan(const AdalnBackwardArgs& a, F&& f) {
  const AdalnShape& s = a.shape;
  return dispatch_gpu_float(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool fit = packs_fit(s.dim, 16 / sizeof(T), {a.grad, a.input, a.param, a.grad_x_new},
                               {a.grad_input, a.param_grad, a.scale_grad});
    return dispatch_row_kernel<T, kBackwardRowBytes>(
        s.dim, fit, [&](auto pack, auto k, auto looped, const RowShape& shape) {
          constexpr bool kLooped = decltype(looped)::value;
          const auto kernel = adaln_backward_kernel<T, decltype(pack)::value, decltype(k)::value,
                                                    kLooped>;
          const bool sums_in_registers = a.per_sample && !kLooped;
          const int rows_at_once =
              static_cast<int>(sums_in_registers ? min64(kRowsPerBlock, s.tokens) : kRowsPerBlock);
          Grid grid;
          const cudaError_t err = plan_grid(kernel, shape, s.batch * s.tokens, rows_at_once, &grid);
          return err != cudaSuccess ? err : f(tag, pack, kernel, grid, sums_in_registers);
        });
  });
}

bool valid_backward(const AdalnBackwardArgs& a) {
  const bool outputs = a.param_grad && (a.gated || a.scale_grad);
  if (!valid_shape(a.shape) || (a.gated && a.grad_x_new.data)) return false;
  if (a.shape.batch * a.shape.tokens == 0) return outputs || !a.per_sample || a.shape.batch == 0;
  return outputs && a.grad.data && a.input.data && a.param.data && a.grad_input &&
         (a.gated || (a.mean && a.rstd));
}

}  // namespace

cudaError_t launch_adaln_forward(const AdalnForwardArgs& a, cudaStream_t stream) {
  const AdalnShape& s = a.shape;
  const int64_t rows = s.batch * s.tokens;
  if (!valid_shape(s)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const bool residual = a.gate.data && a.y.data && a.x_new;
  const bool normalize = a.h && a.shift.data && a.scale.data && a.mean && a.rstd;
  if (!a.x.data || (a.gate.data && !residual) || !(normalize || residual) || (a.h && !normalize)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_gpu_float(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool fit = packs_fit(s.dim, 16 / sizeof(T), {a.x, a.shift, a.scale, a.gate, a.y},
                               {a.h, a.x_new});
    return dispatch_row_kernel<T, kForwardRowBytes>(
        s.dim, fit, [&](auto pack, auto k, auto looped, const RowShape& shape) {
          const auto kernel = adaln_forward_kernel<T, decltype(pack)::value, decltype(k)::value,
                                                   decltype(looped)::value>;
          Grid grid;
          const cudaError_t err = plan_grid(kernel, shape, rows, kRowsPerBlock, &grid);
          if (err != cudaSuccess) return err;
          kernel<<<grid.blocks, grid.block, 0, stream>>>(a, grid.rows_per_block);
          return cudaGetLastError();
        });
  });
}

cudaError_t adaln_backward_workspace_floats(const AdalnBackwardArgs& a, int64_t* floats) {
  *floats = 0;
  if (!valid_backward(a)) return cudaErrorInvalidValue;
  if (a.shape.batch * a.shape.tokens == 0) return cudaSuccess;
  return with_backward_plan(a, [&](auto, auto, auto, const Grid& grid, bool sums_in_registers) {
    *floats = sums_in_registers ? partial_offset(grid.blocks, 0, 0, a.shape.dim) : 0;
    return cudaSuccess;
  });
}

cudaError_t launch_adaln_backward(const AdalnBackwardArgs& a, float* workspace,
                                  cudaStream_t stream) {
  if (!valid_backward(a)) return cudaErrorInvalidValue;
  const AdalnShape& s = a.shape;
  if (s.batch * s.tokens == 0) {  // per-sample grads over no tokens are zeros
    if (!a.per_sample || s.batch == 0) return cudaSuccess;
    return dispatch_gpu_float(s.dtype, [&](auto tag) {
      const size_t bytes = static_cast<size_t>(s.batch * s.dim) * sizeof(tag);
      const cudaError_t err = cudaMemsetAsync(a.param_grad, 0, bytes, stream);
      return err != cudaSuccess || a.gated ? err : cudaMemsetAsync(a.scale_grad, 0, bytes, stream);
    });
  }
  return with_backward_plan(a, [&](auto tag, auto pack, auto kernel, const Grid& grid,
                                   bool sums_in_registers) {
    using T = decltype(tag);
    if (sums_in_registers && workspace == nullptr) return cudaErrorInvalidValue;
    kernel<<<grid.blocks, grid.block, 0, stream>>>(a, grid.rows_per_block, workspace);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || !a.per_sample) return err;
    if (sums_in_registers) {
      sum_split_samples_kernel<T><<<blocks_for(s.batch * s.dim, kSumThreads), kSumThreads, 0,
                                    stream>>>(a, grid.rows_per_block, workspace);
    } else {
      constexpr int kPack = decltype(pack)::value;
      sum_columns_kernel<T, kPack><<<blocks_for(s.batch * (s.dim / kPack), kSumThreads),
                                     kSumThreads, 0, stream>>>(a);
    }
    return cudaGetLastError();
  });
}

}  // namespace vqkernels::cuda
