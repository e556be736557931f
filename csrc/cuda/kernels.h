#pragma once
// Raw-pointer launchers of the CUDA kernels. This header and the .cu files
// include no torch headers, which keeps nvcc fast; csrc/cuda/launchers.cpp
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

// Residual search (csrc/cuda/residual_search.cu) of z (n, dim <= kResidualMaxDim)
// through stages.count codebooks concatenated in books (rows [start[q],
// start[q + 1]) for stage q), all contiguous and of dtype (fp32 / fp16 / bf16).
// Writes indices (n, count) and the sum of the chosen codes out (n, dim).
constexpr int kMaxResidualStages = 64;
constexpr int64_t kResidualMaxDim = 64;
struct ResidualStages {  // by value: no device copy of the stage table
  int count;
  int64_t start[kMaxResidualStages + 1];
};
cudaError_t launch_residual_nearest_code(const void* z, const void* books,
                                         const ResidualStages& stages, DType dtype, int64_t n,
                                         int64_t dim, int64_t* indices, void* out,
                                         cudaStream_t stream);

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

// The finalize above for every stage of a residual quantizer, in two launches for all:
// stage q's state, counts (K_q,) fp32 and sums (K_q, dim) fp32 in stages.stage[q]
// (contiguous; the codebooks all of codebook_dtype); params as make_ema_params
// makes them, but for k_eps, which each stage takes as K_q eps (eps in stages.eps);
// totals is a stages.count-float scratch.
constexpr int kMaxEmaStages = 64;
struct EmaStage {
  float* cluster_size;
  float* embed_sum;
  void* codebook;
  const float* counts;
  const float* sums;
  int64_t k;
};
struct EmaStages {  // by value (3 KB of the 4 KB of launch arguments): no device copy
  int count;
  int64_t dim;
  double eps;
  EmaStage stage[kMaxEmaStages];
};
cudaError_t launch_ema_finalize_stages(const EmaStages& stages, DType codebook_dtype,
                                       const common::EmaParams& params, float* totals,
                                       cudaStream_t stream);

// One fused DDIM step (csrc/cuda/ddim.cu) of a checked record (csrc/common/ddim.h).
cudaError_t launch_ddim_step(const common::DdimStep& step, cudaStream_t stream);

// Head dims with a compiled attention kernel (each a multiple of 8, <= 128),
// ascending; Python reads them from the extension (attention_head_dims_cuda).
#define VQK_ATTENTION_HEAD_DIMS(X) X(16) X(32) X(40) X(48) X(64) X(72) X(80) X(96) X(128)

inline bool attention_head_dim_compiled(int64_t d) {
#define VQK_IS_DIM(DIM) || d == DIM
  return false VQK_ATTENTION_HEAD_DIMS(VQK_IS_DIM);
#undef VQK_IS_DIM
}

// Longest sq / sk the attention kernel indexes with 32-bit ints.
inline constexpr int64_t kMaxAttentionLength = INT32_MAX - 128;

// Forward non-causal attention (csrc/cuda/attention.cu): for each (b, h),
// out = softmax(scale q k^T) v and lse = log(sum_j exp(scale q k_j)) (natural
// log). q (batch, heads, sq, d), k and v (batch, heads, sk, d) of dtype Float16
// or BFloat16, strided: *_strides are host arrays of 4 element strides (B, H, S,
// d) and the d stride must be 1. Writes out (batch, heads, sq, d) contiguous of
// dtype and lse (batch, heads, sq) contiguous fp32. Needs sk >= 1 and a d of
// VQK_ATTENTION_HEAD_DIMS; sq == 0 (or an empty batch) is a no-op, whatever sk.
// Pointers and strides that are multiples of 16 bytes take cp.async; any other
// (2-byte aligned) layout works through a slower plain-load path. Returns
// cudaErrorInvalidValue for another dtype or d, a d stride != 1, sk < 1 or
// sq / sk > kMaxAttentionLength; cudaErrorNotSupported before sm_80. Callers
// check each of these first, so that the user is told the real cause.
cudaError_t launch_attention_forward(const void* q, const void* k, const void* v, DType dtype,
                                     int64_t batch, int64_t heads, int64_t sq, int64_t sk,
                                     int64_t d, const int64_t* q_strides, const int64_t* k_strides,
                                     const int64_t* v_strides, float scale, void* out, float* lse,
                                     cudaStream_t stream);

// --- adaLN family (csrc/cuda/adaln.cu; spec vqkernels/reference/adaln.py) ---------------

// A (B, T, D) tensor read in place with unit stride along D: row (b, t) starts
// batch_stride * b + token_stride * t elements after data. A per-sample (B, D)
// parameter has token_stride 0; data == nullptr: not given.
struct StridedRows {
  const void* data = nullptr;
  int64_t batch_stride = 0, token_stride = 0;
};

// (B, T, D) and the one element type (Float32, Float16 or BFloat16) of a call. The
// launchers return cudaErrorInvalidValue for another dtype, a D outside [1, 2^30] or a
// pointer missing; their callers check first, so that the user is told the real cause.
struct AdalnShape {
  int64_t batch = 0, tokens = 0, dim = 0;
  DType dtype = DType::Float32;
};

// h = modulate(layer_norm(x_new), shift, scale) with x_new = x + gate * y
// rounded to dtype when gate and y are given (then written to x_new), else
// x_new = x. h == nullptr: the gated residual alone (x_new written; shift,
// scale, mean, rstd unused). Outputs contiguous: h, x_new (B, T, D); mean,
// rstd (B, T) fp32. Needs 1 <= dim <= 2^30.
struct AdalnForwardArgs {
  AdalnShape shape;
  StridedRows x, shift, scale, gate, y;
  float eps = 0.0f;
  void *h = nullptr, *x_new = nullptr;
  float *mean = nullptr, *rstd = nullptr;
};
cudaError_t launch_adaln_forward(const AdalnForwardArgs& args, cudaStream_t stream);

// adaln_backward (gated false: grad = dL/dh, input = the normalized x, param =
// scale, with mean, rstd (B, T) fp32 contiguous and grad_x_new optional;
// writes grad_input = grad_x, param_grad = grad_shift, scale_grad = grad_scale)
// or gated_residual_backward (gated true: grad = dL/dx_new, input = y, param
// = gate; writes grad_input = grad_y, param_grad = grad_gate). Outputs are
// contiguous: grad_input (B, T, D), parameter grads (B, D) summed over T when
// per_sample, else (B, T, D). Per-sample sums are deterministic; they need a
// workspace of adaln_backward_workspace_floats fp32 (zero: none) for the same
// args on the same device.
struct AdalnBackwardArgs {
  AdalnShape shape;
  bool gated = false, per_sample = true;
  StridedRows grad, input, param, grad_x_new;
  const float *mean = nullptr, *rstd = nullptr;
  void *grad_input = nullptr, *param_grad = nullptr, *scale_grad = nullptr;
};
cudaError_t adaln_backward_workspace_floats(const AdalnBackwardArgs& args, int64_t* floats);
cudaError_t launch_adaln_backward(const AdalnBackwardArgs& args, float* workspace,
                                  cudaStream_t stream);

}  // namespace vqkernels::cuda
